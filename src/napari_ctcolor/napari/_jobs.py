"""One background job at a time for a dock widget: the lifecycle both widgets share.

A job is a step generator (`engines.steps`: it yields ``(done, total)``) run by napari's ``create_worker`` in a
thread. `JobRunner` connects it to the widget's progress bar, status line and Run / Cancel buttons; says how it ended
("cancelled", "failed", or its seconds); and ignores a job's end once the widget is closed or a newer job superseded
it. A problem the user can fix ends the job with a `Failed` value (shown as a one-line error), not an exception.
Not napari's own ``progress``: its bar in the viewer's corner repaints the whole window (`_docks`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from magicgui.widgets import Label, ProgressBar, PushButton
from napari.qt.threading import create_worker

from ..app.session import Failed


class JobRunner:
    """Runs a widget's jobs, one at a time.

    Args:
        progress_bar, status, run_button, cancel_button: the widget's controls the runner drives.
    """

    def __init__(self, progress_bar: ProgressBar, status: Label, run_button: PushButton, cancel_button: PushButton):
        self.progress_bar, self.status = progress_bar, status
        self.run_button, self.cancel_button = run_button, cancel_button
        self.worker = None  # the running GeneratorWorker, if any
        self.cancelling = False  # Cancel was pressed; the worker stops at its next step
        self._desc = ""  # its name, for the status line
        self.closed = False  # the widget is gone: nothing is shown any more

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def start(
        self,
        steps: Callable,
        args: tuple,
        desc: str,
        on_result: Callable[[Any], None],
        total: int = 1,
        run_stays_enabled: bool = False,
        then: Callable[[], None] | None = None,
    ) -> Any:
        """Run ``steps(*args)`` in a worker; returns the worker.

        Args:
            desc: the job's name in the status line ("<desc>...", then "<desc>: 12.3 s", "cancelled" or "failed").
            on_result: called in the main thread with the generator's return value (a `Failed` included).
            total: the bar's length until the first step says its own.
            run_stays_enabled: Run may start another job that supersedes this one (a recompose).
            then: called in the main thread after the job ended and the controls were reset, unless superseded.
        """
        worker = create_worker(steps, *args, _ignore_errors=True)  # errors other than ours reach napari's notifier
        started = time.perf_counter()
        self.progress_bar.max, self.progress_bar.value, self.progress_bar.visible = total, 0, True
        worker.yielded.connect(self.progress)
        worker.aborted.connect(lambda: self.say(f"{desc}: cancelled"))
        worker.errored.connect(lambda _: self.say(f"{desc}: failed"))
        worker.returned.connect(
            lambda result: self.say(
                f"{desc}: failed" if isinstance(result, Failed) else f"{desc}: {time.perf_counter() - started:.1f} s"
            )
        )
        worker.returned.connect(on_result)  # after the timing message, so that what it says stays
        worker.finished.connect(lambda: self._finished(worker, then))
        self.worker, self.cancelling = worker, False
        self.run_button.enabled = run_stays_enabled
        self.cancel_button.enabled = True
        self.status.value = f"{desc}..."
        self._desc = desc
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the running job at its next step (its generator is closed there). The status line says so at once
        and Cancel is disabled: a step can run for seconds on a CPU (a colorize batch, a refinement step of a 512²
        chest CT), and a second press would change nothing."""
        if self.worker is not None:
            self.worker.quit()
            self.cancelling = True
            self.cancel_button.enabled = False
            self.say(f"{self._desc}: cancelling (at the end of the current step)...")

    def progress(self, step: tuple[int, int] | tuple[int, int, str]) -> None:
        """One ``(done, total)`` step: the bar takes the job's own total and its count; a step that names the stage
        to come (``(done, total, stage)``) says it in the status line ("Register & checkerboard: refinement...")."""
        done, total, *stage = step
        if not self.closed:
            self.progress_bar.max = total
            self.progress_bar.value = done
            if stage and not self.cancelling:
                self.status.value = f"{self._desc}: {stage[0]}..."

    def say(self, text: str) -> None:
        if not self.closed:
            self.status.value = text

    def _finished(self, worker, then: Callable[[], None] | None) -> None:
        if self.worker is not worker or self.closed:  # superseded by a newer job, or no widget left
            return
        self.worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        self.progress_bar.visible = False
        if then is not None:
            then()
