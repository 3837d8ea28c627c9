"""A self-contained HTML audit report: every image is inlined as a base64 PNG (one file, no links)."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import pandas as pd

from probes.reporting.contact import data_uri, encode, render, suspect_rows
from probes.reporting.text import one_line

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1800px}
h1{font-size:22px;margin:0 0 6px} h2{font-size:17px;margin:22px 0 6px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:middle}
th{background:#f3f3f3;position:sticky;top:0} td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,Menlo,monospace;font-size:12px} .meta td{border:none;padding:1px 8px 1px 0}
.bar{display:inline-block;height:9px;background:#d33;vertical-align:middle}
img.strip{display:block;image-rendering:auto} .note{color:#555;font-size:13px}
th.sort{cursor:pointer;user-select:none} th.sort:after{content:" \\2195";color:#aaa}
th.asc:after{content:" \\25B2";color:#333} th.desc:after{content:" \\25BC";color:#333}
.controls{margin:8px 0;font-size:13px} .controls label{margin-right:14px} .why{font-size:12px;min-width:260px}
td.mono{overflow-wrap:break-word;max-width:180px} td.strip{border-top:none;padding-bottom:8px}
tbody.suspect>tr:first-child>td{border-bottom:none} small.nb{display:block;color:#666;font-size:11px}
img.strip{max-width:100%;height:auto} .meta td{overflow-wrap:anywhere}
iframe.map{width:100%;height:82vh;border:1px solid #ddd}
.why small{display:block;color:#666} td.flag{text-align:center;color:#c00;font-weight:bold}
"""

# Sorting and filtering of the suspects table in the browser: plain inline JS, no server, no CDN.
_JS = """
(function () {
  var table = document.getElementById("suspects");
  if (!table) return;
  var rows = Array.prototype.slice.call(table.tBodies);  // one tbody per suspect: numbers row + strip row
  var heads = table.tHead.rows[0].cells;
  function key(row, i) {
    var cell = row.rows[0].cells[i], v = cell.getAttribute("data-v");
    return v === null ? cell.textContent.toLowerCase() : parseFloat(v);
  }
  var state = { col: -1, dir: 1 };
  Array.prototype.forEach.call(heads, function (th, i) {
    if (!th.classList.contains("sort")) return;
    th.addEventListener("click", function () {
      state.dir = state.col === i ? -state.dir : (th.getAttribute("data-desc") ? -1 : 1);
      state.col = i;
      rows.sort(function (a, b) {
        var x = key(a, i), y = key(b, i);
        return (x < y ? -1 : x > y ? 1 : 0) * state.dir || (key(a, 0) - key(b, 0));
      });
      rows.forEach(function (r) { table.appendChild(r); });
      Array.prototype.forEach.call(heads, function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(state.dir > 0 ? "asc" : "desc");
    });
  });
  function val(id) { var e = document.getElementById(id); return e ? e.value : ""; }
  function on(id) { var e = document.getElementById(id); return !!(e && e.checked); }
  function apply() {
    var given = val("f-given"), proposed = val("f-proposed"), text = val("f-text").toLowerCase();
    var cl = on("f-cl"), models = on("f-models"), nbrs = on("f-nbrs"), shown = 0;
    rows.forEach(function (r) {
      var ok = (!given || r.getAttribute("data-given") === given) &&
        (!proposed || r.getAttribute("data-proposed") === proposed) &&
        (!cl || r.getAttribute("data-cl") === "1") &&
        (!models || parseFloat(r.getAttribute("data-consensus")) >= 0.5) &&
        (!nbrs || parseFloat(r.getAttribute("data-nbr")) >= 0.5) &&
        (!text || r.textContent.toLowerCase().indexOf(text) >= 0);
      r.style.display = ok ? "" : "none";
      if (ok) shown++;
    });
    document.getElementById("f-count").textContent = shown + " of " + rows.length + " shown";
  }
  ["f-given", "f-proposed", "f-text", "f-cl", "f-models", "f-nbrs"].forEach(function (id) {
    var e = document.getElementById(id);
    if (e) { e.addEventListener("input", apply); e.addEventListener("change", apply); }
  });
  apply();
})();
"""


def _esc(v: Any) -> str:
    """Text for HTML: one line (control characters as escapes), then entity-escaped."""
    return html.escape(one_line(v))


def _meta(params: dict[str, Any], res: Any) -> str:
    rows = [
        ("store", params.get("store", "(arrays)")),
        ("dataset", params.get("dataset", "")),
        ("backbones", ", ".join(f"{b} ({params['feature_keys'][b]})" for b in params["backbones"])),
        ("pool", params["pool"]),
        (
            "probes",
            ", ".join(
                f"{p} ({params['probe_impl'].get(p, '')})" if isinstance(params.get("probe_impl"), dict) else p
                for p in params["probes"]
            ),
        ),
        ("seeds", ", ".join(map(str, params["seeds"]))),
        ("folds", f"{params['folds']} ({params['scheme']})"),
        (
            "models",
            f"{params['n_models']} (backbone × probe, as each cell's why counts them) × {len(params['seeds'])} seeds = "
            f"{params['n_runs']} out-of-fold runs ({res.reused} reused from the cache, {res.computed} fitted)",
        ),
        ("cells audited", f"{params['n_cells']} ({params.get('n_classes', '?')} classes)"),
        ("k (neighbours)", params["k"]),
        ("label digest", params["label_digest"]),
        ("out-of-fold cache", params.get("cache") or "(none)"),
    ]
    rows += [("excluded", line) for line in params.get("excluded", [])]
    return (
        "<table class=meta>"
        + "".join(f"<tr><td><b>{_esc(a)}</b></td><td>{_esc(b)}</td></tr>" for a, b in rows)
        + "</table>"
    )


def _pairs(table: pd.DataFrame, top: int) -> str:
    """Given -> proposed label counts among the top suspects."""
    counts = table.head(top).groupby(["given_label", "proposed_label"]).size().sort_values(ascending=False)
    body = "".join(
        f"<tr><td>{_esc(g)}</td><td>{_esc(p)}</td><td class=num>{n}</td></tr>" for (g, p), n in counts.items()
    )
    return f"<table><tr><th>given</th><th>proposed</th><th>suspects</th></tr>{body}</table>"


def _options(values: Any) -> str:
    return "<option value=''>all</option>" + "".join(
        f"<option value='{_esc(v)}'>{_esc(v)}</option>" for v in sorted({str(v) for v in values})
    )


def _controls(sus: pd.DataFrame) -> str:
    """Filters of the suspects table: given and proposed class, evidence, free text."""
    return (
        "<div class=controls>"
        f"<label>given <select id=f-given>{_options(sus['given_label'])}</select></label>"
        f"<label>proposed <select id=f-proposed>{_options(sus['proposed_label'])}</select></label>"
        "<label><input type=checkbox id=f-cl> flagged by confident learning</label>"
        "<label><input type=checkbox id=f-models> most models disagree</label>"
        "<label><input type=checkbox id=f-nbrs> most neighbours disagree</label>"
        "<label>text <input type=search id=f-text placeholder='id, class, reason'></label>"
        "<span id=f-count class=note></span></div>"
    )


def _short(key: str) -> str:
    """A feature key's backbone part (``timm-test_vit@random/160-bicubic/clean`` -> ``timm-test_vit@random``)."""
    return key.split("/")[0]


def _num(v: float, digits: int = 2) -> str:
    return f"<td class=num data-v='{float(v):.6g}'>{float(v):.{digits}f}</td>"


def audit_html(
    res: Any,
    path: str | os.PathLike,
    *,
    neighbours: pd.DataFrame | None,
    top: int = 50,
    n_neighbours: int = 8,
    tile: int = 72,
) -> Path:
    """Write the report of an audit result (:class:`probes.AuditResult`) to ``path``, one tab per issue
    audited. Labels: parameters, the score formula, given->proposed counts and the ranked table of the
    ``top`` suspects, each row with its evidence, why it is suspected (which models disagree, which
    neighbours carry another label) and an inline strip (JPEG, ``tile`` px per cell) of the cell (red)
    beside its nearest neighbours (``neighbours``: ``query, rank, id, label, similarity, path`` rows;
    orange: another label). Duplicates, leaks, outliers: :mod:`probes.reporting.issues_html`. Tables sort
    by any column (click its header) and filter in the browser (inline script; nothing fetched)."""
    from probes.reporting import issues_html

    params = res.params
    wanted = params.get("issues", ["label"])
    sections = []
    if "label" in wanted:
        assert neighbours is not None
        sections.append(("labels", "Labels", _label_section(res, neighbours, top, n_neighbours, tile)))
    found = res.issues
    if found is not None:
        if "duplicate" in wanted:
            sections.append(("duplicates", "Duplicates", issues_html.duplicates_section(found, res.obs, top)))
        if "leak" in wanted:
            sections.append(("leaks", "Leaks", issues_html.leaks_section(found, res.obs)))
        if "outlier" in wanted:
            sections.append(("outliers", "Outliers", issues_html.outliers_section(found, res.obs, top)))
    if getattr(res, "map_page", ""):  # the embedding map's own page, inline (srcdoc): the report stays one file
        sections.append(
            (
                "map",
                "Map",
                "<p class=note>Every audited cell on a 2-D map of the first backbone (probes map); colour by audit "
                "suspicion to see where the suspects sit.</p>"
                f"<iframe class=map title='embedding map' srcdoc=\"{html.escape(res.map_page, quote=True)}\"></iframe>",
            )
        )
    notes = "".join(f"<li>{_esc(n)}</li>" for n in params.get("issue_notes", []))
    doc = f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>Audit: {_esc(params.get("dataset", ""))}</title>
<style>{_CSS}{issues_html.TABS_CSS}</style></head><body>
<h1>Audit — {_esc(params.get("dataset", "cells"))}</h1>
{f"<ul class=note>{notes}</ul>" if notes else ""}
{issues_html.tabs(sections)}
<script>{_JS}</script>
<script>{issues_html.TABS_JS}</script>
</body></html>
"""
    path = Path(path)
    path.write_text(doc, encoding="utf-8")
    return path


def _label_section(res: Any, neighbours: pd.DataFrame, top: int, n_neighbours: int, tile: int) -> str:
    """The label audit's tab: parameters, score, given -> proposed counts, the ranked suspects."""
    params = res.params
    sus = res.suspects(top)
    nb = neighbours
    strips = [
        data_uri(encode(render([row], tile=tile), "JPEG"), "image/jpeg") for row in suspect_rows(sus, nb, n_neighbours)
    ]
    per_bb = [c for c in sus.columns if c.startswith("neighbor_disagreement:")]
    sortable = [
        ("rank", ""),
        ("id", ""),
        ("given", ""),
        ("proposed", ""),
        ("votes", "d"),
        ("consensus", "d"),
        ("self-conf.", ""),
        ("CL flag", "d"),
        ("neighbour disagr.", "d"),
        ("score", "d"),
        ("why", ""),
    ]
    head = (
        "<thead><tr>"
        + "".join(f"<th class=sort{' data-desc=1' if d else ''}>{_esc(name)}</th>" for name, d in sortable)
        + "</tr></thead>"
    )
    strip_title = f"the cell (red) and its nearest neighbours in {params['backbones'][0]} (orange: another label)"
    body = []
    for (_, r), strip in zip(sus.iterrows(), strips):
        cl = bool(r.get("confident_learning", False))
        detail = "".join(
            f"<small>{_esc(label)}: {_esc(r[col])}</small>"
            for label, col in (("models", "models_disagreeing"), ("neighbours", "neighbors_disagreeing"))
            if col in r and str(r[col])
        )
        # several backbones: each one's share under the mean, its full key on hover (not a wide column each)
        per_backbone = "".join(
            f"<small class=nb title='{_esc(c.split(':', 1)[1])}'>{_esc(_short(c.split(':', 1)[1]))} {float(r[c]):.2f}"
            "</small>"
            for c in per_bb
        )
        nbr = float(r["neighbor_disagreement"])
        body.append(
            f"<tbody class=suspect data-given='{_esc(r['given_label'])}' data-proposed='{_esc(r['proposed_label'])}' "
            f"data-cl='{int(cl)}' data-consensus='{float(r['consensus']):.4f}' data-nbr='{nbr:.4f}'><tr>"
            f"<td class=num data-v='{r['rank']}'>{r['rank']}</td><td class=mono>{_esc(r['id'])}</td>"
            f"<td>{_esc(r['given_label'])}</td><td>{_esc(r['proposed_label'])}</td>"
            + _num(r["proposed_votes"])
            + _num(r["consensus"])
            + _num(r["self_confidence"], 3)
            + f"<td class=flag data-v='{int(cl)}'>{'✔' if cl else ''}</td>"
            + f"<td class=num data-v='{nbr:.6g}'>{nbr:.2f}{per_backbone}</td>"
            + f"<td class=num data-v='{float(r['score']):.6g}'><span class=bar style='width:{40 * r['score']:.0f}px'>"
            f"</span> {r['score']:.3f}</td>"
            f"<td class=why>{_esc(r.get('why', ''))}{detail}</td></tr>"
            f"<tr><td class=strip colspan={len(sortable)}><img class=strip title='{_esc(strip_title)}' "
            f"alt='cell {_esc(r['id'])} and its neighbours' src='{strip}'></td></tr></tbody>"
        )
    return f"""<p class=note>Cells ranked by how likely their label is wrong. Review the top rows; accept a proposed label by
keeping its row in <code>corrections-template.csv</code>, then run <code>probes relabel --store … --corrections FILE</code>.</p>
{_meta(params, res)}
<h2>Score</h2>
<p>ranking <code>{_esc(params.get("ranking", ""))}</code>: <code>{_esc(params["formula"])}</code></p>
<ul class=note>
<li><b>self-confidence</b> (label quality): probability of the given label in the ensemble of the {params["n_runs"]} out-of-fold runs (backbone × probe × seed; each cell predicted by probes trained on folds without it), each model first calibrated (uniform smoothing and a temperature fitted on the other folds' cells, never on the cells it scales);</li>
<li><b>CL flag</b>: cleanlab's confident learning (per-class thresholds, the confident joint, prune by noise rate) flags the label as an issue;</li>
<li><b>consensus</b>: fraction of the models whose top class is not the given label;</li>
<li><b>neighbour disagreement</b>: fraction of the cell's {params["k"]} nearest neighbours (cosine, FAISS, itself excluded) with another label, averaged over backbones;</li>
<li><b>proposed</b>: the label most models predict instead; <b>votes</b>: the fraction of models predicting it; <b>why</b>: the evidence in words, the models that disagree (model→class, probability) and the neighbours with another label (count, labels, ids).</li>
</ul>
<h2>Given → proposed among the top {len(sus)}</h2>
{_pairs(res.table, top)}
<h2>Top {len(sus)} suspects</h2>
<p class=note>Click a column header to sort; filter by class, evidence or text.</p>
{_controls(sus)}
<p class=note>Under each row: the cell (red) and its nearest neighbours in {_esc(params["backbones"][0])} (orange: another
label).</p>
<table id=suspects>{head}{"".join(body)}</table>
"""
