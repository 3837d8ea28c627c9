"""The installed packages are the source tree's: pyproject.toml lists every package folder, and only those
(a folder missing from the list installs without its modules and fails only on a user's machine)."""

from __future__ import annotations

import tomllib

from tests.paths import REPO


def test_pyproject_lists_every_package_of_the_tree():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    renamed = {folder: name for name, folder in setuptools["package-dir"].items()}  # cli -> embedcache_cli
    found = set()
    for top in ("embedcache", "probes", "cli"):
        for init in (REPO / top).rglob("__init__.py"):
            parts = list(init.parent.relative_to(REPO).parts)
            parts[0] = renamed.get(parts[0], parts[0])
            found.add(".".join(parts))
    assert listed == found, {"not listed": sorted(found - listed), "listed, not in the tree": sorted(listed - found)}


def test_every_module_folder_is_a_package():
    """A folder of modules without __init__.py would be skipped by the package list above."""
    for top in ("embedcache", "probes", "cli"):
        for py in (REPO / top).rglob("*.py"):
            assert (py.parent / "__init__.py").exists(), py.relative_to(REPO)
