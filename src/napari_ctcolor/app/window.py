"""The window a CT opens in, for every front end: a CT whose DICOM header says contrast was given opens with its
contrast-filled vessels light grey (`engines.vessels.contrast_window`), another in its default window.

Torch-free, so that the napari reader, which opens a CT with it, does not import torch (2.8 s of its first open on 2
cores, 2026-11-27).
"""

from __future__ import annotations

from ..engines.vessels import contrast_window
from ..io import Volume
from ..windowing import Window, default_window

__all__ = ["AUTO_WINDOW", "contrast_window", "opening_window", "opens_in_contrast"]

#: The window spec that lets the CT and the colorizer choose (`app.colorize_job.ColorizeRequest.checked`): the window
#: the CT opens in, or the contrast window where the colorizer finds contrast-enhanced blood.
AUTO_WINDOW = "auto"


def opens_in_contrast(volume: Volume) -> bool:
    """Whether ``volume`` is a CT whose header says contrast was given (DICOM ContrastBolusAgent and its sequences)."""
    return bool(volume.meta.get("contrast")) and volume.meta.get("modality", "CT") == "CT"


def opening_window(volume: Volume) -> Window:
    """The window a CT opens in: `contrast_window` where `opens_in_contrast` (its vessels light grey, not white as
    under its header's or the abdomen window), else its default window (the header's first, else the abdomen
    preset)."""
    if opens_in_contrast(volume):
        return contrast_window(volume.array, volume.spacing)
    return default_window(volume)
