"""3D views of a CT in napari: the patient's body without the table and the air, as lit surfaces and HU colours.

napari renders a volume layer by ray casting (vispy). What its public API offers, and what it lacks:

- ``iso`` draws the first surface above a threshold, lit by a head light (ambient + Lambert + a fixed specular term).
  It is the only lit mode: ``translucent`` composites each sample's colormap colour and alpha (a HU transfer
  function) without gradient shading, so napari cannot do a shaded composite rendering like 3D Slicer's CT-Bone or
  OHIF's presets. vispy lights the *value* at the hit (the largest value 1.5 voxels around it) before the colormap,
  and estimates the normal from differences 1.5 voxels either side; a raw HU surface is therefore lit by its HU
  (cortical bone saturates the colormap: washed out) and its normals step with the voxels (crosshatch). The surfaces
  here are drawn from a field made for that renderer (`surface_field`, `lit_surface`).
- ``interpolation3d = "linear"`` samples trilinearly; the shading's normals still show the voxel grid faintly on broad
  curved surfaces of a coarse CT (3 mm), because trilinear gradients jump at voxel faces.
- No public control of the ray step (vispy's ``relative_step_size``, 0.8 voxel, refined to a tenth at a surface), of
  the light (a head light only), or of the specular term; iso surfaces are opaque (a see-through surface is a layer
  opacity below 1). A translucent layer writes the depth of its volume's front face, hiding an iso surface drawn
  after it, so the presets draw surfaces only (and the colorized RGB on its own).
- The voxel size is the layer's scale (anisotropic voxels respected); vispy computes the lighting in voxel
  coordinates, so a CT of thick slices is shaded as if its voxels were cubes.

The presets (`PRESETS_3D`):

- bone: a lit ivory surface at `BONE_SURFACE_HU` of the CT smoothed by `SMOOTH_MM`, its pieces under `MIN_BONE_ML`
  left out (calcifications, stones, bowel content). Contrast-filled vessels above it show as bone too (HU alone
  cannot tell them apart, as in Slicer's CT-Bone).
- CTA: that bone surface without the contrast-filled vessels and heart, which are a red lit surface (`vessel_mask`:
  150-800 HU, away from cortical bone, and not where the colorizer names bone, `app.vessels.named_bone`). HU alone
  cannot tell cancellous bone from contrast blood where the cortex stays below `COMPACT_BONE_HU` (3-5 mm slices,
  osteopenia). On the
  3 mm non-contrast CT 37 % of the labelled bone turned red by HU alone, 0.5 % with the colorizer's names; the
  contrast DICOM series kept its enhanced vessels red (63 % of their voxels above 150 HU, as by HU alone). A CT in
  which the colorizer names no contrast-enhanced blood (`Chroma.enhanced_blood_hu`: the blood it names below 80 HU,
  median) shows the bone surface alone, and the status line says so: on a non-contrast chest, the cancellous bone of
  a scapula that the colorizer does not name bone was red. Checked on the shared exams only (2026-11-27): the
  portal-venous DICOM series' named blood at 102 HU (vessels shown); the 3 mm body's, the popi chest's and the
  lung2 chest's at 37-53 HU, and lung1's at 38 HU, which its source calls contrast-enhanced (no vessels shown:
  nothing in it is enhanced enough to tell from the surface at 150 HU).
- soft tissue: the lit bone surface inside a see-through lit skin (`SKIN_SURFACE_HU`, smoothed by
  `SKIN_SMOOTH_MM`): the body's outline. Organs and muscles cannot be shown shaded (HU cannot tell them apart
  without contrast, and napari's translucent rendering is unlit); the 2D colour shows them.

A "colour" preset (the colorized RGB translucent, alpha from HU) was dropped: unlit, it looked murky, with
stripes from the ray steps, on the chest CT and the CTA alike.

The table and the air are removed first (`app.vessels.body_3d`: the large connected pieces above -400 HU after a
small in-plane opening, which removes the table's shells and cuts the thin contacts between body and table, with
their holes filled).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from napari.utils import Colormap
from scipy import ndimage

from ..app.vessels import AIR_HU, VESSEL_SURFACE_HU

#: Soft tissue's HU: what replaces the voxels a surface leaves out (the vessels under the CTA bone, the bone and
#: organs around the vessels), so that smoothing does not pull the surface of what stays towards air.
SOFT_HU = 40.0


@dataclass(frozen=True)
class Layer3D:
    """One napari layer of a 3D preset.

    Attributes:
        name: the layer's name suffix.
        source: what the layer shows (`surface_field` for the surfaces): "bone" (the bone surface's field), "CTA
            bone" (the same without the contrast-filled vessels, `vessel_mask`), "vessels" (the vessels' field),
            or "skin" (the body's outline).
        rendering: napari's ``rendering``: "iso" (a lit surface) or "translucent".
        colormap: the transfer function over ``limits``.
        limits: contrast limits (HU, or the lit value of a surface, `lit_surface`).
        iso_threshold: the surface's value (``iso``).
        opacity: the layer's opacity (below 1: a see-through surface).
    """

    name: str
    source: str
    rendering: str
    colormap: Colormap | None = None
    limits: tuple[float, float] = (AIR_HU, 2000.0)
    iso_threshold: float | None = None
    opacity: float = 1.0


def transfer_function(
    name: str, points: list[tuple[float, tuple[float, ...]]], limits: tuple[float, float]
) -> Colormap:
    """A napari colormap that gives each HU of ``points`` its RGBA (linear in between) for contrast ``limits``."""
    low, high = limits
    controls = [min(max((hu - low) / (high - low), 0.0), 1.0) for hu, _ in points]
    return Colormap(np.array([rgba for _, rgba in points]), controls=controls, name=f"ctcolor 3D {name}")


#: The top of a lit surface's colormap: the brightest lit value (facing the viewer, with the specular highlight).
LIT_TOP = 2.0


def lit_surface(name: str, source: str, rgb: tuple[float, float, float], opacity: float = 1.0) -> Layer3D:
    """The surface of a `surface_field` (0.5) in colour ``rgb``, lit by the head light, shaded dark at grazing angles.

    vispy lights an iso surface by scaling the *value* at the hit before the colormap: its lit value is the largest
    field value 1.5 voxels around the hit (0.8-1 for a `surface_field`) times ambient + Lambert (0.2 + the cosine of
    the angle to the viewer), plus a specular term (up to 1, shininess 40, fixed in vispy's shader). The colormap
    over (0, `LIT_TOP`) turns that into shading: black at a grazing surface, a darker tone of ``rgb`` half-turned
    away, ``rgb`` facing the viewer; it stays nearly flat above that, because the specular term turns the smoothed
    CT's small normal wobbles into bands on a surface facing the viewer.
    """
    points = [
        (0.0, (0.0, 0.0, 0.0, 1.0)),
        (0.2, (*(0.2 * c for c in rgb), 1.0)),
        (0.6, (*(0.6 * c for c in rgb), 1.0)),
        (1.1, (*rgb, 1.0)),
        (LIT_TOP, (*(c + 0.15 * (1.0 - c) for c in rgb), 1.0)),
    ]
    limits = (0.0, LIT_TOP)
    return Layer3D(name, source, "iso", transfer_function(name, points, limits), limits, 0.5, opacity)


IVORY = (0.93, 0.87, 0.72)
RED = (0.80, 0.12, 0.10)
SKIN = (0.85, 0.62, 0.50)
#: HU of the bone surface in the smoothed CT: where 3D Slicer's CT-Bone opacity ramps up (145-220 HU), so that the
#: thin cortex over a 3 mm CT's cancellous bone (100-150 HU there) and its ribs stay closed.
BONE_SURFACE_HU = 150.0
#: HU of the skin surface: between air and fat.
SKIN_SURFACE_HU = -300.0
#: A bone surface's pieces smaller than this (ml) are left out: calcifications, stones, bowel content, noise. On the
#: shared 3 mm CT the largest piece that is not bone is 0.9 ml (a stone), the smallest rib piece kept 1.1 ml; one
#: 0.6 ml rib end at the scan's edge goes.
MIN_BONE_ML = 1.0
#: Gaussian smoothing of the HU under a surface: sigma (mm, at least half a voxel). More loses a 3 mm CT's thin
#: bone (ribs, the cortex over cancellous bone); the skin takes more (its outline needs no detail, and a flat surface
#: facing the viewer shows every wobble of its normal).
SMOOTH_MM = 1.5
SKIN_SMOOTH_MM = 4.0
#: A surface's field runs from 0 to 1 over this many voxels across the surface.
SURFACE_RAMP_VOXELS = 3.0
PRESETS_3D: dict[str, tuple[Layer3D, ...]] = {
    "bone": (lit_surface("bone", "bone", IVORY),),
    "CTA": (lit_surface("bone", "CTA bone", IVORY), lit_surface("vessels", "vessels", RED)),
    "soft tissue": (
        lit_surface("bone", "bone", IVORY),
        lit_surface("skin", "skin", SKIN, opacity=0.35),
    ),
}


def surface_field(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    threshold: float,
    min_ml: float = 0.0,
    smooth_mm: float | None = None,
) -> np.ndarray:
    """float32 (Z, Y, X) in [0, 1] whose 0.5 surface is the ``threshold`` HU surface of ``hu`` smoothed, for a lit
    iso surface (`lit_surface`).

    The HU are smoothed by a Gaussian of ``smooth_mm`` (default `SMOOTH_MM`; at least half a voxel), so that a CT
    of thick slices gives a smooth surface rather than its voxels' steps; the connected pieces above ``threshold``
    (26-connected) smaller than ``min_ml`` are left out. The field is then 0.5 plus the signed distance to the
    surface (in voxels, first order: (HU - threshold) / |HU gradient|) over `SURFACE_RAMP_VOXELS`, clipped to
    [0, 1]. vispy estimates a surface's normal from differences 1.5 voxels either side of the hit, which a steeper
    field (a cortex's HU jump) saturates into steps that show as bands; with this ramp the normal is the smoothed
    CT's, and the lit value (`lit_surface`) depends on the angle to the viewer rather than on the HU behind the
    surface (which washed cortical bone out).
    """
    sigma = [max((SMOOTH_MM if smooth_mm is None else smooth_mm) / s, 0.5) for s in spacing]
    smooth = ndimage.gaussian_filter(np.asarray(hu, dtype=np.float32), sigma)
    removed = None
    if min_ml > 0:
        labels, count = ndimage.label(smooth > threshold, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel()) * float(np.prod(spacing))
        small = sizes < min_ml * 1000.0
        small[0] = False
        removed = small[labels]
        del labels
    gradient = np.zeros_like(smooth)
    for axis in range(smooth.ndim):
        gradient += np.gradient(smooth, axis=axis) ** 2
    np.sqrt(gradient, out=gradient)
    np.maximum(gradient, 1.0, out=gradient)  # HU per voxel: flat regions lie far from the surface, clipped below
    smooth -= threshold
    smooth /= gradient
    del gradient
    smooth /= SURFACE_RAMP_VOXELS
    smooth += 0.5
    if removed is not None:
        smooth[removed] = 0.0  # its neighbours lie below the surface already
    return np.clip(smooth, 0.0, 1.0, out=smooth)


def layer_data(
    part: Layer3D, hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float], vessels: np.ndarray | None
) -> np.ndarray:
    """float32 (Z, Y, X): the `surface_field` a surface layer ``part`` of a preset shows, from the HU within ``body``
    (without table and air); ``vessels`` (`vessel_mask`) for "CTA bone" and "vessels"."""
    inside = np.where(body, hu, AIR_HU).astype(np.float32)
    if part.source in ("bone", "CTA bone"):
        if part.source == "CTA bone":
            inside[vessels] = SOFT_HU
        return surface_field(inside, spacing, BONE_SURFACE_HU, MIN_BONE_ML)
    if part.source == "vessels":
        inside = np.where(vessels, inside, np.minimum(inside, SOFT_HU))
        return surface_field(inside, spacing, VESSEL_SURFACE_HU)
    if part.source == "skin":
        return surface_field(inside, spacing, SKIN_SURFACE_HU, smooth_mm=SKIN_SMOOTH_MM)
    raise ValueError(f"no 3D source {part.source!r}")
