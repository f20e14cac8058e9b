"""The colorize engine: a CT Volume -> an sRGB ColorVolume whose luminance is exactly the windowed CT.

Two phases, so the UI can change chroma strength or window without re-running the network:

1. `predict_chroma`: the network's a*, b* at its reduced in-plane resolution for the whole volume (16x smaller than
   the CT for the default 4x reduction), computed slice batches at a time (2D) or by sliding window (3D).
2. `compose_chroma`: streams slice chunks: upsample a*, b*, window the CT into grey, compose sRGB with the exact
   luminance, and write into one preallocated uint8 array. Peak memory stays near input + output.

Each phase is written once, as a generator (`iter_predict_chroma`, `iter_compose_chroma`, `iter_colorize`) that
yields ``(done, total)`` slices after every batch and *returns* its result. The plain functions drain these
generators, calling ``progress`` and polling ``cancel`` between steps; the napari widget runs the same generators in
a ``thread_worker``, which emits ``yielded`` per step, aborts between steps on ``worker.quit()`` and emits
``returned`` with the result.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..color import compose_rgb, compose_rgb_torch
from ..io import ColorVolume, InputError, Volume
from ..io.guard import check_memory
from ..models.colorizer import Colorizer, context_indices, downsample_hu, prepare_input
from ..weights import COLORIZER_DEFAULT, load_colorizer
from ..windowing import Window, parse_window, window, window_tensor
from .device import resolve_device
from .steps import Cancel, Progress, Steps, offset_steps, run_steps

_AIR_HU = -1024.0
_COMPOSE_CHUNK = 2  # slices per compose step: bounds the float temporaries; 2 was also faster than 8 (cache)
_ROI_3D = (32, 96, 96)  # 3D model patch (d, h, w) at the network's resolution
_OVERLAP_3D = 0.5  # overlap of neighbouring 3D patches, blended with a Gaussian weight (MONAI's sliding window)
_MODEL_CACHE: dict[str, tuple[Colorizer, dict[str, Any]]] = {}


@dataclass
class Chroma:
    """Predicted a*, b* of a volume at the network's resolution.

    Attributes:
        ab: (Z, 2, h, w) float32 on the CPU; h, w = padded in-plane size / factor.
        factor: in-plane reduction factor.
        pad: ((top, bottom), (left, right)) full-resolution padding added before the network, removed after.
        model: model name.
    """

    ab: torch.Tensor
    factor: int
    pad: tuple[tuple[int, int], tuple[int, int]]
    model: str


def get_colorizer(model: str | os.PathLike | Colorizer = COLORIZER_DEFAULT) -> tuple[Colorizer, dict[str, Any]]:
    """A colorizer and its card, by shipped name or file (cached), or a model object passed through."""
    if isinstance(model, Colorizer):
        return model.eval(), {"name": "custom"}
    key = str(model)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_colorizer(model)
    return _MODEL_CACHE[key]


def _network_padding(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) full-resolution padding: a multiple of ``multiple`` (the reduction factor times the U-Net's
    total stride) and at least two of them, so that the U-Net's deepest level keeps 2 x 2 pixels for its
    instance norm (a one-pixel level has no statistics)."""
    total = max(-(-size // multiple) * multiple, 2 * multiple) - size
    return total // 2, total - total // 2


def _check_volume(volume: Volume) -> None:
    if volume.array.dtype.kind not in "iuf":
        raise InputError(f"cannot colorize an array of type {volume.array.dtype}")


def _hu_slices(volume: Volume, start: int, stop: int) -> np.ndarray:
    """float32 HU of slices [start, stop); NaN (unreconstructed voxels in some NIfTI) becomes air, +-inf clips."""
    hu = np.asarray(volume.array[start:stop], dtype=np.float32)
    if volume.array.dtype.kind == "f":
        np.nan_to_num(hu, copy=False, nan=_AIR_HU, posinf=np.finfo(np.float32).max, neginf=_AIR_HU)
    return hu


def upsample_chroma(chroma: Chroma, start: int, stop: int, shape_yx: tuple[int, int], device: torch.device):
    """a*, b* of slices [start, stop) at full resolution, padding removed: (n, Y, X, 2) float32 on ``device``."""
    (top, bottom), (left, right) = chroma.pad
    height, width = shape_yx
    padded = (height + top + bottom, width + left + right)
    ab = F.interpolate(chroma.ab[start:stop].to(device), size=padded, mode="bilinear", align_corners=False)
    return ab[:, :, top : top + height, left : left + width].movedim(1, -1)


@contextlib.contextmanager
def _inference(device: torch.device) -> Iterator[None]:
    """No autograd, and bf16 autocast on CUDA: the network's chroma needs no more precision; luminance never passes
    through the network.

    Entered around each step, never across a ``yield``: grad mode and autocast are thread-local state, and a
    generator that is abandoned mid-way (worker.quit()) would otherwise leave them set or unwind them in another
    thread.
    """
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    with torch.inference_mode(), autocast:
        yield


def iter_predict_chroma(
    volume: Volume,
    model: str | os.PathLike | Colorizer = COLORIZER_DEFAULT,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
) -> Steps[Chroma]:
    """`predict_chroma` as a generator: yields ``(done, Z)`` slices after each batch, returns the `Chroma`.

    A 2D model advances ``batch_size`` slices per step; a 3D model ``batch_size // 4`` sliding-window patches per
    step, reported as the matching fraction of Z. Nothing runs until the first ``next()``.
    """
    _check_volume(volume)
    net, card = get_colorizer(model)
    config = net.config
    device = resolve_device(device)
    if device.type != "cpu":  # a copy: the cached (or caller's) model stays on the CPU for other callers
        net = copy.deepcopy(net).to(device)
    if device.type == "cuda" and config.dims == 2:  # channels_last exists for 4D tensors only
        net = net.to(memory_format=torch.channels_last)
    factor = config.factor_for(float(np.mean(volume.spacing[1:])))
    multiple = factor * config.net_multiple
    z, height, width = volume.shape
    pad = (_network_padding(height, multiple), _network_padding(width, multiple))
    batch = batch_size or (64 if device.type == "cuda" else 16)
    if batch < 1:
        raise InputError(f"batch size must be >= 1, got {batch}")

    def small_slices(start: int, stop: int) -> torch.Tensor:
        """(n, h, w) HU of slices [start, stop), padded (edge values) and area-reduced on the device."""
        hu = torch.from_numpy(_hu_slices(volume, start, stop)).to(device)
        hu = F.pad(hu[:, None], (*pad[1], *pad[0]), mode="replicate")[:, 0]
        return downsample_hu(hu, factor)

    if config.dims == 2:
        neighbours = context_indices(z, config.context)
        out = None
        for start in range(0, z, batch):
            stop = min(z, start + batch)
            lo, hi = int(neighbours[start:stop].min()), int(neighbours[start:stop].max()) + 1
            with _inference(device):
                x = prepare_input(small_slices(lo, hi)[neighbours[start:stop] - lo], config)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                ab = net(x).float().cpu()
            if out is None:
                out = torch.empty((z, 2, *ab.shape[-2:]), dtype=torch.float32)
            out[start:stop] = ab
            yield stop, z
    else:
        with _inference(device):
            x = prepare_input(small_slices(0, z)[None], config)  # (1, windows, Z, h, w)
        out = yield from _sliding_window_3d(net, x, max(1, batch // 4), z)
    return Chroma(out, factor, pad, str(card.get("name", "custom")))


def _sliding_window_3d(net: Colorizer, x: torch.Tensor, patches_per_step: int, z: int) -> Steps[torch.Tensor]:
    """MONAI's Gaussian-blended sliding window (as `monai.inferers.sliding_window_inference` with replicate padding),
    one step per batch of patches so that progress and cancellation work inside a volume.

    Args:
        x: (1, C, Z, h, w) network input on the device.
        z: slices of the volume, the unit of the yielded progress.

    Returns:
        (Z, 2, h, w) float32 a*, b* on the CPU.
    """
    from monai.data.utils import compute_importance_map, dense_patch_slices

    size = x.shape[2:]
    # Inputs smaller than the patch are padded (split as MONAI does); every patch side is a multiple of the strides.
    pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(_ROI_3D, size, strict=True)]
    x = F.pad(x, [p for pair in reversed(pad) for p in pair], mode="replicate")
    padded = x.shape[2:]
    interval = [r if r == s else max(int(r * (1 - _OVERLAP_3D)), 1) for r, s in zip(_ROI_3D, padded, strict=True)]
    patches = dense_patch_slices(padded, _ROI_3D, interval)
    importance = compute_importance_map(_ROI_3D, mode="gaussian", sigma_scale=0.125, device=x.device)
    total = torch.zeros((2, *padded), dtype=torch.float32, device=x.device)
    weight = torch.zeros((1, *padded), dtype=torch.float32, device=x.device)
    for start in range(0, len(patches), patches_per_step):
        chunk = patches[start : start + patches_per_step]
        with _inference(x.device):
            pred = net(torch.cat([x[(slice(None), slice(None), *p)] for p in chunk])).float()
            for p, ab in zip(chunk, pred, strict=True):
                total[(slice(None), *p)] += ab * importance
                weight[(slice(None), *p)] += importance
        yield z * (start + len(chunk)) // len(patches), z
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pad, size, strict=True))
    return (total / weight)[(slice(None), *crop)].permute(1, 0, 2, 3).cpu()  # (Z, 2, h, w)


def predict_chroma(
    volume: Volume,
    model: str | os.PathLike | Colorizer = COLORIZER_DEFAULT,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> Chroma:
    """Run the colorizer on a CT volume (HU) and return its a*, b* at the network's resolution.

    ``progress(done, Z)`` is called after each batch; ``cancel()`` is polled before each and raises `Cancelled`.
    """
    return run_steps(iter_predict_chroma(volume, model, device, batch_size), progress, cancel)


def iter_compose_chroma(
    volume: Volume,
    chroma: Chroma,
    window_spec: str | Window | tuple[float, float] | None = None,
    strength: float = 1.0,
    device: str | torch.device = "auto",
) -> Steps[ColorVolume]:
    """`compose_chroma` as a generator: yields ``(done, Z)`` after each chunk of slices, returns the `ColorVolume`."""
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"chroma strength must be in [0, 1], got {strength}")
    win = parse_window(window_spec, volume)
    device = resolve_device(device)
    z, height, width = volume.shape
    if chroma.ab.shape[0] != z:
        raise InputError(f"chroma has {chroma.ab.shape[0]} slices, the volume {z}")
    # The uint8 output plus one chunk's float temporaries (~40 bytes per voxel): refuse before allocating.
    check_memory(z * height * width * 3 + _COMPOSE_CHUNK * height * width * 40, volume.meta.get("source", "volume"))
    rgb = np.empty((z, height, width, 3), dtype=np.uint8)
    for start in range(0, z, _COMPOSE_CHUNK):
        stop = min(z, start + _COMPOSE_CHUNK)
        with torch.inference_mode():
            ab = upsample_chroma(chroma, start, stop, (height, width), device)
            if device.type == "cpu":
                grey = window(_hu_slices(volume, start, stop), *win)
                rgb[start:stop] = compose_rgb(grey, ab.numpy(), chroma=strength)
            else:
                hu = torch.from_numpy(_hu_slices(volume, start, stop)).to(device)
                rgb[start:stop] = compose_rgb_torch(window_tensor(hu, *win), ab, chroma=strength).cpu().numpy()
        yield stop, z
    settings = {"window": [win.centre, win.width], "model": chroma.model, "chroma": strength}
    return ColorVolume.on_grid_of(volume, rgb, **settings)


def compose_chroma(
    volume: Volume,
    chroma: Chroma,
    window_spec: str | Window | tuple[float, float] | None = None,
    strength: float = 1.0,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> ColorVolume:
    """sRGB uint8 (Z, Y, X, 3) from the CT's windowed grey (luminance, exact) and the predicted a*, b*."""
    return run_steps(iter_compose_chroma(volume, chroma, window_spec, strength, device), progress, cancel)


def iter_colorize(
    volume: Volume,
    model: str | os.PathLike | Colorizer = COLORIZER_DEFAULT,
    window: str | Window | tuple[float, float] | None = None,
    chroma: float = 1.0,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
) -> Steps[ColorVolume]:
    """`colorize` as a generator: yields ``(done, 2 * Z)`` (network, then compose), returns the `ColorVolume`."""
    z = volume.shape[0]
    # Check the cheap settings before the network runs, not after.
    parse_window(window, volume)
    if not 0.0 <= chroma <= 1.0:
        raise InputError(f"chroma strength must be in [0, 1], got {chroma}")
    chroma_ab = yield from offset_steps(iter_predict_chroma(volume, model, device, batch_size), 0, 2 * z)
    return (yield from offset_steps(iter_compose_chroma(volume, chroma_ab, window, chroma, device), z, 2 * z))


def colorize(
    volume: Volume,
    model: str | os.PathLike | Colorizer = COLORIZER_DEFAULT,
    window: str | Window | tuple[float, float] | None = None,
    chroma: float = 1.0,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> ColorVolume:
    """Colorize a CT: network a*, b* with the windowed CT as exact luminance.

    Example::

        ct = read_volume("../shared/data/ct/totalseg-abdomen-dicom")
        colour = colorize(ct, window="abdomen")   # ColorVolume, rgb uint8 (20, 512, 512, 3)

    Args:
        volume: CT in HU.
        model: shipped name ("colorizer-2d", "colorizer-3d") or a .safetensors file, or a Colorizer.
        window: display window: preset name, "CENTRE,WIDTH", (centre, width), or None for the DICOM default.
        chroma: colour strength in [0, 1]; 0 gives the grey CT.
        device: "auto" (cuda, then mps, then cpu), "cpu", "cuda".
        batch_size: slices per network batch (2D) or windows per batch x 4 (3D).
        progress: called as progress(done, total) with total = 2 * slices (network, then compose).
        cancel: polled between batches; when it returns True, `Cancelled` is raised.
    """
    return run_steps(iter_colorize(volume, model, window, chroma, device, batch_size), progress, cancel)
