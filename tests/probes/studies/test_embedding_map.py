"""probes map / probes.embedding_map: a 2-D map of real features that keeps their neighbourhoods, one offline
page whose script runs (in node with a minimal DOM: no browser on this machine), a PNG, and clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

import probes
from probes.errors import ProbeError
from tests.paths import REPO

MODEL = "efficientnet-lite0"


@pytest.fixture(scope="module")
def mapped(real_store, tmp_path_factory):
    ids = probes.embedding_map(real_store, MODEL, thumbnails=1).points["id"]  # no files without out=
    suspects = pd.DataFrame({"id": ids[:100], "score": np.linspace(1, 0, 100)})
    out = tmp_path_factory.mktemp("map")
    return probes.embedding_map(real_store, MODEL, out=out, thumbnails=60, k=5, suspicion=suspects)


def test_the_map_keeps_label_neighbourhoods_of_real_features(mapped):
    """Cells of one morphology sit together on the map: a 5-NN vote in 2-D recovers labels far above chance
    (13 classes: 0.08), as it does in the 1,280-wide features."""
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    p = mapped.points
    assert len(p) == 832 and p["id"].is_unique and np.isfinite(p[["x", "y"]].to_numpy()).all()
    acc = cross_val_score(KNeighborsClassifier(5), p[["x", "y"]].to_numpy(), p["label"], cv=5).mean()
    assert acc > 0.4, acc
    assert {"label", "group", "suspicion"} <= set(p.columns)  # the bundled store's smear is its group
    assert p["suspicion"].notna().sum() == 100


def test_the_page_runs_and_shows_a_cell_with_its_neighbours(mapped):
    assert set(mapped.files) == {"map.html", "map.png", "map.csv", "map.json"}
    assert mapped.files["map.png"].stat().st_size > 10_000
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's script is not run")
    proc = subprocess.run(
        [node, str(REPO / "tests" / "probes" / "reporting" / "map_page.js"), str(mapped.files["map.html"])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["points"] == 832 and shown["kept"] == 60
    assert shown["colourings"] == ["label", "group", "suspicion"]
    assert shown["drawn"]["label"] == 13  # one legend entry per class
    assert shown["clicked"]["neighbours"] == 5 and shown["clicked"]["title"].startswith(shown["clicked"]["id"])
    assert "no image kept" in shown["bare"]


def test_bad_input_is_named(real_store, tmp_path):
    with pytest.raises(ProbeError, match="no audit table"):
        probes.embedding_map(real_store, MODEL, suspicion=tmp_path / "missing")
    with pytest.raises(ProbeError, match="columns id and score"):
        probes.embedding_map(real_store, MODEL, suspicion=pd.DataFrame({"id": ["a"]}))
    with pytest.raises(ProbeError, match="thumbnails must be"):
        probes.embedding_map(real_store, MODEL, thumbnails=-1)
