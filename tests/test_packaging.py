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


def test_readme_cpu_install_line_pins_torch_and_torchvision_to_the_project_bounds():
    """Issue 28: a CPU torch installed alone was replaced by a CUDA build when pip later pulled torchvision. README's
    CPU line installs both together at the project's upper bounds (the line itself needs the PyTorch index, which
    this offline machine cannot reach: its versions are what is checked here)."""
    import re

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    bound = {m.group(1): m.group(2) for d in deps if (m := re.match(r"(torch|torchvision)\b.*<=([\d.]+)", d))}
    readme = (REPO / "README.md").read_text()
    line = re.search(r'`pip install "torch==([\d.]+)" "torchvision==([\d.]+)" --index-url (\S+)`', readme)
    assert line is not None, "README lost its CPU install line"
    assert (line.group(1), line.group(2)) == (bound["torch"], bound["torchvision"])
    assert line.group(3) == "https://download.pytorch.org/whl/cpu"
