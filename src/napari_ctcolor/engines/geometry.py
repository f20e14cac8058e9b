"""Grid geometry shared by every engine and front end: same grid, resampling through physical space, warping by a
displacement field. One implementation, SimpleITK's resampler, so that every warp in the project (the registration's
outputs, ``ctcolor peer``'s, the widget's colour twin, the bench's label maps) reads the field the same way.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import SimpleITK as sitk

from ..io import ColorVolume, Volume

#: Geometry closer than this (mm for origins and spacings, cosine for directions) is the same grid.
GRID_TOLERANCE = 1e-4


def shape_of(image: Volume | ColorVolume) -> tuple[int, int, int]:
    """(Z, Y, X) of a Volume or a ColorVolume."""
    return tuple(image.rgb.shape[:3]) if isinstance(image, ColorVolume) else tuple(image.array.shape)


def same_grid(a: Volume | ColorVolume, b: Volume | ColorVolume) -> bool:
    """True when ``a`` and ``b`` have the same shape, spacing, origin and direction (to `GRID_TOLERANCE`)."""
    return (
        shape_of(a) == shape_of(b)
        and np.allclose(a.spacing, b.spacing, rtol=0, atol=GRID_TOLERANCE)
        and np.allclose(a.origin, b.origin, rtol=0, atol=GRID_TOLERANCE)
        and np.allclose(a.direction, b.direction, rtol=0, atol=GRID_TOLERANCE)
    )


def resample_onto(
    image: Volume | ColorVolume,
    grid: Volume | ColorVolume,
    transform: sitk.Transform | None = None,
    interpolator: Literal["linear", "nearest"] = "linear",
    default: float | None = None,
) -> np.ndarray:
    """``image`` sampled on ``grid``'s voxels through physical (LPS) space, with SimpleITK.

    Output voxel p takes ``image`` at the physical point ``transform(x_p)`` (identity when None), where x_p is p's
    position on ``grid``.

    Args:
        image: a Volume (Z, Y, X) or ColorVolume (rgb (Z, Y, X, 3) uint8), any geometry.
        grid: the target geometry (its pixels are not read).
        transform: SimpleITK transform from grid points to ``image`` points, e.g. an affine pre-alignment.
        interpolator: ``"linear"`` for intensities, ``"nearest"`` for label maps.
        default: value outside ``image``; its minimum (air for CT) for a Volume, black for a ColorVolume.

    Returns:
        (Z, Y, X) on ``grid``: float32 when linear, the input dtype when nearest; for a ColorVolume (Z, Y, X, 3) uint8.
    """
    color = isinstance(image, ColorVolume)
    if color:
        source = sitk.GetImageFromArray(np.ascontiguousarray(image.rgb), isVector=True)
        source.SetSpacing(image.spacing[::-1])
        source.SetOrigin(image.origin)
        source.SetDirection(image.direction.flatten().tolist())
        default = 0.0 if default is None else default
    else:
        source = image.to_sitk()
        default = float(np.nanmin(image.array)) if default is None else default
    linear = interpolator == "linear"
    if linear:
        source = sitk.Cast(source, sitk.sitkVectorFloat32 if color else sitk.sitkFloat32)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(shape_of(grid)[::-1])
    resampler.SetOutputSpacing(grid.spacing[::-1])
    resampler.SetOutputOrigin(grid.origin)
    resampler.SetOutputDirection(grid.direction.flatten().tolist())
    resampler.SetTransform(transform if transform is not None else sitk.Transform())
    resampler.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    resampler.SetDefaultPixelValue(float(default))
    out = sitk.GetArrayFromImage(resampler.Execute(source))
    if color and linear:
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out


def field_transform(ddf: np.ndarray, grid: Volume | ColorVolume) -> sitk.DisplacementFieldTransform:
    """A SimpleITK transform for a displacement field on ``grid``: grid point p maps to p + ddf(p).

    Args:
        ddf: (Z, Y, X, 3) mm, LPS (ITK's convention, as `RegistrationResult.ddf`), sampled on ``grid``'s voxels.
        grid: the field's geometry (its pixels are not read).
    """
    field = sitk.GetImageFromArray(np.asarray(ddf, dtype=np.float64), isVector=True)
    field.SetSpacing([float(s) for s in grid.spacing[::-1]])
    field.SetOrigin([float(o) for o in grid.origin])
    field.SetDirection([float(d) for d in np.asarray(grid.direction).flatten()])
    return sitk.DisplacementFieldTransform(field)  # takes the field's buffer: no second copy


def warp(
    image: Volume | ColorVolume,
    grid: Volume | ColorVolume,
    ddf: np.ndarray,
    interpolator: Literal["linear", "nearest"] = "linear",
    default: float | None = None,
) -> np.ndarray:
    """``image`` read at p + ddf(p) for every voxel p of ``grid`` (`resample_onto` through `field_transform`).

    Args:
        image: a Volume or ColorVolume on any grid (the moving image, its labels or its colour twin).
        grid: the output grid, the one ``ddf`` is sampled on (the fixed image).
        ddf: (Z, Y, X, 3) mm, LPS, ITK convention.
        interpolator, default: as `resample_onto` (``"nearest"`` for label maps).
    """
    return resample_onto(image, grid, field_transform(ddf, grid), interpolator, default)


def turned(volume: Volume, degrees: float, shift_mm: float, back: bool = False) -> Volume:
    """``volume`` turned by ``degrees`` about its centre's z axis and moved ``shift_mm`` along x (LPS), on its own
    grid, air (-1024 HU) outside: a patient lying otherwise on the table, as in a rigid-motion check. ``back``: then
    resampled through the exact inverse motion, as a perfect pre-alignment leaves it (the same anatomy, twice
    interpolated, air where the turn took it off the grid)."""
    image = volume.to_sitk()
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    turn = sitk.Euler3DTransform(centre, 0.0, 0.0, np.deg2rad(degrees), (shift_mm, 0.0, 0.0))
    moved = sitk.Resample(image, image, turn, sitk.sitkLinear, -1024.0, image.GetPixelID())
    if back:
        moved = sitk.Resample(moved, image, turn.GetInverse(), sitk.sitkLinear, -1024.0, image.GetPixelID())
    return Volume.from_sitk(moved)
