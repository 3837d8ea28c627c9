"""Fine-tunes on real Chula cells with a tiny random-init ViT: cached tokens == full model, LoRA, NaN, adapters."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from embedcache.backbones.adapters import tail_key_to_backbone
from embedcache.backbones.loading import load_backbone, state_dict_sha256
from embedcache.backbones.pooling import embed
from embedcache.backbones.preprocess import Preprocessing
from embedcache.backbones.tail import TailError, tail_tokens
from probes.tuning import (
    AdapterError,
    ArrayTokens,
    FineTuneProbe,
    ImageReader,
    TrainingDiverged,
    load_adapter,
)

SIZE = 64
FAST = {"epochs": 2, "batch_size": 64, "device": "cpu"}


@pytest.fixture(scope="module")
def cells(chula_manifest):
    """130 real cells (10 per class, 13 classes): image reader, labels, model input, tail tokens (k=1, 2)."""
    df = chula_manifest.groupby("label").head(10).reset_index(drop=True)
    bb = load_backbone("timm:test_vit", weights="random")
    images = ImageReader(df["path"].tolist(), Preprocessing(SIZE, "bicubic", bb.spec.mean, bb.spec.std))
    x = torch.from_numpy(images.read(np.arange(len(df))))
    tokens = {k: tail_tokens(bb, x, k).numpy() for k in (1, 2)}
    return {"bb": bb, "images": images, "y": df["label_name"].to_numpy(dtype=str), "x": x, "tokens": tokens}


def _hist(p: FineTuneProbe) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in p.history_]


def test_ft_last_from_cached_tokens_equals_ft_last_through_the_full_model(cells):
    bb, y = cells["bb"], cells["y"]
    full = FineTuneProbe(bb, method="ft-last", k=2, **FAST).fit(cells["images"], y)
    cached = FineTuneProbe(bb, method="ft-last", k=2, **FAST).fit(ArrayTokens(cells["tokens"][2]), y)
    assert len(full.step_losses_) == len(cached.step_losses_) == 2 * 2  # 117 training cells, batch 64
    np.testing.assert_allclose(cached.step_losses_, full.step_losses_, rtol=1e-5)
    np.testing.assert_allclose(cached.history_[0]["train_loss"], full.history_[0]["train_loss"], rtol=1e-5)
    half = FineTuneProbe(bb, method="ft-last", k=2, **FAST).fit(ArrayTokens(cells["tokens"][2].astype(np.float16)), y)
    np.testing.assert_allclose(half.step_losses_[:2], full.step_losses_[:2], rtol=2e-3)
    assert full.step_losses_[0] != full.step_losses_[-1]  # it trains
    # the caller's backbone is untouched by training
    assert state_dict_sha256(bb.model.state_dict()) == bb.weights["sha256"]


def test_resnet_final_stage_tokens_equal_full_model():
    bb = load_backbone("timm:test_resnet", weights="random")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, SIZE, SIZE, generator=g)
    y = np.repeat(["a", "b"], 12)

    class Images:
        kind = "images"

        def __len__(self):
            return len(x)

        def read(self, rows):
            return x[torch.as_tensor(rows)].numpy()

    full = FineTuneProbe(bb, method="ft-last", k=1, **FAST).fit(Images(), y)
    cached = FineTuneProbe(bb, method="ft-last", k=1, **FAST).fit(ArrayTokens(tail_tokens(bb, x, 1)), y)
    np.testing.assert_allclose(cached.step_losses_, full.step_losses_, rtol=1e-5)
    with pytest.raises(ValueError, match="LoRA needs transformer blocks"):
        FineTuneProbe(bb, method="lora", k=1, **FAST).fit(ArrayTokens(tail_tokens(bb, x, 1)), y)


def test_lora_trains_only_its_adapters(cells):
    bb, y = cells["bb"], cells["y"]
    p = FineTuneProbe(bb, method="lora", k=2, lora_rank=4, lora_alpha=8, lr=1e-2, **FAST)
    p.fit(ArrayTokens(cells["tokens"][2]), y)
    tail = p.net_.trunk
    own = bb.model.state_dict()
    base, lora = {}, {}
    for name, t in tail.state_dict().items():
        (lora if ".lora_" in name else base)[name] = t
    assert len(lora) == 2 * 2 * 2  # 2 blocks x (qkv, proj) x (A, B)
    for name, t in base.items():  # tail block i is backbone block 4 + i of 6; norm is norm
        key = tail_key_to_backbone(name.replace(".base_layer", ""), tail)
        assert torch.equal(t, own[key]), name
    assert any(".base_layer" in n for n in base) and "norm.weight" in base
    assert all(t.abs().sum() > 0 for n, t in lora.items() if "lora_B" in n)  # B starts at 0: it moved
    n_lora = sum(t.numel() for t in lora.values())
    n_head = sum(q.numel() for q in p.net_.head.parameters())
    assert p.n_trainable_ == n_lora + n_head
    assert state_dict_sha256(bb.model.state_dict()) == bb.weights["sha256"]


def test_lora_on_every_block_from_images(cells, tmp_path):
    bb, y = cells["bb"], cells["y"]
    p = FineTuneProbe(bb, method="lora", k=6, lora_rank=2, epochs=1, batch_size=64, device="cpu")
    p.fit(cells["images"], y)
    lora = [n for n, q in p.net_.trunk.named_parameters() if q.requires_grad]
    assert len(lora) == 6 * 2 * 2 and all(".lora_" in n for n in lora)
    assert p.predict(cells["images"]).shape == y.shape
    with pytest.raises(FileNotFoundError, match="1 of 2 images are gone"):
        ImageReader([cells["images"].paths[0], str(tmp_path / "gone.jpg")], cells["images"].prep)


def test_fits_are_deterministic_with_the_same_seed(cells):
    bb, y, tok = cells["bb"], cells["y"], ArrayTokens(cells["tokens"][1])
    a = FineTuneProbe(bb, method="ft-last", k=1, head="decoder", seed=3, **FAST).fit(tok, y)
    b = FineTuneProbe(bb, method="ft-last", k=1, head="decoder", seed=3, **FAST).fit(tok, y)
    c = FineTuneProbe(bb, method="ft-last", k=1, head="decoder", seed=4, epochs=1, batch_size=64, device="cpu")
    c.fit(tok, y)
    assert _hist(a) == _hist(b) and a.step_losses_ == b.step_losses_
    np.testing.assert_array_equal(a.predict_proba(tok), b.predict_proba(tok))
    assert a.step_losses_[:2] != c.step_losses_
    proba = a.predict_proba(tok)
    assert proba.shape == (len(y), 13) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert set(a.predict(tok)) <= set(a.classes_)
    assert [h["epoch"] for h in a.history_] == [1, 2]
    assert all(isinstance(h["val_macro_f1"], float) and isinstance(h["train_loss"], float) for h in a.history_)


class Poisoned:
    """Tokens that turn to NaN after ``after`` reads (epoch 2 with 2 batches + 1 hold-out read per epoch)."""

    def __init__(self, array: np.ndarray, after: int):
        self.array, self.after, self.reads = array, after, 0

    def __len__(self):
        return len(self.array)

    def read(self, rows):
        self.reads += 1
        out = self.array[rows].copy()
        if self.reads > self.after:
            out[:] = np.nan
        return out


def test_nan_loss_stops_naming_the_epoch_and_keeps_the_best_state(cells):
    bb, y, tok = cells["bb"], cells["y"], cells["tokens"][1]
    p = FineTuneProbe(bb, method="ft-last", k=1, epochs=3, batch_size=64, device="cpu")
    with pytest.raises(TrainingDiverged, match="at epoch 2; kept the best state \\(epoch 1\\)") as err:
        p.fit(Poisoned(tok, after=1 + 2 + 2 + 1), y)  # shape probe, head moments, epoch 1 (2 batches each), hold-out
    assert err.value.epoch == 2
    ref = FineTuneProbe(bb, method="ft-last", k=1, epochs=1, batch_size=64, device="cpu").fit(ArrayTokens(tok), y)
    np.testing.assert_array_equal(p.predict_proba(ArrayTokens(tok)), ref.predict_proba(ArrayTokens(tok)))
    q = FineTuneProbe(bb, method="ft-last", k=1, **FAST)
    with pytest.raises(TrainingDiverged, match="at epoch 1; no epoch finished"):
        q.fit(Poisoned(tok, after=1), y)
    with pytest.raises(RuntimeError, match="not fitted"):
        q.predict(ArrayTokens(tok))


def test_early_stopping_and_lp_paths(cells):
    bb, y = cells["bb"], cells["y"]
    stuck = FineTuneProbe(bb, method="ft-last", k=1, epochs=10, lr=1e-12, patience=2, batch_size=64, device="cpu")
    stuck.fit(ArrayTokens(cells["tokens"][1]), y)
    assert len(stuck.history_) == 3 and stuck.best_epoch_ == 1  # no improvement in epochs 2, 3
    # lp on the store's pooled features (no backbone) equals lp on tail tokens through the frozen tail
    feats = embed(bb.model, cells["x"], ["cls"], 1)["cls"].numpy()
    on_feats = FineTuneProbe(None, method="lp", **FAST).fit(ArrayTokens(feats), y)
    on_tokens = FineTuneProbe(bb, method="lp", k=1, **FAST).fit(ArrayTokens(cells["tokens"][1]), y)
    np.testing.assert_allclose(on_feats.step_losses_, on_tokens.step_losses_, rtol=1e-5)
    assert on_tokens.n_trainable_ == 64 * 13 + 13


def test_losses_and_heads_are_selectable(cells, tmp_path):
    bb, y, tok = cells["bb"], cells["y"], ArrayTokens(cells["tokens"][1])
    names = sorted(set(y))
    hier = tmp_path / "lineage.yaml"
    hier.write_text(
        f"lineages:\n  a: [{names[0]}, {names[1]}, {names[2]}]\npenalties:\n"
        f"  - {{true: {names[0]}, pred: {names[3]}, weight: 5}}\nsmoothing: 0.1\ngamma: 2\n"
    )
    for loss, head in (("hierarchical-focal", "linear-cls-mean"), ("weighted-focal", "mlp")):
        p = FineTuneProbe(
            bb, method="ft-last", k=1, loss=loss, hierarchy=hier if "hier" in loss else None, head=head, **FAST
        ).fit(tok, y)
        assert np.isfinite([h["train_loss"] for h in p.history_]).all()
    ce = FineTuneProbe(bb, method="ft-last", k=1, **FAST).fit(tok, y)
    assert p.step_losses_[0] != ce.step_losses_[0]


def test_bad_input(cells):
    bb, y = cells["bb"], cells["y"]
    tok = ArrayTokens(cells["tokens"][1])
    with pytest.raises(ValueError, match="unknown fine-tune method"):
        FineTuneProbe(bb, method="full", **FAST).fit(tok, y)
    with pytest.raises(TailError, match="use 1..6"):
        FineTuneProbe(bb, method="ft-last", k=9, **FAST).fit(tok, y)
    with pytest.raises(ValueError, match="pooled features"):
        FineTuneProbe(bb, method="ft-last", **FAST).fit(ArrayTokens(np.zeros((len(y), 64), np.float32)), y)
    with pytest.raises(ValueError, match="do not fit the last 1 blocks"):
        FineTuneProbe(bb, method="ft-last", **FAST).fit(ArrayTokens(np.zeros((len(y), 17, 32), np.float32)), y)
    with pytest.raises(TypeError, match="token reader"):
        FineTuneProbe(bb, **FAST).fit(cells["tokens"][1], y)
    p = FineTuneProbe(bb, method="ft-last", k=1, epochs=1, batch_size=64, device="cpu").fit(tok, y)
    with pytest.raises(ValueError, match="rows of shape"):
        p.predict(ArrayTokens(cells["tokens"][1][:, :5]))


@pytest.mark.parametrize("method", ["ft-last", "lora"])
def test_saved_adapter_embeds_like_the_tuned_model(cells, tmp_path, method):
    bb, y, x = cells["bb"], cells["y"], cells["x"]
    p = FineTuneProbe(bb, method=method, k=2, lr=1e-2, **FAST).fit(ArrayTokens(cells["tokens"][2]), y)
    p.save_adapter(tmp_path / "run")
    ad = load_adapter(tmp_path / "run")  # the base backbone loaded afresh from the provenance
    assert ad.meta["method"] == method and ad.meta["k"] == 2 and ad.meta["weights"]["sha256"] == bb.weights["sha256"]
    assert ad.backbone.key_name.startswith("timm:test_vit@random+" + method)
    tuned = embed(ad.backbone.model, x, ["cls", "mean"], 1)
    with torch.no_grad():
        mem = p.net_.trunk.embed(torch.from_numpy(cells["tokens"][2]), ["cls", "mean"])
        base = embed(bb.model, x, ["cls"], 1)["cls"]
        logits = ad.head(tuned["cls"])
    for pool in ("cls", "mean"):
        torch.testing.assert_close(tuned[pool], mem[pool], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(tuned["cls"], base, atol=1e-3)  # it is the tuned model, not the base one
    np.testing.assert_allclose(
        torch.softmax(logits, 1).numpy(), p.predict_proba(ArrayTokens(cells["tokens"][2])), atol=1e-5
    )
    other = dataclasses.replace(bb, weights={**bb.weights, "sha256": "0" * 64})
    with pytest.raises(AdapterError, match="was trained on"):
        load_adapter(tmp_path / "run", other)
    (tmp_path / "run" / "adapter.json").unlink()
    with pytest.raises(AdapterError, match="missing adapter.json"):
        load_adapter(tmp_path / "run")
