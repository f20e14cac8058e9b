"""SYMNet's training losses (Mok and Chung 2020, eq. 4-8, as the official code computes them): local NCC, the
velocity's smoothness, folding and the two half-way fields' magnitude balance. Used by `training.symnet`; the
registration engine never computes a loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models.diffeo import jacobian_determinant


def local_ncc_loss(a: torch.Tensor, b: torch.Tensor, window: int = 5, eps: float = 1e-5) -> torch.Tensor:
    """Negative mean squared local normalised cross-correlation over ``window``**3 boxes (official ``NCC``).

    Written out rather than MONAI's ``LocalNormalizedCrossCorrelationLoss``: MONAI adds its smoothing constant to the
    numerator too, so flat background (most of a brain MRI or CT air) scores a perfect 1 instead of the official 0,
    which changes the balance against the regularisers whose weights were tuned with the official loss.

    Args:
        a, b: (B, 1, D0, D1, D2) images.
        window: box side in voxels (5 for the official OASIS training).

    Returns:
        Scalar in [-1, 0]; -1 for locally linearly related images.
    """
    if a.ndim != 5 or a.shape[1] != 1 or a.shape != b.shape:
        raise InputError(f"a and b must both have shape (B, 1, D0, D1, D2), got {tuple(a.shape)} and {tuple(b.shape)}")
    pad, n = window // 2, float(window**3)
    # Box sums as a zero-padded mean pool times the box size: the same numbers as a convolution with ones, and its
    # backward pass is about 3x faster on the CPU.
    stacked = torch.cat((a, b, a * a, b * b, a * b), dim=1)
    sums = F.avg_pool3d(stacked, window, stride=1, padding=pad, count_include_pad=True) * n
    a_sum, b_sum, aa_sum, bb_sum, ab_sum = sums.unbind(dim=1)
    cross = ab_sum - a_sum * b_sum / n
    a_var = aa_sum - a_sum * a_sum / n
    b_var = bb_sum - b_sum * b_sum / n
    return -(cross * cross / (a_var * b_var + eps)).mean()


def smoothness_loss(velocity: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a field along the three axes, averaged (official ``smoothloss``).

    Args:
        velocity: (B, 3, D0, D1, D2) in voxels.

    Returns:
        Scalar in voxels**2.
    """
    if velocity.ndim != 5:
        raise InputError(f"velocity must have shape (B, 3, D0, D1, D2), got {tuple(velocity.shape)}")
    return sum(torch.diff(velocity, dim=d).square().mean() for d in (2, 3, 4)) / 3.0


def negative_jacobian_loss(ddf: torch.Tensor) -> torch.Tensor:
    """Mean of max(0, -det J) over voxels: penalises folding (the paper's local orientation consistency).

    Args:
        ddf: (B, 3, D0, D1, D2) in voxels, channels (x, y, z).

    Returns:
        Scalar >= 0.
    """
    return F.relu(-jacobian_determinant(ddf)).mean()


def magnitude_loss(half_xy: torch.Tensor, half_yx: torch.Tensor) -> torch.Tensor:
    """Difference of the mean absolute displacements of the two half-way fields (official ``magnitude_loss``).

    Keeps both images moving equally far towards the half-way space.

    Args:
        half_xy, half_yx: (B, 3, D0, D1, D2) integrated half-way fields in voxels.

    Returns:
        Scalar in voxels.
    """
    if half_xy.shape != half_yx.shape:
        raise InputError(
            f"half_xy and half_yx must have the same shape, got {tuple(half_xy.shape)} and {tuple(half_yx.shape)}"
        )
    return (half_xy.abs().sum() - half_yx.abs().sum()).abs() / half_xy.numel()
