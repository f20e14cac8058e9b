"""Contrast-filled vessels for the front ends' 3D views: whether a colorized CT shows contrast-enhanced blood at all,
and the vessel mask (`engines.vessels`) when it does."""

from __future__ import annotations

from ..engines.colorize import Chroma
from ..engines.colorize.chroma import ENHANCED_HU
from ..engines.vessels import AIR_HU, VESSEL_SURFACE_HU, vessel_mask
from ..io import Volume

__all__ = ["AIR_HU", "VESSEL_SURFACE_HU", "no_vessels_reason", "vessel_mask"]


def no_vessels_reason(volume: Volume, chroma: Chroma) -> str | None:
    """Why a CTA view of ``volume`` shows no vessels: the colorizer names no contrast-enhanced blood in it (the blood
    it names, the heart and the named vessels, has a median below `ENHANCED_HU`, or it names too little), so what
    lies at 150-800 HU away from cortical bone is cancellous bone it did not name bone (a scapula, a sternum), and red
    there would read as vessels. None where it names enhanced blood."""
    blood = chroma.named_blood_hu(volume.array, volume.spacing)
    if blood is not None and blood >= ENHANCED_HU:
        return None
    found = "the colorizer names none" if blood is None else f"the blood it names: median {blood:.0f} HU"
    return f"no vessels shown: no contrast-enhanced blood ({found})"
