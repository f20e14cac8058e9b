"""Registering one CT to another, as every front end runs it: a `RegisterRequest` checked once, then the job as a
generator of ``(done, total[, stage])`` steps (`iter_register_job`) that a napari worker runs as it is and the CLI and
the Slicer logic drain (`register_job`). A colorized twin of the moving CT is warped by the same field, onto the fixed
CT's grid, as one more step.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..engines.checkerboard import checkerboard, checkerboard_mask
from ..engines.device import resolve_device
from ..engines.geometry import resample_onto, same_grid, warp
from ..engines.register import RegistrationResult, iter_register
from ..engines.register.refine import MAX_REFINE_ITERATIONS, check_iterations, parse_refine
from ..engines.steps import Cancel, Progress, Step, Steps, blocking, map_steps
from ..io import ColorVolume, Volume

__all__ = [
    "MAX_REFINE_ITERATIONS",
    "RegisterOutcome",
    "RegisterRequest",
    "RegistrationResult",
    "checkerboard",
    "checkerboard_mask",
    "iter_register_job",
    "register_job",
    "warp_color",
]


@dataclass(frozen=True)
class RegisterRequest:
    """How to register, checked once (`checked`): every front end builds one and hands it to the job.

    Attributes:
        model: ``"ct"`` (the project's CT weights) or a SYMNet checkpoint's path.
        affine: rigid then affine pre-alignment; None takes the model card's default.
        refine: demons iterations at the fixed image's resolution (0: the network alone); None takes the card's.
        device: the torch device's name, resolved from "auto".
    """

    model: str | os.PathLike = "ct"
    affine: bool | None = None
    refine: int | None = None
    device: str = "cpu"

    @classmethod
    def checked(
        cls,
        model: str | os.PathLike = "ct",
        affine: bool | None = None,
        refine: int | str | None = None,
        device: str = "auto",
    ) -> RegisterRequest:
        """The request, or `InputError` naming the setting that cannot be used (``refine`` as a count, or the CLI's
        text: ``auto`` or a count), before any reading of weights."""
        if isinstance(refine, str):
            refine = parse_refine(refine)
        elif refine is not None:
            refine = check_iterations(refine)
        return cls(model=model, affine=affine, refine=refine, device=str(resolve_device(device)))


@dataclass(frozen=True)
class RegisterOutcome:
    """A finished `iter_register_job`.

    Attributes:
        result: the registration (warped image, fields, Jacobian, metrics).
        fixed_color: the fixed CT's colorized twin on the fixed grid, when one was given.
        warped_color: the moving CT's colorized twin warped onto the fixed grid, when one was given.
    """

    result: RegistrationResult
    fixed_color: ColorVolume | None = None
    warped_color: ColorVolume | None = None


def warp_color(color: ColorVolume, grid: Volume, ddf: np.ndarray) -> ColorVolume:
    """``color`` warped onto ``grid`` by a displacement field (linear, black outside).

    Args:
        color: rgb uint8 (Z, Y, X, 3), any grid (the moving image's colorized twin).
        grid: the output grid, the one ``ddf`` is sampled on (the fixed image).
        ddf: (Z, Y, X, 3) mm, LPS, ITK convention: grid point p takes ``color`` at p + ddf(p) (as
            `RegistrationResult.ddf`).
    """
    return ColorVolume.on_grid_of(grid, warp(color, grid, ddf), **color.settings, registered=True)


def iter_register_job(
    fixed: Volume,
    moving: Volume,
    request: RegisterRequest,
    moving_color: ColorVolume | None = None,
    fixed_color: ColorVolume | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    prealignment: Callable[[], object] | None = None,
) -> Steps[RegisterOutcome]:
    """The registration (its steps name their stage: pre-alignment, network, refinement, ...), then, with
    ``moving_color``, one step that warps it and puts ``fixed_color`` on the fixed grid: yields ``(done, total[,
    stage])``, returns the `RegisterOutcome`. ``cancel`` is polled inside the registration's iterations too;
    ``prealignment`` gives a pre-alignment made meanwhile (``ctcolor register`` makes it while reading)."""
    extra = int(moving_color is not None)
    more = {} if progress is None else {"progress": lambda done, total: progress(done, total + extra)}
    if prealignment is not None:
        more["prealignment"] = prealignment
    engine = iter_register(
        fixed, moving, request.model, request.affine, request.refine, request.device, cancel=cancel, **more
    )
    totals = [0]

    def with_warp(step: Step) -> Step:  # the colour twin's warp is one more step
        totals[0] = step[1] + extra
        return (step[0], totals[0], *step[2:])

    result = yield from map_steps(engine, with_warp)  # closed at a yield (Cancel), it closes the engine
    total = totals[0]
    if moving_color is None:
        return RegisterOutcome(result)
    warped_color = warp_color(moving_color, fixed, result.ddf)
    if fixed_color is not None and not same_grid(fixed_color, fixed):
        fixed_color = ColorVolume.on_grid_of(fixed, resample_onto(fixed_color, fixed), **fixed_color.settings)
    if progress is not None:
        progress(total, total)
    yield total, total
    return RegisterOutcome(result, fixed_color, warped_color)


register_job = blocking(iter_register_job)
