"""Means over seeds in printed tables: no ± with one seed, no 'nan±0.000' (issue 28)."""

from __future__ import annotations

import math

from probes.engine.intervals import interval_text
from probes.engine.proba_fits import pm
from probes.reporting.console import mean_std


def test_one_seed_prints_no_plus_minus():
    assert mean_std(0.8123, 0.0, 1) == pm(0.8123, 0.0, 1) == "0.812"
    assert interval_text(0.8123, 0.0, 0.79, 0.83, 1) == "0.812 [0.790, 0.830]"
    assert mean_std(0.8123, 0.0132, 3) == "0.812±0.013" and pm(0.8123, 0.0132, 3, 2) == "0.81±0.01"


def test_an_undefined_mean_prints_a_dash_not_nan_plus_minus():
    # selective: the accuracy of the kept cells when a threshold keeps none (NaN in every seed, std filled 0)
    assert pm(math.nan, 0.0, 3) == "-"
    assert pm(math.nan, 0.0, 1) == "-"
    assert interval_text(math.nan, 0.0, math.nan, math.nan, 2) == "-"
    assert mean_std(0.5, math.nan, 2) == "0.500"  # a std that could not be computed is left out
