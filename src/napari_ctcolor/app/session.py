"""What an interactive front end's jobs end with: a value, or a `Failed` the user is shown as one line.

A dock runs a job in a worker thread, where an exception would reach the user as a traceback; a problem the user can
fix (`CTColorError`) ends the job with `Failed` instead (`failing_as_value`). The sessions (`colorize_session`,
`register_session`) hand their front end jobs of this kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from ..engines.steps import Steps
from ..errors import CTColorError

T = TypeVar("T")


@dataclass
class Failed:
    """A job's return value when it stopped on a `CTColorError`: the message to show (not a crash)."""

    message: str


def failing_as_value(steps: Steps[T]) -> Steps[T | Failed]:
    """``steps`` as they are, ending with `Failed` instead of raising a `CTColorError`."""
    try:
        return (yield from steps)
    except CTColorError as exc:
        return Failed(str(exc))
