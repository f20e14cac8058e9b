"""The compose stage: sRGB from the CT's windowed grey (the exact luminance) and the upsampled a*, b* of a `Chroma`
under a palette; on the CPU in one numba pass per voxel (`fused.upsample_compose`), elsewhere in torch."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from ...color import check_chroma_strength, compose_rgb
from ...color_torch import compose_rgb_torch
from ...errors import InputError
from ...io import Volume
from ...memory import check_memory
from ...palettes import Palette, load_palette
from ...threads import cpu_threads
from ...windowing import Window, parse_window, window, window_tensor
from ..device import resolve_device, runs_torch_stages
from ..steps import Steps, blocking
from .chroma import Chroma, Colorized, class_table
from .enclosure import device_slices, enclosure_band
from .groups import GROUP_FLOOR, MARROW_GROUP_HU, ORGAN_FADE_HU, PLAIN_FADE_HU, hu_group_of
from .hu import device_hu
from .upsample import AIR_FADE_HU, AIR_HU, GUIDE_CLIP_HU, GUIDE_SIGMA_HU, spatial_weights, upsample_chroma

# Slices per compose step: bounds the chunk's float temporaries (the fused CPU kernel's too: its float HU, clipped
# guide and a*, b*). glibc serves them from its heap, which keeps what they touched resident while the RGB output
# grows: 8 slices left 50-115 MB there at the peak of 600 slices of 512² (0.15-0.4x the int16 input), 2 slices
# 5-10 MB. 2 was also faster than 8 for the two-pass path (cache).
COMPOSE_CHUNK = 2


def upsample_compose_cpu(
    chroma: Chroma,
    palette: Palette,
    hu: torch.Tensor,
    start: int,
    win: Window,
    strength: float,
    out: np.ndarray,
    only: tuple[int, int] | None = None,
) -> None:
    """`upsample_chroma` and `compose_rgb` of the slices whose HU are ``hu`` (n, Y, X, CPU) in one pass per voxel
    (`fused.upsample_compose`), written into ``out`` (n, Y, X, 3) uint8. Only the network-resolution inputs are made
    here, edge-padded by one pixel: the palette's a*, b* and its `HU_GROUPS` terms (`fused.class_terms`), and each
    network pixel's mean clipped HU. ``only`` (axis 1 or 2, index): write that row or column alone."""
    from .fused import class_terms, upsample_compose

    (top, bottom), (left, right) = chroma.pad
    factor = chroma.factor
    stop = start + hu.shape[0]
    threads = cpu_threads()
    table = class_table(palette, chroma.classes).numpy()
    group_of = hu_group_of(chroma.classes).numpy()
    ab_pad, groups_pad = class_terms(
        chroma.top[start:stop].numpy(), chroma.prob[start:stop].numpy(), table, group_of, threads
    )
    guide = F.pad(hu[:, None].clamp(*GUIDE_CLIP_HU), (left, right, top, bottom), mode="replicate")
    guide_low = F.avg_pool2d(guide, factor) if factor > 1 else guide
    if factor > 1:
        spatial = spatial_weights(factor)
    else:  # no upsampling: the voxel's own network pixel only, as `guided_upsample` returns a*, b* unchanged
        spatial = torch.tensor([[0.0], [1.0], [0.0]])
    upsample_compose(
        hu.numpy(),
        None if chroma.enclosure is None else chroma.enclosure[:, start:stop],
        MARROW_GROUP_HU,
        ab_pad,
        groups_pad,
        (*PLAIN_FADE_HU, *ORGAN_FADE_HU, *chroma.blood_fade_hu, GROUP_FLOOR),
        F.pad(guide_low, (1, 1, 1, 1), mode="replicate")[:, 0].numpy(),
        spatial.numpy(),
        (top, left),
        factor,
        GUIDE_SIGMA_HU,
        GUIDE_CLIP_HU,
        (AIR_HU, AIR_FADE_HU),
        (win.centre, win.width),
        strength,
        out,
        threads,
        rows=(only[1], only[1] + 1) if only is not None and only[0] == 1 else None,
        columns=(only[1], only[1] + 1) if only is not None and only[0] == 2 else None,
    )


def iter_compose_chroma(
    volume: Volume,
    chroma: Chroma,
    window_spec: str | Window | tuple[float, float] | None = None,
    strength: float = 1.0,
    device: str | torch.device = "auto",
    palette: str | os.PathLike | Palette = "anatomical",
    only: tuple[int, int] | None = None,
) -> Steps[Colorized]:
    """sRGB uint8 (Z, Y, X, 3) from the CT's windowed grey (luminance, exact) and the colour classes' a*, b* under
    ``palette`` ("anatomical", "dicom", a CSV file or a `Palette`), as a `Colorized`.

    A generator of ``(done, Z)`` steps, one per chunk of slices; `compose_chroma` runs it to the end (``progress``,
    ``cancel`` as `predict_chroma`). ``only`` (axis 1 or 2, index), for `compose_plane`: the fused CPU kernel
    composes that row or column alone (the rest of the output is undefined); other paths compose everything."""
    strength = check_chroma_strength(strength)
    win = parse_window(window_spec, volume)
    palette = load_palette(palette)
    device = resolve_device(device)
    z, height, width = volume.shape
    if chroma.top.shape[0] != z:
        raise InputError(f"chroma has {chroma.top.shape[0]} slices, the volume {z}")
    # The uint8 output plus one chunk's float temporaries (guided upsampling and composition, ~100 bytes per voxel):
    # refuse before allocating.
    check_memory(z * height * width * 3 + COMPOSE_CHUNK * height * width * 100, volume.meta.get("source", "volume"))
    rgb = np.empty((z, height, width, 3), dtype=np.uint8)
    fused = device.type == "cpu" and strength > 0.0  # strength 0 is the plain grey: compose_rgb's exact codes
    # In torch on a GPU (MPS too), or on the CPU under `engines.device.TORCH_STAGES_ENV`.
    on_device = device.type != "cpu" or runs_torch_stages(device)
    chunk = device_slices(device, height, width) if on_device else COMPOSE_CHUNK
    for start in range(0, z, chunk):
        stop = min(z, start + chunk)
        with torch.inference_mode():
            hu = device_hu(volume, start, stop, device)
            if on_device:  # HU in, uint8 sRGB out: one copy each way per batch of slices
                ab = upsample_chroma(chroma, palette, hu, start)
                rgb[start:stop] = compose_rgb_torch(window_tensor(hu, *win), ab, chroma=strength).cpu().numpy()
            elif fused:
                upsample_compose_cpu(chroma, palette, hu, start, win, strength, rgb[start:stop], only)
            else:
                ab = upsample_chroma(chroma, palette, hu, start)
                rgb[start:stop] = compose_rgb(window(hu.numpy(), *win), ab.numpy(), chroma=strength)
        yield stop, z
    settings = {"window": [win.centre, win.width], "model": chroma.model, "chroma": strength, "palette": palette.name}
    color = Colorized.on_grid_of(volume, rgb, **settings)
    color.chroma = chroma
    return color


compose_chroma = blocking(iter_compose_chroma)


def compose_plane(
    volume: Volume,
    chroma: Chroma,
    axis: int,
    index: int,
    window_spec: str | Window | tuple[float, float] | None = None,
    strength: float = 1.0,
    device: str | torch.device = "auto",
    palette: str | os.PathLike | Palette = "anatomical",
) -> np.ndarray:
    """One plane of the colour volume, exactly as `compose_chroma` composes it in the whole volume, at a small part of
    its cost (what the viewer shows first when the window changes): the axial slice ``index`` (``axis`` 0, (Y, X, 3)),
    the coronal row (1, (Z, X, 3)) or the sagittal column (2, (Z, Y, 3)), uint8.

    A row or column is composed from the band of network pixels around it (the one that holds it and one on each
    side: all the guided upsampling reads), cut on the network's pixel grid so each kept pixel's mean HU is that of
    the whole volume; the voxels' arithmetic is then the same.
    """
    if axis == 0:
        one = Volume(volume.array[index : index + 1], volume.spacing, volume.origin, volume.direction, volume.meta)
        return compose_chroma(
            one,
            replace(
                chroma,
                top=chroma.top[index : index + 1],
                prob=chroma.prob[index : index + 1],
                enclosure=enclosure_band(chroma.enclosure, 0, index, index + 1),
            ),
            window_spec,
            strength,
            device,
            palette,
        ).rgb[0]
    if axis not in (1, 2) or not 0 <= index < volume.shape[axis]:
        raise InputError(f"no plane {index} along axis {axis} of a volume of shape {volume.shape}")
    factor, size = chroma.factor, volume.shape[axis]
    pads = list(chroma.pad)
    before, _ = pads[axis - 1]
    row = (index + before) // factor
    first, last = max(row - 1, 0), min(row + 2, chroma.top.shape[axis + 1])  # network pixels kept
    start, stop = max(first * factor - before, 0), min(last * factor - before, size)  # the voxels they cover
    pads[axis - 1] = (max(before - first * factor, 0), max(last * factor - before - size, 0))
    band = [slice(None)] * 3
    band[axis] = slice(start, stop)
    low = [slice(None)] * 4
    low[axis + 1] = slice(first, last)
    part = Volume(volume.array[tuple(band)], volume.spacing, volume.origin, volume.direction, volume.meta)
    sub = replace(
        chroma,
        top=chroma.top[tuple(low)],
        prob=chroma.prob[tuple(low)],
        pad=tuple(pads),
        enclosure=enclosure_band(chroma.enclosure, axis, start, stop),
    )
    rgb = compose_chroma(part, sub, window_spec, strength, device, palette, only=(axis, index - start)).rgb
    return rgb[:, index - start] if axis == 1 else rgb[:, :, index - start]
