"""Adapters are checked against what their adapter.json records before anything is embedded with them: an
emptied or modified tensor file, a malformed adapter.json, or a missing tuned tensor is an error, never
base-model features filed under the tuned key (issue 26, case 4)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import embedcache
from embedcache.backbones.adapters import AdapterError, apply_adapter, read_adapter_meta
from embedcache.backbones.tail import tail_tokens
from probes.tuning.estimator import FineTuneProbe
from probes.tuning.readers import ArrayTokens


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    bb = embedcache.load_backbone("timm:test_vit", weights="random")
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = np.array(["a", "b"] * 12)
    probe = FineTuneProbe(bb, method="ft-last", k=1, epochs=1, batch_size=8, lr=1e-3, device="cpu")
    probe.fit(ArrayTokens(tail_tokens(bb, x, 1).numpy()), y)
    out = tmp_path_factory.mktemp("adapter") / "ad"
    probe.save_adapter(out)
    return bb, out


@pytest.fixture
def adapter(saved, tmp_path):
    bb, src = saved
    shutil.copytree(src, tmp_path / "ad")
    return bb, tmp_path / "ad"


def test_an_intact_adapter_applies(adapter):
    bb, d = adapter
    tuned = apply_adapter(d, bb)
    assert tuned.key_name.startswith(bb.key_name + "+ft-last@")


def test_an_emptied_or_modified_tensor_file_is_refused(adapter):
    bb, d = adapter
    (d / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="does not match the sha256"):
        apply_adapter(d, bb)


def test_a_modified_head_is_refused(adapter):
    bb, d = adapter
    head = load_file(str(d / "head.safetensors"))
    save_file({k: v + 1 for k, v in head.items()}, str(d / "head.safetensors"))
    with pytest.raises(AdapterError, match="head.safetensors.*does not match"):
        read_adapter_meta(d)


def test_a_malformed_adapter_json_is_a_clear_error(adapter):
    bb, d = adapter
    (d / "adapter.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter.json cannot be read"):
        apply_adapter(d, bb)
    (d / "adapter.json").write_text(json.dumps({"format": "embedcache-adapter/1"}))
    with pytest.raises(AdapterError, match="lacks backbone"):
        apply_adapter(d, bb)


def test_an_adapter_missing_a_tuned_tensor_is_refused(adapter):
    from embedcache.backbones.loading import sha256_file

    bb, d = adapter
    tensors = load_file(str(d / "adapter.safetensors"))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(d / "adapter.safetensors"))
    meta = json.loads((d / "adapter.json").read_text())
    meta["sha256"]["adapter.safetensors"] = sha256_file(d / "adapter.safetensors")  # consistent, but incomplete
    (d / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="lacks 1 tensors of the tuned tail"):
        apply_adapter(d, bb)
