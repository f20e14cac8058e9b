"""A colorize panel's state and jobs without Qt: what napari's "Colorize volume" dock holds between clicks.

A session keeps each CT's last run (the CT the network saw and its colour classes, `Chroma`), so that a change of
window, palette or strength only recomposes; it knows which run is the current one, decides whether a Run looks for
enhanced blood, and hands its front end the jobs to run in a worker (`run_steps`, `recompose_steps`) or at once
(`plane`). The front end holds its own handles of the CT and of the colour shown (napari: layers); the session keeps
them with the run and never looks inside them. The dock only shows the session: the tests drive it without a viewer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..io import Volume
from ..threads import at_most
from ..windowing import Window
from .colorize_job import (
    Chroma,
    ColorizeOutcome,
    ColorizeRequest,
    compose_plane,
    iter_colorize_job,
    iter_recompose,
    settings_of,
)
from .session import Failed, failing_as_value
from .window import opening_window, opens_in_contrast

#: Two contrast limits within this many HU are the same window (napari's sliders round).
SAME_WINDOW_HU = 0.5


@dataclass
class ColorizeRun:
    """One finished run of one CT.

    Attributes:
        volume: the CT the network saw (HU, geometry).
        chroma: its colour classes, kept for recomposing.
        ct: the front end's handle of the CT (napari: its image layer).
        shown: the front end's handle of the colour shown (napari: the result layer).
    """

    volume: Volume
    chroma: Chroma
    ct: Any
    shown: Any


def same_limits(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Two windows' (low, high) limits are the same within `SAME_WINDOW_HU`."""
    return bool(np.allclose(a, b, rtol=0, atol=SAME_WINDOW_HU))


class ColorizeSession:
    """The runs of one colorize panel and the jobs it starts.

    Attributes:
        runs: every CT's last run (each colour follows its own CT's window), by the CT's handle.
        current: the run of the CT chosen now (else the last run), None before the first.
    """

    def __init__(self) -> None:
        self.runs: list[ColorizeRun] = []
        self.current: ColorizeRun | None = None

    # -- the runs ----------------------------------------------------------------------------------------------------

    def run_of(self, ct: Any) -> ColorizeRun | None:
        """``ct``'s last run (by identity: runs hold arrays), else None."""
        return next((run for run in self.runs if run.ct is ct), None)

    def keep(self, volume: Volume, outcome: ColorizeOutcome, ct: Any, shown: Any) -> ColorizeRun:
        """A finished run of ``ct`` becomes its last run and the current one."""
        self.forget(ct)
        self.current = ColorizeRun(volume, outcome.chroma, ct, shown)
        self.runs.append(self.current)
        return self.current

    def choose(self, ct: Any) -> ColorizeRun | None:
        """``ct`` is chosen: its run becomes the current one (the current one stays when it has none)."""
        self.current = self.run_of(ct) or self.current
        return self.current

    def forget(self, ct: Any) -> bool:
        """Drop ``ct``'s run (its CT or its colour is gone); True when it had one. The current run stays, unless it
        was that one: then there is none (its legend and figures describe nothing the viewer shows)."""
        had = self.run_of(ct)
        self.runs = [run for run in self.runs if run.ct is not ct]
        if had is not None and self.current is had:
            self.current = None
        return had is not None

    # -- Run ---------------------------------------------------------------------------------------------------------

    @staticmethod
    def finds_contrast(volume: Volume, limits: tuple[float, float]) -> bool:
        """Whether a Run of ``volume``, shown in ``limits``, looks for enhanced blood: a CT of more than one slice
        that did not open in a contrast window (`opens_in_contrast`), still in the window it opened in."""
        return (
            volume.shape[0] > 1 and not opens_in_contrast(volume) and same_limits(limits, opening_window(volume).limits)
        )

    @staticmethod
    def run_steps(volume: Volume, request: ColorizeRequest):
        """The colorize job (the network, then the composition): yields (done, 2 Z), returns its `ColorizeOutcome`,
        or `Failed`. A generator function (napari's ``create_worker`` tells a generator worker by that)."""
        outcome = yield from failing_as_value(iter_colorize_job(volume, request))
        if not isinstance(outcome, Failed):
            outcome.chroma.legend_figures(volume.array)  # here in the worker, not in the viewer's main thread
        return outcome

    @staticmethod
    def contrast_to_adopt(
        outcome: ColorizeOutcome, limits_at_run: tuple[float, float], limits_now: tuple[float, float]
    ) -> tuple[float, Window] | None:
        """(median HU of the enhanced blood, the contrast window) when the run composed its colour in the contrast
        window it found and the CT still shows the window it had when Run was pressed; else None (the reader chose
        another window meanwhile: theirs stays)."""
        if outcome.contrast is None or not same_limits(limits_now, limits_at_run):
            return None
        return outcome.contrast

    # -- recompose ---------------------------------------------------------------------------------------------------

    @staticmethod
    def composed_with(request: ColorizeRequest, settings: Mapping | None) -> bool:
        """True when a colour whose `ColorVolume.settings` are ``settings`` was composed as ``request`` asks."""
        return isinstance(settings, Mapping) and settings_of(settings) == request.settings

    @staticmethod
    def recompose_steps(run: ColorizeRun, request: ColorizeRequest):
        """``run``'s colour classes composed as ``request`` asks, on one CPU thread (the interface keeps a core while
        the reader drags the window): yields (done, Z), returns the `ColorVolume`, or `Failed`."""
        with at_most(1):
            return (yield from failing_as_value(iter_recompose(run.volume, run.chroma, request)))

    @staticmethod
    def plane(run: ColorizeRun, axis: int, index: int, request: ColorizeRequest) -> np.ndarray:
        """uint8 RGB of one plane of ``run`` (``axis`` 0 axial, 1 coronal, 2 sagittal), as the whole volume's
        recomposition gives it there."""
        return compose_plane(run.volume, run.chroma, axis, index, request)
