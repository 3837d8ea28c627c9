"""README cannot drift from tests/docs/readme_flows.sh: every embedcache/probes command line of README's bash
blocks has a counterpart there (same command, every flag it uses), or a recorded skip; and the script runs
top to bottom on the bundled cells (~2 min on two cores)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.paths import REPO as _REPO

REPO = _REPO
SCRIPT = REPO / "tests" / "docs" / "readme_flows.sh"


def _command_lines(text: str) -> list[list[str]]:
    lines = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split("  #")[0].split("# ")[0].strip() if not line.lstrip().startswith("# skipped") else line
        words = line.split()
        if len(words) >= 2 and words[0] in ("embedcache", "probes"):
            lines.append(words)
    return lines


def _flags(words: list[str]) -> set[str]:
    return {w.split("=")[0] for w in words if w.startswith("-")}


def test_every_readme_command_has_a_counterpart_in_the_flows_script():
    readme = (REPO / "README.md").read_text()
    script = SCRIPT.read_text()
    ours: dict[str, set[str]] = {}
    for words in _command_lines(script):
        ours.setdefault(" ".join(words[:2]), set()).update(_flags(words))
    skipped: dict[str, set[str]] = {}
    for m in re.finditer(r"^# skipped: (\S+ \S+)(.*?)\(", script, re.M):
        skipped.setdefault(m.group(1), set()).update(_flags(m.group(2).split()))
    missing = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for words in _command_lines(block):
            cmd = " ".join(words[:2])
            lacking = _flags(words) - ours.get(cmd, set()) - skipped.get(cmd, set())
            if cmd not in ours or lacking:
                missing.append(f"{' '.join(words)}  (not covered: {cmd if cmd not in ours else sorted(lacking)})")
    assert not missing, "README commands without a counterpart in tests/docs/readme_flows.sh:\n" + "\n".join(missing)


@pytest.mark.slow
def test_readme_flows_run_top_to_bottom(tmp_path):
    r = subprocess.run(
        ["bash", str(SCRIPT), str(REPO / "tests" / "data"), str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "README flows: all ran" in r.stdout
