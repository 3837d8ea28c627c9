"""Sampling as the seed protocol defines it: FlagLimit caps, FlagMin exclusion, 80/20 splits.

* **FlagLimit** ``L``: a seeded random subset of at most ``L`` cells per class.
* **FlagMin** = 5% of ``L``: a class with fewer cells (``n < 0.05 L``) is left out at that limit.
* Split modes (:data:`SPLITS`):

  - ``stratified`` (the protocol): cap the whole set, then a stratified 80/20 train/test split
    (scikit-learn ``train_test_split``) with the seed;
  - ``column``: the store's ``split`` column fixes the test cells (``"test"``); training cells
    are ``"train"`` (plus ``"val"``/``"valid"``/``"validation"`` when ``val="train"``, the default;
    ``val="exclude"`` leaves them out; other values, ``""`` included, are left out). The cap
    and FlagMin apply to training cells only, so every limit is scored on the same test cells;
  - ``group``: a group-aware split on the ``group`` column (``StratifiedGroupKFold``, one fold of
    ``1 / test_size`` as test, seeded), so no group has cells on both sides. The cap and FlagMin
    apply within the training side; the test side is every test-group cell of a kept class.

Caps are nested: with one seed, the cells kept at limit ``L`` are among those kept at ``2L``.
A class must keep at least one training and one test cell to be scored; else it is excluded
with the reason. All randomness comes from the ``seed`` argument.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from probes.errors import ProbeError

PROTOCOL_SEED = 42
SPLITS = ("stratified", "column", "group")
VAL_MODES = ("train", "exclude")
TEST_SIZE = 0.2
_VAL_NAMES = ("val", "valid", "validation")


def flag_min(limit: int | None) -> int:
    """The fewest cells a class needs at ``limit``: ``ceil(0.05 * limit)`` (0 when uncapped)."""
    if limit is None:
        return 0
    return -(-int(limit) * 5 // 100)


def parse_limits(spec: str | int | Sequence[int]) -> list[int]:
    """``"256..16384"`` -> the powers of two from 256 to 16384 inclusive (7 values);
    ``"256,1000"`` or ``[256, 1000]`` -> those values, sorted, duplicates dropped.
    """
    if isinstance(spec, (int, np.integer)):
        values = [int(spec)]
    elif isinstance(spec, str):
        text = spec.strip().replace(" ", "")
        m = re.fullmatch(r"(\d+)\.\.(\d+)", text)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo < 1 or hi < lo:
                raise ProbeError(f"bad limit range '{spec}': write LOW..HIGH with 1 <= LOW <= HIGH, e.g. 256..16384")
            values = [1 << k for k in range(hi.bit_length()) if lo <= (1 << k) <= hi]
            if not values:
                raise ProbeError(f"no power of two lies in '{spec}'; give a comma list instead, e.g. {lo},{hi}")
        else:
            try:
                values = [int(v) for v in text.split(",") if v]
            except ValueError:
                raise ProbeError(
                    f"bad limits '{spec}': use a range of powers of two (256..16384) or a comma list (256,512,1000)"
                ) from None
    else:
        try:
            values = [int(v) for v in spec]
        except (TypeError, ValueError):
            raise ProbeError(f"bad limits {spec!r}: give integers") from None
    if not values:
        raise ProbeError("no limits given, e.g. --limits 256..4096")
    if min(values) < 1:
        raise ProbeError(f"limits must be positive cell counts per class, got {min(values)}")
    return sorted(set(values))


def limits_note(spec: str | int | Sequence[int], values: Sequence[int]) -> str | None:
    """The note a study prints when a range's ends are not powers of two (``100..300`` -> 128, 256), else None."""
    if not isinstance(spec, str):
        return None
    m = re.fullmatch(r"(\d+)\.\.(\d+)", spec.strip().replace(" ", ""))
    if m is None:
        return None
    lo, hi = int(m.group(1)), int(m.group(2))
    if all(v in values for v in (lo, hi)):
        return None
    shown = ", ".join(map(str, values))
    return (
        f"--limits {lo}..{hi} means the powers of two from {lo} to {hi}: {shown} cells per class; "
        f"for other values give a comma list (e.g. --limits {lo},{hi})"
    )


def parse_seeds(seeds: int | str | Sequence[int]) -> list[int]:
    """``5`` or ``"5"`` -> 42..46 (the protocol's seed first); ``"1,2,3"`` or ``[1, 2, 3]`` -> those."""
    if isinstance(seeds, str):
        text = seeds.strip()
        if "," not in text:
            try:
                seeds = int(text)
            except ValueError:
                raise ProbeError(f"bad seeds '{text}': a count (5 -> 42..46) or a comma list (0,1,2)") from None
        else:
            try:
                return list(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
            except ValueError:
                raise ProbeError(f"bad seeds '{text}': a count (5 -> 42..46) or a comma list (0,1,2)") from None
    if isinstance(seeds, (int, np.integer)):
        if seeds < 1:
            raise ProbeError(f"the number of seeds must be at least 1, got {seeds}")
        return [PROTOCOL_SEED + i for i in range(int(seeds))]
    out = list(dict.fromkeys(int(s) for s in seeds))
    if not out:
        raise ProbeError("no seeds given")
    return out


def sort_labels(labels) -> list[str]:
    """Class labels in natural order ("2" before "10")."""
    key = lambda s: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]  # noqa: E731
    return sorted({str(x) for x in labels}, key=key)


@dataclass
class Split:
    """One train/test split at one limit and seed; positions index the usable cells."""

    mode: str
    limit: int | None
    seed: int
    train: np.ndarray
    test: np.ndarray
    classes: list[str]  # the classes scored
    excluded: dict[str, str] = field(default_factory=dict)  # class -> why it is left out
    exceeds_data: bool = False  # limit >= the largest class: the capped set is the full data
    largest_class: int = 0  # cells in the largest class (its training side for column/group)

    @property
    def flag_min(self) -> int:
        return flag_min(self.limit)


class Sampler:
    """Makes the splits of one study; the base partition (column/group) is computed once per seed."""

    def __init__(
        self,
        labels: Sequence[str] | np.ndarray,
        mode: str = "stratified",
        *,
        groups: Sequence[str] | np.ndarray | None = None,
        split_column: Sequence[str] | np.ndarray | None = None,
        val: str = "train",
        test_size: float = TEST_SIZE,
    ):
        if mode not in SPLITS:
            raise ProbeError(f"unknown split '{mode}': use one of {', '.join(SPLITS)}")
        if val not in VAL_MODES:
            raise ProbeError(f"unknown val mode '{val}': use one of {', '.join(VAL_MODES)}")
        if not 0 < test_size < 1:
            raise ProbeError(f"test_size must lie between 0 and 1, got {test_size}")
        self.labels = np.asarray(labels, dtype=str)
        self.mode, self.val, self.test_size = mode, val, float(test_size)
        self._base: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        n = len(self.labels)
        if mode == "column":
            if split_column is None:
                raise ProbeError("split 'column' needs the store's split column")
            s = np.char.lower(np.char.strip(np.asarray(split_column, dtype=str)))
            self._test = s == "test"
            train_names = ("train", *_VAL_NAMES) if val == "train" else ("train",)
            self._train = np.isin(s, train_names)
            if not self._test.any():
                raise ProbeError(
                    "split 'column': no cell has split == 'test' in the store; give the manifest a split column "
                    "with test cells, or use --split stratified or --split group"
                )
            if not self._train.any():
                raise ProbeError("split 'column': no cell has split == 'train'; fix the manifest's split column")
            self.unassigned = int(n - self._test.sum() - self._train.sum())
        elif mode == "group":
            if groups is None:
                raise ProbeError("split 'group' needs the store's group column")
            self.groups = np.asarray(groups, dtype=str)
            missing = int((np.char.strip(self.groups) == "").sum())
            if missing:
                raise ProbeError(
                    f"split 'group': {missing} of {n} cells have no group; give the manifest a 'group' column "
                    "(e.g. the slide or patient id) for every cell, or use --split stratified"
                )
            n_groups = len(np.unique(self.groups))
            self.n_folds = max(2, round(1 / self.test_size))
            if n_groups < self.n_folds:
                raise ProbeError(
                    f"split 'group': only {n_groups} group(s); a {self.test_size:.0%} group-aware test side "
                    f"needs at least {self.n_folds}"
                )

    # -- the base partition (column / group), independent of the limit ------------------------
    def base(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Boolean (train side, test side) masks before capping, for column and group modes."""
        if seed not in self._base:
            if self.mode == "column":
                self._base[seed] = (self._train, self._test)
            else:
                from sklearn.model_selection import StratifiedGroupKFold

                cv = StratifiedGroupKFold(n_splits=self.n_folds, shuffle=True, random_state=seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "least populated class has fewer members than n_splits"
                    _, test_idx = next(cv.split(np.zeros(len(self.labels)), self.labels, self.groups))
                test = np.zeros(len(self.labels), dtype=bool)
                test[test_idx] = True
                self._base[seed] = (~test, test)
        return self._base[seed]

    # -- one split ------------------------------------------------------------------------------
    def split(self, limit: int | None, seed: int) -> Split:
        """The split at ``limit`` cells per class (``None``: no cap, no FlagMin) with ``seed``."""
        if self.mode == "stratified":
            return self._stratified(limit, seed)
        return self._fixed_test(limit, seed)

    def check_limits(self, limits: Sequence[int | None], seeds: Sequence[int]) -> dict[tuple[int | None, int], Split]:
        """Every split of a study, made up front so that a bad limit fails before any fit."""
        return {(lim, s): self.split(lim, s) for lim in limits for s in seeds}

    def _stratified(self, limit: int | None, seed: int) -> Split:
        from sklearn.model_selection import train_test_split

        classes, counts = np.unique(self.labels, return_counts=True)
        fm = flag_min(limit)
        excluded: dict[str, str] = {}
        kept: list[np.ndarray] = []
        for c, n in zip(classes, counts):
            if n < fm:
                excluded[c] = f"{n} cells < FlagMin {fm}"
                continue
            idx = _cap(np.flatnonzero(self.labels == c), limit, seed, c)
            if len(idx) < 2:
                excluded[c] = f"{len(idx)} cell: a stratified split needs at least 2 (one per side)"
                continue
            kept.append(idx)
        largest = int(counts.max())
        scored = _check_classes(kept, self.labels, limit, fm, largest, excluded)
        pool = np.sort(np.concatenate(kept))
        try:
            train, test = train_test_split(
                pool, test_size=self.test_size, stratify=self.labels[pool], random_state=seed, shuffle=True
            )
        except ValueError as e:
            raise ProbeError(
                f"limit {limit}: {len(pool)} cells in {len(scored)} classes are too few for a stratified "
                f"{1 - self.test_size:.0%}/{self.test_size:.0%} split ({e}); use a larger limit"
            ) from None
        return Split(
            "stratified",
            limit,
            seed,
            np.sort(train),
            np.sort(test),
            scored,
            excluded,
            exceeds_data=limit is not None and limit >= largest,
            largest_class=largest,
        )

    def _fixed_test(self, limit: int | None, seed: int) -> Split:
        train_side, test_side = self.base(seed)
        fm = flag_min(limit)
        classes = sort_labels(np.unique(self.labels[train_side | test_side]))
        excluded: dict[str, str] = {}
        kept_train: list[np.ndarray] = []
        kept_test: list[np.ndarray] = []
        largest = 0
        for c in classes:
            is_c = self.labels == c
            tr = np.flatnonzero(is_c & train_side)
            te = np.flatnonzero(is_c & test_side)
            largest = max(largest, len(tr))
            if len(tr) < max(fm, 1):
                excluded[c] = f"{len(tr)} training cells < FlagMin {fm}" if fm else "no training cells"
                continue
            if len(te) == 0:
                excluded[c] = "no test cells" + (
                    " (every group of this class fell on the training side)" if self.mode == "group" else ""
                )
                continue
            kept_train.append(_cap(tr, limit, seed, c))
            kept_test.append(te)
        scored = _check_classes(kept_train, self.labels, limit, fm, largest, excluded)
        return Split(
            self.mode,
            limit,
            seed,
            np.sort(np.concatenate(kept_train)),
            np.sort(np.concatenate(kept_test)),
            scored,
            excluded,
            exceeds_data=limit is not None and limit >= largest,
            largest_class=largest,
        )


def _cap(idx: np.ndarray, limit: int | None, seed: int, label: str) -> np.ndarray:
    """At most ``limit`` of ``idx``, chosen by a permutation seeded with (seed, class): nested in ``limit``."""
    if limit is None or len(idx) <= limit:
        return idx
    salt = int.from_bytes(label.encode()[:16].ljust(16, b"\0"), "little") % (2**63)
    rng = np.random.default_rng([int(seed) % (2**63), salt, len(label)])
    return np.sort(rng.permutation(idx)[:limit])


def _check_classes(kept, labels, limit, fm, largest, excluded) -> list[str]:
    ordered = {c: excluded[c] for c in sort_labels(excluded)}  # natural order, in place
    excluded.clear()
    excluded.update(ordered)
    scored = sort_labels({labels[k[0]] for k in kept}) if kept else []
    if len(scored) < 2:
        where = f"at limit {limit} (FlagMin {fm})" if limit is not None else ""
        why = "; ".join(f"{c}: {r}" for c, r in list(excluded.items())[:6])
        raise ProbeError(
            f"{'no class' if not scored else 'only one class'} qualifies {where}: the largest class has "
            f"{largest} cells ({why}); use a smaller limit or a dataset with more labelled cells"
        )
    return scored
