// Runs map.html's script in node with a minimal DOM (no browser here): every colouring drawn, a kept cell and a
// point without an image clicked. Prints JSON of what the page showed; any script error exits non-zero.
const fs = require('fs');
const vm = require('vm');
const page = fs.readFileSync(process.argv[2], 'utf8');
const script = page.split('<script>')[1].split('</script>')[0];
const calls = {arc: 0, fill: 0};
const ctx = new Proxy({}, {
  get: (t, k) => (k in t ? t[k] : (...a) => { calls[k] = (calls[k] || 0) + 1; }),
  set: (t, k, v) => { t[k] = v; return true; },
});
function el(tag) {
  let text = '';
  return {
    tag, children: [], style: {}, value: undefined,
    get textContent() { return text; },
    set textContent(v) { text = v; this.children = []; },  // as in a browser: the children go
    appendChild(c) { this.children.push(c); if (tag === 'select' && this.value === undefined) this.value = c.textContent; return c; },
    addEventListener(type, f) { this['on' + type] = f; },
    getBoundingClientRect() { return {left: 0, top: 0, width: 800, height: 600}; },
    getContext() { return ctx; },
  };
}
const ids = {colour: el('select')};
globalThis.document = {
  getElementById: (id) => ids[id] || (ids[id] = el(id)),
  createElement: el,
  createTextNode: (text) => ({text}),
};
globalThis.window = {};
globalThis.devicePixelRatio = 1;
vm.runInThisContext(script);
vm.runInThisContext(`
  const out = {points: D.x.length, colourings: D.colourings, kept: Object.keys(D.detail).length, drawn: {}};
  for (const c of D.colourings) { sel.value = c; sel.onchange(); out.drawn[c] = document.getElementById('legend').children.length; }
  const k = Number(Object.keys(D.detail)[0]);
  cv.onclick({clientX: sx(D.x[k]), clientY: sy(D.y[k])});
  const det = document.getElementById('detail').children;
  out.clicked = {id: D.id[pick], title: det[0].textContent, rows: det.length, neighbours: D.detail[k].nbrs.length};
  const bare = D.x.findIndex((_, i) => !(i in D.detail));
  if (bare >= 0) { show(bare); out.bare = document.getElementById('detail').children.map(c => c.textContent || c.text || '').join(' '); }
  console.log(JSON.stringify(out));
`);
