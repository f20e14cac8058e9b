"""Choosing the torch device for the engines, and whether a CPU network runs in bfloat16."""

from __future__ import annotations

import functools
import os

import torch

from ..errors import InputError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA, then Apple MPS, then the CPU; otherwise the named device, checked to exist."""
    name = str(device)
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_ok else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or mps") from None
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda requested, but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    if resolved.type == "mps" and not mps_ok:
        raise InputError("device mps requested, but PyTorch sees no Apple GPU (use --device cpu or auto)")
    return resolved


#: Set to 0 to keep the CPU networks in float32 on a CPU with bfloat16 instructions (comparisons, benchmarks).
CPU_BF16_ENV = "CTCOLOR_CPU_BF16"


@functools.cache
def cpu_bf16() -> bool:
    """Whether a network that allows it runs under bfloat16 autocast on this CPU: where it has AVX512-BF16 or AMX
    (oneDNN's bf16 kernels; 2.3x faster for the colorizer on an AMD EPYC with avx512_bf16), unless
    ``CTCOLOR_CPU_BF16=0``. Elsewhere float32 (emulated bf16 would be slower). The colorizer always allows it; a
    registration model when its card says so (``inference.cpu_bf16``). Their tolerances: BENCHMARKS.md.
    """
    if os.environ.get(CPU_BF16_ENV, "1").strip() == "0":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume no bf16 instructions
        return False
