"""Colour targets: what "anatomical colour" means for a labelled CT, as CIE a*, b* per voxel.

- Labelled voxels take their structure's palette colour (TotalSegmentator v2 names).
- Unlabelled voxels take a tissue colour from HU (the palette's tissue classes: air none, lung pink, fat yellow, soft
  tissue red-brown, bone ivory).
- a*, b* are smoothed in-plane at boundaries (Gaussian, ``smooth_mm``): a colour photograph of tissue has no
  one-voxel colour steps, and a network cannot place edges more precisely than the CT's partial-volume blur anyway.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from ..color import Palette, load_palette, tissue_ab_from_hu
from ..io.errors import InputError


def ab_targets(
    hu: np.ndarray,
    labels: np.ndarray | None,
    label_names: Mapping[int, str],
    palette: Palette | str = "anatomical",
    spacing_yx_mm: tuple[float, float] = (1.0, 1.0),
    smooth_mm: float = 1.5,
) -> np.ndarray:
    """Per-voxel target a*, b*.

    Args:
        hu: (Z, Y, X) HU.
        labels: (Z, Y, X) integer label map (0 = unlabelled), or None.
        label_names: label id -> TotalSegmentator v2 name; ids whose name the palette lacks fall back to HU.
        palette: a Palette or its name.
        spacing_yx_mm: in-plane pixel size, for the smoothing.
        smooth_mm: Gaussian sigma of the in-plane smoothing in mm (0 disables it).
    Returns:
        (Z, Y, X, 2) float32 a*, b*.
    """
    palette = load_palette(palette) if isinstance(palette, str) else palette
    if labels is not None and labels.shape != hu.shape:
        raise InputError(f"labels shape {labels.shape} does not match the CT's {hu.shape}")
    ab = tissue_ab_from_hu(hu, palette).astype(np.float32, copy=False)
    if labels is not None:
        table = np.full((int(labels.max()) + 1, 2), np.nan, dtype=np.float32)
        for label, name in label_names.items():
            if 0 < label < len(table) and name in palette.rgb:
                table[label] = palette.ab(name)
        per_voxel = table[labels]
        has_colour = ~np.isnan(per_voxel[..., 0])
        ab[has_colour] = per_voxel[has_colour]
    if smooth_mm > 0:
        sigma = (0.0, smooth_mm / spacing_yx_mm[0], smooth_mm / spacing_yx_mm[1])
        for c in range(2):
            ab[..., c] = ndimage.gaussian_filter(ab[..., c], sigma, mode="nearest")
    return ab
