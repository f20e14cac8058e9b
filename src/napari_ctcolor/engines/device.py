"""Choosing the torch device for the engines, and whether a CPU network runs in bfloat16."""

from __future__ import annotations

import functools
import os
import platform
import threading

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


def start_device(device: str | torch.device = "auto") -> None:
    """Start CUDA (its context: one to four seconds) in a background thread when ``device`` resolves to a CUDA GPU,
    so that it overlaps what the caller does next (reading the CT); nothing for other devices or a bad name (the
    job reports that)."""
    try:
        resolved = resolve_device(device)
    except InputError:
        return
    if resolved.type == "cuda":
        threading.Thread(target=torch.zeros, args=(1,), kwargs={"device": resolved}, daemon=True).start()


#: ``1`` runs the colorize stages around the network as torch operations on the CPU too (`runs_torch_stages`): the
#: GPU's pipeline, checked on a machine without one.
TORCH_STAGES_ENV = "CTCOLOR_TORCH_STAGES"


def runs_torch_stages(device: torch.device) -> bool:
    """Whether the colorize stages around the network (enclosure, upsampling, composition) run as batched torch
    operations on ``device``: on a CUDA GPU, rather than as the CPU's numba and scipy kernels, which are faster on
    the CPU (`TORCH_STAGES_ENV` makes the CPU run them too). Apple's MPS composes in torch but keeps the CPU's
    enclosure: the connected components' operations (cummax, index_add on integers) are untested there."""
    return device.type == "cuda" or os.environ.get(TORCH_STAGES_ENV, "") == "1"


#: ``0`` keeps the CPU networks in float32, ``1`` runs them in bfloat16 wherever the CPU has bf16 instructions
#: (comparisons, benchmarks); unset or ``auto``: `cpu_bf16`'s rule.
CPU_BF16_ENV = "CTCOLOR_CPU_BF16"


def cpu_bf16_instructions() -> bool:
    """Whether this CPU has bfloat16 instructions that oneDNN uses: AVX512-BF16 or AMX."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume none
        return False


@functools.cache
def cpu_bf16() -> bool:
    """Whether a network that allows it runs under bfloat16 autocast on this CPU by default: with AMX, or on an AMD
    CPU with AVX512-BF16; float32 elsewhere (``CTCOLOR_CPU_BF16`` overrides). The colorizer always allows it; a
    registration model when its card says so (``inference.bf16``). Their tolerances: BENCHMARKS.md.

    Measured, 2 threads, same run each (BENCHMARKS.md): on an AMD EPYC with AVX512-BF16, bf16 made the colorizer 2.3x
    faster. On an Intel Xeon (Emerald Rapids, AMX not exposed to the virtual machine) with AVX512-BF16, it made
    things slower: the CT registration network 0.70 s against 0.49 s on a 3 mm pair, colorizer-3d 8.65 against 9.46
    slices/s, a 32-channel 3D convolution 46-50 against 29-34 ms (why is not established). On an Intel Xeon with AMX
    (family 6, model 167 as its virtual machine reports it), bf16 was faster: colorizer-2d 92.5 against 76.0
    slices/s at 512², colorizer-3d 16.2 against 11.3 (`ctcolor bench --only colorize`, one run, 2026-11-25).
    """
    override = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
    if override == "0":
        return False
    if override == "1":
        return cpu_bf16_instructions()
    try:
        amx = bool(torch.cpu._is_amx_tile_supported())
    except AttributeError:
        amx = False
    return amx or (cpu_bf16_instructions() and _cpu_vendor() == "AuthenticAMD")


def _cpu_vendor() -> str:
    """The CPU's vendor string (``GenuineIntel``, ``AuthenticAMD``), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    processor = platform.processor()  # Windows: "AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD"
    return next((v for v in ("AuthenticAMD", "GenuineIntel") if v in processor), "")
