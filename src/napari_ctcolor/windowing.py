"""Windowing: Hounsfield units to display grey in [0, 1].

grey = clip((hu - (centre - width / 2)) / width, 0, 1), the linear ramp napari applies for contrast limits
(centre - width / 2, centre + width / 2). Using the same ramp means the colorizer's luminance is exactly the grey the
viewer shows for that window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .errors import InputError
from .io.volume import Volume

if TYPE_CHECKING:
    import torch


class Window(NamedTuple):
    """A display window in HU: ``centre`` (level) and ``width``."""

    centre: float
    width: float

    @property
    def limits(self) -> tuple[float, float]:
        """(low, high) HU: napari's contrast limits for this window."""
        return (self.centre - self.width / 2, self.centre + self.width / 2)


# Standard CT windows (centre, width) in HU, as commonly tabulated for radiology workstations (Radiopaedia,
# "Windowing (CT)"; CTA as a common vendor default).
PRESETS: dict[str, Window] = {
    "lung": Window(-600, 1500),
    "mediastinum": Window(50, 350),
    "abdomen": Window(40, 400),
    "soft_tissue": Window(40, 400),
    "liver": Window(30, 150),
    "bone": Window(400, 1800),
    "brain": Window(40, 80),
    "subdural": Window(75, 215),
    "stroke": Window(40, 40),
    "cta": Window(300, 600),
}
DEFAULT_PRESET = "abdomen"


def window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Map HU to display grey float32 in [0, 1].

    Example: ``window(ct.array, *PRESETS["lung"])`` shows lung parenchyma (-850 HU) at grey 0.17.

    Args:
        hu: any shape, HU.
        centre: window centre (level) in HU.
        width: window width in HU, > 0.
    """
    if not width > 0:
        raise InputError(f"window width must be positive, got {width}")
    low = np.float32(centre - width / 2)
    grey = np.subtract(hu, low, dtype=np.float32)
    grey *= np.float32(1.0 / width)
    return np.clip(grey, 0.0, 1.0, out=grey)


def window_tensor(hu: torch.Tensor, centre: float, width: float) -> torch.Tensor:
    """`window` for torch tensors (any shape, any device): the same ramp, computed where the tensor lives."""
    if not width > 0:
        raise InputError(f"window width must be positive, got {width}")
    return ((hu - (centre - width / 2)) * (1.0 / width)).clamp_(0.0, 1.0)


def parse_window(spec: str | Sequence[float] | Window | None, volume: Volume | None = None) -> Window:
    """A Window from a preset name, "CENTRE,WIDTH", a pair, or None (the volume's default, see `default_window`)."""
    if spec is None:
        return default_window(volume)
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_").replace(" ", "_")
        if key in PRESETS:
            return PRESETS[key]
        parts = spec.split(",")
        try:
            centre, width = (float(p) for p in parts)
        except ValueError:
            names = ", ".join(PRESETS)
            raise InputError(f"unknown window {spec!r}: use a preset ({names}) or CENTRE,WIDTH in HU") from None
        spec = (centre, width)
    centre, width = (float(v) for v in spec)
    if not (np.isfinite(centre) and np.isfinite(width) and width > 0):
        raise InputError(f"window needs a finite centre and a positive width, got {centre}, {width}")
    return Window(centre, width)


def default_window(volume: Volume | None) -> Window:
    """The DICOM WindowCenter/Width when the file has one, else the abdomen preset for CT, else the 1..99 % range."""
    if volume is None:
        return PRESETS[DEFAULT_PRESET]
    if "window" in volume.meta:
        return Window(*(float(v) for v in volume.meta["window"]))
    if volume.meta.get("modality", "CT") == "CT":
        return PRESETS[DEFAULT_PRESET]
    lo, hi = np.percentile(volume.array[:: max(1, volume.shape[0] // 32)], [1, 99])
    return Window((lo + hi) / 2, max(float(hi - lo), 1e-6))


def window_stack(hu: np.ndarray, windows: Sequence[Window | tuple[float, float]]) -> np.ndarray:
    """Several windows of the same HU array stacked on a new leading axis: (m, *hu.shape) float32.

    This is the multi-window model input: e.g. lung, abdomen and bone windows give the network air/lung, soft
    tissue and bone contrast at once.
    """
    out = np.empty((len(windows), *np.shape(hu)), dtype=np.float32)
    for i, (centre, width) in enumerate(windows):
        out[i] = window(hu, centre, width)
    return out
