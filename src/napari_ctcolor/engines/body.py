"""The patient's body in a CT, without the table and the air around it: what gets colour, a 3D view and metrics.

Thresholded above `BODY_HU` (skin, fat, soft tissue, bone; the mattress foam and air lie below), opened in-plane by
a disc of `TABLE_GAP_MM` (which removes the table's thin shells and cuts thin contacts between the body and the table),
reduced to its large connected pieces: the largest and every piece of at least `LIMB_SHARE` of it (an arm lying
beside the abdomen, the second leg of a leg scan), then grown back by the same disc within the threshold (the skin the
opening shaved off), its holes (lungs, bowel gas) filled slice by slice. Written with scipy.ndimage's morphology:
the rules are about CT, not a library's.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Above this HU a voxel may belong to the body (skin, fat, soft tissue, bone); the mattress (foam) and air lie below.
BODY_HU = -400.0
#: Radius (mm) of the opening that separates the body from the table.
TABLE_GAP_MM = 4.0
#: A connected piece of the opened mask is kept when it has at least this share of the largest piece's voxels.
LIMB_SHARE = 0.05


def ellipsoid(radius: list[int]) -> np.ndarray:
    """bool structuring element: the ellipsoid of the given radius (voxels) along each axis."""
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum((g / max(r, 1)) ** 2 for g, r in zip(grid, radius, strict=True)) <= 1.0


def body_mask(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """bool (Z, Y, X): the patient's body, without the table and the air around it (see the module docstring)."""
    inside = hu > BODY_HU
    # In-plane only: along z a ball would erode a one-slice image (or the end slices) away entirely.
    radius = [max(1, round(TABLE_GAP_MM / s)) if i else 0 for i, s in enumerate(spacing)]
    ball = ellipsoid(radius)
    opened = ndimage.binary_opening(inside, structure=ball)
    labels, count = ndimage.label(opened)
    if count == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = (sizes >= LIMB_SHARE * sizes.max())[labels]
    del labels
    body = ndimage.binary_dilation(body, structure=ball) & inside  # the skin the opening shaved off
    for z in range(body.shape[0]):  # lungs and bowel gas are inside the body
        body[z] = ndimage.binary_fill_holes(body[z])
    return body
