"""The demo (:func:`demo`): the main job on real cells, and why a pretrained backbone's cache is worth having.

It extracts the 832 real Chula RBC-12 cells bundled in ``tests/data`` (13 red-cell morphologies, 64 each) with
``efficientnet-lite0`` (real ImageNet weights that install with the package: no network) and with the same
network at random init, fits logistic and kNN probes on both feature sets (the same splits), and prints
their macro-F1 side by side.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["BUNDLED", "demo", "DemoResult"]

BUNDLED = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "chula_rbc12" / "manifest.csv"


@dataclass
class DemoResult:
    """What :func:`demo` made: the cells, the store, the pretrained and random-init feature sets, the study."""

    cells: pathlib.Path
    store: str
    extract: Any  # embedcache.ExtractResult of the pretrained backbone
    random: Any | None  # ... and of its random-init copy (None: compare_random=False)
    info: dict  # the store's info()
    evaluation: Any | None = None  # probes' StudyResult of logistic + kNN on both, or None (probe=False)
    eval_out: pathlib.Path | None = None

    def macro_f1(self) -> dict[tuple[str, str], float]:
        """``{(feature set, probe): mean test macro-F1}`` of the study (empty without one)."""
        if self.evaluation is None:
            return {}
        r = self.evaluation.results
        main = r[(r["metric"] == "macro_f1") & (r["class"] == "")]
        return {(str(k), str(p)): float(v) for (k, p), v in main.groupby(["backbone", "probe"])["value"].mean().items()}


def demo(
    out: str | os.PathLike = "demo_out",
    *,
    data: str | os.PathLike | None = None,
    model: str = "efficientnet-lite0",
    compare_random: bool = True,
    probe: bool = True,
    progress: bool = True,
    show: bool = False,
    on_step: Callable[[str, Any], None] | None = None,
) -> DemoResult:
    """Extract ``data`` (default: the bundled real Chula cells) with ``model`` and, with ``compare_random``, with
    its random-init copy into ``out/cache.zarr``; read the store's summary; and (``probe``) fit logistic and kNN
    probes on every feature set into ``out/eval`` (``show`` prints the summary).

    ``on_step(step, value)`` is called after each step: ``("cells", manifest)``, ``("extract", ExtractResult)``,
    ``("extract-random", ExtractResult)``, ``("store", url)`` and ``("probes", StudyResult)``.
    """
    from embedcache.extraction.runner import extract
    from embedcache.store import open_store

    def step(name: str, value: Any) -> None:
        if on_step is not None:
            on_step(name, value)

    cells = pathlib.Path(data) if data is not None else BUNDLED
    if not cells.exists():
        raise FileNotFoundError(
            f"the demo's cells are not at {cells}: it runs from a source checkout (tests/data holds 832 real "
            "Chula RBC-12 cells); pass data=... (--data) to an ImageFolder or manifest of your own cells"
        )
    step("cells", cells)
    root = pathlib.Path(out)
    store = str(root / "cache.zarr")
    kw = dict(chunk_size=512, progress=progress, label_column="label_name" if data is None else "label")
    pretrained = extract(model, cells, store, **kw)
    step("extract", pretrained)
    random = None
    if compare_random:
        random = extract(model, cells, store, weights="random", **kw)
        step("extract-random", random)
    result = DemoResult(cells, store, pretrained, random, open_store(store).info())
    step("store", store)
    if probe:
        from probes import evaluate  # probes builds on embedcache: imported only when the demo probes

        keys = [pretrained.key] + ([random.key] if random is not None else [])
        result.eval_out = root / "eval"
        result.evaluation = evaluate(
            store, keys, probes="logistic,knn", out=result.eval_out, show=show, quiet=not progress
        )
        step("probes", result.evaluation)
    return result
