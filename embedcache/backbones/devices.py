"""One place that turns ``device=`` / ``dtype=`` strings into torch objects, for extraction and probes alike."""

from __future__ import annotations

import functools

import torch

__all__ = [
    "DTYPES",
    "DeviceUnavailable",
    "cpu_has_native_bf16",
    "dtype_candidates",
    "default_dtype",
    "resolve_device",
    "resolve_dtype",
]

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


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what :mod:`platform` says: named beside every
    CPU figure, since this machine's CPU changes between sessions."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 dot-product instructions (``avx512_bf16`` / ``amx_bf16`` in /proc/cpuinfo)
    and torch has oneDNN to use them. Without them bf16 autocast on the CPU is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"}) and torch.backends.mkldnn.is_available()
    except OSError:
        pass
    return False


def dtype_candidates(device: torch.device) -> tuple[str, ...]:
    """Compute dtypes worth using on ``device``, fastest first: CUDA fp16, bf16, fp32; a CPU with native bf16
    bf16, fp32; any other CPU (bf16 emulated: 4-6x slower than fp32 on an AVX2 EPYC) and MPS fp32 only."""
    if device.type == "cuda":
        return ("float16", "bfloat16", "float32")
    if device.type == "cpu" and cpu_has_native_bf16():
        return ("bfloat16", "float32")
    return ("float32",)


def default_dtype(device: torch.device) -> str:
    """What ``auto`` means on ``device`` before any model's policy: the first of :func:`dtype_candidates`."""
    return dtype_candidates(device)[0]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Compute dtype: ``"auto"`` is :func:`default_dtype` (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32);
    an explicit name is checked against the device (no fp16 on the CPU). A backbone's own policy (forbidden or
    failed dtypes) is applied by :func:`embedcache.backbones.precision.choose_dtype`."""
    if dtype == "auto":
        return DTYPES[default_dtype(device)]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    if device.type == "cpu" and dtype == "float16":
        raise ValueError("float16 compute on the CPU is slow and poorly supported: use bfloat16 or float32")
    return DTYPES[dtype]
