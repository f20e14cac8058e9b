"""The axis order and orientation a registration network was trained in, and the exact array moves to reach it.

A CNN is not equivariant to permuting or flipping its input axes: the same weights given the transpose of a pair
produce another registration. So every SYMNet model card states the orientation its network saw, as three nibabel
axis codes (the direction each network axis D0, D1, D2 increases towards, in RAS letters), and the engine moves the
(Z, Y, X) arrays into that orientation before the network and moves the fields back after it. The moves are
transposes and reversals of the array (no interpolation), so two files that store the same physical image in other
orders give the same physical result.

Example: the official SYMNet checkpoint saw nibabel's array of the neurite-OASIS files as stored, axes ("L", "I", "A");
our (Z, Y, X) array of ``image_A_full_size.nii.gz`` is that array transposed, so `AxisMap.to_network` transposes it
back. A DICOM CT read as (Z, Y, X) with the identity direction is ("S", "P", "L").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from nibabel.orientations import axcodes2ornt, io_orientation

from ..errors import InputError
from ..io import Volume

#: LPS (ours, DICOM/ITK) -> RAS (nibabel): the first two world axes change sign.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def check_axes(codes: Sequence[str], source: str) -> tuple[str, str, str]:
    """``codes`` as a tuple of three RAS letters naming three different world axes; `InputError` otherwise."""
    codes = tuple(str(c).upper() for c in codes)
    try:
        ornt = axcodes2ornt(codes)
    except ValueError:
        ornt = None
    if len(codes) != 3 or ornt is None or np.isnan(ornt).any() or len(set(ornt[:, 0])) != 3:
        raise InputError(f"{source}: axes must be three letters of R/L, A/P, S/I, one per world axis, got {codes}")
    return codes  # type: ignore[return-value]


@dataclass(frozen=True)
class AxisMap:
    """How a (Z, Y, X) array becomes a network's (D0, D1, D2) array: D_n is array axis ``axes[n]``, reversed where
    ``flips[n]``.

    Attributes:
        axes: for each network axis, the (Z, Y, X) array axis it comes from (a permutation of 0, 1, 2).
        flips: for each network axis, whether the array axis runs the other way.
    """

    axes: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def between(cls, volume: Volume, codes: Sequence[str]) -> AxisMap:
        """The map from ``volume``'s (Z, Y, X) array to a network that expects axes ``codes`` (e.g. ("S", "P", "L")).

        Each index axis is matched to the world axis closest to its direction (nibabel's ``io_orientation``), so an
        oblique volume is moved to the orientation nearest the network's without resampling.
        """
        ras = np.eye(4)
        ras[:3, :3] = _LPS_TO_RAS @ volume.direction @ np.diag(volume.spacing[::-1])
        have = io_orientation(ras)  # rows: index axes i, j, k -> (world axis, +1 / -1)
        want = axcodes2ornt(tuple(codes))  # rows: network axes D0, D1, D2 -> (world axis, +1 / -1)
        axes, flips = [], []
        for world, sign in want:
            index_axis = int(np.flatnonzero(have[:, 0] == world)[0])
            axes.append(2 - index_axis)  # index axis i, j, k is array axis 2, 1, 0
            flips.append(bool(have[index_axis, 1] != sign))
        return cls(tuple(axes), tuple(flips))  # type: ignore[arg-type]

    @property
    def identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flips)

    def shape_to_network(self, values: Sequence) -> tuple:
        """A per-axis (Z, Y, X) tuple (shape, spacing) in network axis order."""
        return tuple(values[a] for a in self.axes)

    def to_network(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) -> (B, C, D0, D1, D2)."""
        if self.identity:
            return image
        image = image.permute(0, 1, *(2 + a for a in self.axes))
        flipped = [2 + n for n, f in enumerate(self.flips) if f]
        return image.flip(flipped) if flipped else image

    def field_from_network(self, field: torch.Tensor) -> torch.Tensor:
        """(B, 3, D0, D1, D2) in network voxels, channels (x, y, z) = network axes (2, 1, 0) -> (B, 3, Z, Y, X) in
        array voxels, channels (x, y, z) = array axes (2, 1, 0)."""
        if self.identity:
            return field
        flipped = [2 + n for n, f in enumerate(self.flips) if f]
        by_axis = field.flip(1)  # component n runs along network axis n
        sign = torch.tensor([-1.0 if f else 1.0 for f in self.flips], dtype=field.dtype, device=field.device)
        by_axis = by_axis * sign.view(1, 3, 1, 1, 1)  # a reversed axis reverses the displacement along it
        if flipped:
            by_axis = by_axis.flip(flipped)
        inverse = [self.axes.index(a) for a in range(3)]  # array axis a is network axis inverse[a]
        by_axis = by_axis.permute(0, 1, *(2 + n for n in inverse))[:, inverse]
        return by_axis.flip(1).contiguous()


@dataclass(frozen=True)
class AxialView:
    """The array moves that show a volume's axial slices in the radiological orientation (rows from anterior to
    posterior, columns from the patient's right to left, slices from inferior to superior: a DICOM series read
    with the identity direction), whatever order the file stored them in.

    A colorizer is not equivariant to flips either: the shipped network, trained on slices in one orientation,
    named 33 % of the DICOM patient's body otherwise (spleen 126,131 -> 160 voxels) when the same series was stored
    in NIfTI's RAS order, which many tools write. Its card's ``canonical`` flag makes training and inference show it
    every slice this way (moves of the array only, no interpolation).
    """

    transpose: bool = False  # the rows run left-right: swap rows and columns first
    flip_rows: bool = False  # then reverse the rows (they ran towards anterior)
    flip_cols: bool = False  # and the columns (they ran towards the patient's right)
    reverse_z: bool = False  # the slices run from superior to inferior

    @classmethod
    def of(cls, volume: Volume) -> AxialView:
        """The moves for ``volume``: `AxisMap.between` it and the axes ("S", "P", "L"), kept only when its slices are
        axial (the slice axis maps to head-foot); otherwise none, the slices as stored."""
        axis_map = AxisMap.between(volume, ("S", "P", "L"))
        if axis_map.axes[0] != 0:
            return cls()
        reverse_z, flip_rows, flip_cols = axis_map.flips
        return cls(axis_map.axes[1] == 2, flip_rows, flip_cols, reverse_z)

    def _plane_dims(self, ndim: int) -> list[int]:
        return [d for d, flip in ((ndim - 2, self.flip_rows), (ndim - 1, self.flip_cols)) if flip]

    def to_view(self, x: torch.Tensor) -> torch.Tensor:
        """(..., rows, cols) as stored -> the radiological view (the last two axes moved)."""
        if self.transpose:
            x = x.transpose(-1, -2)
        dims = self._plane_dims(x.ndim)
        return x.flip(dims) if dims else x

    def from_view(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_view` (a new contiguous tensor where anything moved, else ``x`` itself)."""
        dims = self._plane_dims(x.ndim)
        x = x.flip(dims) if dims else x
        return x.transpose(-1, -2).contiguous() if self.transpose else x

    def volume_to_view(self, x: torch.Tensor) -> torch.Tensor:
        """(..., Z, rows, cols) as stored -> the view, slices in inferior-to-superior order too (a 3D network)."""
        x = self.to_view(x)
        return x.flip(-3) if self.reverse_z else x

    def volume_from_view(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `volume_to_view`."""
        return self.from_view(x.flip(-3) if self.reverse_z else x)

    def arrays(self, spacing: Sequence[float], *arrays: np.ndarray) -> tuple[tuple[float, float, float], list]:
        """(Z, Y, X, ...) arrays moved to the view, all axes (training), with the (z, y, x) ``spacing`` they then
        have: (spacing, [moved arrays])."""
        sz, sy, sx = (float(s) for s in spacing)
        out = []
        for a in arrays:
            if self.transpose:
                a = np.swapaxes(a, 1, 2)
            if self.flip_rows:
                a = a[:, ::-1]
            if self.flip_cols:
                a = a[:, :, ::-1]
            if self.reverse_z:
                a = a[::-1]
            out.append(np.ascontiguousarray(a))
        return ((sz, sx, sy) if self.transpose else (sz, sy, sx)), out
