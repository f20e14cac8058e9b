"""Choosing the torch device for the engines."""

from __future__ import annotations

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
