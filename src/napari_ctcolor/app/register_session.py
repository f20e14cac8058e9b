"""A register panel's state and jobs without Qt: what napari's "Register & checkerboard" dock holds between clicks.

A session runs the register job and what a reader looks at after it (the difference, off the main thread), keeps the
finished run, and derives from it what the panel's controls redraw without registering again: the checkerboard at a
tile size, before or after registration, in grey or in colour, and its tile edges (`tile_edges`). The dock only
shows the session: the tests drive it without a viewer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..engines.geometry import resample_onto, same_grid
from ..engines.steps import map_steps
from ..errors import Cancelled
from ..io import ColorVolume, Volume
from .register_job import (
    RegisterRequest,
    RegistrationResult,
    checkerboard,
    checkerboard_mask,
    iter_register_job,
)
from .session import Failed, failing_as_value

#: The difference image: fixed - warped in HU with both clipped to `DIFFERENCE_CLIP_HU` (air to contrast-filled
#: vessels: a lung's and a soft tissue's misalignment alike; bone differs no more than its edge), shown at
#: +-`DIFFERENCE_RANGE_HU`, whatever the fixed layer's window (a soft-tissue window hid the lungs' misalignment).
DIFFERENCE_CLIP_HU, DIFFERENCE_RANGE_HU = (-1000.0, 400.0), 400.0
#: Below this HU somewhere in the fixed image: it is in HU (a CT); else the difference uses the fixed layer's window.
HU_MIN = -500.0


@dataclass
class RegisterInputs:
    """What one run registers, as the front end read it.

    Attributes:
        fixed, moving: the grey volumes (own units, physical geometry).
        fixed_color: the fixed CT's colorized twin, if any (any grid; put on the fixed one by the job).
        moving_color: the moving CT's colorized twin, when it is to be warped too.
        moving_name, moving_color_name: their names, for the outputs' names.
        fixed_limits, moving_limits: the display windows' (low, high) of the fixed and moving images.
    """

    fixed: Volume
    moving: Volume
    fixed_color: ColorVolume | None
    moving_color: ColorVolume | None
    moving_name: str
    moving_color_name: str | None
    fixed_limits: tuple[float, float]
    moving_limits: tuple[float, float]


@dataclass
class RegisterRun:
    """A finished run: the engine's result and what is derived from it off the main thread.

    Attributes:
        inputs: what was registered.
        result: the registration (warped image, fields, Jacobian, metrics) on the fixed grid.
        fixed_color, warped_color: the colorized twins on the fixed grid, when the moving one was warped.
        difference, difference_limits: `difference_of` the fixed and the warped image.
        ranges: (lowest, highest) finite value of the warped image, the difference and the Jacobian (``"warped"``,
            ``"difference"``, ``"jacobian"``): found here, off the main thread (a pass over a 512² chest CT of 141
            slices takes 25 ms, which the layers' contrast-limit ranges would otherwise spend in the viewer's thread).
    """

    inputs: RegisterInputs
    result: RegistrationResult
    fixed_color: ColorVolume | None
    warped_color: ColorVolume | None
    difference: np.ndarray
    difference_limits: tuple[float, float]
    ranges: dict[str, tuple[float, float] | None]
    _moved: dict[bool, Volume | ColorVolume] = field(default_factory=dict, repr=False)

    def moving_on_fixed(self, colour: bool) -> Volume | ColorVolume:
        """The moving image (``colour``: its colorized twin) as it was, resampled onto the fixed grid by position
        (linear; outside: the grey image's minimum, black): kept once made."""
        if colour not in self._moved:
            fixed, moving = self.inputs.fixed, self.inputs.moving_color if colour else self.inputs.moving
            if same_grid(moving, fixed):
                self._moved[colour] = moving
            elif colour:
                self._moved[colour] = ColorVolume.on_grid_of(fixed, resample_onto(moving, fixed), **moving.settings)
            else:
                self._moved[colour] = fixed.with_array(resample_onto(moving, fixed))
        return self._moved[colour]


class RegisterSession:
    """The last finished registration of one panel and what its controls redraw from it.

    Attributes:
        run: the finished run shown, None before the first.
    """

    def __init__(self) -> None:
        self.run: RegisterRun | None = None

    @staticmethod
    def steps(inputs: RegisterInputs, request: RegisterRequest, cancel: Callable[[], bool]):
        """The register job (`iter_register_job`: the engine, then the colour warp), then the difference: yields
        (done, total[, stage]), returns the `RegisterRun`, `Failed`, or None when ``cancel`` stopped it inside an
        iteration (after one more step, at which a worker told to quit closes the generator)."""
        job = iter_register_job(
            inputs.fixed, inputs.moving, request, inputs.moving_color, inputs.fixed_color, cancel=cancel
        )
        last = [(0, 0)]

        def seen(step):
            last[0] = step
            return step

        try:  # closed at a yield (Cancel), `map_steps` closes the job: its and the engine's finally blocks run
            outcome = yield from map_steps(job, seen)
        except Cancelled:
            yield last[0][:2]
            return None
        result = outcome.result
        difference, limits = difference_of(inputs.fixed.array, result.warped.array, inputs.fixed_limits, result.covered)
        arrays = {"warped": result.warped.array, "difference": difference, "jacobian": result.jacobian.array}
        ranges = {key: finite_range(array) for key, array in arrays.items()}
        return RegisterRun(inputs, result, outcome.fixed_color, outcome.warped_color, difference, limits, ranges)

    @classmethod
    def job(cls, inputs: RegisterInputs, request: RegisterRequest, cancel: Callable[[], bool], name: str):
        """`steps`, ending with `Failed` on a problem the user can fix, or on a `RuntimeError` ("<name> failed: <its
        first line>"; torch's out of memory is one, and superqt would end a worker that raised it without its finished
        signal, which would leave the panel busy for good)."""
        try:
            return (yield from failing_as_value(cls.steps(inputs, request, cancel)))
        except RuntimeError as exc:
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            return Failed(f"{name} failed: {lines[0]}")

    def keep(self, run: RegisterRun) -> None:
        """``run`` is the one shown from now on."""
        self.run = run

    def checkerboard(
        self, tile_mm: float, before: bool, colour: bool, run: RegisterRun | None = None
    ) -> Volume | ColorVolume:
        """The fixed image and the warped one (``before``: the moving one as it was, on the fixed grid by position) in
        alternating cubes of ``tile_mm``; with ``colour`` and warped colours, the colorized twins (the fixed CT's grey
        in its window where it has none). Of ``run``, else the session's. The moving image is resampled onto the
        fixed grid once per run, the first time ``before`` asks for it (a second's work on a 512² CT)."""
        run = run or self.run
        if run is None:
            raise ValueError("no registration yet")
        inputs = run.inputs
        if colour and run.warped_color is not None:
            fixed_color = run.fixed_color or grey_as_color(inputs.fixed, inputs.fixed_limits)
            return checkerboard(fixed_color, run.moving_on_fixed(colour=True) if before else run.warped_color, tile_mm)
        return checkerboard(inputs.fixed, run.moving_on_fixed(colour=False) if before else run.result.warped, tile_mm)


def tile_edges(grid: Volume, tile_mm: float, axes: Sequence[int] = (1, 2)) -> np.ndarray:
    """uint8 (Z, Y, X) on ``grid``: 1 on the first voxel of each new checkerboard tile along any of ``axes`` (array
    axes), else 0. With the two axes of a plane shown, a slice shows the tiles' outlines as one-voxel lines."""
    mask = checkerboard_mask(grid.shape, grid.spacing, tile_mm)
    edges = np.zeros(mask.shape, dtype=bool)
    for axis in axes:
        ahead = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
        behind = tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))
        edges[ahead] |= mask[ahead] != mask[behind]
    return edges.view(np.uint8)


def grey_as_color(volume: Volume, limits: tuple[float, float]) -> ColorVolume:
    """``volume`` windowed to ``limits`` as grey sRGB, for a colour checkerboard."""
    low, high = limits
    grey = np.clip((volume.array.astype(np.float32) - low) / max(high - low, 1e-6), 0.0, 1.0)
    value = np.rint(grey * 255).astype(np.uint8)
    return ColorVolume.on_grid_of(volume, np.repeat(value[..., None], 3, axis=-1))


def finite_range(data: np.ndarray) -> tuple[float, float] | None:
    """(lowest, highest) finite value of ``data``; None for an empty array or one without a finite value."""
    if not data.size:
        return None
    low, high = float(data.min()), float(data.max())
    if not (np.isfinite(low) and np.isfinite(high)):  # the engine's outputs are finite: only then the slower pass
        finite = data[np.isfinite(data)]
        return (float(finite.min()), float(finite.max())) if finite.size else None
    return low, high


def difference_of(
    fixed: np.ndarray, warped: np.ndarray, limits: tuple[float, float], covered: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """(float32 fixed - warped with both clipped to `DIFFERENCE_CLIP_HU`, its display limits +-`DIFFERENCE_RANGE_HU`)
    for a CT; an image not in HU (nothing below `HU_MIN`) is clipped to its window ``limits`` and shown at +- half
    its width. Two voxels both beyond one end of the clip differ by 0, and so do voxels outside ``covered`` (where
    the warped image holds no moving data: a shorter moving scan is not a change)."""
    ct = float(np.min(fixed)) < HU_MIN
    low, high = DIFFERENCE_CLIP_HU if ct else limits
    half = DIFFERENCE_RANGE_HU if ct else (high - low) / 2
    difference = np.clip(fixed, low, high).astype(np.float32) - np.clip(warped, low, high).astype(np.float32)
    if covered is not None:
        difference[~covered] = 0.0
    return difference, (-half, half)
