"""napari-ctcolor: colorize CT volumes (luminance kept exactly) and register them with SYMNet."""

from __future__ import annotations

__version__ = "0.1.0"
