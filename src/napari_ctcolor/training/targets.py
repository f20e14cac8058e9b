"""Colour targets: which colour class each voxel of a labelled CT belongs to, and the a*, b* that gives.

- A labelled voxel belongs to its structure's colour class (`napari_ctcolor.palettes.color_class`: ``kidney_left``
  -> ``kidney``), when the model has that class.
- Any other voxel, unlabelled or of a structure the model has no class for, belongs to the HU tissue class whose
  range (the anatomical palette's ``tissue_classes``) is nearest its HU: air, lung, fat, soft tissue, contrast blood,
  bone. So anatomy the model never learnt falls back to tissue colours, never to another organ's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..palettes import Palette, color_class, load_palette

#: The tissue classes, in HU order; every model's classes include them.
TISSUE_CLASSES = tuple(t.name for t in load_palette("anatomical").tissue_classes)


def tissue_class_index(hu: np.ndarray) -> np.ndarray:
    """Index into `TISSUE_CLASSES` of each voxel: the class whose HU range is nearest (inside it: that class)."""
    ranges = [t.hu_range for t in load_palette("anatomical").tissue_classes]
    # Between two neighbouring ranges, the boundary is the midpoint of the gap.
    edges = np.asarray([(ranges[i][1] + ranges[i + 1][0]) / 2.0 for i in range(len(ranges) - 1)], dtype=np.float32)
    return np.searchsorted(edges, np.asarray(hu, dtype=np.float32), side="right").astype(np.uint8)


def class_targets(
    hu: np.ndarray, labels: np.ndarray | None, label_names: Mapping[int, str], classes: Sequence[str]
) -> np.ndarray:
    """(Z, Y, X) uint8 index into ``classes`` of every voxel's colour class (see the module docstring).

    Args:
        hu: (Z, Y, X) HU.
        labels: (Z, Y, X) integer label map (0 = unlabelled) on the same grid, or None.
        label_names: label id -> TotalSegmentator v2 name.
        classes: the model's colour classes; they must include every tissue class.
    """
    missing = [t for t in TISSUE_CLASSES if t not in classes]
    if missing:
        raise InputError(f"colour classes must include the tissue classes; missing {', '.join(missing)}")
    if labels is not None and labels.shape != hu.shape:
        raise InputError(f"labels shape {labels.shape} does not match the CT's {hu.shape}")
    index = {name: k for k, name in enumerate(classes)}
    tissue_lut = np.asarray([index[t] for t in TISSUE_CLASSES], dtype=np.uint8)
    out = tissue_lut[tissue_class_index(hu)]
    if labels is not None:
        table = np.full(int(labels.max()) + 1, 255, dtype=np.uint8)  # 255: no class of the model
        for label, name in label_names.items():
            k = index.get(color_class(name))
            if 0 < label < len(table) and k is not None:
                table[label] = k
        per_voxel = table[labels]
        known = per_voxel != 255
        out[known] = per_voxel[known]
    return out


def ab_targets(
    hu: np.ndarray,
    labels: np.ndarray | None,
    label_names: Mapping[int, str],
    classes: Sequence[str],
    palette: Palette | str = "anatomical",
    spacing_yx_mm: tuple[float, float] = (1.0, 1.0),
    smooth_mm: float = 1.5,
) -> np.ndarray:
    """Per-voxel reference a*, b*: the palette colour of each voxel's colour class, smoothed in-plane.

    A colour photograph of tissue has no one-voxel colour steps, and no model places edges more precisely than the
    CT's partial-volume blur, so the reference is smoothed at boundaries (Gaussian, ``smooth_mm``; 0 disables it).

    Returns:
        (Z, Y, X, 2) float32 a*, b*.
    """
    table = load_palette(palette).class_ab(classes)
    ab = table[class_targets(hu, labels, label_names, classes)]
    if smooth_mm > 0:
        sigma = (0.0, smooth_mm / spacing_yx_mm[0], smooth_mm / spacing_yx_mm[1])
        for c in range(2):
            ab[..., c] = ndimage.gaussian_filter(ab[..., c], sigma, mode="nearest")
    return ab
