"""The demo shows real science in its first minute: the bundled real Chula cells through a pretrained backbone
(EfficientNet-Lite0, ImageNet weights from its package) and through the same network at random init, probed
on the same splits: the pretrained cache separates the 13 morphologies far better."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import embedcache
from embedcache_cli.demo import BUNDLED, DemoResult, demo
from embedcache_cli.embedcache_app import app


@pytest.fixture(scope="module")
def shown(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    steps: list[str] = []
    result = demo(out, progress=False, on_step=lambda s, v: steps.append(s))
    return out, result, steps


def test_demo_extracts_real_cells_twice_and_probes_both(shown):
    out, r, steps = shown
    assert isinstance(r, DemoResult) and steps == ["cells", "extract", "extract-random", "store", "probes"]
    assert r.cells == BUNDLED and r.extract.n_cells == 832
    assert r.extract.key == "efficientnet-lite0/224-bicubic/clean"
    assert r.random.key == "efficientnet-lite0@random/224-bicubic/clean"
    ds = embedcache.open_store(r.store).dataset()
    assert ds.feature_set(r.extract.key).attrs["provenance"]["weights"]["source"] == "package"
    assert ds.feature_set(r.random.key).attrs["provenance"]["weights"]["source"] == "random"
    f1 = r.macro_f1()
    for probe in ("logistic", "knn"):
        pretrained, random = f1[(r.extract.key, probe)], f1[(r.random.key, probe)]
        assert pretrained > 0.55 and pretrained > random + 0.15, (probe, pretrained, random)


def test_demo_command_prints_the_comparison_and_reruns_as_a_cache_hit(shown):
    out, r, _ = shown
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert res.output.count("cache hit") == 2 and "why the cache is worth having" in res.output
    scores = r.macro_f1()
    assert f"{scores[(r.extract.key, 'logistic')]:.3f}" in res.output  # the same splits: the same numbers


def test_demo_without_the_bundled_cells_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data"):
        demo(tmp_path / "d", data=tmp_path / "nothing-here.csv", probe=False, progress=False)
