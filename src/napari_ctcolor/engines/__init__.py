"""Engines: the calls behind both the napari widgets and the CLI (batching, devices, progress, cancellation).

Import each engine from its module (`napari_ctcolor.engines.register.register`,
`napari_ctcolor.engines.colorize`): this package imports neither, so that its torch-free modules
(`napari_ctcolor.engines.checkerboard`, `napari_ctcolor.engines.prealign`) load without torch, as ``ctcolor peer
demons`` and the reader child of ``ctcolor register`` need; and ``ctcolor register`` does not pay the colorizer's
MONAI import (about 2 s of start-up on 2 CPU cores).
"""

from __future__ import annotations

from ..errors import Cancelled
from .checkerboard import checkerboard

__all__ = ["Cancelled", "checkerboard"]
