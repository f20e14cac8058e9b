"""What ``ctcolor info`` reports of an image: its geometry, modality, value range and default window, as the
CLI contract's JSON record."""

from __future__ import annotations

import numpy as np

from ..io import ColorVolume, Volume
from ..windowing import default_window


def volume_info(volume: Volume) -> dict:
    """The `ctcolor info --json` record of a volume (keys fixed by the CLI contract, a few more after them)."""
    array = volume.array
    finite = array if array.dtype.kind in "iu" else array[np.isfinite(array)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (float("nan"), float("nan"))
    as_number = int if array.dtype.kind in "iu" else float
    return {
        "shape": list(volume.shape),
        "spacing": list(volume.spacing),
        "origin": list(volume.origin),
        "direction": volume.direction.flatten().tolist(),
        "modality": volume.meta.get("modality", "OT"),
        "hu_min": as_number(lo),
        "hu_max": as_number(hi),
        "window": list(default_window(volume)),
        "series_count": int(volume.meta.get("series_count", 1)),
        "series_description": volume.meta.get("series_description", ""),
        "dtype": str(array.dtype),
        "format": volume.meta.get("format", ""),
        **{k: volume.meta[k] for k in ("irregular_spacing", "missing_slices") if k in volume.meta},
        # Where the header says so: every window it offers, the contrast given, where the geometry came from.
        **{k: volume.meta[k] for k in ("windows", "contrast", "geometry_source") if k in volume.meta},
        "position_known": bool(volume.meta.get("position_known", True)),
    }


def color_info(color: ColorVolume) -> dict:
    """The `ctcolor info --json` record of an RGB volume (what `ctcolor colorize` writes)."""
    return {
        "shape": list(color.rgb.shape[:3]),
        "spacing": list(color.spacing),
        "origin": list(color.origin),
        "direction": color.direction.flatten().tolist(),
        "modality": "RGB",
        "dtype": "uint8 RGB",
        "format": color.settings.get("format", ""),
        "geometry_known": color.settings.get("geometry") != "none",
    }
