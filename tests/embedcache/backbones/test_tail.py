"""The tail on cached tokens reproduces the backbone's own pooled features, per architecture family."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from embedcache.backbones.pooling import embed
from embedcache.backbones.preprocess import Preprocessing, to_model_input
from embedcache.backbones.tail import (
    TailError,
    TailModule,
    tail_bytes_per_cell,
    tail_depth,
    tail_token_shape,
    tail_tokens,
)
from embedcache.inputs.images import read_image

SIZE = 64


def cell_batch(manifest, n: int = 12, size: int = SIZE) -> torch.Tensor:
    """``n`` real Chula cells, one per class where possible, as normalised model input."""
    df = manifest.groupby("label").head(1).head(n)
    imgs = [torch.from_numpy(read_image(p)) for p in df["path"]]
    prep = Preprocessing(size, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return to_model_input([torch.stack(imgs)], prep, torch.device("cpu"))


def _tiny(arch: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=0, **kw).eval().requires_grad_(False)


MODELS = {
    "test_vit": lambda: _tiny("test_vit"),
    "vit_reg_noembedcls_ls": lambda: _tiny(
        "vit_small_patch16_224",
        depth=3,
        embed_dim=64,
        num_heads=2,
        reg_tokens=4,
        img_size=SIZE,
        no_embed_class=True,
        init_values=1e-5,
        dynamic_img_size=True,
    ),
    "vit_avg_fcnorm": lambda: _tiny("test_vit2"),
    "vit_map": lambda: _tiny("test_vit3", img_size=SIZE),
    "eva_dinov3": lambda: _tiny("vit_small_patch16_dinov3", depth=3, embed_dim=64, num_heads=2, img_size=SIZE),
    "resnet": lambda: _tiny("test_resnet"),
}


@pytest.fixture(scope="module")
def cells(chula_manifest):
    return cell_batch(chula_manifest)


@pytest.mark.parametrize("name", list(MODELS))
def test_tail_on_cached_tokens_reproduces_pooled_features(name, cells):
    model = MODELS[name]()
    npt = int(getattr(model, "num_prefix_tokens", 0) or 0)
    pools = ["mean"] if name == "resnet" else ["cls", "mean"]
    ref = embed(model, cells, pools, npt)
    with torch.no_grad():
        head_ref = model.forward_head(model.forward_features(cells), pre_logits=True)
    depth = tail_depth(model)
    for k in sorted({1, 2, depth}):
        tokens = tail_tokens(model, cells, k)
        assert tuple(tokens.shape[1:]) == tail_token_shape(model, k, SIZE)
        tail = TailModule(model, k).eval()
        with torch.no_grad():
            exact = tail.embed(tokens, pools + ["head"])
            half = tail.embed(tokens.to(torch.float16), pools)  # the cache stores float16
        for p in pools:
            assert torch.equal(exact[p], ref[p]), (name, k, p)
            cos = F.cosine_similarity(half[p].float(), ref[p].float(), dim=1)
            assert cos.min().item() >= 0.999, (name, k, p, cos.min().item())
        assert torch.equal(exact["head"], head_ref), (name, k)


def test_loaded_backbone_and_default_pool(tiny_vit, cells):
    tokens = tail_tokens(tiny_vit, cells, 1)
    assert tokens.shape == (len(cells), 1 + (SIZE // 16) ** 2, 64)
    tail = TailModule(tiny_vit, 1)
    assert tail.pool == "cls"
    with torch.no_grad():
        assert torch.equal(tail(tokens), embed(tiny_vit.model, cells, ["cls"], 1)["cls"])


def test_resnet_tokens_are_the_input_of_the_final_stage(cells):
    model = MODELS["resnet"]()
    tokens = tail_tokens(model, cells, 1)
    with torch.no_grad():
        x = model.maxpool(model.act1(model.bn1(model.conv1(cells))))
        x = model.layer3(model.layer2(model.layer1(x)))
    assert torch.equal(tokens, x) and tokens.ndim == 4
    with pytest.raises(ValueError, match="no class token"):
        TailModule(model, 1, pool="cls")


def test_copy_leaves_the_backbone_untouched(cells):
    model = MODELS["test_vit"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tail = TailModule(model, 2, copy=True)
    with torch.no_grad():
        for p in tail.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    shared = TailModule(model, 2)
    assert shared.blocks[0] is model.blocks[-2]


def test_k_beyond_depth_and_unsupported_models():
    model = MODELS["test_vit"]()
    with pytest.raises(TailError, match=r"k=7 blocks .* 6 blocks: use 1\.\.6"):
        TailModule(model, 7)
    with pytest.raises(TailError, match="use 1..6"):
        tail_tokens(model, torch.zeros(1, 3, SIZE, SIZE), 0)
    convnext = _tiny("test_convnext")
    with pytest.raises(TailError, match="ConvNeXt.*supported: timm VisionTransformer"):
        tail_depth(convnext)


def test_bytes_per_cell():
    with torch.device("meta"):
        vit_l = timm.create_model("vit_large_patch16_224", num_classes=0)
    assert tail_bytes_per_cell(vit_l, 1, 224) == 197 * 1024 * 2
    assert tail_bytes_per_cell(vit_l, 1, 224, "float32") == 197 * 1024 * 4
    with pytest.raises(TailError, match="224x224 input only"):
        tail_bytes_per_cell(vit_l, 1, 64)
    resnet = MODELS["resnet"]()
    c, h, w = tail_token_shape(resnet, 1, SIZE)
    assert tail_bytes_per_cell(resnet, 1, SIZE) == c * h * w * 2
    with pytest.raises(ValueError, match="dtype"):
        tail_bytes_per_cell(resnet, 1, SIZE, "int8")
    assert np.prod(tail_token_shape(MODELS["eva_dinov3"](), 1, SIZE)) == (5 + 16) * 64
