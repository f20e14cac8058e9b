"""The refinement: ITK's fast symmetric-forces demons (Vercauteren et al., NeuroImage 2009), run coarse to fine from
the network's map (`refine_field`): numba kernels on the CPU (`_demons_kernels`), torch on a GPU.

The scheme is the one SimpleITK's ``FastSymmetricForcesDemonsRegistrationFilter`` runs with the refinement's settings
(`refine`: the images `refine.demons_images`, the levels and their iteration counts, the step lengths, both
smoothings and the early stop), written here because no maintained library runs it on a GPU, and because on the CPU
SimpleITK's filter spends most of an iteration in its generic neighbourhood smoothing (8.2 s per iteration on popi's
512 x 512 x 141 chest, 2 cores, 2026-11-28) where three fused passes do the same work. One iteration matches
SimpleITK's filter to float32 rounding, faces and rotated grids included (`tests/engines/test_register.py`):

- the update at a voxel is  (f - m o phi) J / (|J|^2 + (f - m o phi)^2 / K),  J = (grad f + grad (m o phi)) / 2,
  whose length cannot exceed sqrt(K) / 2: K = (2 L)^2 for a longest update of L = step x the level's root-mean-square
  voxel size (ITK's ``MaximumUpdateStepLength``);
- no update where |f - m o phi| is below 0.001 (ITK's ``IntensityDifferenceThreshold``) or the denominator is 0;
- grad f by central differences in mm, 0 on the grid's faces; grad (m o phi) central where both neighbours map into
  the moving image, one-sided over one voxel where only one does (on a face, or beside a voxel mapped outside), as
  ITK's filter takes it; the moving image sampled linearly; a voxel that maps more than half a voxel outside the
  moving image gets no update and does not count in the metric;
- the update is smoothed by a Gaussian of `refine.UPDATE_SMOOTHING_VOXELS` voxels of the level (ITK's
  ``SmoothUpdateField``), then the field plus the update by one of `refine.SMOOTHING_VOXELS`, edges replicated.

Cancel is polled between the set-up's filters and, on the CPU, between the kernels of every iteration (after every
iteration on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from functools import partial

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ...io import Volume
from ...models.diffeo import identity_grid
from ..steps import in_thread
from ._demons_kernels import add, force, smooth_axis, warp
from .refine import (
    MATCHED_METRIC,
    REFINEMENT_THREAD,
    SMOOTHING_VOXELS,
    THIRION_STEP,
    UPDATE_SMOOTHING_VOXELS,
    demons_images,
    level_chunks,
    levels,
    step_length,
)

#: ITK's ``IntensityDifferenceThreshold`` default: no force where the images differ by less.
INTENSITY_THRESHOLD = 1e-3


def refine_field(
    fixed: Volume,
    moving: Volume,
    seed_mm: torch.Tensor,
    iterations: int,
    check: Callable[[], None],
    kernels: bool | None = None,
) -> Generator[None, None, torch.Tensor]:
    """Demons from ``seed_mm`` ((Z, Y, X, 3) LPS mm on the fixed grid: fixed point p maps to moving point p + seed(p))
    on its device, coarse to fine (`refine.levels`), each level stopped early where its images agree within noise
    (`refine.MATCHED_METRIC`); yields after each chunk of iterations (`refine.level_chunks`), returns the refined map,
    (Z, Y, X, 3) float32 LPS mm on that device.

    ``fixed`` and ``moving`` are normalised as the network saw them; a moving image on another grid is sampled onto
    the fixed grid first (`refine.demons_images`). ``check`` (raises `Cancelled` to cancel) runs between the set-up's
    filters (each in a thread of its own while it polls, `steps.in_thread`) and during every iteration. ``kernels``:
    the CPU's numba kernels (None: wherever the map is on the CPU; False runs the GPU's torch code on the CPU)."""
    device = seed_mm.device
    fixed_image, moving_image = in_thread(partial(demons_images, fixed, moving, check), check, REFINEMENT_THREAD)
    images = [torch.from_numpy(sitk.GetArrayFromImage(i))[None, None].to(device) for i in (fixed_image, moving_image)]
    del fixed_image, moving_image
    direction = torch.as_tensor(fixed.direction, dtype=torch.float32, device=device)
    # Along the index axes (x, y, z) in mm, channels first: (1, 3, Z, Y, X).
    field = (seed_mm.float() @ direction).permute(3, 0, 1, 2)[None].contiguous()
    previous = (1, 1, 1)
    for factors, count in levels(fixed.spacing, iterations):  # factors (x, y, z)
        zyx = factors[::-1]
        f, m = (F.avg_pool3d(i, zyx, stride=zyx) if max(zyx) > 1 else i for i in images)  # sitk.BinShrink
        field = _between_levels(field, previous[::-1], zyx, fixed.shape)
        previous = factors
        spacing = [s * k for s, k in zip(fixed.spacing, zyx, strict=True)]  # (z, y, x) mm
        step = THIRION_STEP if max(factors) > 1 else step_length(fixed.spacing)
        level = _Level(f, m, spacing, step, (device.type == "cpu") if kernels is None else kernels, check)
        for chunk in level_chunks(count):
            for _ in range(chunk):
                field, metric = level.iterate(field)
                check()
            yield
            if float(metric) < MATCHED_METRIC / math.prod(factors):
                break
    return (field[0].permute(1, 2, 3, 0) @ direction.T).contiguous()


class _Level:
    """One level's images and the demons iteration on them."""

    def __init__(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        spacing_zyx: list[float],
        step: float,
        kernels: bool = False,
        check: Callable[[], None] = lambda: None,
    ) -> None:
        self.fixed, self.moving, self.check = fixed, moving, check
        self.spacing_zyx = spacing_zyx
        self.fixed_gradient = _gradient(fixed, spacing_zyx)
        rms = math.sqrt(sum(s * s for s in spacing_zyx) / 3.0)
        self.k = (2.0 * step * rms) ** 2
        shape = fixed.shape[2:]
        self.kernel = _gaussian(SMOOTHING_VOXELS, fixed.device)
        self.update_kernel = _gaussian(UPDATE_SMOOTHING_VOXELS, fixed.device)
        scale = [2.0 / max(n - 1, 1) for n in shape[::-1]]  # voxels -> normalised units, (x, y, z)
        self.half = torch.tensor([k / 2.0 for k in scale], device=fixed.device)  # half a voxel, normalised
        self.base = identity_grid(tuple(shape), fixed)
        # mm along index axis (x, y, z) -> normalised coordinate
        self.mm_to_normalised = torch.tensor(
            [c / s for c, s in zip(scale, spacing_zyx[::-1], strict=True)], device=fixed.device
        )
        self.kernels = kernels
        if kernels:  # the numba kernels' buffers, reused by every iteration of the level
            self.warped = np.empty(shape, dtype=np.float32)
            self.inside = np.empty(shape, dtype=np.bool_)
            self.update = np.empty((3, *shape), dtype=np.float32)

    def iterate(self, field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One demons iteration: the new field and the mean squared difference before it (a tensor: read once per
        chunk, not a host synchronisation per iteration). On the CPU the numba kernels do it in place of ``field``."""
        if self.kernels:
            return field, self._iterate_cpu(field)
        at = self.base + field[0].permute(1, 2, 3, 0)[None] * self.mm_to_normalised
        inside = (at.abs() <= 1 + self.half).all(dim=-1)[:, None]  # within half a voxel of the moving image
        warped = F.grid_sample(self.moving, at.clamp(-1.0, 1.0), mode="bilinear", align_corners=True)
        del at
        difference = self.fixed - warped
        j = (self.fixed_gradient + _warped_gradient(warped, inside, self.spacing_zyx)) * 0.5
        del warped
        denominator = (j * j).sum(1, keepdim=True) + difference * difference / self.k
        usable = inside & (difference.abs() >= INTENSITY_THRESHOLD) & (denominator > 1e-9)
        update = torch.where(usable, difference / denominator.clamp_min(1e-9), 0.0) * j
        squares = torch.where(inside, difference * difference, 0.0)
        metric = squares.sum() / inside.sum().clamp_min(1)
        return _smooth(field + _smooth(update, self.update_kernel), self.kernel), metric

    def _iterate_cpu(self, field: torch.Tensor) -> torch.Tensor:
        """`iterate` with `_demons_kernels` on ``field`` in place (a contiguous float32 CPU tensor)."""
        values = field[0].numpy()
        spacing_xyz = np.asarray(self.spacing_zyx[::-1], dtype=np.float32)
        warp(self.moving[0, 0].numpy(), values, 1.0 / spacing_xyz, self.warped, self.inside)
        self.check()
        metric = force(
            self.fixed[0, 0].numpy(),
            self.fixed_gradient[0].numpy(),
            self.warped,
            self.inside,
            spacing_xyz,
            np.float32(self.k),
            np.float32(INTENSITY_THRESHOLD),
            self.update,
        )
        self.check()
        for axis in (0, 1, 2):
            smooth_axis(self.update, self.update_kernel.numpy(), axis)
        self.check()
        add(values, self.update)
        for axis in (0, 1, 2):
            smooth_axis(values, self.kernel.numpy(), axis)
        return torch.tensor(metric)


def _gradient(image: torch.Tensor, spacing_zyx: list[float]) -> torch.Tensor:
    """(1, 3, Z, Y, X) gradient of a (1, 1, Z, Y, X) image in mm, channels (x, y, z): central differences, 0 across
    the border (the first and last voxels of an axis have no derivative along it), as ITK's
    ``CentralDifferenceImageFunction`` gives them."""
    gradient = torch.zeros((1, 3, *image.shape[2:]), dtype=image.dtype, device=image.device)
    for channel, (axis, spacing) in enumerate(zip((4, 3, 2), spacing_zyx[::-1], strict=True)):
        n = image.shape[axis]
        if n > 2:
            ahead, behind = image.narrow(axis, 2, n - 2), image.narrow(axis, 0, n - 2)
            gradient[:, channel : channel + 1].narrow(axis, 1, n - 2).copy_((ahead - behind) / (2.0 * spacing))
    return gradient


def _warped_gradient(warped: torch.Tensor, inside: torch.Tensor, spacing_zyx: list[float]) -> torch.Tensor:
    """(1, 3, Z, Y, X) gradient of the warped moving image in mm, channels (x, y, z), as ITK's symmetric-forces demons
    takes it: central differences where both neighbours along an axis map into the moving image (``inside``), one-sided
    over one voxel where only one does (the other beyond the grid's edge or mapped outside), 0 where neither does.
    Matched to SimpleITK's filter on one iteration to float32 rounding (tests/engines/test_register.py)."""
    gradient = torch.zeros((1, 3, *warped.shape[2:]), dtype=warped.dtype, device=warped.device)
    for channel, (axis, spacing) in enumerate(zip((4, 3, 2), spacing_zyx[::-1], strict=True)):
        n = warped.shape[axis]
        if n == 1:
            continue
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = 1
        values = F.pad(warped, pad)
        usable = F.pad(inside.to(warped.dtype), pad) > 0  # beyond the edge: not usable
        ahead, behind = values.narrow(axis, 2, n), values.narrow(axis, 0, n)
        ahead_ok, behind_ok = usable.narrow(axis, 2, n), usable.narrow(axis, 0, n)
        one_sided = torch.where(ahead_ok, ahead - warped, torch.where(behind_ok, warped - behind, 0.0)) / spacing
        gradient[:, channel : channel + 1] = torch.where(
            ahead_ok & behind_ok, (ahead - behind) / (2.0 * spacing), one_sided
        )
    return gradient


def _gaussian(sigma: float, device: torch.device) -> torch.Tensor:
    """ITK's ``GaussianOperator`` kernel for ``sigma`` voxels: the discrete Gaussian (Lindeberg's, e^-t I_n(t) with
    t = sigma^2), cut at the first radius whose weights sum to 0.9 (its maximum error of 0.1; radius 2 for 1.5 voxels)
    and normalised to sum 1. A sampled Gaussian cut at 3 sigma had smoothed more: the 3 mm pair's Dice 0.896 against
    ITK's 0.902."""
    from scipy.special import ive

    t = sigma * sigma
    weights = [float(ive(0, t))]
    while weights[0] + 2.0 * sum(weights[1:]) < 0.9:
        weights.append(float(ive(len(weights), t)))
    kernel = torch.tensor(weights[:0:-1] + weights, dtype=torch.float64)
    return (kernel / kernel.sum()).float().to(device)


def _smooth(field: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel of (1, 3, Z, Y, X) smoothed by the separable ``kernel`` along every axis longer than one voxel,
    the edge replicated (ITK's zero-flux border)."""
    radius = kernel.numel() // 2
    for axis in (2, 3, 4):
        if field.shape[axis] == 1:
            continue
        shape = [1, 1, 1]
        shape[axis - 2] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - axis)] = pad[2 * (4 - axis) + 1] = radius
        field = F.conv3d(F.pad(field, pad, mode="replicate"), kernel.view(1, 1, *shape).expand(3, 1, *shape), groups=3)
    return field


def _between_levels(field: torch.Tensor, source: tuple, target: tuple, shape: tuple[int, int, int]) -> torch.Tensor:
    """``field`` on the grid of boxes ``source`` (z, y, x) of the full grid ``shape``, sampled linearly at the centres
    of the boxes ``target``, as SimpleITK's linear resampling between two ``BinShrink`` grids: a point up to half a
    voxel beyond the first or last centre reads the edge, farther 0."""
    if tuple(source) == tuple(target):
        return field
    src = field.shape[2:]
    out = [n // k for n, k in zip(shape, target, strict=True)]
    coords = []
    for n_src, k_src, n_out, k_out in zip(src, source, out, target, strict=True):
        centre = torch.arange(n_out, dtype=torch.float32, device=field.device) * k_out + (k_out - 1) / 2.0
        index = (centre - (k_src - 1) / 2.0) / k_src
        beyond = (index < -0.5) | (index > n_src - 0.5)
        index = index.clamp(0, n_src - 1)
        normalised = index * (2.0 / max(n_src - 1, 1)) - 1.0
        coords.append(torch.where(beyond, torch.full_like(normalised, 10.0), normalised))  # 10: outside, reads 0
    z, y, x = torch.meshgrid(*coords, indexing="ij")
    at = torch.stack((x, y, z), dim=-1)[None]
    return F.grid_sample(field, at, mode="bilinear", padding_mode="zeros", align_corners=True)
