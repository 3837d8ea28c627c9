"""Registry and weight loading: meta-device builds, a hand-made Hugging Face cache, local files, converters."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from embedcache.backbones import loading, registry
from embedcache.backbones.loading import (
    LoadedBackbone,
    WeightsMismatch,
    WeightsUnavailable,
    build_model,
    hf_vit_to_timm,
    load_backbone,
    normalise_state_dict,
    sha256_file,
)
from embedcache.backbones.registry import IN_MEAN, IN_STD, BackboneSpec, get_spec, list_models, register
from tests.paths import REPO as _REPO

REPO = _REPO
REQUIRED = [
    "uni",
    "uni2-h",
    "dinobloom-s",
    "dinobloom-b",
    "dinobloom-l",
    "dinobloom-g",
    "dinov2-s",
    "dinov2-b",
    "dinov2-l",
    "dinov2-g",
    "phikon",
    "phikon-v2",
    "ctranspath",
    "resnet-rs50",
    "h-optimus-0",
    "virchow2",
]
PREFIX = {
    "uni": 1,
    "uni2-h": 9,
    "h-optimus-0": 5,
    "virchow2": 5,
    "phikon": 1,
    "phikon-v2": 1,
    "ctranspath": 0,
    "resnet-rs50": 0,
    "dinov3-s": 5,
    "dinov3-b": 5,
    "dinov3-l": 5,
    **{f"dino{v}-{s}": 1 for v in ("bloom", "v2") for s in "sblg"},
    **{f"efficientnet-lite{i}": 0 for i in range(3)},
}
IMG = 32  # tiny test_vit: 2x2 patches of 16


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def tiny_spec(
    name: str, hub_id: str | None = None, filenames=("model.safetensors", "pytorch_model.bin")
) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        arch="test_vit",
        hub_id=hub_id,
        filenames=filenames,
        kwargs={"img_size": IMG},
        layers={},
        input_size=IMG,
        interpolation="bicubic",
        mean=IN_MEAN,
        std=IN_STD,
        width=64,
        default_pool=("cls",),
        gated=False,
        licence="test",
    )


@pytest.fixture
def tiny(request):
    """Register tiny specs for one test, then remove them."""
    names = []

    def add(name, **kw):
        register(tiny_spec(name, **kw), overwrite=True)
        names.append(name)
        return name

    yield add
    for n in names:
        registry._REGISTRY.pop(n, None)


def seeded_state(seed: int = 123) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model("test_vit", img_size=IMG, num_classes=0).state_dict()


def assert_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert own.keys() == sd.keys()
    for k in sd:
        assert torch.equal(own[k], sd[k]), k


def make_hub_repo(cache: Path, repo_id: str, files: dict[str, Path], commit: str) -> None:
    """The hub's cache layout: refs/main -> commit, blobs/<sha256>, snapshots/<commit>/<file> -> blob symlink."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir(exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        blob = repo / "blobs" / sha256_file(src)
        blob.write_bytes(src.read_bytes())
        (snap / name).symlink_to(os.path.relpath(blob, snap))


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF cache with offline mode on (huggingface_hub reads env at import, so patch constants too)."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    return cache


def commit_of(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# 1. every registry entry builds (on the meta device) with the right width and prefix tokens
# ---------------------------------------------------------------------------------------------


def test_registry_has_required_entries():
    names = [s.name for s in list_models()]
    assert set(REQUIRED) <= set(names)
    assert len(names) == len(set(names))
    assert get_spec("virchow2").default_pool == ("cls", "mean")
    assert get_spec("ctranspath").default_pool == ("mean",) and get_spec("resnet-rs50").default_pool == ("mean",)
    assert get_spec("h-optimus-0").mean == registry.HO_MEAN
    assert get_spec("uni").gated and not get_spec("dinobloom-b").gated
    for spec in list_models():  # the store's provenance records them as JSON: they must read back equal
        for fields in (dict(spec.kwargs), dict(spec.layers)):
            assert json.loads(json.dumps(fields)) == fields, (spec.name, fields)


def test_entries_keep_the_reference_values():
    """Fields as in ../shared/REGISTRY_REFERENCE.md (the builder kwargs that make the checkpoints load)."""
    uni = get_spec("uni")
    assert (uni.arch, uni.hub_id, uni.filenames, uni.width) == (
        "vit_large_patch16_224",
        "MahmoodLab/UNI",
        ("pytorch_model.bin",),
        1024,
    )
    assert uni.kwargs == dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True)
    assert (uni.interpolation, uni.mean, uni.std, uni.licence) == ("bilinear", IN_MEAN, IN_STD, "CC-BY-NC-ND-4.0")
    uni2 = get_spec("uni2-h")
    assert uni2.arch == "vit_giant_patch14_224" and uni2.width == 1536 and uni2.gated
    assert {k: uni2.kwargs[k] for k in ("depth", "num_heads", "embed_dim", "reg_tokens", "init_values")} == dict(
        depth=24, num_heads=24, embed_dim=1536, reg_tokens=8, init_values=1e-5
    )
    assert uni2.kwargs["mlp_ratio"] == pytest.approx(5.33334) and uni2.kwargs["no_embed_class"] is True
    assert uni2.layers == {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}
    ho = get_spec("h-optimus-0")
    assert ho.arch == "vit_giant_patch14_reg4_dinov2" and (ho.mean, ho.std) == (registry.HO_MEAN, registry.HO_STD)
    assert ho.mean == (0.707223, 0.578729, 0.703617) and ho.kwargs["init_values"] == 1e-5
    v2 = get_spec("virchow2")
    assert (v2.width, v2.kwargs["reg_tokens"], v2.kwargs["mlp_ratio"], v2.interpolation) == (1280, 4, 5.3375, "bicubic")
    ctp = get_spec("ctranspath")
    assert ctp.layers == {"embed_layer": "ConvStem"} and ctp.licence == "GPL-3.0" and ctp.width == 768
    assert [get_spec(f"dinobloom-{s}").width for s in "sblg"] == [384, 768, 1024, 1536]
    assert get_spec("dinov2-l").hub_id == "timm/vit_large_patch14_dinov2.lvd142m"
    assert get_spec("dinov3-b").input_size == 256 and get_spec("resnet-rs50").hub_id == "timm/resnetrs50.tf_in1k"
    assert get_spec("phikon").filenames == ("model.safetensors", "pytorch_model.bin")


def test_spec_fields_are_keywords_only():
    """A spec is data: no positional construction, so a reordered field cannot shift every entry."""
    with pytest.raises(TypeError):
        BackboneSpec("x", "test_vit", 64)  # positional on purpose
    spec = BackboneSpec(name="x", arch="test_vit", width=64)
    assert (spec.input_size, spec.interpolation, spec.default_pool, spec.build, spec.embed) == (
        224,
        "bilinear",
        ("cls",),
        None,
        None,
    )
    with pytest.raises(ValueError, match="build must be callable"):
        BackboneSpec(name="x", arch="toy", width=8, build="not a function")


@pytest.mark.parametrize("name", [s.name for s in list_models()])
def test_entry_builds_with_width(name):
    spec = get_spec(name)
    with torch.device("meta"):
        model = build_model(spec)
        feats = model.forward_features(torch.empty(2, 3, spec.input_size, spec.input_size))
        pooled = feats[:, 0] if feats.ndim == 3 else model.forward_head(feats, pre_logits=True)
    assert model.num_features == spec.width
    assert pooled.shape == (2, spec.width)
    assert loading.num_prefix_tokens(model) == PREFIX[name]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    if feats.ndim == 3:
        grid = (spec.input_size // model.patch_embed.patch_size[0]) ** 2
        assert feats.shape[1] == PREFIX[name] + grid


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="dinobloom-b"):
        get_spec("dinobloom-bb")
    with pytest.raises(ValueError, match="timm:test_vit"):
        get_spec("timm:test_vitt")
    with pytest.raises(ValueError, match="already registered"):
        register(get_spec("uni"))


# ---------------------------------------------------------------------------------------------
# 2. the hub path, through huggingface_hub itself, against a hand-built offline cache
# ---------------------------------------------------------------------------------------------


def test_hub_load_from_offline_cache(tmp_path, offline_cache, tiny):
    sd = seeded_state()
    src = tmp_path / "model.safetensors"
    save_file(sd, str(src))
    commit = commit_of("tiny-vit")
    make_hub_repo(offline_cache, "embedcache-test/tiny-vit", {"model.safetensors": src}, commit)
    name = tiny("tiny-hub", hub_id="embedcache-test/tiny-vit")

    bb = load_backbone(name)
    assert isinstance(bb, LoadedBackbone)
    assert_weights(bb.model, sd)
    assert bb.weights == {
        "source": "hub",
        "hub_id": "embedcache-test/tiny-vit",
        "revision": commit,
        "filename": "model.safetensors",
        "path": None,
        "sha256": sha256_file(src),
    }
    assert bb.key_name == name and bb.num_prefix_tokens == 1
    assert not bb.model.training and not any(p.requires_grad for p in bb.model.parameters())
    # pinning the commit gives the same snapshot; an unknown one is reported, not silently ignored
    assert load_backbone(name, revision=commit).weights["revision"] == commit
    with pytest.raises(WeightsUnavailable, match="embedcache-test/tiny-vit"):
        load_backbone(name, revision=commit_of("other"))


def test_hub_falls_back_to_pytorch_model_bin(tmp_path, offline_cache, tiny):
    sd = seeded_state(7)
    src = tmp_path / "pytorch_model.bin"
    torch.save(sd, src)
    commit = commit_of("bin-only")
    make_hub_repo(offline_cache, "embedcache-test/bin-only", {"pytorch_model.bin": src}, commit)
    bb = load_backbone(tiny("tiny-bin", hub_id="embedcache-test/bin-only"))
    assert_weights(bb.model, sd)
    assert bb.weights["filename"] == "pytorch_model.bin" and bb.weights["revision"] == commit
    assert bb.weights["sha256"] == sha256_file(src)


def test_hub_offline_not_cached_names_repo(offline_cache, tiny):
    name = tiny("tiny-absent", hub_id="embedcache-test/absent")
    with pytest.raises(WeightsUnavailable) as err:
        load_backbone(name)
    msg = str(err.value)
    assert "embedcache-test/absent" in msg and "hf download embedcache-test/absent" in msg
    assert "--weights PATH" in msg and "HF_HUB_OFFLINE" in msg and "--weights random" in msg


def test_unreachable_hub_is_tried_once(monkeypatch, tiny):
    """Not offline, but no network: one network attempt, the other files only from the cache, a fast clear error."""
    import huggingface_hub
    import huggingface_hub.constants as hc
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    name = tiny("tiny-unreachable", hub_id="org/unreachable")
    calls = []

    def unreachable(repo_id, filename, local_files_only=False, **k):
        calls.append((filename, local_files_only))
        raise LocalEntryNotFoundError("connection error and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(WeightsUnavailable, match="could not be reached.*--weights random"):
        load_backbone(name)
    assert calls == [("model.safetensors", False), ("pytorch_model.bin", True)]


def test_hub_env_vars_in_fresh_process(tmp_path):
    """HF_HUB_OFFLINE / HF_HUB_CACHE set before import, as a user would; the token never reaches provenance."""
    sd = seeded_state(11)
    src = tmp_path / "model.safetensors"
    save_file(sd, str(src))
    cache, commit = tmp_path / "cache", commit_of("env")
    make_hub_repo(cache, "embedcache-test/env-vit", {"model.safetensors": src}, commit)
    code = textwrap.dedent(f"""
        import json
        from embedcache.backbones.registry import BackboneSpec, register, IN_MEAN, IN_STD
        from embedcache.backbones.loading import load_backbone
        register(BackboneSpec(name="env-vit", arch="test_vit", hub_id="embedcache-test/env-vit",
                              filenames=("model.safetensors",), kwargs={{"img_size": {IMG}}}, input_size={IMG},
                              interpolation="bicubic", mean=IN_MEAN, std=IN_STD, width=64, licence="t"))
        bb = load_backbone("env-vit")
        print(json.dumps({{"weights": bb.weights, "key": bb.key_name}}))
    """)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_TOKEN": "hf_NotARealSecret123",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("HF_HOME", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["weights"]["source"] == "hub" and out["weights"]["revision"] == commit
    assert out["weights"]["sha256"] == sha256_file(src) and out["key"] == "env-vit"
    assert "NotARealSecret" not in res.stdout + res.stderr


def _hub_error(cls, msg):
    """A huggingface_hub error without building an HTTP response (constructor differs across versions)."""
    err = cls.__new__(cls)
    Exception.__init__(err, msg)
    return err


def test_hub_gated_and_missing_files_messages(monkeypatch, tiny):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError

    name = tiny("tiny-gated", hub_id="org/gated-model")

    def gated(*a, **k):
        raise _hub_error(GatedRepoError, "403 gated")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(WeightsUnavailable) as err:
        load_backbone(name)
    msg = str(err.value)
    assert "gated" in msg and "https://huggingface.co/org/gated-model" in msg
    assert "HF_TOKEN" in msg and "hf auth login" in msg and "--weights PATH" in msg

    calls = []

    def missing(repo_id, filename, **k):
        calls.append(filename)
        raise _hub_error(RemoteEntryNotFoundError, "404")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    with pytest.raises(WeightsUnavailable, match="model.safetensors, pytorch_model.bin"):
        load_backbone(name)
    assert calls == ["model.safetensors", "pytorch_model.bin"]


def test_no_hub_id_needs_weights(tiny):
    with pytest.raises(WeightsUnavailable, match="--weights PATH"):
        load_backbone(tiny("tiny-nohub"))


# ---------------------------------------------------------------------------------------------
# 3. local checkpoint files
# ---------------------------------------------------------------------------------------------


def test_local_safetensors(tmp_path, tiny):
    sd = seeded_state()
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    bb = load_backbone(tiny("tiny-local"), weights=path)
    assert_weights(bb.model, sd)
    sha = sha256_file(path)
    assert bb.weights["source"] == "file" and bb.weights["sha256"] == sha
    assert bb.weights["path"] == str(path.resolve()) and bb.weights["filename"] == "w.safetensors"
    assert bb.key_name == f"tiny-local@{sha[:8]}"
    with pytest.raises(ValueError, match="revision"):
        load_backbone("tiny-local", weights=path, revision="main")


def test_local_dino_teacher_checkpoint(tmp_path, tiny):
    sd = seeded_state(5)
    teacher = {f"backbone.{k}": v for k, v in sd.items()}
    teacher["dino_head.last_layer.weight"] = torch.randn(8, 64)
    teacher["ibot_head.mlp.0.weight"] = torch.randn(8, 64)
    path = tmp_path / "DinoBloom-T.pth"
    torch.save({"teacher": teacher, "student": {"backbone.x": torch.zeros(1)}, "iteration": 3}, path)
    bb = load_backbone(tiny("tiny-teacher"), weights=str(path))
    assert_weights(bb.model, sd)
    assert bb.key_name.startswith("tiny-teacher@")


def test_pos_embed_resampled_from_other_size(tmp_path, tiny):
    """As for DINOv2 (518 px weights run at 224): timm's checkpoint_filter_fn resamples pos_embed."""
    torch.manual_seed(3)
    big = timm.create_model("test_vit", img_size=2 * IMG, num_classes=0).state_dict()
    assert big["pos_embed"].shape[1] == 1 + 16
    save_file(big, str(tmp_path / "big.safetensors"))
    bb = load_backbone(tiny("tiny-resample"), weights=tmp_path / "big.safetensors")
    assert bb.model.pos_embed.shape[1] == 1 + 4
    assert torch.equal(bb.model.blocks[0].attn.qkv.weight, big["blocks.0.attn.qkv.weight"])


def test_raw_dinov2_checkpoint_keys(tmp_path):
    """Raw DINOv2 training keys: mask_token, SwiGLU w12/w3 (giant) and chunked blocks are mapped."""
    spec = BackboneSpec(
        name="tiny-swiglu",
        arch="test_vit",
        kwargs={"img_size": IMG, "init_values": 1e-5, "mlp_ratio": 4},
        layers={"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"},
        input_size=IMG,
        interpolation="bicubic",
        width=64,
        licence="test",
    )
    register(spec, overwrite=True)
    try:
        ref = load_backbone("tiny-swiglu", weights="random").model
        sd = jitter(ref).state_dict()
        raw = {"mask_token": torch.zeros(1, 64)}
        for k, v in sd.items():
            k = k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
            k = re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // 3}.{m.group(1)}.", k)
            raw[k] = v
        assert "blocks.1.4.mlp.w12.weight" in raw
        torch.save({"teacher": {f"backbone.{k}": v for k, v in raw.items()}}, tmp_path / "raw.pth")
        assert_weights(load_backbone("tiny-swiglu", weights=tmp_path / "raw.pth").model, sd)
    finally:
        registry._REGISTRY.pop("tiny-swiglu", None)


def test_not_a_checkpoint(tmp_path, tiny):
    path = tmp_path / "notes.txt"
    path.write_text("not weights " * 20)
    with pytest.raises(WeightsUnavailable, match="neither a safetensors file nor a torch checkpoint"):
        load_backbone(tiny("tiny-garbage"), weights=path)


def test_mismatched_checkpoint_names_keys(tmp_path, tiny):
    sd = seeded_state()
    sd.pop("blocks.0.norm1.weight")
    sd["blocks.99.surprise.weight"] = torch.zeros(3)
    sd["norm.bias"] = torch.zeros(7)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsMismatch) as err:
        load_backbone(tiny("tiny-bad"), weights=path)
    msg = str(err.value)
    assert "blocks.0.norm1.weight" in msg and "blocks.99.surprise.weight" in msg and "norm.bias" in msg


class _Payload:
    """Unpickling this would create a directory: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_pickle_with_objects_is_refused(tmp_path, tiny):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": seeded_state(), "extra": _Payload(marker)}, path)
    with pytest.raises(WeightsUnavailable, match="weights_only") as err:
        load_backbone(tiny("tiny-evil"), weights=path)
    assert err.value.__cause__ is not None
    assert not marker.exists()


def test_missing_file(tmp_path, tiny):
    with pytest.raises(WeightsUnavailable, match="not found"):
        load_backbone(tiny("tiny-nofile"), weights=tmp_path / "nope.safetensors")


def test_ctranspath_entry_has_convstem_keys():
    with torch.device("meta"):
        keys = set(build_model(get_spec("ctranspath")).state_dict())
    assert {
        "patch_embed.proj.0.weight",
        "patch_embed.proj.1.running_mean",
        "patch_embed.proj.3.weight",
        "patch_embed.proj.4.num_batches_tracked",
        "patch_embed.proj.6.bias",
        "patch_embed.norm.weight",
    } <= keys
    assert not any(k.startswith("patch_embed.proj.weight") for k in keys)


def test_convstem_swin_file_roundtrip(tmp_path):
    """A small Swin with the ConvStem: random weights, a real forward, and both Swin checkpoint layouts."""
    spec = BackboneSpec(
        name="tiny-ctp",
        arch="swin_tiny_patch4_window7_224",
        kwargs=dict(img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4),
        layers={"embed_layer": "ConvStem"},
        input_size=64,
        interpolation="bilinear",
        width=128,
        default_pool=("mean",),
        licence="test",
    )
    register(spec, overwrite=True)
    try:
        bb = load_backbone("tiny-ctp", weights="random")
        assert bb.num_prefix_tokens == 0
        with torch.inference_mode():
            feats = bb.model.forward_features(torch.randn(2, 3, 64, 64))
            assert feats.shape == (2, 2, 2, 128)
            assert bb.model.forward_head(feats, pre_logits=True).shape == (2, 128)
        sd = bb.model.state_dict()
        path = tmp_path / "ctp.safetensors"
        save_file(sd, str(path))
        assert_weights(load_backbone("tiny-ctp", weights=path).model, sd)
        # original Swin/CTransPath layout: downsample at the end of stage i, not the start of stage i+1
        old = {
            re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
            for k, v in sd.items()
        }
        assert "layers.0.downsample.reduction.weight" in old
        torch.save({"model": old}, tmp_path / "old.pth")
        assert_weights(load_backbone("tiny-ctp", weights=tmp_path / "old.pth").model, sd)
    finally:
        registry._REGISTRY.pop("tiny-ctp", None)


# ---------------------------------------------------------------------------------------------
# 4. timm:<arch> specs and seeded random weights
# ---------------------------------------------------------------------------------------------


def test_timm_specs_from_pretrained_cfg():
    vit, res = get_spec("timm:test_vit"), get_spec("timm:test_resnet")
    cfg = timm.models.get_pretrained_cfg("test_vit")
    assert vit.arch == "test_vit" and vit.width == 64 and vit.default_pool == ("cls",)
    assert vit.input_size == cfg.input_size[-1] and vit.interpolation == cfg.interpolation
    assert vit.mean == tuple(cfg.mean) and vit.std == tuple(cfg.std) and vit.hub_id == cfg.hf_hub_id
    rcfg = timm.models.get_pretrained_cfg("test_resnet")
    assert res.default_pool == ("mean",) and res.width == timm.create_model("test_resnet", num_classes=0).num_features
    assert res.interpolation == rcfg.interpolation and res.mean == tuple(rcfg.mean)
    # timm's training input_size, not its larger test_input_size (which costs more and surprises users)
    rs = get_spec("timm:resnetrs50")
    assert rs.input_size == 160 and "test size is 224 (--input-size 224)" in rs.notes
    assert get_spec("timm:resnet18").input_size == 224 == timm.models.get_pretrained_cfg("resnet18").input_size[-1]
    assert get_spec("resnet-rs50").input_size == 224  # the registry entry states its own size


def test_bare_timm_name_suggests_the_timm_form():
    with pytest.raises(ValueError, match=r"Did you mean: timm:vit_tiny_patch16_224\?"):
        get_spec("vit_tiny_patch16_224")


def test_random_weights_are_deterministic():
    a = load_backbone("timm:test_vit", weights="random")
    b = load_backbone("timm:test_vit", weights="random")
    assert a.weights["source"] == "random" and a.weights["sha256"] == b.weights["sha256"]
    assert a.key_name == "timm:test_vit@random" and a.num_prefix_tokens == 1
    assert_weights(b.model, a.model.state_dict())
    r = load_backbone("timm:test_resnet", weights="random")
    assert r.num_prefix_tokens == 0 and r.spec.default_pool == ("mean",)
    assert r.weights["sha256"] != a.weights["sha256"]


# ---------------------------------------------------------------------------------------------
# 5. HF transformers ViT / Dinov2 -> timm
# ---------------------------------------------------------------------------------------------


def jitter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make every parameter non-trivial (timm inits biases to 0 and LayerScale to 1e-5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def tiny_timm(layerscale=True, swiglu=False, img=IMG):
    kw = dict(img_size=img, num_classes=0)
    if layerscale:
        kw["init_values"] = 1e-5
    if swiglu:
        kw.update(mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=4)
    return timm.create_model("test_vit", **kw)


def timm_to_hf(sd, flavour: str, swiglu: bool = False, depth: int = 6, prefix: str = "") -> dict[str, torch.Tensor]:
    """Inverse mapping, written independently: timm ViT -> HF on-disk keys ("dinov2" or "vit")."""
    dino = flavour == "dinov2"
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    if dino:
        out["embeddings.mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    else:
        out["pooler.dense.weight"] = torch.randn(64, 64)
        out["pooler.dense.bias"] = torch.randn(64)
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{p}"].chunk(3, 0)
            out[f"{h}attention.attention.query.{p}"] = q
            out[f"{h}attention.attention.key.{p}"] = k
            out[f"{h}attention.attention.value.{p}"] = v
            out[f"{h}attention.output.dense.{p}"] = sd[f"{b}attn.proj.{p}"]
            out[f"{h}{'norm1' if dino else 'layernorm_before'}.{p}"] = sd[f"{b}norm1.{p}"]
            out[f"{h}{'norm2' if dino else 'layernorm_after'}.{p}"] = sd[f"{b}norm2.{p}"]
            if swiglu:  # transformers-4 on-disk SwiGLU: packed [gate; up] in, then out
                out[f"{h}mlp.weights_in.{p}"] = sd[f"{b}mlp.fc1.{p}"]
                out[f"{h}mlp.weights_out.{p}"] = sd[f"{b}mlp.fc2.{p}"]
            elif dino:
                out[f"{h}mlp.fc1.{p}"] = sd[f"{b}mlp.fc1.{p}"]
                out[f"{h}mlp.fc2.{p}"] = sd[f"{b}mlp.fc2.{p}"]
            else:
                out[f"{h}intermediate.dense.{p}"] = sd[f"{b}mlp.fc1.{p}"]
                out[f"{h}output.dense.{p}"] = sd[f"{b}mlp.fc2.{p}"]
        if dino:
            out[f"{h}layer_scale1.lambda1"] = sd[f"{b}ls1.gamma"]
            out[f"{h}layer_scale2.lambda1"] = sd[f"{b}ls2.gamma"]
    return {prefix + k: v.clone().contiguous() for k, v in out.items()}


@pytest.mark.parametrize(
    "flavour,layerscale,swiglu,prefix",
    [
        ("dinov2", True, False, ""),
        ("dinov2", True, True, "dinov2."),
        ("vit", False, False, ""),
        ("vit", False, False, "vit."),
    ],
)
def test_hf_roundtrip_gives_identical_outputs(flavour, layerscale, swiglu, prefix):
    ref = jitter(tiny_timm(layerscale, swiglu))
    hf = timm_to_hf(ref.state_dict(), flavour, swiglu, prefix=prefix)
    target = tiny_timm(layerscale, swiglu).eval()
    sd = normalise_state_dict(hf, target)
    loading.load_state_dict_strict(target, sd)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.inference_mode():
        assert torch.equal(target.forward_features(x), ref.forward_features(x))


def test_phikon_v2_spec_takes_converted_keys():
    """The phikon-v2 entry (ViT-L/16 + LayerScale) accepts exactly the keys the converter makes."""
    spec = get_spec("phikon-v2")
    with torch.device("meta"):
        model = build_model(spec)
        hf = timm_to_hf(model.state_dict(), "dinov2", depth=24)
        converted = hf_vit_to_timm(hf)
    own = model.state_dict()
    assert set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)


def _save_hf(model_dir: Path, sd: dict, config) -> None:
    model_dir.mkdir()
    config.save_pretrained(model_dir)
    save_file(sd, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("flavour,swiglu", [("dinov2", False), ("dinov2", True), ("vit", False)])
def test_converter_matches_transformers(tmp_path, flavour, swiglu):
    """Where transformers is installed: its own models, loaded from our HF-format files, agree with timm."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed; round trip above still runs")
    ref = jitter(tiny_timm(flavour == "dinov2", swiglu))
    hf_sd = timm_to_hf(ref.state_dict(), flavour, swiglu)
    common = dict(
        hidden_size=64,
        num_hidden_layers=6,
        num_attention_heads=2,
        image_size=IMG,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
    )
    if flavour == "dinov2":
        cfg = transformers.Dinov2Config(mlp_ratio=3, use_swiglu_ffn=swiglu, layerscale_value=1e-5, **common)
        cls = transformers.Dinov2Model
    else:
        cfg = transformers.ViTConfig(intermediate_size=192, **common)
        cls = transformers.ViTModel
    _save_hf(tmp_path / "hf", hf_sd, cfg)
    hf, info = cls.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys")
    hf.eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.inference_mode():
        want = hf(pixel_values=x).last_hidden_state
        torch.testing.assert_close(ref.forward_features(x), want, rtol=1e-4, atol=1e-4)
        # the transformers-5 in-memory names convert too
        again = tiny_timm(flavour == "dinov2", swiglu).eval()
        loading.load_state_dict_strict(again, normalise_state_dict(hf.state_dict(), again))
        torch.testing.assert_close(again.forward_features(x), want, rtol=1e-4, atol=1e-4)
        if flavour == "dinov2":  # pos_embed resized as HF does when the input grows
            big = tiny_timm(True, swiglu, img=2 * IMG).eval()
            loading.load_state_dict_strict(big, normalise_state_dict(hf_sd, big))
            x2 = torch.randn(2, 3, 2 * IMG, 2 * IMG)
            torch.testing.assert_close(
                big.forward_features(x2), hf(pixel_values=x2).last_hidden_state, rtol=1e-4, atol=1e-4
            )


# ---------------------------------------------------------------------------------------------
# 6. a backbone timm cannot build: build / embed hooks, extracted end to end into a store
# ---------------------------------------------------------------------------------------------


class ToyCNN(torch.nn.Module):
    """Not a timm model: no forward_features, returns (N, 16) from its own forward."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.proj = torch.nn.Linear(8, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def build_toy(spec: BackboneSpec) -> torch.nn.Module:
    return ToyCNN(spec.width)


def embed_toy(model, x, pools, num_prefix_tokens):
    return {"mean": model(x)}


@pytest.fixture
def toy():
    spec = BackboneSpec(
        name="toy-cnn",
        arch="toy",
        width=16,
        build=build_toy,
        embed=embed_toy,
        input_size=24,
        default_pool=("mean",),
        licence="test",
    )
    register(spec, overwrite=True)
    yield spec
    registry._REGISTRY.pop("toy-cnn", None)


def test_hook_backbone_extracts_end_to_end(tmp_path, toy, chula_subset):
    import embedcache
    from embedcache.backbones.forward import compute_batch
    from embedcache.backbones.preprocess import Preprocessing
    from embedcache.inputs.images import read_image

    manifest = chula_subset(20)
    out = tmp_path / "c.zarr"
    r = embedcache.extract("toy-cnn", manifest, out, weights="random", progress=False, num_workers=0, chunk_size=8)
    assert r.cells_computed == 20 and r.key == "toy-cnn@random/24-bilinear/clean"
    fs = embedcache.open_store(out).dataset().feature_set(r.key)
    feats = fs.to_numpy("mean")
    assert feats.shape == (20, 16) and fs.ok().all() and np.abs(feats).sum() > 0
    prov = fs.attrs["provenance"]["backbone"]
    assert prov["build"].endswith("build_toy") and prov["embed"].endswith("embed_toy") and prov["arch"] == "toy"
    # the stored rows are the hook's output for each cell, as one-cell batches compute it
    bb = load_backbone("toy-cnn", weights="random")
    assert isinstance(bb.model, ToyCNN) and not bb.model.training
    prep = Preprocessing(size=24, interpolation="bilinear", mean=IN_MEAN, std=IN_STD, fit="squash")
    paths = pd.read_csv(manifest)["path"]
    for i in (0, 13):
        one = compute_batch(
            bb.model,
            [torch.from_numpy(read_image(paths[i]))[None]],
            prep,
            torch.device("cpu"),
            torch.float32,
            ("mean",),
            0,
            embed_fn=bb.embed,
        )["mean"][0]
        np.testing.assert_allclose(feats[i], one.astype(np.float16).astype(np.float32), rtol=1e-2, atol=1e-3)
    # a local checkpoint of the toy module loads through the same path as any entry
    sd = {k: v + 0.5 for k, v in bb.model.state_dict().items()}
    save_file(sd, str(tmp_path / "toy.safetensors"))
    mine = load_backbone("toy-cnn", weights=str(tmp_path / "toy.safetensors"))
    assert_weights(mine.model, sd)
    assert mine.key_name.startswith("toy-cnn@") and mine.key_name != "toy-cnn@random"


def test_hook_output_is_checked(toy):
    bad = BackboneSpec(
        name="toy-bad",
        arch="toy",
        width=16,
        build=build_toy,
        default_pool=("mean",),
        embed=lambda model, x, pools, n: {"mean": model(x)[:, :3]},
        licence="test",
    )
    register(bad, overwrite=True)
    try:
        bb = load_backbone("toy-bad", weights="random")
        with pytest.raises(ValueError, match=r"toy-bad.*shape \(2, 3\), expected \(2, 16\)"):
            bb.embed(torch.zeros(2, 3, 24, 24), ("mean",))
        with pytest.raises(ValueError, match="gave pools"):
            load_backbone("toy-cnn", weights="random").embed(torch.zeros(2, 3, 24, 24), ("cls",))
    finally:
        registry._REGISTRY.pop("toy-bad", None)
    not_a_module = BackboneSpec(name="toy-none", arch="toy", width=4, build=lambda spec: object(), licence="t")
    with pytest.raises(TypeError, match="not a torch nn.Module"):
        build_model(not_a_module)
