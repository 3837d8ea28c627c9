"""The embedding map as one offline HTML page (a canvas of every cell; click: image and nearest cells) and a PNG."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363",
]  # fmt: skip
TILE = 72


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def _thumbs(paths: list[str]) -> list[str]:
    from probes.reporting.contact import data_uri, encode, thumbnail

    return [data_uri(encode(thumbnail(p, TILE), "JPEG"), "image/jpeg") for p in paths]


def map_html(points: pd.DataFrame, sample: np.ndarray, nbrs: np.ndarray, sims: np.ndarray, params: dict) -> str:
    """The page: every point drawn on a canvas, coloured by a chosen column; the sampled cells (``sample``,
    positions) carry a thumbnail and their neighbours (positions ``nbrs``, similarities ``sims``)."""
    colourings = [c for c in ("label", "split", "domain", "group", "suspicion") if c in points.columns]
    data: dict[str, Any] = {
        "x": np.round(points["x"].to_numpy(dtype=float), 3).tolist(),
        "y": np.round(points["y"].to_numpy(dtype=float), 3).tolist(),
        "id": points["id"].astype(str).tolist(),
        "colourings": colourings,
        "cols": {},
    }
    for c in colourings:
        if c == "suspicion":
            v = points[c].to_numpy(dtype=float)
            data["cols"][c] = {
                "kind": "score",
                "values": [None if not np.isfinite(s) else round(float(s), 4) for s in v],
            }
        else:
            cats, codes = np.unique(points[c].astype(str).to_numpy(), return_inverse=True)
            data["cols"][c] = {"kind": "category", "names": cats.tolist(), "codes": codes.tolist()}
    thumbs = _thumbs(points["path"].iloc[sample].astype(str).tolist()) if len(sample) else []
    data["detail"] = {
        str(int(p)): {"img": t, "nbrs": [int(q) for q in n], "sims": [round(float(s), 4) for s in sm]}
        for p, t, n, sm in zip(sample, thumbs, nbrs, sims)
    }
    title = html.escape(f"{params.get('dataset', '')} · {params.get('feature_key', '')} · {len(points):,} cells")
    return (
        TEMPLATE.replace("__TITLE__", title)
        .replace("__PALETTE__", _script_json(PALETTE))
        .replace("__DATA__", _script_json(data))
        .replace("__PARAMS__", html.escape(json.dumps(params)))
    )


def map_png(points: pd.DataFrame, path: str | os.PathLike, *, title: str = "") -> Path:
    """A scatter of every cell coloured by label, for a paper figure."""
    from probes.reporting.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.5), dpi=150)
    labels = points["label"].astype(str).to_numpy()
    names = np.unique(labels)
    size = max(1.0, min(12.0, 20000 / max(1, len(points))))
    for i, name in enumerate(names):
        m = labels == name
        ax.scatter(points["x"][m], points["y"][m], s=size, c=PALETTE[i % len(PALETTE)], label=f"{name} ({m.sum():,})",
                   linewidths=0, alpha=0.8)  # fmt: skip
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, markerscale=max(1.0, 6 / size), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:13px system-ui,sans-serif;margin:0;display:flex;height:100vh}
#main{flex:1;display:flex;flex-direction:column;min-width:0}
#bar{padding:6px 10px;border-bottom:1px solid #ddd;display:flex;gap:12px;align-items:center;flex-wrap:wrap}
#wrap{flex:1;position:relative;min-height:0}
canvas{position:absolute;inset:0;width:100%;height:100%;cursor:crosshair}
#side{width:330px;overflow:auto;border-left:1px solid #ddd;padding:8px}
#legend span{display:inline-block;margin-right:8px;white-space:nowrap}
#legend i{display:inline-block;width:10px;height:10px;margin-right:3px;border-radius:5px}
.nb{display:flex;gap:6px;align-items:center;margin:3px 0}.nb img{width:48px;height:48px}
</style></head><body>
<div id="main"><div id="bar"><b>__TITLE__</b>
<label>colour by <select id="colour"></select></label><span id="legend"></span></div>
<div id="wrap"><canvas id="map"></canvas></div></div>
<div id="side"><p>Click a point: its image and its nearest cells (cells with an image are drawn with a dark rim).</p>
<div id="detail"></div><details><summary>parameters</summary><pre style="white-space:pre-wrap">__PARAMS__</pre>
</details></div>
<script>
const PAL=__PALETTE__, D=__DATA__;
const cv=document.getElementById('map'), ctx=cv.getContext('2d'), sel=document.getElementById('colour');
let W=0,H=0,sx=null,sy=null,pick=-1;
D.colourings.forEach(c=>{const o=document.createElement('option');o.textContent=c;sel.appendChild(o);});
function extent(a){let lo=Infinity,hi=-Infinity;for(const v of a){if(v<lo)lo=v;if(v>hi)hi=v;}return [lo,hi];}
const ex=extent(D.x), ey=extent(D.y);
function colourOf(i){const c=D.cols[sel.value];if(c.kind==='category')return PAL[c.codes[i]%PAL.length];
 const v=c.values[i];if(v===null)return '#ccc';const t=Math.max(0,Math.min(1,v));
 return `rgb(${Math.round(40+215*t)},${Math.round(90*(1-t))},${Math.round(200*(1-t))})`;}
function legend(){const c=D.cols[sel.value],el=document.getElementById('legend');el.textContent='';
 if(c.kind==='category'){c.names.forEach((n,k)=>{const s=document.createElement('span'),i=document.createElement('i');
  i.style.background=PAL[k%PAL.length];s.appendChild(i);s.appendChild(document.createTextNode(n));el.appendChild(s);});}
 else el.textContent='audit suspicion: blue (low) to red (high); grey: not scored';}
function draw(){const r=cv.getBoundingClientRect();W=r.width;H=r.height;cv.width=W*devicePixelRatio;cv.height=H*devicePixelRatio;
 ctx.setTransform(devicePixelRatio,0,0,devicePixelRatio,0,0);ctx.clearRect(0,0,W,H);
 const m=20;sx=v=>m+(v-ex[0])/(ex[1]-ex[0]||1)*(W-2*m);sy=v=>H-m-(v-ey[0])/(ey[1]-ey[0]||1)*(H-2*m);
 const n=D.x.length,rad=n>20000?1.5:n>2000?2.5:3.5;
 for(let i=0;i<n;i++){ctx.fillStyle=colourOf(i);ctx.beginPath();ctx.arc(sx(D.x[i]),sy(D.y[i]),rad,0,6.2832);ctx.fill();}
 ctx.strokeStyle='#222';for(const k in D.detail){ctx.beginPath();ctx.arc(sx(D.x[k]),sy(D.y[k]),rad+1,0,6.2832);ctx.stroke();}
 if(pick>=0){ctx.strokeStyle='#000';ctx.lineWidth=2;ctx.beginPath();ctx.arc(sx(D.x[pick]),sy(D.y[pick]),rad+5,0,6.2832);ctx.stroke();ctx.lineWidth=1;}}
function label(i){const c=D.cols.label;return c?c.names[c.codes[i]]:'';}
function show(i){pick=i;draw();const d=D.detail[i],el=document.getElementById('detail');el.textContent='';
 const h=document.createElement('h3');h.textContent=D.id[i]+' · '+label(i);el.appendChild(h);
 if(!d){const p=document.createElement('p');p.textContent='no image kept for this cell (the page keeps a sample); click a rimmed point';el.appendChild(p);return;}
 const im=document.createElement('img');im.src=d.img;im.width=144;el.appendChild(im);
 const t=document.createElement('p');t.textContent='nearest cells (cosine):';el.appendChild(t);
 d.nbrs.forEach((q,k)=>{const row=document.createElement('div');row.className='nb';const dq=D.detail[q];
  if(dq){const ni=document.createElement('img');ni.src=dq.img;row.appendChild(ni);}
  const s=document.createElement('span');s.textContent=`${D.id[q]} · ${label(q)} · ${d.sims[k].toFixed(3)}`;
  s.style.cursor='pointer';s.onclick=()=>show(q);row.appendChild(s);el.appendChild(row);});}
cv.addEventListener('click',e=>{const r=cv.getBoundingClientRect(),px=e.clientX-r.left,py=e.clientY-r.top;
 let best=-1,bd=Infinity;for(let i=0;i<D.x.length;i++){const dx=sx(D.x[i])-px,dy=sy(D.y[i])-py,dd=dx*dx+dy*dy;
  if(dd<bd){bd=dd;best=i;}}if(best>=0)show(best);});
sel.onchange=()=>{legend();draw();};window.onresize=draw;legend();draw();
</script></body></html>
"""
