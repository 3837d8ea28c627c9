"""Sampling rules (FlagLimit, FlagMin, 80/20 stratified, column and group splits) on the real
Chula RBC-12 labels and smear ids (22,106 cells, 13 imbalanced classes, 621 smears)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from probes.errors import ProbeError
from probes.sampling import Sampler, flag_min, parse_limits, parse_seeds, sort_labels


@pytest.fixture(scope="module")
def chula(chula_labels) -> pd.DataFrame:
    df = chula_labels[["label", "smear"]].copy()  # bundled: every cell's label and smear, no images
    # a fixed split column for the column mode: whole smears go to test / val / train
    smear = df["smear"].astype(int)
    df["split"] = np.where(smear % 5 == 0, "test", np.where(smear % 5 == 1, "val", "train"))
    return df


def _counts(labels: np.ndarray, idx: np.ndarray) -> pd.Series:
    return pd.Series(labels[idx]).value_counts()


# -- parsing ------------------------------------------------------------------------------------
def test_parse_limits_range_and_lists():
    assert parse_limits("256..16384") == [256, 512, 1024, 2048, 4096, 8192, 16384]
    assert parse_limits("100..300") == [128, 256]
    assert parse_limits("512, 256,1000,256") == [256, 512, 1000]
    assert parse_limits([64, 32]) == [32, 64] and parse_limits(128) == [128]
    for bad in ("abc", "256..128", "0,1", "", "33..63"):
        with pytest.raises(ProbeError):
            parse_limits(bad)


def test_parse_seeds_and_flag_min():
    assert parse_seeds(5) == [42, 43, 44, 45, 46] and parse_seeds("3") == [42, 43, 44]
    assert parse_seeds("7,1,7") == [7, 1] and parse_seeds([0, 1]) == [0, 1]
    for bad in (0, "x", "1,y"):
        with pytest.raises(ProbeError):
            parse_seeds(bad)
    # FlagMin = 5% of FlagLimit; a class needs at least ceil(0.05 L) cells
    assert [flag_min(v) for v in (20, 256, 4096, 16384)] == [1, 13, 205, 820]
    assert flag_min(None) == 0
    assert sort_labels(["10", "2", "0", "b", "a"]) == ["0", "2", "10", "a", "b"]


# -- stratified (the protocol) ------------------------------------------------------------------
def test_cap_flagmin_and_stratified_80_20(chula):
    labels = chula["label"].to_numpy()
    total = pd.Series(labels).value_counts()
    sp = Sampler(labels).split(4096, 42)
    # FlagMin 205 at 4096: class 10 (184 cells) is out, and the reason says so
    assert sp.flag_min == 205
    assert set(sp.excluded) == set(total[total < 205].index) == {"10"}
    assert "FlagMin 205" in sp.excluded["10"]
    assert set(sp.classes) == set(total[total >= 205].index)
    assert not set(sp.train) & set(sp.test)
    kept = _counts(labels, np.concatenate([sp.train, sp.test]))
    for c in sp.classes:
        assert kept[c] == min(total[c], 4096)  # capped at the limit, else every cell
    # 80/20 overall and within each class (stratified)
    n = len(sp.train) + len(sp.test)
    assert abs(len(sp.test) / n - 0.2) < 0.002
    te = _counts(labels, sp.test)
    for c in sp.classes:
        assert abs(te[c] - 0.2 * kept[c]) <= 1.0
    assert not sp.exceeds_data  # 6,330 cells in class 0 > 4096


def test_every_protocol_limit_and_full_data_flag(chula):
    labels = chula["label"].to_numpy()
    sampler = Sampler(labels)
    splits = sampler.check_limits(parse_limits("256..16384"), [42])
    assert len(splits) == 7
    for (limit, _), sp in splits.items():
        counts = _counts(labels, np.concatenate([sp.train, sp.test]))
        assert counts.max() <= limit
        assert (counts >= flag_min(limit)).all()
    # 8192 and 16384 exceed the largest class (6,330): allowed, flagged, the full data
    assert [sp.exceeds_data for (lim, _), sp in sorted(splits.items())] == [False] * 5 + [True] * 2
    big = splits[(16384, 42)]
    assert big.largest_class == 6330
    assert len(big.train) + len(big.test) == int(_counts(labels, np.arange(len(labels)))[big.classes].sum())


def test_caps_are_nested_and_seeded(chula):
    labels = chula["label"].to_numpy()
    s = Sampler(labels)
    a, b = s.split(256, 42), s.split(512, 42)
    assert set(np.concatenate([a.train, a.test])) <= set(np.concatenate([b.train, b.test]))
    again = Sampler(labels).split(256, 42)
    assert np.array_equal(a.train, again.train) and np.array_equal(a.test, again.test)
    other = s.split(256, 43)
    assert not np.array_equal(a.test, other.test)


def test_no_class_qualifies_and_singleton_class(chula):
    labels = chula["label"].to_numpy()
    with pytest.raises(ProbeError, match="no class qualifies at limit 200000"):
        Sampler(labels).split(200_000, 42)
    # a class with a single cell: out by FlagMin at 256, and out as unsplittable at 16 (FlagMin 1)
    odd = labels.copy()
    odd[0] = "lonely"
    s = Sampler(odd)
    assert "FlagMin 13" in s.split(256, 42).excluded["lonely"]
    sp = s.split(16, 42)
    assert "needs at least 2" in sp.excluded["lonely"] and "lonely" not in sp.classes
    assert 0 not in set(sp.train) | set(sp.test)


def test_bad_modes_are_clear(chula):
    labels = chula["label"].to_numpy()
    with pytest.raises(ProbeError, match="unknown split"):
        Sampler(labels, "random")
    with pytest.raises(ProbeError, match="no group"):
        Sampler(labels, "group", groups=np.where(np.arange(len(labels)) < 5, "", "g1"))
    with pytest.raises(ProbeError, match="no cell has split == 'test'"):
        Sampler(labels, "column", split_column=np.full(len(labels), "train"))


# -- group and column splits --------------------------------------------------------------------
def test_group_split_never_leaks_a_smear(chula):
    labels, groups = chula["label"].to_numpy(), chula["smear"].to_numpy()
    s = Sampler(labels, "group", groups=groups)
    tests = {}
    for seed in (42, 43):
        for limit in (256, 1024):
            sp = s.split(limit, seed)
            assert not set(groups[sp.train]) & set(groups[sp.test])
            assert _counts(labels, sp.train).max() <= limit  # the cap applies to the training side
            tests[(limit, seed)] = sp.test
        # about a fifth of the cells (a 5-fold group split) are test cells
        _, test_side = s.base(seed)
        assert 0.15 < test_side.mean() < 0.25
    # the test side does not depend on the limit (for classes kept at both), but on the seed
    assert np.array_equal(tests[(256, 42)], tests[(1024, 42)])
    assert not np.array_equal(tests[(256, 42)], tests[(256, 43)])


def test_column_split_same_test_cells_across_limits(chula):
    labels, split = chula["label"].to_numpy(), chula["split"].to_numpy()
    s = Sampler(labels, "column", split_column=split)
    a, b = s.split(64, 42), s.split(256, 42)
    assert np.array_equal(a.test, b.test)
    assert set(a.test) == set(np.flatnonzero(split == "test"))
    assert (split[a.train] != "test").all() and (split[b.train] != "test").all()
    assert _counts(labels, b.train).max() <= 256
    # val cells are training cells by default, left out with val="exclude"
    assert (split[b.train] == "val").any()
    ex = Sampler(labels, "column", split_column=split, val="exclude").split(256, 42)
    assert (split[ex.train] == "train").all() and ex.test.tolist() == b.test.tolist()
