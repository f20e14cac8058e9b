"""Contrast-filled vessels and the window that shows them, from a CT's HU (numpy and scipy, no torch: the napari reader
chooses a contrast CT's opening window with it).

- `vessel_mask`: the body's voxels of `VESSEL_SURFACE_HU` to `VESSEL_MAX_HU` away from cortical bone and what it
  encloses (the contrast-filled vessels and heart of a contrast CT; the 3D view's CTA preset shows them red).
- `contrast_window`: a window in which a contrast CT's enhanced blood is light grey and fat, muscle and organs keep
  greys that carry colour.
- `enhanced_blood`: whether a CT shows contrast-enhanced blood, from its HU alone: the HU of a tube of enhanced
  blood (the aorta, the heart's chambers, the great veins) followed along z, or None.
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


#: `enhanced_blood`'s rules, each checked on the shared CTs (2026-11-28): five non-contrast scans (3 mm NIfTI of the
#: lower chest to the pelvis, its 30-slice cut, two chests at 2 and 5 mm, the 5 mm chest sold as contrast whose
#: blood pool measures 26-52 HU) and the contrast DICOM series (portal-venous, aorta 150-160 HU, 2 mm), with synthetic
#: versions (training.exams: the labelled aorta, heart and veins of both labelled patients moved to portal-venous
#: 130-170 and arterial 300 and 600 HU; two chests' mediastinal blood pools moved to 150, 300 and 500 HU).
#: - Enhanced blood: `ENHANCED_HU` (portal-venous blood 140-220 HU, unenhanced 30-60), a 2 mm grid.
#: - A blood disc: the deepest point of a slice's enhanced region, 6-30 mm from its edge (`BLOOD_RADIUS_MM`: the
#:   aorta's radius is 8-18 mm), whose inside is smooth (SD of the 2 mm block means below `BLOOD_SD_HU`: the
#:   blood measured 7-11 HU, cancellous bone 35-60 at 2 mm and 20-45 at 3 mm) and whose 3 mm ring is darker than
#:   it (median below its own; at most half of the ring 60 HU brighter: a cortex around marrow is brighter).
#: - Enhanced: blood discs followed along z (centres within `BLOOD_SHIFT_MM` per slice, one missing slice
#:   bridged) over at least `BLOOD_RUN_MM`. Measured: the longest run in the non-contrast scans 2-6 mm (vertebral
#:   bodies and hip bones at 3 mm), in the contrast ones 40 mm (the whole 40 mm series) to 177 mm, 58-80 mm for a
#:   mediastinal pool at 150 HU. Beyond that range: 15 HU more image noise still found; the arterial 40 mm series
#:   averaged to five 8 mm slices is not (too few discs to follow), nor would be a very noisy low-dose CT (blood SD
#:   above 20 HU on 2 mm means): such a CT opens as a non-contrast one, and Run's check of the blood the network names
#:   (`app.colorize_job`, ``find_contrast``) still moves it to the contrast window. Oral contrast in a bowel loop
#:   followed over 24 mm would count as enhanced blood.
ENHANCED_HU = (130.0, 700.0)
BLOOD_RADIUS_MM, BLOOD_SD_HU, BLOOD_SHIFT_MM, BLOOD_RUN_MM = (6.0, 30.0), 20.0, 4.0, 24.0
_GRID_MM = 2.0


def _blood_discs(sm: np.ndarray, means: np.ndarray, enhanced: np.ndarray, pixel: float) -> list[tuple[float, ...]]:
    """(y, x, median HU) of each blood disc of one slice (`BLOOD_RADIUS_MM` ...): ``sm`` the smoothed HU, ``means``
    the 2 mm block means, ``enhanced`` the body's voxels of `ENHANCED_HU`, all on a grid of ``pixel`` mm."""
    depth = ndimage.distance_transform_edt(enhanced) * pixel
    peaks = (depth == ndimage.maximum_filter(depth, size=max(3, round(12.0 / pixel)))) & (
        (depth >= BLOOD_RADIUS_MM[0]) & (depth <= BLOOD_RADIUS_MM[1])
    )
    labels, count = ndimage.label(peaks)
    found = []
    for y, x in ndimage.center_of_mass(peaks, labels, range(1, count + 1)) if count else []:
        y, x = int(round(y)), int(round(x))
        radius = depth[y, x]
        reach = int(np.ceil((radius + 3.0) / pixel)) + 1
        y0, x0 = max(0, y - reach), max(0, x - reach)
        box = (slice(y0, min(y + reach + 1, sm.shape[0])), slice(x0, min(x + reach + 1, sm.shape[1])))
        yy, xx = np.ogrid[box[0], box[1]]
        dist = np.hypot(yy - y, xx - x) * pixel
        inside, ring = dist <= radius - pixel, (dist > radius) & (dist <= radius + 3.0 + pixel)
        if inside.sum() < 5 or ring.sum() < 5:
            continue
        median, rim = float(np.median(sm[box][inside])), sm[box][ring]
        if (
            float(np.std(means[box][inside])) < BLOOD_SD_HU
            and float(np.median(rim)) < median
            and float((rim > median + 60.0).mean()) < 0.5
        ):
            found.append((float(y), float(x), median))
    return found


def _longest_run(discs: dict[int, list[tuple[float, ...]]], grid: tuple[float, float, float]) -> tuple[float, list]:
    """The longest chain of blood discs from slice to slice (module constants): (its length in mm, its HUs)."""
    best: tuple[float, list] = (0.0, [])
    chains: list[tuple[int, tuple[float, ...], int, list]] = []  # (slice, disc, first slice, HUs)
    for z in sorted(discs):
        chains = [c for c in chains if z - c[0] <= 2]  # one missing slice bridged
        new = []
        for disc in discs[z]:
            linked = [
                c for c in chains
                if np.hypot((c[1][0] - disc[0]) * grid[1], (c[1][1] - disc[1]) * grid[2]) <= BLOOD_SHIFT_MM
            ]  # fmt: skip
            first = min(linked, key=lambda c: c[2]) if linked else None
            new.append((z, disc, first[2] if first else z, (first[3] if first else []) + [disc[2]]))
        chains += new
        for c in new:
            if (c[0] - c[2] + 1) * grid[0] > best[0]:
                best = ((c[0] - c[2] + 1) * grid[0], c[3])
    return best


def enhanced_blood(hu: np.ndarray, spacing: tuple[float, float, float]) -> float | None:
    """The median HU of a CT's contrast-enhanced blood, or None where its HU show none (rules and the range they were
    checked on: `ENHANCED_HU`). A CT shorter than `BLOOD_RUN_MM` cannot tell: None."""
    hu = np.asarray(hu)
    step_z, step = max(1, round(_GRID_MM / spacing[0])), max(1, round(_GRID_MM / spacing[1]))
    z, h, w = hu[::step_z].shape
    cut = hu[::step_z, : h // step * step, : w // step * step]
    means = np.empty((z, h // step, w // step), dtype=np.float32)
    for k in range(z):  # slice by slice: no float copy of the whole CT (a 275-slice 512² CT is 290 MB of float32)
        means[k] = cut[k].reshape(h // step, step, w // step, step).sum(axis=(1, 3), dtype=np.float32)
    means /= step * step
    grid = (spacing[0] * step_z, spacing[1] * step, spacing[2] * step)
    if z * grid[0] < BLOOD_RUN_MM or min(means.shape[1:]) < 8:
        return None
    coarse = body_mask(means[:, ::2, ::2], (grid[0], grid[1] * 2, grid[2] * 2))  # the outline needs no finer grid
    body = np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2)[:, : means.shape[1], : means.shape[2]]
    sm = ndimage.gaussian_filter(means, (0.0, 1.0 / grid[1], 1.0 / grid[2]))
    enhanced = body & (sm >= ENHANCED_HU[0]) & (sm <= ENHANCED_HU[1])
    smallest = np.pi * (BLOOD_RADIUS_MM[0] / grid[1]) ** 2  # pixels of the smallest disc
    discs = {}
    for k in np.flatnonzero(enhanced.sum(axis=(1, 2)) >= smallest):
        rows, cols = np.flatnonzero(enhanced[k].any(axis=1)), np.flatnonzero(enhanced[k].any(axis=0))
        margin = int(np.ceil(BLOOD_RADIUS_MM[1] / grid[1])) + 3  # the ring around the deepest possible disc
        y0, x0 = max(0, rows[0] - margin), max(0, cols[0] - margin)
        box = (slice(y0, rows[-1] + margin + 1), slice(x0, cols[-1] + margin + 1))
        found = _blood_discs(sm[k][box], means[k][box], enhanced[k][box], grid[1])
        discs[int(k)] = [(y + y0, x + x0, value) for y, x, value in found]
    length, values = _longest_run({k: found for k, found in discs.items() if found}, grid)
    return float(np.median(values)) if length >= BLOOD_RUN_MM else None


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
    return blood_window(float(np.percentile(values, 75)))


def blood_window(blood: float) -> Window:
    """The contrast window for enhanced blood at ``blood`` HU: from `CONTRAST_LOW_HU` to where the blood shows at
    `CONTRAST_BLOOD_GREY`, at least the CTA preset's width."""
    width = float(np.round(max((blood - CONTRAST_LOW_HU) / CONTRAST_BLOOD_GREY, PRESETS["cta"].width)))
    return Window(CONTRAST_LOW_HU + width / 2, width)
