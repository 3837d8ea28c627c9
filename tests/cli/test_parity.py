"""Every command of both CLIs is a thin skin: each of its parameters is a keyword of the same-named Python
function (or a field of an options object that function takes), so the CLI and the API never drift apart."""

from __future__ import annotations

import inspect

import pytest
import typer.main

import embedcache
import probes
from embedcache.options import accepted_names
from embedcache_cli import demo as demo_module
from embedcache_cli import embedcache_app, probes_app

# parameters a command has that its function spells another way (said here, once)
CLI_ONLY = {
    ("embedcache", "extract"): {"no_labels"},  # --no-labels is label_column=None
    ("probes", "audit"): {"no_cache"},  # --no-cache is cache=False
    # --json prints the returned object (a table, a dict) as JSON instead of a table
    ("embedcache", "models"): {"as_json"},
    ("embedcache", "info"): {"as_json"},
    ("embedcache", "verify"): {"as_json"},
}
# the Python function of each command (the same name, except where the command's name is a keyword or clashes)
FUNCTIONS = {
    ("embedcache", "models"): embedcache.models,
    ("embedcache", "check-precision"): embedcache.check_precision,
    ("embedcache", "extract"): embedcache.extract,
    ("embedcache", "import"): embedcache.import_features_file,
    ("embedcache", "info"): embedcache.describe,
    ("embedcache", "verify"): embedcache.verify,
    ("embedcache", "demo"): demo_module.demo,
    ("embedcache", "export"): embedcache.export_anndata,
    ("probes", "scale"): probes.scale,
    ("probes", "eval"): probes.evaluate,
    ("probes", "robustness"): probes.robustness,
    ("probes", "ensemble"): probes.ensemble,
    ("probes", "calibrate"): probes.calibrate,
    ("probes", "selective"): probes.selective,
    ("probes", "finetune"): probes.finetune,
    ("probes", "audit"): probes.audit,
    ("probes", "neighbors"): probes.neighbors,
    ("probes", "relabel"): probes.relabel,
    ("probes", "map"): probes.embedding_map,  # map: a Python builtin
}
APPS = {"embedcache": embedcache_app.app, "probes": probes_app.app}


def _commands() -> list[tuple[str, str, object]]:
    out = []
    for app_name, app in APPS.items():
        for info in app.registered_commands:
            name = info.name or typer.main.get_command_name(info.callback.__name__)
            out.append((app_name, name, info.callback))
    return out


def test_every_command_has_a_python_function():
    assert {(a, n) for a, n, _ in _commands()} == set(FUNCTIONS)


@pytest.mark.parametrize("app_name, name, callback", _commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_cli_parameters_are_the_python_names(app_name, name, callback):
    cli = set(inspect.signature(callback).parameters) - CLI_ONLY.get((app_name, name), set())
    api = accepted_names(FUNCTIONS[(app_name, name)])
    assert cli <= api, f"{app_name} {name}: {sorted(cli - api)} are not keywords of the Python function"
