"""Engines: the calls behind both the napari widgets and the CLI (batching, devices, progress, cancellation).

The names are imported on first use (PEP 562), so ``ctcolor register`` does not pay for MONAI, which only the
colorizer needs (about 2 s of start-up on 2 CPU cores).
"""

from __future__ import annotations

import importlib
from typing import Any

from ..io.errors import Cancelled

_LAZY = {
    "checkerboard": ".checkerboard",
    "colorize": ".colorize",
    "register": ".register",
    "RegistrationResult": ".register",
}

__all__ = ["Cancelled", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    # Importing the submodule `.register` binds the package attribute `register` to the module: rebind the function.
    globals()[name] = value
    return value
