"""3D views of a CT in napari: the patient's body without the table and the air, shown with HU transfer functions.

napari renders a volume layer by ray casting (vispy). Its ``iso`` mode draws the first surface above a threshold,
lit by a head light (the only lit mode: vispy's ``translucent`` compositing has no gradient shading, and vispy
lights the value before the colormap, so a lit surface needs a colormap that runs from dark to its colour,
`lit_surface`); ``translucent`` composites every sample through the colormap's colour and alpha, which makes the
colormap a HU transfer function, unlit. The presets (`PRESETS_3D`):

- bone: a lit iso surface of bone (200 HU).
- CTA: the bone surface and a red lit surface of contrast-filled vessels and heart (`vessel_hu`: 150-600 HU, not
  bone; HU alone cannot tell contrast blood from bone there). A portal-venous phase's vessels (100-140 HU) stay
  below it.
- soft tissue: a translucent transfer function: fat and lung clear, soft tissue faint, contrast blood redder, bone
  ivory.
- colour: the colorized RGB with alpha from HU, translucent.

The table and the air are removed first (`engines.body.body_mask`: the large connected pieces above -400 HU after a
small in-plane opening, which removes the table's shells and cuts the thin contacts between body and table, with
their holes filled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from napari.utils import Colormap
from scipy import ndimage

from ..engines.body import body_mask, ellipsoid
from ..windowing import PRESETS, Window

AIR_HU = -1024.0
#: Cortical bone: above this HU. Vessel-bright voxels within `BONE_REACH_MM` of it count as bone (cancellous bone).
CORTEX_HU = 650.0
BONE_REACH_MM = 5.0


@dataclass(frozen=True)
class Layer3D:
    """One napari layer of a 3D preset.

    Attributes:
        name: the layer's name suffix.
        source: "body" (the CT's HU without table and air), "vessels" (`vessel_hu`) or "colour" (the colorized RGB
            with alpha from HU, `napari_ctcolor.windowing.COLOUR_3D_OPACITY`).
        rendering: napari's ``rendering``: "iso" (a lit surface) or "translucent".
        colormap: the transfer function over ``limits``; None for the RGB colour.
        limits: contrast limits (HU).
        iso_threshold: HU of the surface (``iso``).
    """

    name: str
    source: str
    rendering: str
    colormap: Colormap | None = None
    limits: tuple[float, float] = (AIR_HU, 2000.0)
    iso_threshold: float | None = None


def transfer_function(
    name: str, points: list[tuple[float, tuple[float, ...]]], limits: tuple[float, float]
) -> Colormap:
    """A napari colormap that gives each HU of ``points`` its RGBA (linear in between) for contrast ``limits``."""
    low, high = limits
    controls = [min(max((hu - low) / (high - low), 0.0), 1.0) for hu, _ in points]
    return Colormap(np.array([rgba for _, rgba in points]), controls=controls, name=f"ctcolor 3D {name}")


def lit_surface(name: str, source: str, rgb: tuple[float, float, float], threshold: float) -> Layer3D:
    """An iso surface at ``threshold`` HU in colour ``rgb``, lit.

    vispy lights an iso surface by scaling the *value* at the hit (ambient + Lambert, a head light) before the
    colormap, so the colormap must run from dark to the colour for the light to show: the limits put the threshold
    at 0.25 of the range and the colormap rises from black to ``rgb`` at 0.5; a surface facing the viewer shows
    ``rgb``, one seen at a grazing angle darkens.
    """
    limits = (threshold - 250.0, threshold + 750.0)
    points = [(limits[0], (0.0, 0.0, 0.0, 1.0)), (threshold + 250.0, (*rgb, 1.0)), (limits[1], (*rgb, 1.0))]
    return Layer3D(name, source, "iso", transfer_function(name, points, limits), limits, threshold)


IVORY = (0.95, 0.90, 0.78)
RED = (0.85, 0.10, 0.08)
#: HU of the bone surface: above cancellous bone's partial-volume fringe, below cortical bone.
BONE_SURFACE_HU = 200.0
#: HU of the vessel surface in the vessel-only volume: contrast blood is 150-500 HU, unenhanced blood 30-60 HU.
VESSEL_SURFACE_HU = 150.0
_SOFT_LIMITS = (AIR_HU, 1500.0)
PRESETS_3D: dict[str, tuple[Layer3D, ...]] = {
    "bone": (lit_surface("bone", "body", IVORY, BONE_SURFACE_HU),),
    "CTA": (
        lit_surface("bone", "body", IVORY, BONE_SURFACE_HU),
        lit_surface("vessels", "vessels", RED, VESSEL_SURFACE_HU),
    ),
    "soft tissue": (
        Layer3D(
            "soft tissue",
            "body",
            "translucent",
            transfer_function(
                "soft tissue",
                [
                    (AIR_HU, (0.0, 0.0, 0.0, 0.0)),
                    (-200.0, (0.0, 0.0, 0.0, 0.0)),  # fat and lung clear
                    (0.0, (0.80, 0.50, 0.40, 0.0)),
                    (60.0, (0.85, 0.45, 0.38, 0.04)),  # muscle and organs faint
                    (150.0, (0.85, 0.20, 0.15, 0.08)),  # contrast blood redder
                    (300.0, (*IVORY, 0.15)),  # bone
                    (1500.0, (*IVORY, 0.6)),
                ],
                _SOFT_LIMITS,
            ),
            _SOFT_LIMITS,
        ),
    ),
    "colour": (Layer3D("colour", "colour", "translucent"),),
}


def vessel_hu(
    hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float], low: float = VESSEL_SURFACE_HU
) -> np.ndarray:
    """The HU of the body's voxels of ``low``-600 HU that are not bone, air elsewhere: the contrast-filled vessels and
    heart of a contrast CT (kidneys and other enhancing organs too), in pieces of at least 0.5 ml.

    Bone is cortical bone (above `CORTEX_HU`) with what it encloses in each axial slice (cancellous bone, marrow),
    grown by `BONE_REACH_MM`: where HU alone cannot tell contrast blood from bone (150-600 HU).
    """
    grow = [max(1, round(BONE_REACH_MM / s)) for s in spacing]
    cortex = body & (hu > CORTEX_HU)
    closed = ndimage.binary_closing(cortex, structure=ellipsoid([1, *grow[1:]]))
    bone = np.stack([ndimage.binary_fill_holes(plane) for plane in closed])
    bone = ndimage.binary_dilation(bone, structure=ellipsoid(grow))
    keep = body & (hu > low) & (hu < 600.0) & ~bone
    labels, count = ndimage.label(keep)
    if count:
        sizes = np.bincount(labels.ravel()) * float(np.prod(spacing))
        sizes[0] = 0
        keep = sizes[labels] >= 500.0  # mm^3
    return np.where(keep, hu, AIR_HU).astype(np.float32)


def contrast_window(hu: np.ndarray, spacing: tuple[float, float, float]) -> Window:
    """A window for a contrast-enhanced CT that shows its contrast-filled vessels mid-grey: width 600 HU (as CTA),
    centred on the enhanced blood, estimated as the 75th percentile of the body's non-bone voxels of 100-600 HU
    (enhancing organs and vessels; 120-140 HU in a portal-venous phase, 300-400 HU in an arterial one). The CTA
    window when the CT shows none. Computed on at most 128 pixels in-plane."""
    step = max(1, -(-max(hu.shape[1:]) // 128))
    sub = np.asarray(hu[:, ::step, ::step], dtype=np.float32)
    grid = (spacing[0], spacing[1] * step, spacing[2] * step)
    enhanced = vessel_hu(sub, body_mask(sub, grid), grid, low=100.0)
    values = enhanced[enhanced > AIR_HU]
    if values.size * float(np.prod(grid)) < 5000.0:  # under 5 ml: nothing enhanced to centre on
        return PRESETS["cta"]
    return Window(float(np.round(np.percentile(values, 75))), PRESETS["cta"].width)
