"""The one progress display (plain lines that keep every number when not a terminal) and the one device resolver."""

from __future__ import annotations

import io
import re

import pytest
import torch

from embedcache.backbones.devices import DeviceUnavailable, resolve_device, resolve_dtype
from embedcache.progress import Progress, format_seconds

LINE = re.compile(r"^extract timm:test_vit: (\d+)/1000 cells, ([\d,]+) cells/s, (\d+:\d\d) elapsed(, \d+:\d\d left)?$")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_tenth_keep_every_number():
    out = io.StringIO()
    with Progress(1000, "extract timm:test_vit", stream=out, interval=3600) as bar:
        for _ in range(20):
            bar.advance(50)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10, lines  # one per tenth, none repeated at close
    counts = [int(LINE.match(line).group(1)) for line in lines]
    assert counts == list(range(100, 1001, 100))
    assert "left" not in lines[-1] and LINE.match(lines[0]).group(4)


def test_plain_lines_by_time_and_a_final_line_when_stopped_early():
    out = io.StringIO()
    bar = Progress(1000, "extract timm:test_vit", stream=out, interval=0.0)
    bar.advance(3)
    bar.advance(4)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [int(LINE.match(line).group(1)) for line in lines] == [3, 7, 7]  # time-driven lines, then the final one
    bar.advance(5)  # nothing after close
    assert out.getvalue().splitlines() == lines


def test_rich_bar_on_a_terminal_and_nothing_when_disabled():
    tty = _Tty()
    with Progress(10, "extract x", stream=tty) as bar:
        assert bar._rich is not None
        bar.advance(10)
    assert "10/10" in tty.getvalue()
    quiet = io.StringIO()
    with Progress(10, "extract x", stream=quiet, enabled=False) as bar:
        bar.advance(10)
    assert quiet.getvalue() == "" and bar.done == 10


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 9.6, 75, 3725)] == ["0:00", "0:10", "1:15", "1:02:05"]


def test_cli_extract_piped_prints_plain_progress(tmp_path, chula_subset):
    from typer.testing import CliRunner

    from embedcache_cli.embedcache_app import app

    res = CliRunner().invoke(
        app,
        [
            "extract",
            "-m",
            "timm:test_vit",
            "--weights",
            "random",
            "-d",
            str(chula_subset(12)),
            "-o",
            str(tmp_path / "c.zarr"),
            "--input-size",
            "32",
            "--num-workers",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    line = r"extract timm:test_vit → \S+: 12/12 cells, [\d,]+ cells/s, \d+:\d\d elapsed"
    assert re.search(line, res.output), res.output
    assert "━" not in res.output  # no cut-off bar in a log


def test_resolve_device(monkeypatch):
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(" CPU ") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=r"asks for CUDA.*device='auto'.*'cpu'") as e:
            resolve_device(name)
        assert isinstance(e.value, DeviceUnavailable) and isinstance(e.value, RuntimeError)
    for name in ("tpu", "nonsense"):
        with pytest.raises(ValueError, match="not supported|unknown device"):
            resolve_device(name)


def test_resolve_dtype(monkeypatch):
    import embedcache.backbones.devices as devices

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("auto", cuda) == torch.float16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)  # AVX-512 bf16 / AMX
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 compute on the CPU"):
        resolve_dtype("float16", cpu)
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        resolve_dtype("int8", cpu)


def test_pipeline_uses_the_shared_resolver():
    import embedcache.extraction.new_images as query
    import embedcache.extraction.runner as pipeline

    assert pipeline.resolve_device is resolve_device and pipeline.resolve_dtype is resolve_dtype
    assert query.resolve_device is resolve_device
