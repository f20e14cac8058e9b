"""Engine work as generators of ``(done, total)`` steps: one mechanism for the CLI (callbacks) and napari workers.

A napari ``GeneratorWorker`` runs a step generator directly (``worker.quit()`` closes it between steps); the CLI and
library calls drain it with `run_steps`, which reports progress and polls a cancel callback.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

from ..errors import Cancelled

Progress = Callable[[int, int], Any]
Cancel = Callable[[], bool]
Step = tuple[int, int]  # (done, total)
R = TypeVar("R")
Steps = Generator[Step, None, R]


def run_steps(steps: Steps[R], progress: Progress | None = None, cancel: Cancel | None = None) -> R:
    """Drain a step generator: poll ``cancel`` before each step, report each ``(done, total)``, return its value.

    Raises:
        Cancelled: when ``cancel()`` returns True; the generator is closed first (its ``finally`` blocks run).
    """
    while True:
        if cancel is not None and cancel():
            steps.close()
            raise Cancelled("cancelled")
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)


def offset_steps(steps: Steps[R], offset: int, total: int) -> Steps[R]:
    """Re-yield a phase's ``(done, _)`` steps as ``(offset + done, total)`` and return its value (for `yield from`)."""
    while True:
        try:
            done, _ = next(steps)
        except StopIteration as stop:
            return stop.value
        yield offset + done, total
