"""Smoke tests of the benchmarks in benchmarks/: each runs at tiny sizes and writes its JSON."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.paths import REPO


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
