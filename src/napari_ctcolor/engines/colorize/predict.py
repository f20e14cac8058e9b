"""The predict stage: the colorizer network on a CT volume (2D batches of slices with their neighbours, or 3D sliding
windows), its kept classes (`Chroma`), then the anatomy and enclosure stages."""

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

from ...errors import InputError
from ...io import Volume
from ...memory import release_free_memory
from ...models.colorizer import Colorizer, context_indices, downsample_hu, prepare_input
from ...weights import COLORIZER_DEFAULT, load_colorizer
from ..device import cpu_bf16, resolve_device
from ..orientation import AxialView
from ..steps import Steps, blocking
from .chroma import TOP_K, Chroma, compact
from .consistency import make_consistent
from .enclosure import BoneTopology, enclosure_bits
from .fused import top_classes
from .groups import BLOOD_PERCENTILE, blood_fade
from .hu import device_hu

ROI_3D = (32, 96, 96)  # 3D model patch (d, h, w) at the network's resolution
_OVERLAP_3D = 0.5  # overlap of neighbouring 3D patches, blended with a Gaussian weight (MONAI's sliding window)
_MODEL_CACHE: dict[str, tuple[Colorizer, dict[str, Any]]] = {}


def check_batch_size(batch_size: int | None) -> int | None:
    """``batch_size`` (slices per network batch; None: the model's default), or `InputError` below 1."""
    if batch_size is not None and int(batch_size) < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    return None if batch_size is None else int(batch_size)


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


#: Finer pixels than this are not CT (clinical CT: 0.2 mm and up): a wrong spacing in the file's header.
MIN_PIXEL_MM = 0.05


def _check_volume(volume: Volume) -> None:
    if volume.array.dtype.kind not in "iuf":
        raise InputError(f"cannot colorize an array of type {volume.array.dtype}")
    pixel_mm = float(np.mean(volume.spacing[1:]))
    if pixel_mm < MIN_PIXEL_MM:  # the network's grid is padded to multiples of chroma_mm / pixel_mm pixels
        raise InputError(
            f"{volume.meta.get('source') or 'the image'}: pixels of {pixel_mm:.3g} mm are finer than any CT's "
            f"(at least {MIN_PIXEL_MM} mm); check its voxel spacing"
        )


@contextlib.contextmanager
def _inference(device: torch.device, bf16: bool | None = None) -> Iterator[None]:
    """No autograd, and bf16 autocast on CUDA and on CPUs where it is faster (`cpu_bf16`): the network's chroma
    needs no more precision; luminance never passes through the network.

    Entered around each step, never across a ``yield``: grad mode and autocast are thread-local state, and a
    generator that is abandoned mid-way (worker.quit()) would otherwise leave them set or unwind them in another
    thread.
    """
    if device.type == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        enabled = device.type == "cpu" and (cpu_bf16() if bf16 is None else bf16)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)
    with torch.inference_mode(), autocast:
        yield


def iter_predict_chroma(
    volume: Volume,
    model: str | os.PathLike | Colorizer = COLORIZER_DEFAULT,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    anatomy: bool = True,
    bf16: bool | None = None,
) -> Steps[Chroma]:
    """Run the colorizer on a CT volume (HU): its a*, b* at the network's resolution, as a `Chroma` made anatomically
    consistent by `anatomy` (``anatomy=False`` keeps the network's own probabilities).

    A generator of ``(done, Z)`` steps: a 2D model advances ``batch_size`` slices per step, a 3D model
    ``batch_size // 4`` sliding-window patches per step, reported as the matching fraction of Z. Nothing runs until
    the first ``next()``. `predict_chroma` runs it to the end, calling ``progress(done, Z)`` after each step and
    polling ``cancel()`` before each (`Cancelled`). ``bf16``: None runs the CPU network in bfloat16 where that is
    faster on this CPU (`cpu_bf16`), False in float32, True in bfloat16.
    """
    _check_volume(volume)
    net, card = get_colorizer(model)
    device = resolve_device(device)
    classes = yield from _network_classes(volume, net, device, batch_size, bf16)
    # The enclosure's HU-only half (`BoneTopology`) in the background, while the host runs the anatomy step.
    topology = BoneTopology(volume, device)
    try:
        if anatomy:
            make_consistent(classes.top, classes.prob, classes.small_hu, net.config.classes, volume, classes.factor)
        del classes.small_hu
        if device.type == "cpu":  # the network's freed temporaries, before the compose phase allocates the RGB output
            release_free_memory()
        name = str(card.get("name", "custom"))
        chroma = Chroma(classes.top, classes.prob, net.config.classes, classes.factor, classes.pad, name)
        chroma.enclosure = enclosure_bits(volume, chroma, device, topology)
    finally:
        topology.close()  # a run stopped here (an error) stops it too
    chroma.blood_fade_hu = blood_fade(chroma.named_blood_hu(volume.array, volume.spacing, BLOOD_PERCENTILE))
    return chroma


@dataclass
class _Classes:
    """The network's kept classes of a volume: (Z, k, h, w) uint8 ``top`` and ``prob``, (Z, h, w) ``small_hu`` (the
    HU on the network's grid, for the anatomy step), the in-plane reduction ``factor`` and full-resolution ``pad``."""

    top: torch.Tensor
    prob: torch.Tensor
    small_hu: torch.Tensor
    factor: int
    pad: tuple[tuple[int, int], tuple[int, int]]


def _network_classes(
    volume: Volume, net: Colorizer, device: torch.device, batch_size: int | None, bf16: bool | None
) -> Steps[_Classes]:
    """The network's forward passes over ``volume`` (`iter_predict_chroma`'s steps), its kept classes returned."""
    config = net.config
    if device.type != "cpu":  # a copy: the cached (or caller's) model stays on the CPU for other callers
        net = copy.deepcopy(net).to(device)
    if device.type == "cuda" and config.dims == 2:  # channels_last exists for 4D tensors only
        net = net.to(memory_format=torch.channels_last)
    factor = config.factor_for(float(np.mean(volume.spacing[1:])))
    multiple = factor * config.net_multiple
    z, height, width = volume.shape
    pad = (_network_padding(height, multiple), _network_padding(width, multiple))
    # CPU, 2D: 8 slices per batch were faster than 16 (13.8 against 17.8 ms per 512² slice, cache) and keep the
    # network's temporaries smaller; 3D: 16, i.e. 4 patches per step.
    batch = (64 if device.type == "cuda" else 8 if config.dims == 2 else 16) if batch_size is None else batch_size
    check_batch_size(batch)

    def small_slices(start: int, stop: int) -> torch.Tensor:
        """(n, h, w) HU of slices [start, stop), padded (edge values) and area-reduced on the device."""
        hu = device_hu(volume, start, stop, device)  # an int16 CT travels as int16
        hu = F.pad(hu[:, None], (*pad[1], *pad[0]), mode="replicate")[:, 0]
        return downsample_hu(hu, factor)

    low = ((height + sum(pad[0])) // factor, (width + sum(pad[1])) // factor)
    k = min(TOP_K, len(config.classes))
    top = torch.empty((z, k, *low), dtype=torch.uint8)
    prob = torch.empty((z, k, *low), dtype=torch.uint8)
    small_hu = torch.empty((z, *low), dtype=torch.float32)  # for the anatomy step (`make_consistent`)
    if config.dims == 2:
        view = AxialView.of(volume) if config.canonical else AxialView()
        neighbours = context_indices(z, config.context)
        if view.reverse_z:  # each slice's neighbours in inferior-to-superior order, as the network saw them
            neighbours = neighbours.flip(1)

        def predict_batch(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(class indices, probabilities, small HU) of slices [start, stop) on the CPU. A function, so that the
            batch's tensors (the logits: 20 MB for 8 slices of 512²) are freed when it returns, not kept in the
            generator's frame through the anatomy step and past the hand-back of free memory below."""
            lo, hi = int(neighbours[start:stop].min()), int(neighbours[start:stop].max()) + 1
            with _inference(device, bf16):
                small = small_slices(lo, hi)
                x = view.to_view(prepare_input(small[neighbours[start:stop] - lo], config))
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                logits = view.from_view(net(x))
                if device.type == "cpu":  # one numba pass from the logits (`fused.top_classes`), bfloat16 as its bits
                    bits = logits.view(torch.int16).numpy().view(np.uint16) if logits.dtype == torch.bfloat16 else None
                    found = top_classes(logits.float().numpy() if bits is None else bits, k, torch.get_num_threads())
                    indices, values = torch.from_numpy(found[0]), torch.from_numpy(found[1])
                else:
                    indices, values = compact(logits.float().softmax(dim=1))
                return indices.cpu(), values.cpu(), small[start - lo : stop - lo].float().cpu()

        for start in range(0, z, batch):
            stop = min(z, start + batch)
            top[start:stop], prob[start:stop], small_hu[start:stop] = predict_batch(start, stop)
            yield stop, z
    else:
        view = AxialView.of(volume) if config.canonical else AxialView()
        with _inference(device, bf16):
            small = small_slices(0, z)
            small_hu[:] = small.float().cpu()
            x = view.volume_to_view(prepare_input(small[None], config))  # (1, windows, Z, h, w) in the view
        del small
        if view == AxialView():
            yield from _sliding_window_3d(net, x, max(1, batch // 4), top, prob, bf16)
        else:  # filled in the view's order, then moved back: (Z, k, h, w) uint8, a few MB
            top_view = torch.empty((z, k, *x.shape[-2:]), dtype=torch.uint8)
            prob_view = torch.empty_like(top_view)
            yield from _sliding_window_3d(net, x, max(1, batch // 4), top_view, prob_view, bf16)
            top[:] = view.volume_from_view(top_view.movedim(0, 1)).movedim(1, 0)
            prob[:] = view.volume_from_view(prob_view.movedim(0, 1)).movedim(1, 0)
        del x
    return _Classes(top, prob, small_hu, factor, pad)


def _sliding_window_3d(
    net: Colorizer, x: torch.Tensor, patches_per_step: int, top: torch.Tensor, prob: torch.Tensor, bf16: bool | None
) -> Steps[None]:
    """MONAI's Gaussian-blended sliding window (as `monai.inferers.sliding_window_inference` with replicate padding),
    one step per batch of patches so that progress and cancellation work inside a volume.

    The volume is swept in slabs of `ROI_3D` depth along z, each with half a patch of context on either side, and
    only a slab's own slices are kept (`compact`, into ``top`` and ``prob``): blending all classes of a whole
    volume at once would take 4 bytes per class and pixel (1.5 GB for 600 slices of 512x512 and 39 classes).

    Args:
        x: (1, C, Z, h, w) network input on the device.
        top, prob: (Z, TOP_K, h, w) uint8 outputs, filled slab by slab.
    """
    from monai.data.utils import compute_importance_map, dense_patch_slices

    z = x.shape[2]
    depth, halo = ROI_3D[0], ROI_3D[0] // 2
    importance = compute_importance_map(ROI_3D, mode="gaussian", sigma_scale=0.125, device=x.device)
    for slab_start in range(0, z, depth):
        slab_stop = min(z, slab_start + depth)
        lo, hi = max(0, slab_start - halo), min(z, slab_stop + halo)
        slab = x[:, :, lo:hi]
        size = slab.shape[2:]
        # Inputs smaller than the patch are padded (split as MONAI does); patch sides are multiples of the strides.
        pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(ROI_3D, size, strict=True)]
        slab = F.pad(slab, [p for pair in reversed(pad) for p in pair], mode="replicate")
        padded = slab.shape[2:]
        interval = [r if r == s else max(int(r * (1 - _OVERLAP_3D)), 1) for r, s in zip(ROI_3D, padded, strict=True)]
        patches = dense_patch_slices(padded, ROI_3D, interval)
        total = torch.zeros((len(net.config.classes), *padded), dtype=torch.float32, device=x.device)
        weight = torch.zeros((1, *padded), dtype=torch.float32, device=x.device)
        for start in range(0, len(patches), patches_per_step):
            chunk = patches[start : start + patches_per_step]
            with _inference(x.device, bf16):
                pred = net(torch.cat([slab[(slice(None), slice(None), *p)] for p in chunk])).float().softmax(dim=1)
                for p, probs in zip(chunk, pred, strict=True):
                    total[(slice(None), *p)] += probs * importance
                    weight[(slice(None), *p)] += importance
            done = slab_start + (slab_stop - slab_start) * (start + len(chunk)) // len(patches)
            yield done, z
        keep = slice(pad[0][0] + slab_start - lo, pad[0][0] + slab_stop - lo)
        crop = (keep, *(slice(before, before + s) for (before, _), s in zip(pad[1:], size[1:], strict=True)))
        mean = (total / weight)[(slice(None), *crop)].movedim(1, 0)  # (slab slices, K, h, w)
        indices, values = compact(mean)
        top[slab_start:slab_stop], prob[slab_start:slab_stop] = indices.cpu(), values.cpu()


predict_chroma = blocking(iter_predict_chroma)
