"""Every ``--probes`` help lists every registered probe name and family, generated from the registry (issue 28)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from embedcache_cli.probes_app import app
from probes.heads.registry import PROBES

COMMANDS = ["scale", "eval", "robustness", "calibrate", "selective", "audit"]


def _probes_help(command: str) -> str:
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}, terminal_width=200)
    assert res.exit_code == 0, res.output
    rows = [line.strip(" │") for line in res.output.splitlines()]
    start = next(i for i, r in enumerate(rows) if r.startswith("--probes"))
    text = " ".join(rows[start : start + 8])  # the option's help, wrapped over a few lines
    text = re.split(r"\s--\w", text[len("--probes") :], maxsplit=1)[0]  # up to the next option
    return re.sub(r"\s+", "", text)  # rich wraps inside long names


@pytest.mark.parametrize("command", COMMANDS)
def test_probes_help_lists_every_registered_probe(command):
    text = _probes_help(command)
    listed = set(re.split(r"[:,]\s*|\[default", text.split("probes:", 1)[-1]))
    for name in PROBES.names():
        assert name in listed, (command, name, text)
    for pattern in PROBES.patterns():
        assert re.sub(r"\s+", "", pattern) in text, (command, pattern, text)
    assert {"lp", "ft-last", "lora", "scratch-vit"} <= set(PROBES.names("tune"))
