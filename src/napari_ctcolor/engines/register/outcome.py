"""The end of a registration: its measures (`measure`: the Jacobian determinant, inverse consistency, NCC and local
NCC, det J's spread in the body, the overlap), the `RegistrationResult.metrics` record with its quality warnings
(`metrics_of`), and the `RegistrationResult` on the fixed grid (`result_of`). `iter_register` calls them after the
warp, on what the stages (`stages`) made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...io import Volume
from ...models.diffeo import jacobian_determinant
from .metrics import global_ncc, inverse_consistency_mm, local_ncc, quality_warnings
from .stages import Fields, Grid, Pair, Plan, Stages


@dataclass
class RegistrationResult:
    """The output of `register`, all on the fixed image's grid.

    Attributes:
        warped: the moving image in the fixed image's space, in its original units (float32; HU for CT).
        ddf: float32 (Z, Y, X, 3), mm, LPS (x, y, z) components, ITK convention: fixed point p maps to moving point
            p + ddf(p) (the original moving image's space, pre-alignment included). ``sitk.DisplacementFieldTransform``
            of it resamples the moving image onto the fixed grid like ``warped``.
        inverse_ddf: float32 (Z, Y, X, 3), mm, LPS: moving point q maps to fixed point q + inverse_ddf(q), sampled at
            the fixed grid's points (so it covers the moving image where it overlaps the fixed image's box).
        jacobian: det J of the map p -> p + ddf(p), float32 on the fixed grid (1 keeps volume, <= 0 folds).
        metrics: ncc_before, ncc_after (global NCC over the fixed grid; ncc_prealigned, prealign_matrix and
            prealign_offset_mm with the pre-alignment), lncc_before, lncc_after (`local_ncc` in the body),
            folding_fraction, volume_change_fraction (det J outside 0.8..1.25 in the body),
            jacobian_body_near_1_fraction (within `NEAR_ONE`), jacobian_body_p1_p99, inverse_consistency_mm,
            overlap_fraction (of the body covered by the moving image), seconds, stage_seconds, model, network_shape
            (the grid the network ran on), device, refine_iterations (planned), refine_matched (the refinement stopped
            early: the images agreed within noise, `refine.MATCHED_METRIC`), copies (one scan twice: the identity
            without the network, `COPIES_METRIC`), prealigned_matched (after the pre-alignment the images differed
            only by noise and resampling, and it is the registration: `PREALIGNED_MATCHED_METRIC`, with
            prealigned_coarse_mse),
            network_gain and network_dropped (the network's map took less than `NETWORK_GAIN_MIN` of the pre-aligned
            difference away, and the pre-alignment is the registration, unrefined), affine, symmetric, and warnings
            (`warnings`).
        warped_labels: the moving labels in the fixed image's space (nearest), when labels were given.
        covered: bool on the fixed grid, True where ``warped`` holds the moving image, False where the map leads
            beyond it (a moving scan with a shorter field of view: ``warped`` holds its minimum there, no data).
    """

    warped: Volume
    ddf: np.ndarray
    inverse_ddf: np.ndarray
    jacobian: Volume
    metrics: dict[str, Any]
    warped_labels: Volume | None = None
    covered: np.ndarray | None = None


@dataclass
class Measured:
    """The measures of a finished registration and its outputs on the host (`measure`)."""

    jacobian: np.ndarray
    ddf: np.ndarray
    inverse_ddf: np.ndarray
    warped: np.ndarray
    inverse_consistency: float
    ncc_after: float
    lncc_after: float
    volume_change: float
    near_one: float
    spread: list[float]
    overlap: float


#: det J within this range: the volume kept within 5 %, where the Jacobian layer is nearly clear.
NEAR_ONE = (0.95, 1.05)


def measure(plan: Plan, pair: Pair, fields: Fields, warped_t: torch.Tensor) -> Measured:
    """The Jacobian determinant, inverse consistency, NCC and local NCC after registration, the share of the body
    whose volume changes by more than 0.8..1.25, the share within `NEAR_ONE` and its 1st-99th percentiles, the
    overlap; the outputs moved to the host as float32. det J is invariant under the voxel -> mm similarity, so the
    voxel field gives it; the pre-alignment's part is a constant factor."""
    fixed, f_ba = plan.fixed, fields.f_ba
    if plan.copies:  # the identity's values, exactly
        jacobian = torch.ones(fixed.shape, device=plan.device)
        inverse_consistency, ncc_after, lncc_after = 0.0, pair.ncc_before, pair.lncc_before
    else:
        if pair.prealignment_alone:  # an affine map: det J its matrix's on every voxel, its inverse exact
            jacobian = torch.full(fixed.shape, fields.affine_det, device=plan.device)
            inverse_consistency = 0.0
        else:
            slab = f_ba.expand(-1, -1, 2, -1, -1) if plan.two_d else f_ba  # a 2D field needs 2 slices for its gradient
            jacobian = jacobian_determinant(slab)[0, : fixed.shape[0]] * fields.affine_det
            spacing_xyz = torch.tensor(fixed.spacing[::-1], dtype=f_ba.dtype, device=f_ba.device)
            inverse_consistency = inverse_consistency_mm(fields.f_ab, f_ba, spacing_xyz)
        ncc_after = global_ncc(pair.fixed_t, warped_t)
        lncc_after = local_ncc(pair.fixed_n, plan.normalised(warped_t, 1), pair.body)
    in_body = jacobian[pair.body[0, 0]]
    volume_change = float(((in_body < 0.8) | (in_body > 1.25)).float().mean()) if in_body.numel() else 0.0
    near_one = float(((in_body >= NEAR_ONE[0]) & (in_body <= NEAR_ONE[1])).float().mean()) if in_body.numel() else 1.0
    spread = np.percentile(in_body.cpu().numpy(), (1, 99)).tolist() if in_body.numel() else [1.0, 1.0]
    body_np = pair.body[0, 0].cpu().numpy()
    outside = pair.outside
    overlap = 1.0 if outside is None or not body_np.any() else float(1.0 - outside[body_np].mean())
    return Measured(
        jacobian=jacobian.cpu().numpy().astype(np.float32, copy=False),
        ddf=fields.ddf.cpu().numpy().astype(np.float32, copy=False),
        inverse_ddf=fields.inverse_ddf.cpu().numpy().astype(np.float32, copy=False),
        warped=warped_t[0, 0].cpu().numpy(),
        inverse_consistency=inverse_consistency,
        ncc_after=ncc_after,
        lncc_after=lncc_after,
        volume_change=volume_change,
        near_one=near_one,
        spread=spread,
        overlap=overlap,
    )


def metrics_of(
    plan: Plan, grid: Grid, pair: Pair, fields: Fields, measured: Measured, stages: Stages, bf16: bool, seconds: float
) -> dict[str, Any]:
    """The `RegistrationResult.metrics` record, with its quality `warnings`."""
    loaded = plan.loaded
    metrics: dict[str, Any] = {
        "ncc_before": pair.ncc_before,
        "ncc_after": measured.ncc_after,
        "lncc_before": pair.lncc_before,
        "lncc_after": measured.lncc_after,
        "folding_fraction": float(np.mean(measured.jacobian <= 0)),
        "volume_change_fraction": measured.volume_change,
        "jacobian_body_p1_p99": [round(float(v), 3) for v in measured.spread],
        "jacobian_body_near_1_fraction": round(measured.near_one, 4),
        "inverse_consistency_mm": measured.inverse_consistency,
        "overlap_fraction": measured.overlap,
        "seconds": round(seconds, 3),
        "stage_seconds": stages.seconds,
        "model": loaded.name,
        # The working grid in the fixed image's (Z, Y, X) order (the network saw it in its own axis order).
        "network_shape": [grid.work[grid.axis_map.axes.index(a)] for a in range(3)],
        "device": str(plan.device),
        "network_dtype": "bfloat16" if bf16 else "float32",
        "refine_iterations": plan.iterations,
        "refine_matched": stages.skipped > 0,
        "copies": plan.copies,
        "prealigned_matched": pair.prealigned_matched,
        "network_gain": None if pair.network_gain is None else round(pair.network_gain, 4),
        "network_dropped": pair.network_dropped,
        "affine": bool(plan.affine),
        "symmetric": loaded.symmetric,
    }
    if plan.affine:
        metrics["ncc_prealigned"] = pair.ncc_prealigned
        metrics["prealigned_coarse_mse"] = pair.coarse_mse_prealigned
        metrics["prealign_matrix"] = fields.a.tolist()
        metrics["prealign_offset_mm"] = fields.b.tolist()
    if plan.two_d:
        metrics["two_d"] = True
    metrics["quality_limits"] = dict(loaded.limits)
    metrics["warnings"] = quality_warnings(metrics, loaded.limits)
    return metrics


def result_of(
    plan: Plan,
    measured: Measured,
    metrics: dict[str, Any],
    warped_labels: np.ndarray | None,
    labels: Volume | None,
    covered: np.ndarray,
) -> RegistrationResult:
    """The `RegistrationResult` on the fixed grid."""
    fixed, moving = plan.fixed, plan.moving

    def on_fixed_grid(array: np.ndarray, **meta: Any) -> Volume:
        return Volume(array, fixed.spacing, fixed.origin, fixed.direction.copy(), meta=meta)

    return RegistrationResult(
        warped=on_fixed_grid(measured.warped, **{**moving.meta, "registered_to": fixed.meta.get("source", "")}),
        ddf=measured.ddf,
        inverse_ddf=measured.inverse_ddf,
        jacobian=on_fixed_grid(measured.jacobian, quantity="jacobian_determinant"),
        metrics=metrics,
        warped_labels=None if warped_labels is None else on_fixed_grid(warped_labels, **labels.meta),
        covered=covered,
    )
