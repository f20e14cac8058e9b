"""The window a CT opens in, for every front end: a CT whose HU show contrast-enhanced blood (a tube of it followed
along z: `engines.vessels.enhanced_blood`) opens with that blood light grey (`engines.vessels.blood_window`), another
in its default window (its header's, else the abdomen preset).

Torch-free, so that the napari reader, which opens a CT with it, does not import torch (2.8 s of its first open on 2
cores, 2026-11-27).
"""

from __future__ import annotations

import weakref

from ..engines.vessels import BLOOD_RUN_MM, blood_window, contrast_window, enhanced_blood
from ..io import Volume
from ..windowing import Window, default_window

__all__ = ["AUTO_WINDOW", "blood_hu", "contrast_window", "opening_window", "opens_in_contrast"]

#: The window spec that lets the CT and the colorizer choose (`app.colorize_job.ColorizeRequest.checked`): the window
#: the CT opens in, or the contrast window where the colorizer finds contrast-enhanced blood.
AUTO_WINDOW = "auto"

#: id of a CT's voxel array -> (a weak reference to it, `blood_hu`): the front ends ask for a CT's opening window more
#: than once (the reader, the colorize request, Run), and the search takes 0.3-2 s on 2 cores.
_FOUND: dict[int, tuple[weakref.ref, float | None]] = {}


def blood_hu(volume: Volume) -> float | None:
    """The median HU of the CT's contrast-enhanced blood (`enhanced_blood`), or None where its HU show none, and for
    a CT shorter than `BLOOD_RUN_MM` along z, which its HU cannot tell (`opens_in_contrast` then follows its DICOM
    header). Searched once per voxel array."""
    if volume.meta.get("modality", "CT") != "CT":
        return None
    array = volume.array
    known = _FOUND.get(id(array))
    if known is not None and known[0]() is array:
        return known[1]
    found = enhanced_blood(array, volume.spacing)
    _FOUND[id(array)] = (weakref.ref(array), found)
    weakref.finalize(array, _FOUND.pop, id(array), None)
    return found


def _too_short(volume: Volume) -> bool:
    return volume.shape[0] * volume.spacing[0] < BLOOD_RUN_MM


def opens_in_contrast(volume: Volume) -> bool:
    """Whether ``volume`` opens in a contrast window: its HU show enhanced blood (`blood_hu`), or, too short along z
    to tell, its DICOM header says contrast was given."""
    if blood_hu(volume) is not None:
        return True
    return _too_short(volume) and bool(volume.meta.get("contrast")) and volume.meta.get("modality", "CT") == "CT"


def opening_window(volume: Volume) -> Window:
    """The window a CT opens in: its enhanced blood light grey (`blood_window`) where `opens_in_contrast`, else its
    default window (the header's first, else the abdomen preset)."""
    blood = blood_hu(volume)
    if blood is not None:
        return blood_window(blood)
    if opens_in_contrast(volume):
        return contrast_window(volume.array, volume.spacing)
    return default_window(volume)
