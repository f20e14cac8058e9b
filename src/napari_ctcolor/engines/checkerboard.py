"""Checkerboard of two images on one grid.

A checkerboard alternates cubes of ``tile_mm`` from two aligned images: where the alignment is good, edges run
straight across the tile borders. Tiles are laid out in the grid's own physical frame, index * spacing mm from the
centre of voxel 0 along each array axis, so they are cubes in mm whatever the voxel spacing.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

from ..errors import InputError
from ..io import ColorVolume, Volume
from .geometry import resample_onto, same_grid, shape_of

Image = TypeVar("Image", Volume, ColorVolume)


def checkerboard_mask(shape: tuple[int, int, int], spacing: tuple[float, float, float], tile_mm: float) -> np.ndarray:
    """Boolean (Z, Y, X): True on the tiles taken from the first image (even tile-index sum), False on the others.

    Tile index along an axis is floor(index * spacing / tile_mm). The parity of the three indices is the XOR of three
    1D parity vectors broadcast against each other: no loop over voxels.

    Args:
        shape: (Z, Y, X) voxels.
        spacing: (z, y, x) mm.
        tile_mm: cube side in mm, > 0.
    """
    if not (np.isfinite(tile_mm) and tile_mm > 0):
        raise InputError(f"tile size must be a positive number of mm, got {tile_mm}")
    odd = [
        (np.floor(np.arange(n) * (s / tile_mm)).astype(np.int64) & 1).astype(bool)
        for n, s in zip(shape, spacing, strict=True)
    ]
    return ~(odd[0][:, None, None] ^ odd[1][None, :, None] ^ odd[2][None, None, :])


def checkerboard(a: Image, b: Image, tile_mm: float = 20.0) -> Image:
    """Alternate cubes of ``tile_mm`` from ``a`` and ``b``, on ``a``'s grid.

    Works for grey volumes and RGB colour volumes, one slice (2D) or many (3D). Tile (0, 0, 0), the one holding
    voxel 0, comes from ``a``.

    Example (a CT against itself shifted, 20 mm tiles)::

        ct = read_volume("../shared/data/ct/totalseg-body-3mm-30slices.nii.gz")
        board = checkerboard(ct, registration.warped)   # Volume, (30, 101, 122), 20 mm = 6.7 voxels per tile

    Args:
        a: Volume (Z, Y, X) or ColorVolume (rgb uint8 (Z, Y, X, 3)); its grid is the output's.
        b: the same kind as ``a``. When its geometry differs it is first resampled onto ``a``'s grid (SimpleITK,
            linear, outside = b's minimum for grey, black for colour).
        tile_mm: cube side in mm.

    Returns:
        The same type as ``a``: a Volume of the two arrays' common dtype, or a ColorVolume (uint8).

    Raises:
        InputError: when one image is grey and the other colour, or ``tile_mm`` is not positive.
    """
    if isinstance(a, ColorVolume) != isinstance(b, ColorVolume):
        kinds = ["colour" if isinstance(x, ColorVolume) else "grey" for x in (a, b)]
        raise InputError(f"checkerboard needs two grey or two colour images, got {kinds[0]} and {kinds[1]}")
    mask = checkerboard_mask(shape_of(a), a.spacing, tile_mm)
    b_pixels = (b.rgb if isinstance(b, ColorVolume) else b.array) if same_grid(a, b) else resample_onto(b, a)
    if isinstance(a, ColorVolume):
        rgb = np.where(mask[..., None], a.rgb, b_pixels)
        return ColorVolume(rgb, a.spacing, a.origin, a.direction.copy(), {**a.settings, "checkerboard_mm": tile_mm})
    return a.with_array(np.where(mask, a.array, b_pixels), checkerboard_mm=tile_mm)
