"""``--save-adapter DIR`` for studies: keep the fine-tunes a study fits, then write their adapters."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from probes.errors import ProbeError
from probes.heads.registry import make_probe

SAVABLE = ("lp", "ft-last", "lora")


class AdapterKeeper:
    """A ``make_probe`` for :func:`probes.engine.split_fits.fit_splits` that remembers the fine-tunes it builds;
    :meth:`save` writes each one's adapter (:func:`probes.tuning.adapter.save_adapter`) under ``directory``."""

    def __init__(self, directory: str | os.PathLike, probes: list[str]):
        self.directory = Path(directory)
        wanted = [p for p in probes if p in SAVABLE]
        if not wanted:
            raise ProbeError(
                f"--save-adapter saves a fine-tune ({', '.join(SAVABLE)}); the probes are {', '.join(probes)}"
            )
        self.kept: list[tuple[str, int, Any]] = []

    def __call__(self, name: str, *, seed: int = 0, device: str = "auto", **params: Any) -> Any:
        est = make_probe(name, seed=seed, device=device, **params)
        if name in SAVABLE:
            self.kept.append((name, seed, est))
        return est

    def save(self) -> list[str]:
        """Write every kept fit's adapter; returns one note line per directory written."""
        from probes.tuning.adapter import save_adapter

        fitted = [(n, s, e) for n, s, e in self.kept if hasattr(e, "net_")]
        notes = []
        for name, seed, est in fitted:
            if est.backbone is None:
                raise ProbeError(
                    f"{name} on pooled features has no backbone to adapt: --save-adapter needs the "
                    "fine-tune to train on tokens (--tail-blocks K with a token head) or images"
                )
            where = self.directory
            if len(fitted) > 1:
                slug = re.sub(r"[^A-Za-z0-9._-]+", "-", est.backbone.key_name).strip("-")
                where = self.directory / f"{slug}-{name}-seed{seed}"
            save_adapter(est, where)
            notes.append(f"adapter of {est.backbone.key_name} · {name} · seed {seed} written to {where}")
        return notes


__all__ = ["SAVABLE", "AdapterKeeper"]
