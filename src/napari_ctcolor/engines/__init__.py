"""Engines: the calls behind both the napari widgets and the CLI (batching, devices, progress, cancellation)."""

from __future__ import annotations

from ..io.errors import Cancelled
from .checkerboard import checkerboard
from .colorize import colorize
from .register import RegistrationResult, register

__all__ = ["Cancelled", "RegistrationResult", "checkerboard", "colorize", "register"]
