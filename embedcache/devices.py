"""One place that turns ``device=`` / ``dtype=`` strings into torch objects, for extraction and probes alike."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "DeviceUnavailable", "resolve_device", "resolve_dtype"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DeviceUnavailable(ValueError, RuntimeError):
    """The device asked for does not exist here (a ``ValueError``; also a ``RuntimeError`` for older callers)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when torch sees one, else CPU; ``"cpu"``; ``"cuda[:N]"``; ``"mps"``.

    Raises :class:`DeviceUnavailable` when CUDA (or CUDA device N) is asked for and absent, and
    ``ValueError`` for any other device name.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device={str(device)!r} asks for CUDA, but torch {torch.__version__} sees no CUDA device on this "
                "machine; use device='auto' (CUDA when present, else CPU) or 'cpu' (--device cpu)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device={str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceUnavailable(f"device={str(device)!r}: torch sees no Apple MPS device here; use 'cpu'")
    elif dev.type not in ("cpu", "mps"):
        raise ValueError(f"device {str(device)!r} is not supported; use 'auto', 'cpu' or 'cuda[:N]'")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Compute dtype: ``"auto"`` is fp16 on CUDA and fp32 on the CPU; bf16 on request on either."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("float16 compute on the CPU is slow and poorly supported: use bfloat16 or float32")
    return DTYPES[dtype]
