"""Colorizing one CT, as every front end runs it: a `ColorizeRequest` whose settings are checked once, then the job as
a generator of ``(done, total)`` steps (`iter_colorize_job`) that a napari worker runs as it is and the CLI and the
Slicer logic drain (`colorize_job`). The kept colour classes (`Chroma`) are recomposed in another window, strength or
palette without the network (`iter_recompose`, `compose_plane`).

A CT whose header does not say contrast was given (NIfTI, NRRD, MHA), asked with ``find_contrast``, is composed in
the contrast window (`contrast_window`) when the blood the network names is enhanced
(`Chroma.enhanced_blood_hu`): contrast-filled vessels are white in the window such a CT opens in, and white takes no
colour.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from ..color import check_chroma_strength
from ..engines import colorize as colorize_engine
from ..engines.colorize import Chroma, iter_compose_chroma, iter_predict_chroma
from ..engines.colorize.predict import check_batch_size
from ..engines.device import resolve_device
from ..engines.steps import Steps, blocking, offset_steps
from ..errors import InputError
from ..io import ColorVolume, Volume
from ..models.colorizer import Colorizer
from ..palettes import Palette, load_palette
from ..weights import COLORIZER_DEFAULT
from ..windowing import Window, parse_window
from .window import AUTO_WINDOW, contrast_window, opening_window, opens_in_contrast

__all__ = [
    "AUTO_WINDOW",
    "Chroma",
    "ColorizeOutcome",
    "ColorizeRequest",
    "ModelSpec",
    "colorize_job",
    "compose_plane",
    "iter_colorize_job",
    "iter_recompose",
    "settings_of",
]

#: A shipped colorizer's name ("colorizer-2d"), a .safetensors file, or a loaded `Colorizer`.
ModelSpec = str | os.PathLike | Colorizer


@dataclass(frozen=True)
class ColorizeRequest:
    """What to colorize a CT with, checked once (`checked`): every front end builds one and hands it to the jobs.

    Attributes:
        window: the display window (the luminance).
        palette: the class colours.
        strength: colour strength in [0, 1]; 0 gives the grey CT.
        device: the torch device's name ("cpu", "cuda", ...), resolved from "auto".
        model: the colorizer (`ModelSpec`).
        batch_size: slices per network batch (2D) or windows per batch x 4 (3D); None for the model's default.
        find_contrast: compose in the contrast window where the network names enhanced blood (a CT whose header
            does not say contrast was given, still in the window it opened in).
    """

    window: Window
    palette: Palette
    strength: float = 1.0
    device: str = "cpu"
    model: ModelSpec = COLORIZER_DEFAULT
    batch_size: int | None = None
    find_contrast: bool = False

    @classmethod
    def checked(
        cls,
        volume: Volume | None,
        window: str | Window | tuple[float, float] | None = None,
        palette: str | os.PathLike | Palette = "anatomical",
        strength: float = 1.0,
        device: str = "auto",
        model: ModelSpec = COLORIZER_DEFAULT,
        batch_size: int | None = None,
        find_contrast: bool = False,
    ) -> ColorizeRequest:
        """The request for ``volume`` (its header's window when ``window`` is None), or `InputError` naming the first
        setting that cannot be used: before any reading of weights or running of the network.

        ``window="auto"`` is the window the CT opens in (`app.window.opening_window`: the contrast window where its
        DICOM header says contrast was given), and for a CT without such a header the contrast window where the
        network names contrast-enhanced blood (``find_contrast``): what napari's Run gives a CT still in the window
        it opened in."""
        if isinstance(window, str) and window.strip().lower() == AUTO_WINDOW:
            if volume is None:
                raise InputError("window 'auto' needs the CT: it is chosen from its header and HU")
            window, find_contrast = opening_window(volume), not opens_in_contrast(volume)
        strength = check_chroma_strength(strength)
        return cls(
            window=parse_window(window, volume),
            palette=load_palette(palette),
            strength=float(strength),
            device=str(resolve_device(device)),
            model=model,
            batch_size=check_batch_size(batch_size),
            find_contrast=find_contrast,
        )

    def with_settings(self, window: Window, palette: Palette, strength: float) -> ColorizeRequest:
        """The same request in another window, palette or strength (a recompose)."""
        return replace(self, window=window, palette=palette, strength=float(strength))

    @property
    def settings(self) -> tuple:
        """(window (centre, width), strength, palette name): what a composed colour depends on, as
        `ColorVolume.settings` records it (`settings_of`)."""
        return ((self.window.centre, self.window.width), self.strength, self.palette.name)


def settings_of(settings: Mapping) -> tuple:
    """The `ColorizeRequest.settings` a composed colour records in its ``ColorVolume.settings``, () when it does not
    record them."""
    if "window" not in settings:
        return ()
    return (tuple(settings["window"]), settings.get("chroma"), settings.get("palette"))


@dataclass(frozen=True)
class ColorizeOutcome:
    """A finished `iter_colorize_job`.

    Attributes:
        chroma: the network's colour classes, kept for recomposing.
        color: the composed colour volume.
        contrast: (median HU of the enhanced blood, the contrast window the colour was composed in) where
            ``find_contrast`` found it, else None.
    """

    chroma: Chroma
    color: ColorVolume
    contrast: tuple[float, Window] | None = None


def iter_colorize_job(volume: Volume, request: ColorizeRequest) -> Steps[ColorizeOutcome]:
    """The network, then the composition: yields ``(done, 2 Z)``, returns the `ColorizeOutcome`."""
    z = volume.shape[0]
    predict = iter_predict_chroma(volume, request.model, request.device, request.batch_size)
    chroma = yield from offset_steps(predict, 0, 2 * z)
    contrast = None
    if request.find_contrast:
        blood = chroma.enhanced_blood_hu(volume.array, volume.spacing)
        if blood is not None:
            contrast = (blood, contrast_window(volume.array, volume.spacing))
            request = replace(request, window=contrast[1])
    color = yield from offset_steps(iter_recompose(volume, chroma, request), z, 2 * z)
    return ColorizeOutcome(chroma, color, contrast)


colorize_job = blocking(iter_colorize_job)


def iter_recompose(volume: Volume, chroma: Chroma, request: ColorizeRequest) -> Steps[ColorVolume]:
    """The kept classes composed in the request's window, strength and palette: yields ``(done, Z)``, returns the
    colour volume."""
    return iter_compose_chroma(volume, chroma, request.window, request.strength, request.device, request.palette)


def compose_plane(volume: Volume, chroma: Chroma, axis: int, index: int, request: ColorizeRequest) -> np.ndarray:
    """uint8 RGB of one plane (``axis`` 0 axial, 1 coronal, 2 sagittal, at ``index``), exactly as the whole volume's
    composition gives it there."""
    window, strength, device, palette = request.window, request.strength, request.device, request.palette
    return colorize_engine.compose_plane(volume, chroma, axis, index, window, strength, device, palette)
