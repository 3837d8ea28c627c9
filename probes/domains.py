"""Domain studies: train on some values of the store's ``domain`` column, test on the others.

:class:`DomainPlan` checks the names; :func:`evaluations` lists a split's test sets (the split's own,
in-domain test cells, then every cell of each unseen domain whose class was trained on);
:func:`domain_gaps` sets in- and out-of-domain scores side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from probes.errors import ProbeError
from probes.features.cells import Cells, parse_names
from probes.metrics import MAIN_METRIC
from probes.reporting.console import Col, Panel
from probes.sampling import Split, sort_labels

TestSet = tuple[str, bool, np.ndarray, list[str]]  # (test_domain, in_domain, positions, classes)


@dataclass
class DomainPlan:
    """Which cells train (and give the in-domain test split) and which form each out-of-domain test set."""

    train: list[str]
    test: list[str]
    train_mask: np.ndarray  # over the usable cells
    test_masks: dict[str, np.ndarray]

    @property
    def train_name(self) -> str:
        return "+".join(self.train)

    @classmethod
    def make(
        cls, cells: Cells, train_domain: str | Sequence[str] | None, test_domain: str | Sequence[str] | None
    ) -> DomainPlan | None:
        """Check the names against the store's ``domain`` column; None when no domain is asked for."""
        train, test = parse_names(train_domain or []), parse_names(test_domain or [])
        if not train:
            if test:
                raise ProbeError("--test-domain needs --train-domain (the domain(s) the probes are trained on)")
            return None
        dom = cells.obs["domain"].to_numpy(dtype=str)
        present = sort_labels(set(dom) - {""})
        if not present:
            raise ProbeError(
                f"dataset '{cells.dataset}' has no domain column (obs.domain is empty for every cell); "
                "give the manifest a 'domain' column (e.g. the site or scanner) and extract again"
            )
        unknown = [d for d in train + test if d not in present]
        if unknown:
            raise ProbeError(f"unknown domain(s) {', '.join(unknown)}; the store has: {', '.join(present)}")
        both = sorted(set(train) & set(test))
        if both:
            raise ProbeError(
                f"domain(s) {', '.join(both)} are both training and test domains; a domain is one or the other"
            )
        if not test:
            test = [d for d in present if d not in train]
            if not test:
                raise ProbeError(
                    f"every domain ({', '.join(present)}) is a training domain: nothing is left to test on"
                )
        return cls(train, test, np.isin(dom, train), {d: dom == d for d in test})


def evaluations(sp: Split, plan: DomainPlan | None, labels: np.ndarray, notes: list[str]) -> list[TestSet]:
    """``[(test_domain, in_domain, positions, classes)]`` for one split: the split's own test cells,
    then, in a domain study, every cell of each test domain whose class the probes were trained on."""
    if plan is None:
        return [("", True, sp.test, sp.classes)]
    out = [(plan.train_name, True, sp.test, sp.classes)]
    for d, mask in plan.test_masks.items():
        pos = np.flatnonzero(mask & np.isin(labels, sp.classes))
        present = set(labels[pos])
        classes = [c for c in sp.classes if c in present]
        unseen = sorted(set(labels[mask]) - set(sp.classes))
        if unseen:
            notes.append(
                f"domain {d}: {int(np.isin(labels[mask], unseen).sum())} cells of class(es) "
                f"{', '.join(unseen)} not scored (no training cells of that class in {plan.train_name})"
            )
        if len(classes) < 1:
            notes.append(f"domain {d}: no cell of a trained class; not scored")
            continue
        absent = [str(c) for c in sp.classes if c not in present]
        if absent:
            notes.append(
                f"domain {d}: training class(es) {', '.join(absent)} absent from {d}; confusion.csv keeps their "
                "predicted columns (cells predicted as them are errors), and macro averages cover the "
                f"{len(classes)} classes {d} has"
            )
        out.append((d, False, pos, classes))
    return out


def domain_gaps(curves: pd.DataFrame, metric: str = MAIN_METRIC) -> pd.DataFrame:
    """Domain studies: per backbone x probe x limit x out-of-domain test set, the in-domain and
    out-of-domain mean ``metric`` side by side and ``gap = in_domain - out_of_domain``."""
    main = curves[(curves["metric"] == metric) & (curves["class"] == "")]
    keys = ["backbone", "feature_key", "pool", "probe", "limit"]
    cols = keys + ["mean", "std", "n_test"]
    ind = main[main["in_domain"]][cols + ["test_domain"]].rename(
        columns={
            "mean": "in_domain_mean",
            "std": "in_domain_std",
            "n_test": "in_domain_n_test",
            "test_domain": "train_domain",
        }
    )
    ood = main[~main["in_domain"]][cols + ["test_domain"]].rename(
        columns={"mean": "out_of_domain_mean", "std": "out_of_domain_std", "n_test": "out_of_domain_n_test"}
    )
    both = ind.merge(ood, on=keys, how="inner")
    both["gap"] = both["in_domain_mean"] - both["out_of_domain_mean"]
    both.insert(len(keys), "metric", metric)
    return both.reset_index(drop=True)


def domain_panels(d: pd.DataFrame | None) -> list[Panel]:
    """In- vs out-of-domain macro-F1 and the gap, when the study has domains."""
    if d is None or not len(d):
        return []
    left = ("backbone", "probe", "trained on", "tested on")
    cols = [
        Col(c, "left" if c in left else "right")
        for c in ("backbone", "probe", "limit", "trained on", "in-domain", "tested on", "out-of-domain", "gap")
    ]
    rows = [
        [
            r.backbone,
            r.probe,
            "all" if pd.isna(r.limit) else str(int(r.limit)),
            r.train_domain,
            f"{r.in_domain_mean:.3f}",
            r.test_domain,
            f"{r.out_of_domain_mean:.3f}",
            f"{r.gap:+.3f}",
        ]
        for r in d.itertuples()
    ]
    return [Panel("domain shift: macro-F1 in the training domain vs unseen domains (mean over seeds)", cols, rows)]
