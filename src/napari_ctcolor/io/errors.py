"""The error types, re-exported where they lived before (`napari_ctcolor.errors` holds them, below every layer)."""

from __future__ import annotations

from ..errors import Cancelled, CTColorError, InputError

__all__ = ["CTColorError", "Cancelled", "InputError"]
