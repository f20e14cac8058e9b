"""Engine work as generators of ``(done, total)`` steps: one mechanism for the CLI (callbacks) and napari workers.

A napari ``GeneratorWorker`` runs a step generator directly (``worker.quit()`` closes it between steps); the CLI and
library calls drain it with `run_steps`, which reports progress and polls a cancel callback. Each engine function
``iter_X`` is written once; `blocking` makes its ``X``.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from ..errors import Cancelled

Progress = Callable[[int, int], Any]
Cancel = Callable[[], bool]
#: (done, total), or (done, total, stage): ``stage`` names what runs until the next step ("refinement"), for a
#: progress line; callers that only count take the first two.
Step = tuple[int, int] | tuple[int, int, str]
R = TypeVar("R")
Steps = Generator[Step, None, R]
#: Seconds between two polls of Cancel while a long call runs in a thread of its own (`in_thread`).
CANCEL_POLL_S = 0.05


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
            done, total = next(steps)[:2]
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)


def map_steps(steps: Generator[Any, None, R], relabel: Callable[[Any], Step]) -> Steps[R]:
    """Re-yield each of ``steps`` as ``relabel(step)`` and return its value (for `yield from`). Closed at a yield (a
    worker told to quit), or left by an error, it closes ``steps``: their ``finally`` blocks run."""
    try:
        while True:
            try:
                step = next(steps)
            except StopIteration as stop:
                return stop.value
            yield relabel(step)
    finally:
        steps.close()


def offset_steps(steps: Steps[R], offset: int, total: int) -> Steps[R]:
    """Re-yield a phase's ``(done, _)`` steps as ``(offset + done, total)`` (a stage name kept) and return its value
    (for `yield from`)."""
    return map_steps(steps, lambda step: (offset + step[0], total, *step[2:]))


def blocking(iterate: Callable[..., Steps[R]]) -> Callable[..., R]:
    """The function that runs the step generator function ``iter_X`` to its end, named ``X``, with its docstring.

    Its arguments are ``iterate``'s, plus keyword-only ``progress(done, total)`` and ``cancel()`` (`run_steps`) where
    ``iterate`` has no parameters of those names (a generator that reports its own stages takes them itself). Its
    ``__signature__`` is the whole list, for help(), IDEs and the napari console.
    """
    signature = inspect.signature(iterate)
    parameters = list(signature.parameters.values())
    if {"progress", "cancel"} <= signature.parameters.keys():

        def run(*args: Any, **kwargs: Any) -> R:
            return run_steps(iterate(*args, **kwargs))

    else:

        def run(*args: Any, progress: Progress | None = None, cancel: Cancel | None = None, **kwargs: Any) -> R:
            return run_steps(iterate(*args, **kwargs), progress, cancel)

        keyword = inspect.Parameter.KEYWORD_ONLY
        parameters += [
            inspect.Parameter("progress", keyword, default=None, annotation="Progress | None"),
            inspect.Parameter("cancel", keyword, default=None, annotation="Cancel | None"),
        ]
    functools.update_wrapper(run, iterate)
    run.__name__ = iterate.__name__.removeprefix("iter_")
    run.__qualname__ = iterate.__qualname__.removeprefix("iter_")
    returns = str(signature.return_annotation).removeprefix("Steps[").removesuffix("]")
    run.__signature__ = signature.replace(parameters=parameters, return_annotation=returns)
    return run


def in_thread(call: Callable[[], R], check: Callable[[], None], name: str = "ctcolor-call") -> R:
    """``call()`` in a thread of its own while this one polls ``check`` every `CANCEL_POLL_S`; its value or error.

    For a call that holds its thread for seconds in one library operation that releases the GIL and cannot be
    interrupted: a SimpleITK filter (which polls Cancel only between its iterations: one demons iteration on a
    512 x 512 x 141 chest CT took 3.3 s on 2 cores, 2026-11-27), a torch operation on a whole CT. A ``check`` that
    raises (`Cancelled`) returns within `CANCEL_POLL_S`; the call left behind stops at its own next poll of Cancel
    (the end of its iteration, its next torch operation) and its result is dropped."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the waiting thread, which raises it
            outcome["error"] = error

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(CANCEL_POLL_S)
        check()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
