"""A self-contained HTML audit report: every image is inlined as a base64 PNG (one file, no links)."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

import pandas as pd

from .contact import encode, render, suspect_rows
from .text import one_line

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 6px} h2{font-size:17px;margin:22px 0 6px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:middle}
th{background:#f3f3f3;position:sticky;top:0} td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,Menlo,monospace;font-size:12px} .meta td{border:none;padding:1px 8px 1px 0}
.bar{display:inline-block;height:9px;background:#d33;vertical-align:middle}
img.strip{display:block;image-rendering:auto} .note{color:#555;font-size:13px}
"""


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data:`` URI of ``data`` (base64), for an image inlined in the page."""
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


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
            f"{params['n_models']} = backbones × probes × seeds ({res.reused} reused from the cache, {res.computed} fitted)",
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


def audit_html(
    res: Any, path: str | os.PathLike, *, neighbours: pd.DataFrame, top: int = 50, n_neighbours: int = 8, tile: int = 72
) -> Path:
    """Write the report of an audit result (:class:`probes.AuditResult`) to ``path``: parameters, the
    score formula, given->proposed counts and the ranked table of the ``top`` suspects, each row with
    an inline strip (JPEG, ``tile`` px per cell) of the cell (red) beside its nearest neighbours
    (``neighbours``: ``query, rank, id, label, similarity, path`` rows; orange: another label)."""
    params = res.params
    sus = res.suspects(top)
    nb = neighbours
    strips = [
        data_uri(encode(render([row], tile=tile), "JPEG"), "image/jpeg") for row in suspect_rows(sus, nb, n_neighbours)
    ]
    w = params["weights"]
    per_bb = [c for c in sus.columns if c.startswith("neighbor_disagreement:")]
    head = (
        "<tr><th>rank</th><th>id</th><th>given</th><th>proposed</th><th>votes</th><th>consensus</th>"
        "<th>self-conf.</th><th>neighbour disagr.</th>"
        + "".join(f"<th>nbr. {_esc(c.split(':', 1)[1])}</th>" for c in per_bb)
        + "<th>score</th><th>cell and nearest neighbours "
        f"({_esc(params['backbones'][0])})</th></tr>"
    )
    body = []
    for (_, r), strip in zip(sus.iterrows(), strips):
        body.append(
            f"<tr><td class=num>{r['rank']}</td><td class=mono>{_esc(r['id'])}</td><td>{_esc(r['given_label'])}</td>"
            f"<td>{_esc(r['proposed_label'])}</td><td class=num>{r['proposed_votes']:.2f}</td>"
            f"<td class=num>{r['consensus']:.2f}</td><td class=num>{r['self_confidence']:.3f}</td>"
            f"<td class=num>{r['neighbor_disagreement']:.2f}</td>"
            + "".join(f"<td class=num>{r[c]:.2f}</td>" for c in per_bb)
            + f"<td class=num><span class=bar style='width:{40 * r['score']:.0f}px'></span> {r['score']:.3f}</td>"
            f"<td><img class=strip alt='cell {_esc(r['id'])} and its neighbours' src='{strip}'></td></tr>"
        )
    doc = f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>Label audit: {_esc(params.get("dataset", ""))}</title>
<style>{_CSS}</style></head><body>
<h1>Label audit — {_esc(params.get("dataset", "cells"))}</h1>
<p class=note>Cells ranked by how likely their label is wrong. Review the top rows; accept a proposed label by
keeping its row in <code>corrections-template.csv</code>, then run <code>probes relabel --store … --corrections FILE</code>.</p>
{_meta(params, res)}
<h2>Score</h2>
<p><code>{_esc(params["formula"])}</code></p>
<ul class=note>
<li><b>consensus</b>: fraction of the {params["n_models"]} out-of-fold models (backbone × probe × seed) whose top class is not the given label;</li>
<li><b>self-confidence</b>: mean predicted probability of the given label over those models (each cell predicted by probes trained on folds without it);</li>
<li><b>neighbour disagreement</b>: fraction of the cell's {params["k"]} nearest neighbours (cosine, itself excluded) with another label, averaged over backbones;</li>
<li><b>proposed</b>: the label most models predict instead; <b>votes</b>: the fraction of models predicting it.</li>
</ul>
<p class=note>Weights: consensus {w["consensus"]:.3g}, 1 − self-confidence {w["confidence"]:.3g}, neighbour disagreement {w["neighbors"]:.3g}.
Every piece lies in [0, 1], so the score does too.</p>
<h2>Given → proposed among the top {len(sus)}</h2>
{_pairs(res.table, top)}
<h2>Top {len(sus)} suspects</h2>
<table>{head}{"".join(body)}</table>
</body></html>
"""
    path = Path(path)
    path.write_text(doc, encoding="utf-8")
    return path
