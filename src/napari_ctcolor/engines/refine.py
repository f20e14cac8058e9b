"""Test-time refinement (instance optimisation) of SYMNet's two half-way velocity fields for one pair.

After the network's forward pass, residual velocities dv_xy, dv_yx are optimised with Adam for a few steps so that
the pair itself fits better, the standard way learning-based registration closes the gap to classical optimisers
(e.g. uniGradICON's instance optimisation). The construction stays SYMNet's: v = v_net + dv is integrated by scaling
and squaring (`integrate_velocity`) for v_xy, v_yx and their negatives, and the full fields are the half-way
compositions (`half_way_fields`), so the maps remain diffeomorphic and inverse-consistent by construction.

Loss per step, on the refinement grid (by default the working grid averaged 2x2x2, so a step costs 1/8 of a
full-grid step), SYMNet's half-way similarity, which needs two integrations instead of four:
    LNCC(fixed o int(v_xy), moving o int(v_yx))                     (MONAI LocalNormalizedCrossCorrelationLoss)
    + smooth * (|grad dv_xy|^2 + |grad dv_yx|^2)                     (mean squared forward differences, voxels^2)
    + antifold * mean(max(0, -det J)) of both half-way maps            (keeps folding near 0)
The residuals are then upsampled to the working grid (trilinear) and added to the network's velocities.

Measured (`ctcolor bench`, 2026-11-22, 2 CPU cores, factor 2, 40 steps): on held-out deformations of the unseen
DICOM patient Dice 0.792 -> 0.838 (6 s -> 25 s); on the 3 mm CT 0.838 -> 0.856. A larger step (lr 0.2, smooth 0.3)
lost Dice in the first 10 steps on one pair (0.850 -> 0.837). Factor 1 gains more but costs about 8x per step.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models.diffeo import integrate_velocity, warp
from ..models.symnet import negative_jacobian_loss, smoothness_loss

#: The most refinement steps accepted (a typo guard: 10,000 steps would take hours on a CPU).
MAX_REFINE_STEPS = 10000


@dataclass(frozen=True)
class RefineSettings:
    """Refinement hyper-parameters (the model card's ``inference.refine`` may set any of them).

    Attributes:
        steps: Adam steps (0 = no refinement).
        lr: Adam learning rate, in refinement-grid voxels of velocity per step.
        ncc_window: LNCC box side in refinement-grid voxels.
        smooth: weight of the residuals' smoothness.
        antifold: weight of the negative-Jacobian penalty.
        factor: the refinement grid is the working grid averaged by this factor along each axis (1 or 2).
    """

    steps: int = 0
    lr: float = 0.1
    ncc_window: int = 5
    smooth: float = 1.0
    antifold: float = 10.0
    factor: int = 2

    @classmethod
    def from_card(cls, spec: dict | None, source: str) -> RefineSettings:
        """The settings of a model card's ``inference.refine`` (defaults for what it leaves out)."""
        spec = dict(spec or {})
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"{source}: unknown refinement settings in its model card: {sorted(unknown)}")
        settings = cls(**spec)
        check_steps(settings.steps)
        if settings.factor not in (1, 2):
            raise InputError(f"{source}: refinement factor must be 1 or 2, got {settings.factor}")
        return settings


def check_steps(steps: int) -> int:
    """``steps`` if it is a refinement count in 0..`MAX_REFINE_STEPS`; `InputError` otherwise."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_REFINE_STEPS:
        raise InputError(f"refinement steps must be an integer from 0 to {MAX_REFINE_STEPS}, got {steps!r}")
    return steps


def _down(image: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool3d(image, factor) if factor > 1 else image


def refine_velocities(
    v_xy: torch.Tensor,
    v_yx: torch.Tensor,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    settings: RefineSettings,
) -> Generator[float, None, tuple[torch.Tensor, torch.Tensor]]:
    """Optimise the pair's velocities; yields the loss after each step, returns the refined (v_xy, v_yx).

    Args:
        v_xy, v_yx: (1, 3, D0, D1, D2) the network's velocities in voxels, channels (x, y, z); sizes divisible by
            ``settings.factor``.
        fixed, moving: (1, 1, D0, D1, D2) the normalised images the network saw.
        settings: `RefineSettings` with steps >= 1.

    Returns:
        The refined velocities, same shapes, detached.
    """
    from monai.losses import LocalNormalizedCrossCorrelationLoss  # MONAI: only when refining (2 s of import)

    factor = settings.factor
    if any(n % factor for n in v_xy.shape[2:]):
        raise InputError(f"velocity sizes {tuple(v_xy.shape[2:])} are not divisible by the refinement factor {factor}")
    lncc = LocalNormalizedCrossCorrelationLoss(
        spatial_dims=3, kernel_size=settings.ncc_window, kernel_type="rectangular", smooth_nr=0.0, smooth_dr=1e-5
    )
    with torch.inference_mode(False), torch.enable_grad():
        # Inference tensors cannot take part in autograd: fresh copies of the inputs.
        fixed_c, moving_c = _down(fixed.clone(), factor), _down(moving.clone(), factor)
        base = _down(torch.cat((v_xy, v_yx)).float().clone(), factor) / factor  # coarse voxels
        residual = torch.zeros_like(base, requires_grad=True)
        optimiser = torch.optim.Adam([residual], lr=settings.lr)
        for _ in range(settings.steps):
            halves = integrate_velocity(base + residual)  # int(v_xy), int(v_yx): both images into the half-way space
            loss = lncc(warp(fixed_c, halves[:1]), warp(moving_c, halves[1:]))
            if settings.smooth:
                loss = loss + settings.smooth * (smoothness_loss(residual[:1]) + smoothness_loss(residual[1:]))
            if settings.antifold:
                loss = loss + settings.antifold * (
                    negative_jacobian_loss(halves[:1]) + negative_jacobian_loss(halves[1:])
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            yield float(loss.detach())
        residual = residual.detach()
    if factor > 1:
        residual = F.interpolate(residual * factor, size=tuple(v_xy.shape[2:]), mode="trilinear", align_corners=False)
    return v_xy + residual[:1].to(v_xy.dtype), v_yx + residual[1:].to(v_yx.dtype)
