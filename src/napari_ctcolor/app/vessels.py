"""What the front ends' 3D views are drawn from: the CT without the table and the air (`body_3d`), and the
contrast-filled vessels of a colorized CT (`cta_vessels`), which a CT shows only where the colorizer names
contrast-enhanced blood in it (`no_vessels_reason`)."""

from __future__ import annotations

import numpy as np

from ..engines.body import body_mask
from ..engines.colorize import Chroma
from ..engines.colorize.anatomy import family
from ..engines.colorize.chroma import ENHANCED_HU
from ..engines.vessels import AIR_HU, VESSEL_SURFACE_HU, vessel_mask
from ..io import Volume

__all__ = ["AIR_HU", "VESSEL_SURFACE_HU", "body_3d", "cta_vessels", "named_bone", "no_vessels_reason"]


def body_3d(volume: Volume, step: int = 1) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(float32 HU, bool body, spacing) of every ``step``-th voxel in-plane of ``volume``: the body is the CT without
    the table and the air (`engines.body.body_mask`)."""
    hu = np.asarray(volume.array[:, ::step, ::step], dtype=np.float32)
    spacing = (volume.spacing[0], volume.spacing[1] * step, volume.spacing[2] * step)
    return hu, body_mask(hu, spacing), spacing


def named_bone(chroma: Chroma, shape: tuple[int, int, int], step: int = 1) -> np.ndarray:
    """bool (Z, Y / step, X / step): where the colorizer's most probable class in the network pixel is a bone (a
    vertebra, a rib, ..., or the tissue class bone), on every ``step``-th voxel in-plane of a CT of ``shape``."""
    first = chroma.first_class(np.arange(0, shape[1], step), np.arange(0, shape[2], step))
    return np.array([family(name) == "bone" for name in chroma.classes])[first]


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


def cta_vessels(
    volume: Volume, chroma: Chroma, body: tuple[np.ndarray, np.ndarray, tuple[float, float, float]], step: int = 1
) -> tuple[np.ndarray, str | None]:
    """bool (Z, Y / step, X / step) contrast-filled vessels of the `body_3d` ``body`` of ``volume``
    (`engines.vessels.vessel_mask`, never where the colorizer names bone), and None; or no vessels and the
    `no_vessels_reason`."""
    hu, inside, spacing = body
    reason = no_vessels_reason(volume, chroma)
    if reason is not None:
        return np.zeros(hu.shape, dtype=bool), reason
    return vessel_mask(hu, inside, spacing, named_bone=named_bone(chroma, volume.shape, step)), None
