"""Engines: the calls behind both the napari widgets and the CLI (batching, devices, progress, cancellation).

``colorize`` lives in `napari_ctcolor.engines.colorize` and is not imported here: it needs MONAI, about 2 s of
start-up on 2 CPU cores that ``ctcolor register`` should not pay. Import it from its module.
"""

from __future__ import annotations

from ..errors import Cancelled
from .checkerboard import checkerboard
from .register import RegistrationResult, register

__all__ = ["Cancelled", "RegistrationResult", "checkerboard", "register"]
