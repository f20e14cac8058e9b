"""`Volume` and `ColorVolume`: voxel arrays with their physical geometry.

Conventions (the same everywhere in the project):

- ``array`` is indexed (Z, Y, X), i.e. (slice, row, column).
- ``spacing`` is (z, y, x) in mm, in array-axis order.
- ``origin`` is (x, y, z) in mm, LPS, the centre of voxel [0, 0, 0].
- ``direction`` is 3x3 in the ITK convention: column ``c`` is the LPS direction of index axis ``c`` where the
  index axes are (i, j, k) = (X, Y, Z). So LPS(p) = origin + direction @ (spacing_xyz * (i, j, k)).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import InputError


def _geometry_affine(spacing: tuple[float, float, float], origin, direction) -> np.ndarray:
    """4x4 matrix mapping homogeneous index (i, j, k, 1) = (X, Y, Z, 1) to LPS (x, y, z, 1) in mm."""
    spacing_xyz = np.asarray(spacing, dtype=np.float64)[::-1]
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=np.float64) @ np.diag(spacing_xyz)
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)
    return affine


def _check_geometry(shape: tuple[int, ...], spacing, origin, direction) -> None:
    if len(shape) != 3:
        raise InputError(f"expected a (Z, Y, X) volume, got an array of shape {tuple(shape)}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"voxel spacing must be three positive numbers, got {tuple(spacing)}")
    if len(origin) != 3 or not all(np.isfinite(o) for o in origin):
        raise InputError(f"origin must be three finite numbers, got {tuple(origin)}")
    d = np.asarray(direction, dtype=np.float64)
    if d.shape != (3, 3) or not np.all(np.isfinite(d)):
        raise InputError(f"direction must be a finite 3x3 matrix, got shape {d.shape}")
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
        raise InputError("direction cosines are not orthonormal (sheared or degenerate geometry)")


@dataclass
class Volume:
    """A scalar image volume with physical geometry.

    Example (the shared abdomen series)::

        vol = read_volume("../shared/data/ct/totalseg-abdomen-dicom")
        vol.array.shape   # (20, 512, 512), HU, int16
        vol.spacing       # (2.0, 0.977, 0.977) mm, (z, y, x)
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        # Contiguous: a napari layer's matrix may be a view with negative strides, which torch refuses to wrap.
        self.direction = np.ascontiguousarray(self.direction, dtype=np.float64).reshape(3, 3)
        _check_geometry(self.array.shape, self.spacing, self.origin, self.direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix from index (i, j, k) = (X, Y, Z) to LPS mm."""
        return _geometry_affine(self.spacing, self.origin, self.direction)

    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """A new Volume on the same grid with another array of the same shape (meta updated by ``meta``)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise InputError(f"array shape {array.shape} does not match the volume's {self.array.shape}")
        return replace(self, array=array, meta={**self.meta, **meta})

    def finite(self) -> Volume:
        """This volume, or a copy with NaN as the finite minimum (air in a CT: some NIfTI files mark unreconstructed
        voxels so) and +-inf clipped to the finite range, as the colorizer reads them. Registration and its
        pre-alignment need it: SimpleITK's optimiser and the warped image would carry the NaN."""
        if self.array.dtype.kind != "f" or np.isfinite(self.array).all():
            return self
        values = self.array[np.isfinite(self.array)]
        if values.size == 0:
            raise InputError(f"{self.meta.get('source') or 'the image'}: no finite voxel values")
        low, high = float(values.min()), float(values.max())
        return self.with_array(np.nan_to_num(self.array, nan=low, posinf=high, neginf=low))

    def to_sitk(self):
        """The same image as a ``SimpleITK.Image`` (lossless: array, spacing, origin, direction)."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array), isVector=False)
        image.SetSpacing(self.spacing[::-1])
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction.flatten().tolist())
        return image

    @classmethod
    def from_sitk(cls, image, meta: dict[str, Any] | None = None) -> Volume:
        """A Volume from a scalar 2D or 3D ``SimpleITK.Image`` (2D images become one slice of 1 mm)."""
        import SimpleITK as sitk

        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(
                f"expected a scalar (grey) image, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
            )
        dim = image.GetDimension()
        if dim == 2:
            image = sitk.JoinSeries([image])
        elif dim != 3:
            raise InputError(f"expected a 2D or 3D image, got {dim}D")
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=image.GetSpacing()[::-1],
            origin=image.GetOrigin(),
            direction=np.asarray(image.GetDirection()).reshape(3, 3),
            meta=dict(meta or {}),
        )


@dataclass
class ColorVolume:
    """An sRGB rendering of a volume: ``rgb`` uint8 (Z, Y, X, 3) on its source's grid.

    ``settings`` records what made it (window, model name, chroma strength).
    """

    rgb: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rgb.ndim != 4 or self.rgb.shape[-1] != 3 or self.rgb.dtype != np.uint8:
            raise InputError(f"expected uint8 RGB of shape (Z, Y, X, 3), got {self.rgb.dtype} {self.rgb.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        # Contiguous: a napari layer's matrix may be a view with negative strides, which torch refuses to wrap.
        self.direction = np.ascontiguousarray(self.direction, dtype=np.float64).reshape(3, 3)
        _check_geometry(self.rgb.shape[:3], self.spacing, self.origin, self.direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X): the grid, as `Volume.shape` (the colour axis is not spatial)."""
        return tuple(self.rgb.shape[:3])

    @classmethod
    def on_grid_of(cls, volume: Volume, rgb: np.ndarray, **settings: Any) -> ColorVolume:
        return cls(rgb, volume.spacing, volume.origin, volume.direction.copy(), dict(settings))

    @property
    def affine(self) -> np.ndarray:
        return _geometry_affine(self.spacing, self.origin, self.direction)
