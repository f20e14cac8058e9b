"""The colorize engine: a CT Volume -> an sRGB ColorVolume whose luminance is exactly the windowed CT.

Two phases, so the UI can change palette, chroma strength or window without re-running the network:

1. `predict_chroma`: the network's colour-class probabilities at its reduced in-plane resolution (16x fewer pixels
   than the CT for the default 4x reduction), kept compactly as the `TOP_K` most probable classes per pixel in 8 bits
   (`Chroma`), computed slice batches at a time (2D) or by sliding window (3D).
2. `compose_chroma`: streams slice chunks: a*, b* = probability-weighted palette a*, b*; upsampled to full
   resolution guided by the full-resolution CT (`guided_upsample`), so colour stops at boundaries; no colour where
   HU < -900 (air); then the windowed CT's grey composed into sRGB with the exact luminance, written into one
   preallocated uint8 array (on the CPU both in one numba pass per voxel, `fused.upsample_compose`). Peak memory
   stays near input + output + the kept classes + the bone enclosure bits: 2.9x an int16 CT of 512² slices
   (1x + 1.5x + 0.26x + 0.125x).

Each phase is written once, as a generator (`iter_predict_chroma`, `iter_compose_chroma`, `iter_colorize`) that
yields ``(done, total)`` slices after every batch and *returns* its result. The plain functions drain these
generators, calling ``progress`` and polling ``cancel`` between steps; the napari widget runs the same generators in
a ``thread_worker``, which emits ``yielded`` per step, aborts between steps on ``worker.quit()`` and emits
``returned`` with the result.
"""

from __future__ import annotations

import os

import torch

from ...color import check_chroma_strength
from ...io import Volume
from ...models.colorizer import Colorizer
from ...palettes import Palette, load_palette
from ...weights import COLORIZER_DEFAULT
from ...windowing import Window, parse_window
from ..steps import Steps, blocking, offset_steps
from .chroma import TOP_K, Chroma, Colorized
from .compose import compose_chroma, compose_plane, iter_compose_chroma
from .groups import blood_fade
from .predict import get_colorizer, iter_predict_chroma, predict_chroma
from .upsample import AIR_HU, guided_upsample, upsample_chroma

__all__ = [
    "AIR_HU",
    "TOP_K",
    "Chroma",
    "Colorized",
    "blood_fade",
    "colorize",
    "compose_chroma",
    "compose_plane",
    "get_colorizer",
    "guided_upsample",
    "iter_colorize",
    "iter_compose_chroma",
    "iter_predict_chroma",
    "predict_chroma",
    "upsample_chroma",
]


def iter_colorize(
    volume: Volume,
    model: str | os.PathLike | Colorizer = COLORIZER_DEFAULT,
    window: str | Window | tuple[float, float] | None = None,
    chroma: float = 1.0,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    palette: str | os.PathLike | Palette = "anatomical",
) -> Steps[Colorized]:
    """Colorize a CT: the network's colour classes under a palette, with the windowed CT as exact luminance.

    A generator of ``(done, 2 * Z)`` steps (network, then compose) that returns the `Colorized`; `colorize` runs it
    to the end.

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
        palette: "anatomical" (cryosection-like), "dicom" (DICOM recommended display colours), a CSV file of
            name,R,G,B, or a `Palette`.
        progress: (`colorize` only) called as progress(done, total) with total = 2 * slices (network, then
            compose).
        cancel: (`colorize` only) polled between batches; when it returns True, `Cancelled` is raised.
    """
    z = volume.shape[0]
    # Check the cheap settings before the network runs, not after.
    parse_window(window, volume)
    palette = load_palette(palette)
    check_chroma_strength(chroma)
    chroma_ab = yield from offset_steps(iter_predict_chroma(volume, model, device, batch_size), 0, 2 * z)
    return (yield from offset_steps(iter_compose_chroma(volume, chroma_ab, window, chroma, device, palette), z, 2 * z))


colorize = blocking(iter_colorize)
