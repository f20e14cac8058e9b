"""The inverse of a refined displacement, in torch on the field's device.

SYMNet gives the inverse of its own map by construction; the demons refinement does not, so the refined map is
inverted by the fixed-point iteration of Chen et al. (Med. Phys. 2008), the scheme ITK's
``InvertDisplacementFieldImageFilter`` also runs: for a map p -> p + u(p), the inverse q -> q + v(q) satisfies
v(q) = -u(q + v(q)), and v <- -u(q + v) converges where u contracts (|grad u| < 1, which a map free of folding
with det J near 1 meets almost everywhere).

Written with ``grid_sample`` rather than calling ITK because the field then stays on the network's device (a CUDA
registration need not move it to the host) and cancel is polled between its operations: ITK's filter ignores
``Abort()`` and took 10 s in one call on a 512 x 512 x 141 chest (2-core AMD EPYC, 2026-11-27).

Axes of voxels up to half `INVERSE_MM` are inverted on a grid of boxes of whole voxels (``avg_pool3d``, which is
SimpleITK's ``BinShrink``), and the inverse is upsampled linearly (`upsample_binned`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...io import Volume
from ...models.diffeo import identity_grid, sampling_grid
from .fields import index_to_mm

#: Inversion on boxes of whole voxels no larger than INVERSE_MM along each axis (axes at least half as fine are
#: box-averaged), then upsampled. The refinement smooths its field by 1.5 voxels after every iteration, so it holds
#: little detail finer than the boxes. Boxes of up to 3 mm instead of about 2 mm (ITK's inversion, 2 CPU threads,
#: 2026-11-26): a 164 x 126 x 120 chest CT of 1.5 mm voxels 1.0 -> 0.2 s, forward-inverse round trip 0.017 ->
#: 0.068 mm; a DICOM pair (0.98 mm pixels) 0.7 -> 0.4 s, 0.09 -> 0.18 mm: a fifth of a voxel at most, against a
#: warning at 1 mm.
INVERSE_MM = 3.0
#: The most fixed-point iterations, and the stopping tolerances on the residual |v(q) + u(q + v(q))| in voxels of the
#: inverted grid (largest, and mean): 10 iterations were measured against 20 and 6 with ITK's filter (issue 23,
#: 2026-11-25: the round trip of the 3 mm, DICOM, lung1 and popi pairs within 0.015 mm of 20 iterations'; 6 doubled it).
INVERSE_ITERATIONS = 10
INVERSE_MAX_ERROR = 0.1
INVERSE_MEAN_ERROR = 0.001


def invert_field(field_mm: torch.Tensor, grid: Volume) -> torch.Tensor:
    """The inverse of a (Z, Y, X, 3) LPS displacement in mm on ``grid``, sampled at the same grid's points, as float32
    on the field's device. It is a few tensor operations per iteration, so a cancelled stage left behind
    (`stages.Stages.run`) stops within one.

    Where q + v(q) leaves the grid, u is read at the nearest border voxel (the map may move the border: a pre-aligned
    20 mm shift), as ITK's filter reads it.
    """
    factors = tuple(max(1, int(INVERSE_MM / s)) for s in grid.spacing)  # (z, y, x)
    field = field_mm.float().permute(3, 0, 1, 2)[None]
    small = F.avg_pool3d(field, factors, stride=factors) if max(factors) > 1 else field
    # In voxels of the binned grid: the sampling point of grid point i is i + v, and the residual's unit is its voxel.
    to_voxels = np.linalg.inv(index_to_mm(grid) @ np.diag(np.asarray(factors[::-1], dtype=float)))
    to_voxels = torch.as_tensor(to_voxels, dtype=small.dtype, device=small.device)
    u = torch.einsum("ij,bjzyx->bizyx", to_voxels, small)
    inverse = _fixed_point(u)
    inverse_mm = torch.einsum("ij,bjzyx->bizyx", torch.linalg.inv(to_voxels), inverse)
    return upsample_binned(inverse_mm, factors, grid.shape)


def _fixed_point(u: torch.Tensor) -> torch.Tensor:
    """v with v(i) = -u(i + v(i)) for (1, 3, z, y, x) ``u`` in voxels, channels (x, y, z)."""
    identity = identity_grid(tuple(u.shape[2:]), u)
    inverse = torch.zeros_like(u)
    for _ in range(INVERSE_ITERATIONS):
        at = sampling_grid(inverse, identity)
        residual = inverse + F.grid_sample(u, at, mode="bilinear", padding_mode="border", align_corners=True)
        norm = (residual[:, 0] ** 2 + residual[:, 1] ** 2 + residual[:, 2] ** 2).sqrt()  # vector_norm(dim=1): 8x slower
        if float(norm.max()) < INVERSE_MAX_ERROR or float(norm.mean()) < INVERSE_MEAN_ERROR:
            break
        inverse -= residual
    return inverse


def upsample_binned(small: torch.Tensor, factors: tuple[int, ...], shape: tuple[int, int, int]) -> torch.Tensor:
    """float32 (Z, Y, X, C) on a grid of ``shape`` from (1, C, z, y, x) ``small`` on its box average by ``factors``
    (z, y, x), linear: what SimpleITK's linear resampling of the ``BinShrink``-ed grid onto the full grid gives. Voxel
    i of an axis binned by k lies at (i - (k - 1) / 2) / k on the small grid: edge values up to half a small voxel
    beyond its first and last centres, 0 farther (the last ``shape % k`` voxels, which no box covered), as ITK's
    interpolator gives them."""
    covered = tuple(k * n for k, n in zip(factors, small.shape[2:], strict=True))
    out = small.new_zeros((*shape, small.shape[1]), dtype=torch.float32)
    up = F.interpolate(small.float(), size=covered, mode="trilinear", align_corners=False)
    out[: covered[0], : covered[1], : covered[2]] = up[0].permute(1, 2, 3, 0)
    return out
