"""The data-set issue tabs of the audit report: duplicate sets side by side, leaks across the split, outliers
beside their nearest neighbours. Each tab is a table that sorts by any column (click its header) and filters
by text, like the suspects table; every image is inlined (JPEG strips), nothing is fetched."""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from probes.reporting.contact import DIFFERENT_COLOUR, QUERY_COLOUR, SAME_COLOUR, Tile, data_uri, encode, render
from probes.reporting.text import one_line

MAX_STRIP = 8  # cells per strip (a duplicate set, an outlier and its neighbours)

# tabs, and sorting / text filtering of every table.sortable: plain inline JS
TABS_JS = """
(function () {
  var buttons = document.querySelectorAll("button.tab");
  function show(name) {
    document.querySelectorAll("section.tab").forEach(function (s) { s.hidden = s.id !== "tab-" + name; });
    buttons.forEach(function (b) { b.classList.toggle("on", b.getAttribute("data-tab") === name); });
  }
  buttons.forEach(function (b) { b.addEventListener("click", function () { show(b.getAttribute("data-tab")); }); });
  if (buttons.length) show(buttons[0].getAttribute("data-tab"));
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows), dir = 1, col = -1;
    function key(row, i) {
      var cell = row.cells[i], v = cell.getAttribute("data-v");
      return v === null ? cell.textContent.toLowerCase() : parseFloat(v);
    }
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      if (!th.classList.contains("sort")) return;
      th.addEventListener("click", function () {
        dir = col === i ? -dir : (th.getAttribute("data-desc") ? -1 : 1); col = i;
        rows.sort(function (a, b) { var x = key(a, i), y = key(b, i); return (x < y ? -1 : x > y ? 1 : 0) * dir; });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
    var box = document.querySelector("input.filter[data-for='" + table.id + "']");
    if (box) box.addEventListener("input", function () {
      var t = box.value.toLowerCase();
      rows.forEach(function (r) { r.style.display = r.textContent.toLowerCase().indexOf(t) >= 0 ? "" : "none"; });
    });
  });
})();
"""

TABS_CSS = """
button.tab{font-size:14px;padding:6px 14px;margin:0 4px 12px 0;border:1px solid #bbb;background:#f6f6f6;cursor:pointer}
button.tab.on{background:#333;color:#fff;border-color:#333}
"""


def _esc(v: Any) -> str:
    return html.escape(one_line(v))


def _strip(tiles: list[Tile], tile: int) -> str:

    return data_uri(encode(render([tiles[:MAX_STRIP]], tile=tile), "JPEG"), "image/jpeg")


def _table(table_id: str, columns: list[tuple[str, bool]], rows: list[str], note: str) -> str:
    """A sortable table (``columns``: name and whether it sorts descending first) with its text filter."""
    head = "".join(f"<th class=sort{' data-desc=1' if d else ''}>{_esc(c)}</th>" for c, d in columns)
    return (
        f"<p class=note>{note} Click a column header to sort.</p>"
        f"<div class=controls><label>text <input type=search class=filter data-for={table_id} "
        "placeholder='id, class, part, reason'></label></div>"
        f"<table id={table_id} class=sortable><thead><tr>{head}<th>cells</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _num(v: Any, digits: int = 3) -> str:
    f = float(v)
    shown = "" if np.isnan(f) else f"{f:.{digits}f}"
    return f"<td class=num data-v='{-1 if np.isnan(f) else f:.6g}'>{shown}</td>"


def duplicates_section(found: Any, obs: pd.DataFrame, top: int = 50, tile: int = 64) -> str:
    """The ``top`` largest duplicate sets (ties: most similar first), each as a strip of its cells."""
    cells = found.duplicates.cells
    in_set = cells[cells["duplicate_set"] >= 0]
    if in_set.empty:
        return "<p>No duplicate cells: no two cells share their pixels or reach the cosine threshold.</p>"
    labels, paths = obs["label"].astype(str).to_numpy(), obs["path"].astype(str).to_numpy()
    sets = in_set.groupby("duplicate_set").agg(
        size=("id", "size"), similarity=("max_similarity", "max"), pixel=("evidence", lambda e: (e == "pixel").any())
    )
    sets = sets.sort_values(["size", "similarity"], ascending=False).head(top)
    rows = []
    for s, r in sets.iterrows():
        members = np.flatnonzero(cells["duplicate_set"].to_numpy() == s)
        tiles = [Tile(paths[j], str(cells["id"].iat[j]), labels[j], QUERY_COLOUR if k == 0 else SAME_COLOUR)
                 for k, j in enumerate(members)]  # fmt: skip
        mixed = len(set(labels[members])) > 1
        rows.append(
            f"<tr><td class=num data-v={s}>{s}</td><td class=num data-v={r['size']}>{r['size']}</td>"
            + _num(r["similarity"])
            + f"<td>{'pixels' if r['pixel'] else 'features'}</td><td>{'yes' if mixed else ''}</td>"
            f"<td class=why>{_esc(', '.join(cells['id'].iloc[members].astype(str)))}</td>"
            f"<td><img class=strip alt='duplicate set {s}' src='{_strip(tiles, tile)}'></td></tr>"
        )
    columns = [("set", False), ("cells", True), ("max cosine", True), ("evidence", False), ("labels differ", True)]
    columns.append(("ids", False))
    threshold = found.duplicates.threshold
    note = (
        f"{len(in_set)} cells in {found.duplicates.n_sets} duplicate sets (same pixels, or cosine "
        f">= {threshold:g} on the features); the largest {len(sets)} here, all in issues.csv."
    )
    return _table("duplicates", columns, rows, note)


def leaks_section(found: Any, obs: pd.DataFrame, tile: int = 64) -> str:
    """Duplicate sets and groups with cells on more than one side of the split."""
    leaks = found.leaks
    if leaks is None:
        return "<p>Leaks were not audited.</p>"
    labels, paths = obs["label"].astype(str).to_numpy(), obs["path"].astype(str).to_numpy()
    ids = obs["id"].astype(str).to_numpy()
    position = {v: i for i, v in enumerate(ids)}
    rows = []
    for r in leaks.sets.itertuples(index=False):
        members = [position[str(c)] for c in r.cells if str(c) in position]
        tiles = [Tile(paths[j], ids[j], labels[j], QUERY_COLOUR if k == 0 else DIFFERENT_COLOUR)
                 for k, j in enumerate(members)]  # fmt: skip
        rows.append(
            f"<tr><td>duplicate set {r.duplicate_set}</td><td class=num data-v={r.size}>{r.size}</td>"
            f"<td>{_esc(r.parts)}</td><td class=why>{_esc(r.counts)}</td>"
            f"<td><img class=strip alt='leaking set' src='{_strip(tiles, tile)}'></td></tr>"
        )
    parts = [c for c in leaks.groups.columns if c not in ("group", "size", "n_parts")]
    for r in leaks.groups.to_dict("records"):
        counts = ", ".join(f"{p}: {int(r[p])}" for p in parts if r[p])
        rows.append(
            f"<tr><td>group {_esc(r['group'])}</td><td class=num data-v={r['size']}>{r['size']}</td>"
            f"<td>{_esc(r['n_parts'])} parts</td><td class=why>{_esc(counts)}</td><td></td></tr>"
        )
    note = (
        f"{len(leaks.sets)} duplicate sets and {len(leaks.groups)} groups with cells on more than one side of the "
        f"split ({_esc(leaks.note) or 'groups from the store'}): a probe tested on them has seen them in training."
    )
    if not rows:
        return "<p>No leaks: no duplicate set and no group has cells on two sides of the split.</p>"
    return _table("leaks", [("what", False), ("cells", True), ("parts", False), ("cells per part", False)], rows, note)


def outliers_section(found: Any, obs: pd.DataFrame, top: int = 50, tile: int = 64) -> str:
    """The ``top`` most outlying cells, each beside its nearest neighbours."""
    out = found.outliers
    if out is None:
        return "<p>Outliers were not audited.</p>"
    labels, paths = obs["label"].astype(str).to_numpy(), obs["path"].astype(str).to_numpy()
    ids = obs["id"].astype(str).to_numpy()
    ranked = out.ranking().head(top)
    rows = []
    for pos, r in ranked.iterrows():
        tiles = [Tile(paths[pos], f"#{r['rank']} {ids[pos]}", labels[pos], QUERY_COLOUR)]
        for j, s in zip(out.neighbors[pos], out.similarities[pos]):
            if j >= 0:
                colour = DIFFERENT_COLOUR if labels[j] != labels[pos] else SAME_COLOUR
                tiles.append(Tile(paths[j], f"{labels[j]}", f"{s:.2f}", colour))
        rows.append(
            f"<tr><td class=num data-v={r['rank']}>{r['rank']}</td><td class=mono>{_esc(r['id'])}</td>"
            f"<td>{_esc(labels[pos])}</td>"
            + _num(r["score"], 2)
            + _num(r["z"], 1)
            + f"<td class=flag data-v={int(r['flag'])}>{'✔' if r['flag'] else ''}</td>"
            f"<td class=why>{_esc(r['why'])}</td>"
            f"<td><img class=strip alt='outlier {_esc(r['id'])}' src='{_strip(tiles, tile)}'></td></tr>"
        )
    flagged = int(out.cells["flag"].sum())
    note = (
        f"{flagged} cells flagged (robust z > {out.z_threshold:g} of the log mean cosine distance to the {out.k} "
        f"nearest cells{', within the class' if out.by_class else ''}); the top {len(ranked)} here, beside their "
        "nearest neighbours (orange: another label)."
    )
    columns = [("rank", False), ("id", False), ("label", False), ("score", True), ("z", True), ("flag", True)]
    return _table("outliers", [*columns, ("why", False)], rows, note)


def tabs(sections: list[tuple[str, str, str]]) -> str:
    """Buttons and one ``<section>`` per ``(name, title, html)``; the first is shown."""
    buttons = "".join(f"<button class=tab data-tab={n}>{_esc(t)}</button>" for n, t, _ in sections)
    body = "".join(f"<section class=tab id=tab-{n}>{h}</section>" for n, _, h in sections)
    return f"<nav>{buttons}</nav>{body}"
