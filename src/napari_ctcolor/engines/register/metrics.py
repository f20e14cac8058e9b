"""How well a registration went: global and local NCC, the fields' inverse consistency, and the quality warnings
reported with the outputs."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...models.diffeo import sampling_grid
from ._metric_kernels import local_ncc_cpu

#: The inverse-consistency metric is evaluated at every IC_STRIDE-th voxel along each axis.
IC_STRIDE = 2


#: Local NCC (`local_ncc`): box side in voxels, and the body: voxels whose normalised fixed intensity exceeds
#: BODY_LEVEL (-500 HU in the CT weights' -1000..1000 window; a quarter of the range for min-max normalisation).
LNCC_WINDOW = 7


LNCC_EPSILON = 1e-6


#: Voxels per chunk of `global_ncc`'s sums.
NCC_CHUNK = 1 << 20


#: A registration is reported as doubtful (`warnings`) when a measure is beyond its limit: less overlap or local NCC,
#: more folding, inverse inconsistency or share of the body with det J outside 0.8..1.25.
#: These suit intra-patient CT (a follow-up scan, breathing): a model card can change any of them, or switch one off
#: with null, in ``inference.quality_limits``.
QUALITY_LIMITS: Mapping[str, float | None] = MappingProxyType(
    {
        "overlap_fraction": 0.8,
        "lncc_after": 0.3,
        "folding_fraction": 5e-4,
        "inverse_consistency_mm": 1.0,
        "volume_change_fraction": 0.5,
    }
)


#: The official OASIS checkpoint registers one subject's brain to another's: local volume change there is anatomy
#: (ventricles, sulci), not a failure, so det J far from 1 is not reported (on the OASIS pair it is on 59 % of the
#: brain). The other limits hold.
INTER_SUBJECT_LIMITS: Mapping[str, float | None] = MappingProxyType({**QUALITY_LIMITS, "volume_change_fraction": None})


def global_ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised cross-correlation of two images over all their voxels, in [-1, 1] (0 when one is constant)."""
    # The five sums in float64 over chunks of a million voxels, without a float64 copy of either image: 0.7 -> 0.2 s a
    # call on a 512² CT of 141 slices (2 cores, 2026-11-29), equal to 1e-13. In float64 the one-pass variance loses
    # nothing a CT's range could show (its sums' rounding is 1e-16 of n times the squared values).
    a, b = a.flatten(), b.flatten()
    n = a.numel()
    sums = torch.zeros(5, dtype=torch.float64, device=a.device)
    for start in range(0, n, NCC_CHUNK):
        x, y = a[start : start + NCC_CHUNK].double(), b[start : start + NCC_CHUNK].double()
        sums += torch.stack((x.sum(), y.sum(), x @ x, y @ y, x @ y))
    sum_a, sum_b, sum_aa, sum_bb, sum_ab = sums.tolist()
    variance_a, variance_b = sum_aa - sum_a * sum_a / n, sum_bb - sum_b * sum_b / n
    if variance_a <= 1e-10 * sum_aa or variance_b <= 1e-10 * sum_bb:  # constant, to the sums' rounding
        return 0.0
    return (sum_ab - sum_a * sum_b / n) / (variance_a * variance_b) ** 0.5


def inverse_consistency_mm(f_ab: torch.Tensor, f_ba: torch.Tensor, spacing_xyz: torch.Tensor) -> float:
    """Mean round-trip residual length in mm, both directions averaged, at every `IC_STRIDE`-th voxel per axis.

    The residual of "f2, then f1" at p is f2(p) + f1(p + f2(p)) (as `compose`), zero for exact inverses, over the
    points p whose p + f2(p) lies on the grid (where f1 is known: a pre-aligned shift moves part of the grid off it).
    Sampling 1/8 of the voxels estimates the mean to well under 1% and costs 1/8 of two full compositions.
    """
    scale = spacing_xyz.view(1, 3, 1, 1, 1)
    step = slice(None, None, IC_STRIDE)

    def residual_mm(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        grid = sampling_grid(f2)[:, step, step, step]
        moved = F.grid_sample(f1, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        residual = ((moved + f2[:, :, step, step, step]) * scale).norm(dim=1)
        on_grid = (grid.abs() <= 1.0).all(dim=-1)
        return residual[on_grid].mean() if bool(on_grid.any()) else residual.new_zeros(())

    return float(0.5 * (residual_mm(f_ab, f_ba) + residual_mm(f_ba, f_ab)))


def local_ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean local normalised cross-correlation of two (1, 1, Z, Y, X) images over ``mask``, in [-1, 1].

    The correlation in a box of `LNCC_WINDOW` voxels around each voxel (means, variances and covariance over the box,
    boxes clipped at the border), as MONAI's ``LocalNormalizedCrossCorrelationLoss`` with a rectangular kernel, and
    written here with separable average pooling because importing ``monai.losses`` costs every ``ctcolor register``
    about 3 s of start-up. A voxel whose box is constant in either image counts as 0. 0 for an empty mask.

    The mean is taken at every `IC_STRIDE`-th voxel along each axis (the pooling strides there, so the boxes cost
    about a third of full resolution: 2.4 s -> 0.8 s on a 160x192x224 pair); like the inverse-consistency sample, it
    estimates the mean over the mask to well under 1 %. On the CPU numba's two fused passes compute it
    (`_metric_kernels.local_ncc_cpu`: 2.7 -> 0.6 s on popi's 512² chest, 2 cores, 2026-11-29), elsewhere torch's
    pooling (`local_ncc_torch`).
    """
    if not bool(mask.any()):
        return 0.0
    if a.device.type != "cpu":
        return local_ncc_torch(a, b, mask)
    a, b, mask = (np.ascontiguousarray(t[0, 0].numpy()) for t in (a.float(), b.float(), mask))
    return local_ncc_cpu(a, b, mask, LNCC_WINDOW, IC_STRIDE, LNCC_EPSILON)


def local_ncc_torch(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """`local_ncc` with torch's separable average pooling, on any device."""
    k, pad = LNCC_WINDOW, LNCC_WINDOW // 2

    def box(t: torch.Tensor) -> torch.Tensor:
        # The contiguous axis first, at full resolution; each pass strides its own axis. The slices (then the rows)
        # are the pooling's channels, which torch spreads over the cores: as one (1, 1, Z, Y, X) channel a 512² CT
        # of 141 slices took 0.6 s a box on one core, 0.3 s this way (2 cores, 2026-11-29). A singleton axis (a 2D
        # image) gets no box across it.
        z, y, x = t.shape[2:]
        t = t.reshape(z, y, x)
        if x > 1:
            t = F.avg_pool2d(t, (1, k), stride=(1, IC_STRIDE), padding=(0, pad), count_include_pad=False)
        if y > 1:
            t = F.avg_pool2d(t, (k, 1), stride=(IC_STRIDE, 1), padding=(pad, 0), count_include_pad=False)
        y, x = t.shape[1:]
        if z > 1:
            rows = t.reshape(z, y * x).T.contiguous()
            t = F.avg_pool1d(rows, k, stride=IC_STRIDE, padding=pad, count_include_pad=False).T.reshape(-1, y, x)
        return t[None, None]

    # Box centres at 0, s, 2s, ... on each pooled axis: the voxels mask[::s, ::s, ::s] (a singleton axis keeps its one).
    mask = mask[..., ::IC_STRIDE, ::IC_STRIDE, ::IC_STRIDE]
    if not bool(mask.any()):
        return 0.0

    a, b = a.float(), b.float()
    mean_a, mean_b = box(a), box(b)
    var_a = (box(a * a) - mean_a * mean_a).clamp_min(0)
    var_b = (box(b * b) - mean_b * mean_b).clamp_min(0)
    covariance = box(a * b) - mean_a * mean_b
    denominator = torch.sqrt(var_a * var_b)
    ncc = torch.where(denominator > LNCC_EPSILON, covariance / denominator.clamp_min(LNCC_EPSILON), 0.0)
    return float(ncc[mask].double().mean())


def quality_warnings(metrics: dict[str, Any], limits: Mapping[str, float | None] = QUALITY_LIMITS) -> list[str]:
    """One line per quality measure out of its range (``limits``; a None limit is not checked); empty when the
    registration looks sound."""
    out = []
    if metrics.get("copies"):
        out.append(
            "the two images are one scan twice (intensities within 2 HU on one grid): the result is the identity; "
            "check that the moving image is the series you meant"
        )

    def below(key: str) -> bool:
        return limits[key] is not None and metrics[key] < limits[key]

    def above(key: str) -> bool:
        return limits[key] is not None and metrics[key] > limits[key]

    if below("overlap_fraction"):
        out.append(
            f"the moving image covers only {100 * metrics['overlap_fraction']:.0f}% of the fixed image's body; "
            "the rest is not registered"
        )
    if below("lncc_after"):
        out.append(
            f"local NCC in the body is {metrics['lncc_after']:.2f} after registration (below "
            f"{limits['lncc_after']}): the images are not aligned; check that they show the same anatomy"
            + ("" if metrics["affine"] else ", or pre-align (--affine)")
        )
    if above("folding_fraction"):
        out.append(f"the field folds on {100 * metrics['folding_fraction']:.3f}% of voxels (det J <= 0)")
    if above("inverse_consistency_mm"):
        out.append(
            f"the field does not undo itself: mapped forward and back, points land "
            f"{metrics['inverse_consistency_mm']:.1f} mm from where they started on average (sound: under "
            f"{limits['inverse_consistency_mm']:g} mm); the scans may not show the same region or anatomy"
            + ("" if metrics.get("affine") else ", or need pre-alignment (--affine)")
        )
    if above("volume_change_fraction"):
        out.append(
            f"det J is outside 0.8..1.25 on {100 * metrics['volume_change_fraction']:.0f}% of the body: "
            "large local volume changes; check the warped image"
        )
    return out
