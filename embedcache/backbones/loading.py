"""Build registry backbones and load their weights: Hugging Face cache, a local file, or seeded random.

Weights only ever come through ``huggingface_hub`` (token from the environment, offline mode
honoured), ``safetensors`` or ``torch.load(weights_only=True)``. Never ``trust_remote_code``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from embedcache.backbones import pooling
from embedcache.backbones.registry import BackboneSpec, get_spec

RANDOM_SEED = 0
_CONTAINERS = ("teacher", "state_dict", "model", "module")  # unwrapped in this order
_PREFIXES = ("module.", "_orig_mod.")
_SSL_HEADS = ("dino_head.", "ibot_head.")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class WeightsUnavailable(RuntimeError):
    """Weights cannot be had: gated, offline and not cached, missing file, or an unsafe pickle."""


class WeightsMismatch(ValueError):
    """A checkpoint's keys or shapes do not fit the backbone's architecture."""


@dataclass
class LoadedBackbone:
    """A frozen backbone on the CPU (``eval()``, no grads, no head) plus where its weights came from."""

    model: nn.Module
    spec: BackboneSpec
    weights: dict
    key_name: str
    num_prefix_tokens: int

    def embed(self, x: torch.Tensor, pools: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pooled features of a model-ready batch: the spec's ``embed`` hook, else timm-style pooling.

        Raises ``ValueError`` when a hook gives other pools than asked or vectors of the wrong width.
        """
        if self.spec.embed is None:
            return pooling.embed(self.model, x, pools, self.num_prefix_tokens)
        out = dict(self.spec.embed(self.model, x, tuple(pools), self.num_prefix_tokens))
        if set(out) != set(pools):
            raise ValueError(f"the embed hook of {self.spec.name!r} gave pools {sorted(out)}, asked for {list(pools)}")
        for p, v in out.items():
            if tuple(v.shape) != (x.shape[0], self.spec.width):
                raise ValueError(
                    f"the embed hook of {self.spec.name!r} gave '{p}' features of shape "
                    f"{tuple(v.shape)}, expected ({x.shape[0]}, {self.spec.width})"
                )
        return out


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def resolve_layers(layers: Mapping[str, str]) -> dict[str, Any]:
    """Map layer names (``"SwiGLUPacked"``, ``"SiLU"``, ``"ConvStem"``) to classes."""
    import timm.layers

    out = {}
    for kwarg, name in layers.items():
        if name == "ConvStem":
            from embedcache.backbones.ctranspath import ConvStem

            out[kwarg] = ConvStem
        elif callable(getattr(timm.layers, name, None)):
            out[kwarg] = getattr(timm.layers, name)
        elif isinstance(getattr(nn, name, None), type):
            out[kwarg] = getattr(nn, name)
        else:
            raise ValueError(f"unknown layer {name!r} for {kwarg!r}: use a timm.layers / torch.nn name or ConvStem")
    return out


def build_model(spec: BackboneSpec) -> nn.Module:
    """The spec's model without weights, in ``eval()`` without grads: its ``build`` hook, else timm's
    ``create_model(arch, pretrained=False)`` with no head."""
    if spec.build is not None:
        model = spec.build(spec)
        if not isinstance(model, nn.Module):
            raise TypeError(f"the build hook of {spec.name!r} returned a {type(model).__name__}, not a torch nn.Module")
        return model.eval().requires_grad_(False)
    import timm

    kwargs = {**dict(spec.kwargs), **resolve_layers(spec.layers), "num_classes": 0}
    model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    return model.eval().requires_grad_(False)


def num_prefix_tokens(model: nn.Module) -> int:
    """Class + register tokens ahead of the patch tokens (0 for CNNs and Swin)."""
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_backbone(name: str, weights: str | os.PathLike | None = None, revision: str | None = None) -> LoadedBackbone:
    """Build backbone ``name`` and load its weights.

    ``weights=None``: the spec's Hugging Face repo (``revision`` pins a branch, tag or commit);
    ``"random"``: seeded random init; otherwise a local ``.safetensors`` / torch checkpoint path.
    """
    spec = get_spec(name)
    if weights is not None and revision:
        raise ValueError("revision only applies to hub weights; drop it when passing weights")
    if isinstance(weights, str) and weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = build_model(spec)
        prov = _provenance("random", sha256=state_dict_sha256(model.state_dict()), seed=RANDOM_SEED)
        # random features never share a key with pretrained ones
        return LoadedBackbone(model, spec, prov, f"{spec.name}@random", num_prefix_tokens(model))
    if weights is None and spec.packaged is not None:
        if revision:
            raise ValueError(f"{spec.name!r} takes its weights from an installed package: there is no revision")
        found, extra = spec.packaged(spec)
        path = Path(found)
        prov = _provenance("package", filename=path.name, path=str(path), sha256=sha256_file(path), **extra)
        key_name = spec.name
    elif weights is None:
        path, prov = _hub_file(spec, revision)
        key_name = spec.name
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"weights file not found: {str(path)!r} (for backbone {spec.name!r})")
        prov = _provenance("file", filename=path.name, path=str(path.resolve()), sha256=sha256_file(path))
        key_name = f"{spec.name}@{prov['sha256'][:8]}"
    model = build_model(spec)
    state = read_state_dict(path)
    own = model.state_dict()
    if spec.convert is not None and not any(k in own for k in state):  # a checkpoint in another naming
        state = spec.convert(state, model, f"{spec.name} weights {prov.get('package') or path.name}")
    state = normalise_state_dict(state, model)
    load_state_dict_strict(model, state, f"{spec.name} ({spec.arch})")
    return LoadedBackbone(model.eval(), spec, prov, key_name, num_prefix_tokens(model))


def _provenance(source: str, **kw: Any) -> dict:
    base = {"source": source, "hub_id": None, "revision": None, "filename": None, "path": None, "sha256": None}
    return {**base, **kw}


def _hub_file(spec: BackboneSpec, revision: str | None) -> tuple[Path, dict]:
    """Fetch the first of ``spec.filenames`` that the repo (or, offline, the cache) has."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not spec.hub_id:
        raise WeightsUnavailable(
            f"backbone {spec.name!r} has no Hugging Face weights: pass weights=PATH (--weights PATH) or 'random'"
        )
    hub, url = spec.hub_id, f"https://huggingface.co/{spec.hub_id}"
    access = (
        f"Accept its terms at {url} while logged in, then set HF_TOKEN or run `hf auth login`; "
        f"or pass --weights PATH to a local copy."
    )
    tried: list[str] = []
    offline: BaseException | None = None
    local_only = bool(constants.HF_HUB_OFFLINE)
    for filename in spec.filenames:
        try:
            found = hf_hub_download(hub, filename, revision=revision, local_files_only=local_only)
            break
        except GatedRepoError as e:
            raise WeightsUnavailable(f"{hub} is a gated repository and this session has no access. {access}") from e
        except RepositoryNotFoundError as e:
            raise WeightsUnavailable(
                f"repository {hub} was not found or is private/gated for this session. If it is gated: {access}"
            ) from e
        except RevisionNotFoundError as e:
            raise WeightsUnavailable(f"revision {revision!r} does not exist in {url}") from e
        except LocalEntryNotFoundError as e:  # offline, or hub unreachable, and not cached
            tried.append(filename)
            offline = e
            local_only = True  # the hub was not reached once: look for the other files in the cache only
        except EntryNotFoundError:  # the hub says the repo has no such file
            tried.append(filename)
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                raise WeightsUnavailable(f"access to {hub} was refused (HTTP {status}); gated? {access}") from e
            raise WeightsUnavailable(f"the Hugging Face Hub failed for {hub}/{filename}: {e}") from e
        except OSError as e:  # connection problems that slipped past huggingface_hub
            tried.append(filename)
            offline = e
            local_only = True
    else:
        at = f" at revision {revision!r}" if revision else ""
        if offline is not None:
            mode = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
            raise WeightsUnavailable(
                f"weights for {spec.name!r} ({hub}{at}; tried {', '.join(tried)}) are not in the local Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}) and {mode}. On a connected machine run "
                f"`hf download {hub}` (then copy the cache here or point HF_HUB_CACHE at it), "
                f"or pass --weights PATH to a local checkpoint; to try the tool without any download, "
                f"--weights random (random-init features)."
            ) from offline
        raise WeightsUnavailable(
            f"none of the weight files {', '.join(tried)} exists in {url}{at}; pass --weights PATH instead."
        )
    path = Path(found)
    prov = _provenance(
        "hub",
        hub_id=hub,
        revision=_snapshot_commit(path) or revision,
        filename=spec.filenames[len(tried)],
        sha256=sha256_file(path),
    )
    return path, prov


def _snapshot_commit(path: Path) -> str | None:
    """Commit hash from a cache path ``.../snapshots/<commit>/<filename>``."""
    parts = path.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "snapshots" and _COMMIT.match(parts[i + 1]):
            return parts[i + 1]
    return None


# ---------------------------------------------------------------------------------------------
# Files and digests
# ---------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(sd: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over sorted (name, dtype, shape, bytes) of a state dict."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < path.stat().st_size


def read_state_dict(path: str | os.PathLike) -> dict:
    """Tensors from ``.safetensors`` or a torch checkpoint, the latter only via ``weights_only=True``."""
    path = Path(path)
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if blocked is None:
            raise WeightsUnavailable(f"{path.name} is neither a safetensors file nor a torch checkpoint") from e
        raise WeightsUnavailable(
            f"refusing to load {path.name}: it holds Python objects beyond tensors and plain containers, which "
            f"torch.load(weights_only=True) does not unpickle (unpickling them could run code). Re-save just the "
            f"state dict (torch.save(model.state_dict(), ...)) or convert it to .safetensors. "
            f"weights_only said: {blocked[:300]}"
        ) from e
    except (RuntimeError, EOFError, KeyError, ValueError) as e:
        raise WeightsUnavailable(f"{path.name} is neither a safetensors file nor a torch checkpoint: {e!r}") from e
    if not isinstance(obj, Mapping):
        raise WeightsUnavailable(f"{path.name} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


# ---------------------------------------------------------------------------------------------
# State-dict normalisation
# ---------------------------------------------------------------------------------------------


def normalise_state_dict(sd: Mapping[str, Any], model: nn.Module) -> dict:
    """Map a checkpoint onto ``model``'s keys.

    Unwraps ``teacher`` / ``state_dict`` / ``model`` containers, strips ``module.`` and
    ``backbone.`` prefixes, drops SSL heads and classifier heads the model lacks, converts HF
    transformers ViT/Dinov2 keys and chunked DINOv2 blocks, then applies the timm model module's
    ``checkpoint_filter_fn`` (raw DINOv2 keys, pos_embed resampling, Swin layout, ...).
    """
    model_keys = set(model.state_dict())
    for _ in range(4):
        inner = next((sd[c] for c in _CONTAINERS if isinstance(sd.get(c), Mapping)), None)
        if inner is None:
            break
        sd = inner
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        sd = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(_SSL_HEADS)}
    if any(k.startswith("backbone.") for k in sd) and not any(k.startswith("backbone.") for k in model_keys):
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    if is_hf_vit(sd):
        sd = hf_vit_to_timm(sd, model)
    sd = _unchunk_blocks(sd, model_keys)
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if callable(filter_fn):
        sd = filter_fn(dict(sd), model)
    return _drop_heads(dict(sd), model, model_keys)


def _unchunk_blocks(sd: dict, model_keys: set[str]) -> dict:
    """DINOv2 ``block_chunks``: ``blocks.<chunk>.<i>.*`` -> ``blocks.<i>.*``."""
    pat = re.compile(r"^blocks\.\d+\.(\d+)\.")
    if not any(pat.match(k) for k in sd) or any(pat.match(k) for k in model_keys):
        return sd
    return {pat.sub(r"blocks.\1.", k): v for k, v in sd.items()}


def _drop_heads(sd: dict, model: nn.Module, model_keys: set[str]) -> dict:
    """Drop classifier / pooler weights the headless model has no place for."""
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    heads = {*(cls if isinstance(cls, (tuple, list)) else (cls,)), "head", "head_dist", "fc", "classifier"}
    prefixes = tuple(h + "." for h in heads)
    return {k: v for k, v in sd.items() if k in model_keys or not k.startswith(prefixes)}


def load_state_dict_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """``load_state_dict(strict=True)`` with an error that names the first bad keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        groups = (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
            for label, keys in groups
            if keys
        ]
        raise WeightsMismatch(
            f"checkpoint does not fit {what}: " + "; ".join(parts) + ". Is it a checkpoint for this backbone?"
        )
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers ViT / Dinov2 -> timm VisionTransformer
# ---------------------------------------------------------------------------------------------

_HF_MODEL_PREFIXES = ("vit.", "dinov2.", "model.")


def is_hf_vit(sd: Mapping[str, Any]) -> bool:
    """True for transformers ``ViTModel`` / ``Dinov2Model`` state dicts (optionally ``vit.``/``dinov2.`` prefixed)."""
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd)


# per-layer HF suffix -> timm suffix; legacy (on-disk, transformers 4) and transformers 5 names
_HF_LAYER_MAP = {
    "norm1": "norm1",
    "layernorm_before": "norm1",
    "norm2": "norm2",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "intermediate.dense": "mlp.fc1",
    "mlp.weights_in": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "output.dense": "mlp.fc2",
    "mlp.weights_out": "mlp.fc2",
    "mlp.down_proj": "mlp.fc2",
}
_HF_QKV = {
    "q": ("attention.attention.query", "attention.q_proj"),
    "k": ("attention.attention.key", "attention.k_proj"),
    "v": ("attention.attention.value", "attention.v_proj"),
}


def hf_vit_to_timm(sd: Mapping[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Convert HF ``ViTModel`` / ``Dinov2Model`` keys to timm ``VisionTransformer`` keys.

    q/k/v are concatenated into ``qkv``, ``layer_scale*.lambda1`` becomes ``ls*.gamma``, SwiGLU
    ``weights_in`` (or ``gate_proj``+``up_proj``) becomes packed ``fc1``; poolers and the mask token
    are dropped. With ``model``, ``pos_embed`` is resized the way HF does at run time (bicubic,
    no antialias) and folded for ``no_embed_class`` models with registers.
    """
    prefix = next((p for p in _HF_MODEL_PREFIXES if f"{p}embeddings.patch_embeddings.projection.weight" in sd), "")
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$", k)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = v
        elif k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k == "embeddings.register_tokens":
            out["reg_token"] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif k == "embeddings.mask_token" or k.startswith("pooler."):
            continue
        else:
            raise WeightsMismatch(f"unrecognised key in a Hugging Face ViT checkpoint: {k}")
    for i, entries in sorted(layers.items()):
        for param in ("weight", "bias"):
            found_qkv = [
                next((entries.pop(f"{n}.{param}") for n in _HF_QKV[c] if f"{n}.{param}" in entries), None)
                for c in "qkv"
            ]
            qkv = [t for t in found_qkv if t is not None]
            if len(qkv) == 3:
                out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat(qkv, 0)
            gate, up = entries.pop(f"mlp.gate_proj.{param}", None), entries.pop(f"mlp.up_proj.{param}", None)
            if gate is not None and up is not None:
                out[f"blocks.{i}.mlp.fc1.{param}"] = torch.cat([gate, up], 0)
        for sub, v in entries.items():
            stem, _, leaf = sub.rpartition(".")
            if sub in _HF_LAYER_MAP:  # lambda1 has no .weight/.bias leaf
                out[f"blocks.{i}.{_HF_LAYER_MAP[sub]}"] = v
            elif stem in _HF_LAYER_MAP:
                out[f"blocks.{i}.{_HF_LAYER_MAP[stem]}.{leaf}"] = v
            else:
                raise WeightsMismatch(f"unrecognised key in a Hugging Face ViT checkpoint: layer {i}: {sub}")
    if model is not None and "pos_embed" in out and getattr(model, "pos_embed", None) is not None:
        out.update(_hf_pos_embed(out, model))
    return out


def _hf_pos_embed(out: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """HF pos embeddings (CLS + square grid) -> the model's grid, resized as HF does at run time."""
    pos = out["pos_embed"]
    cls_pos, grid = pos[:, :1], pos[:, 1:]
    vit: Any = model  # a timm VisionTransformer; nn.Module types its submodules as Tensor | Module
    gh, gw = vit.patch_embed.grid_size
    n = int(round(grid.shape[1] ** 0.5))
    if (n, n) != (gh, gw) and n * n == grid.shape[1]:
        g = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
        g = torch.nn.functional.interpolate(g, size=(gh, gw), mode="bicubic", align_corners=False)
        grid = g.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(pos.dtype)
    res = {"pos_embed": torch.cat([cls_pos, grid], 1)}
    if getattr(model, "no_embed_class", False):  # timm keeps CLS/register tokens outside pos_embed
        res = {"pos_embed": grid, "cls_token": out["cls_token"] + cls_pos}
    return res
