"""Diffeomorphic building blocks: warp, scaling-and-squaring integration, composition, Jacobian, folding.

Conventions (those of the official SYMNet code, so its checkpoint and ours share them):

- A displacement or velocity field is a tensor (B, 3, D0, D1, D2) in voxels, on the grid of an image
  (B, C, D0, D1, D2); D0, D1, D2 are the array axes (Z, Y, X for our CT volumes).
- Channel c is the displacement along array axis 2 - c: channel 0 along D2 (x), channel 1 along D1 (y),
  channel 2 along D0 (z). This is the (x, y, z) coordinate order of ``torch.nn.functional.grid_sample``.
- A field u maps grid point p to p + u(p), and ``warp(image, u)(p) = image(p + u(p))``.
- Sampling is ``grid_sample`` with ``align_corners=True`` (the first and last voxel centres sit at -1 and +1) and
  zeros outside the volume.

Why not MONAI's ``Warp`` / ``DVF2DDF`` (checked in MONAI 1.6.1): they do use ``align_corners=True`` and accept
``padding_mode="zeros"`` (``Warp`` defaults to ``"border"``, ``DVF2DDF`` passes ``"zeros"``), but they expect channel i
to be the displacement along array axis i (Z, Y, X), the reverse of the official (x, y, z) order, so every call would
need two channel flips (copies of the field). They also renormalise the grid with three strided in-place passes and a
gather at every squaring step, cache the reference grid on the module (an inference tensor if first built under
``torch.inference_mode``, which then breaks training with the same module), and warn at construction when MONAI's C++
extension is absent. Measured on 2 CPU cores, 4 fields of 160x192x224: ``DVF2DDF`` with flips 31 s, this module's
``grid_sample`` path 14 s; on the CPU at inference `_field_kernels` now does each step of a large field in one pass
(2.0 s against 8.9 s for the ``grid_sample`` path, BENCHMARKS.md; `KERNEL_MIN_VOXELS`).
``tests/models/test_symnet.py`` checks that ``warp`` equals MONAI's ``Warp`` on channel-flipped fields.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from napari_ctcolor.errors import InputError

InterpolationMode = Literal["bilinear", "nearest"]
PaddingMode = Literal["zeros", "border", "reflection"]

#: Squaring steps of the official SYMNet integration: the velocity is divided by 2**7 and self-composed 7 times.
INTEGRATION_STEPS = 7
#: `_field_kernels` takes a step only for fields of at least this many voxels (summed over the batch). Loading numba
#: and its cached kernel costs about 0.45 s once per process, and the kernel saves about 12 ns per voxel and step
#: against ``grid_sample`` (2 CPU cores, 2026-11-24): it pays from about 4 million voxel-fields integrated (four
#: fields of 1 million voxels; OASIS's four are 6.9 million each). A 3 mm abdomen (four fields of 0.37 million
#: voxels) integrates in 0.2 s with ``grid_sample`` against 0.65 s with numba's load.
KERNEL_MIN_VOXELS = 4_000_000


def _check_field(name: str, field: torch.Tensor) -> None:
    """Raise `InputError` unless ``field`` is (B, 3, D0, D1, D2)."""
    if field.ndim != 5 or field.shape[1] != 3:
        raise InputError(f"{name} must have shape (B, 3, D0, D1, D2), got {tuple(field.shape)}")


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise InputError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _grid_scale(spatial_shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Voxels -> normalised grid units per channel (x, y, z), for ``align_corners=True``. Shape (3,)."""
    d0, d1, d2 = spatial_shape
    # A singleton axis has no extent; max(n - 1, 1) keeps its only voxel at -1 instead of dividing by zero.
    return torch.tensor([2.0 / max(n - 1, 1) for n in (d2, d1, d0)], dtype=like.dtype, device=like.device)


def identity_grid(spatial_shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Normalised identity sampling grid (1, D0, D1, D2, 3), last axis (x, y, z), values in [-1, 1]."""
    # linspace(-1, 1, 1) is [-1], consistent with _grid_scale for singleton axes.
    axes = [torch.linspace(-1.0, 1.0, n, dtype=like.dtype, device=like.device) for n in spatial_shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack((x, y, z), dim=-1).unsqueeze(0)


def _cpu_kernel(field: torch.Tensor, padding_mode: str) -> bool:
    """Whether `_field_kernels` computes this step: a float32 CPU field without autograd, zeros outside (SYMNet's
    integration and composition at inference), of at least `KERNEL_MIN_VOXELS`. Training, GPUs, other paddings and
    small fields keep ``grid_sample``."""
    return (
        field.device.type == "cpu"
        and field.dtype == torch.float32
        and padding_mode == "zeros"
        and field.numel() // 3 >= KERNEL_MIN_VOXELS
        and not (torch.is_grad_enabled() and field.requires_grad)
    )


def sampling_grid(ddf: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
    """grid_sample grid (B, D0, D1, D2, 3) for the points p + ddf(p); ``identity`` may be passed to reuse it."""
    spatial = tuple(ddf.shape[2:])
    if identity is None:
        identity = identity_grid(spatial, ddf)
    return torch.addcmul(identity, ddf.movedim(1, -1), _grid_scale(spatial, ddf))


def warp(
    image: torch.Tensor,
    ddf: torch.Tensor,
    mode: InterpolationMode = "bilinear",
    padding_mode: PaddingMode = "zeros",
) -> torch.Tensor:
    """Resample ``image`` at p + ddf(p) for every grid point p.

    Args:
        image: (B, C, D0, D1, D2). Integer tensors (label maps) are sampled in float64 and returned in their own
            dtype; use ``mode="nearest"`` for them so every output value is one of the input values (or 0 outside).
        ddf: (B, 3, D0, D1, D2) displacement in voxels, channels (x, y, z) = array axes (2, 1, 0).
        mode: ``"bilinear"`` (trilinear in 3D) for images, ``"nearest"`` for labels.
        padding_mode: value outside the volume; ``"zeros"`` as in the official SYMNet.

    Returns:
        The warped image, (B, C, D0, D1, D2), same dtype as ``image``.

    Example (the shared OASIS pair, moving image B into fixed image A's grid):
        ``warped_b = warp(moving, fields.f_ba)``
    """
    _check_field("ddf", ddf)
    if image.ndim != 5 or image.shape[0] != ddf.shape[0] or image.shape[2:] != ddf.shape[2:]:
        expected = (ddf.shape[0], "C", *ddf.shape[2:])
        raise InputError(f"image must have shape {expected} to match ddf {tuple(ddf.shape)}, got {tuple(image.shape)}")
    if image.is_floating_point():
        grid = sampling_grid(ddf.to(image.dtype))
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    # float64 holds every int32 label exactly (float32 only up to 2**24).
    values = image.to(torch.float64)
    grid = sampling_grid(ddf.to(torch.float64))
    out = F.grid_sample(values, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return out.round().to(image.dtype)


def integrate_velocity(
    velocity: torch.Tensor, num_steps: int = INTEGRATION_STEPS, padding_mode: PaddingMode = "zeros"
) -> torch.Tensor:
    """Displacement of the flow of a stationary velocity field, by scaling and squaring.

    ddf_0 = v / 2**num_steps, then ``num_steps`` times ddf <- ddf + ddf sampled at (p + ddf(p)) (bilinear,
    ``align_corners=True``, zeros outside), exactly as the official SYMNet ``DiffeomorphicTransform``.

    Args:
        velocity: (B, 3, D0, D1, D2) in voxels, channels (x, y, z). Put several fields in the batch to integrate them
            in one call (SYMNet integrates v_xy, v_yx, -v_xy, -v_yx as a batch of 4).
        num_steps: squaring steps (7 in SYMNet).
        padding_mode: how the field is read outside the volume: ``"zeros"`` as SYMNet; ``"border"`` keeps smooth
            synthetic fields from folding at the edges, where zeros would meet a large displacement.

    Returns:
        (B, 3, D0, D1, D2) displacement in voxels, channels (x, y, z).
    """
    _check_field("velocity", velocity)
    if num_steps < 1:
        raise InputError(f"num_steps must be >= 1, got {num_steps}")
    ddf = velocity / 2.0**num_steps
    if _cpu_kernel(ddf, padding_mode):
        # One numba pass per step (models/_field_kernels.py), ping-ponging between two buffers.
        from ._field_kernels import sample_add

        src, dst = ddf.detach().contiguous().numpy(), np.empty(tuple(ddf.shape), np.float32)
        for _ in range(num_steps):
            src, dst = sample_add(src, src, dst, torch.get_num_threads()), src
        return torch.from_numpy(src)
    identity = identity_grid(tuple(velocity.shape[2:]), velocity)
    if torch.is_grad_enabled() and velocity.requires_grad:
        for _ in range(num_steps):
            grid = sampling_grid(ddf, identity)
            ddf = ddf + F.grid_sample(ddf, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
        return ddf
    # Without autograd (on a GPU, or with other padding), the same arithmetic in place: one new field-sized tensor
    # per step instead of three.
    grid = torch.empty_like(identity.expand(ddf.shape[0], *identity.shape[1:]))
    scale = _grid_scale(tuple(velocity.shape[2:]), velocity)
    for _ in range(num_steps):
        torch.addcmul(identity, ddf.movedim(1, -1), scale, out=grid)
        ddf.add_(F.grid_sample(ddf, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True))
    return ddf


def compose(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """Displacement of "apply f2, then f1": ``f1`` sampled at (p + f2(p)), plus ``f2``.

    This is the official SYMNet ``CompositionTransform(f1, f2)``: p -> p + f2(p) -> (p + f2(p)) + f1(p + f2(p)).
    Warping with the result equals warping with f1 and then with f2:
    ``warp(image, compose(f1, f2)) ~= warp(warp(image, f1), f2)``.

    Args:
        f1, f2: (B, 3, D0, D1, D2) in voxels, channels (x, y, z).

    Returns:
        (B, 3, D0, D1, D2) in voxels, channels (x, y, z).
    """
    _check_field("f1", f1)
    _check_same_shape("f1", f1, "f2", f2)
    if _cpu_kernel(f1, "zeros") and _cpu_kernel(f2, "zeros"):
        from ._field_kernels import sample_add

        a, b = f1.detach().contiguous().numpy(), f2.detach().contiguous().numpy()
        return torch.from_numpy(sample_add(a, b, np.empty(a.shape, np.float32), torch.get_num_threads()))
    return F.grid_sample(f1, sampling_grid(f2), mode="bilinear", padding_mode="zeros", align_corners=True) + f2


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of p -> p + ddf(p), per voxel.

    Derivatives are central differences in the interior and one-sided on the border (``torch.gradient``), in voxel
    units, so an affine field u(p) = A p gives det(I + A) on every voxel.

    Args:
        ddf: (B, 3, D0, D1, D2) in voxels, channels (x, y, z).

    Returns:
        (B, D0, D1, D2); 1 where the map preserves volume, <= 0 where it folds.
    """
    _check_field("ddf", ddf)
    if min(ddf.shape[2:]) < 2:
        raise InputError(f"ddf needs at least 2 voxels along each spatial axis, got {tuple(ddf.shape)}")
    depth = ddf.shape[2]
    if depth <= JACOBIAN_SLABS:
        return _jacobian_slab(ddf, 0, depth)
    # Slab by slab along the first axis, each with a slice of its neighbours on either side: the same differences as
    # over the whole field (one-sided only at the field's own ends), with temporaries of a slab's size (a 512² CT of
    # 141 slices: 12 float32 copies of its field at once had taken 5 GB).
    return torch.cat(
        [_jacobian_slab(ddf, start, min(depth, start + JACOBIAN_SLABS)) for start in range(0, depth, JACOBIAN_SLABS)],
        dim=1,
    )


#: Slices of the first axis per slab of `jacobian_determinant`.
JACOBIAN_SLABS = 16


def _jacobian_slab(ddf: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """`jacobian_determinant` of slices [start, stop) of the first axis, from them and one neighbour each side."""
    low, high = max(start - 1, 0), min(stop + 1, ddf.shape[2])
    # Reorder channels to array-axis order so that row i / column j of the matrix both refer to array axis i / j.
    u = ddf[:, :, low:high].flip(1)
    # grads[j][:, i] = d u_i / d axis_j
    keep = slice(start - low, stop - low)
    grads = [g[:, :, keep] for g in torch.gradient(u, dim=(2, 3, 4))]
    m = [[grads[j][:, i] + (1.0 if i == j else 0.0) for j in range(3)] for i in range(3)]
    return (
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    )


def folding_fraction(ddf: torch.Tensor) -> torch.Tensor:
    """Share of voxels whose Jacobian determinant is <= 0 (the map folds there).

    Args:
        ddf: (B, 3, D0, D1, D2) in voxels, channels (x, y, z).

    Returns:
        (B,) fractions in [0, 1].
    """
    return (jacobian_determinant(ddf) <= 0).flatten(1).to(ddf.dtype).mean(dim=1)


def inverse_consistency_error(f_ab: torch.Tensor, f_ba: torch.Tensor) -> torch.Tensor:
    """Mean distance in voxels between a point and its image after a round trip through both fields.

    With f_ba the field that warps B onto A (A point p -> B point p + f_ba(p)) and f_ab the reverse, the round trip
    from A is ``compose(f_ab, f_ba)`` and the one from B is ``compose(f_ba, f_ab)``; both residuals are 0 for exact
    inverses. Returns the mean of the two residual lengths over all voxels. Points that leave the volume sample zeros
    (``padding_mode="zeros"``), so near the border the error also counts out-of-volume motion.

    Args:
        f_ab, f_ba: (B, 3, D0, D1, D2) in voxels, channels (x, y, z).

    Returns:
        (B,) mean residual in voxels.
    """
    _check_field("f_ab", f_ab)
    _check_same_shape("f_ab", f_ab, "f_ba", f_ba)
    from_a = compose(f_ab, f_ba).norm(dim=1).flatten(1).mean(dim=1)
    from_b = compose(f_ba, f_ab).norm(dim=1).flatten(1).mean(dim=1)
    return 0.5 * (from_a + from_b)
