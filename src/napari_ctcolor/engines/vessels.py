"""Contrast-filled vessels and the window that shows them, from a CT's HU (numpy and scipy, no torch: the napari reader
chooses a contrast CT's opening window with it).

- `vessel_mask`: the body's voxels of `VESSEL_SURFACE_HU` to `VESSEL_MAX_HU` away from cortical bone and what it
  encloses (the contrast-filled vessels and heart of a contrast CT; the 3D view's CTA preset shows them red).
- `contrast_window`: a window in which a contrast CT's enhanced blood is light grey and fat, muscle and organs keep
  greys that carry colour.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..windowing import PRESETS, Window
from .body import body_mask, ellipsoid

#: What `vessel_hu` puts outside the vessels: air.
AIR_HU = -1024.0
#: Cortical bone: above this HU. Vessel-bright voxels within `BONE_REACH_MM` of it count as bone (cancellous bone).
#: Above a CT angiography's blood (its aorta and heart reach 500-700 HU); thinner cortex, partial-volumed below it,
#: is found by the colorizer's names (``named_bone`` of `vessel_mask`).
COMPACT_BONE_HU = 800.0
#: Contrast-filled blood: up to this HU (`vessel_mask`).
VESSEL_MAX_HU = 800.0
BONE_REACH_MM = 5.0
#: HU of the vessel surface: contrast blood is 150-500 HU, unenhanced blood 30-60 HU.
VESSEL_SURFACE_HU = 150.0


def vessel_mask(
    hu: np.ndarray,
    body: np.ndarray,
    spacing: tuple[float, float, float],
    low: float = VESSEL_SURFACE_HU,
    named_bone: np.ndarray | None = None,
) -> np.ndarray:
    """bool (Z, Y, X): the body's voxels of ``low`` to `VESSEL_MAX_HU` that are not bone: the contrast-filled vessels
    and heart of a contrast CT (kidneys and other enhancing organs too), in pieces of at least 0.5 ml.

    Bone is cortical bone (above `COMPACT_BONE_HU`) with what it encloses in each axial slice (cancellous bone, marrow),
    grown by `BONE_REACH_MM`, and ``named_bone`` (bool, the same grid) where the colorizer names bone: where HU alone
    cannot tell contrast blood from bone (150-800 HU). Without the colorizer's names, where a thick-slice CT's cortex
    stays below `COMPACT_BONE_HU` (partial volume), cancellous bone counts as vessel.
    """
    grow = [max(1, round(BONE_REACH_MM / s)) for s in spacing]
    cortex = body & (hu > COMPACT_BONE_HU)
    closed = ndimage.binary_closing(cortex, structure=ellipsoid([1, *grow[1:]]))
    bone = np.stack([ndimage.binary_fill_holes(plane) for plane in closed])
    bone = ndimage.binary_dilation(bone, structure=ellipsoid(grow))
    keep = body & (hu > low) & (hu < VESSEL_MAX_HU) & ~bone
    if named_bone is not None:
        keep &= ~named_bone
    labels, count = ndimage.label(keep)
    if count:
        sizes = np.bincount(labels.ravel()) * float(np.prod(spacing))
        sizes[0] = 0
        keep = sizes[labels] >= 500.0  # mm^3
    return keep


def vessel_hu(
    hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float], low: float = VESSEL_SURFACE_HU
) -> np.ndarray:
    """float32: the HU of `vessel_mask`'s voxels, air elsewhere."""
    return np.where(vessel_mask(hu, body, spacing, low), hu, AIR_HU).astype(np.float32)


#: The contrast window (`contrast_window`): its lower edge, so that fat (-100 HU) keeps a grey that carries colour
#: (0.13-0.2 of the grey scale) and muscle (50 HU) and organs (100 HU) a quarter to a third; the enhanced blood at
#: `CONTRAST_BLOOD_GREY` (light grey: bone above it still brighter); at least the CTA preset's width.
CONTRAST_LOW_HU, CONTRAST_BLOOD_GREY = -250.0, 0.6


def contrast_window(hu: np.ndarray, spacing: tuple[float, float, float]) -> Window:
    """A window for a contrast-enhanced CT in which its contrast-filled vessels are light grey and fat, muscle and
    organs keep greys that carry colour: from `CONTRAST_LOW_HU` to where the enhanced blood shows at
    `CONTRAST_BLOOD_GREY`, and at least the CTA preset's width (600 HU). The enhanced blood is estimated as the 75th
    percentile of the body's non-bone voxels of 100-800 HU (enhancing organs and vessels; 120-140 HU in a
    portal-venous phase: window -250..350; 300-500 HU in an arterial one: a CTA whose blood is at 463 HU gets
    -250..938, fat at grey 0.13, muscle 0.25, the blood 0.6). The CTA window when the CT shows none. Computed on at
    most 128 pixels in-plane."""
    step = max(1, -(-max(hu.shape[1:]) // 128))
    sub = np.asarray(hu[:, ::step, ::step], dtype=np.float32)
    grid = (spacing[0], spacing[1] * step, spacing[2] * step)
    enhanced = vessel_hu(sub, body_mask(sub, grid), grid, low=100.0)
    values = enhanced[enhanced > AIR_HU]
    if values.size * float(np.prod(grid)) < 5000.0:  # under 5 ml: nothing enhanced to centre on
        return PRESETS["cta"]
    blood = float(np.percentile(values, 75))
    width = float(np.round(max((blood - CONTRAST_LOW_HU) / CONTRAST_BLOOD_GREY, PRESETS["cta"].width)))
    return Window(CONTRAST_LOW_HU + width / 2, width)
