"""The CT's HU as the colorize stages read them: float32 slices, NaN as air."""

from __future__ import annotations

import numpy as np

from ...io import Volume

_AIR_HU = -1024.0


def hu_slices(volume: Volume, start: int, stop: int) -> np.ndarray:
    """float32 HU of slices [start, stop); NaN (unreconstructed voxels in some NIfTI) becomes air, +-inf clips."""
    hu = np.asarray(volume.array[start:stop], dtype=np.float32)
    if volume.array.dtype.kind == "f":
        np.nan_to_num(hu, copy=False, nan=_AIR_HU, posinf=np.finfo(np.float32).max, neginf=_AIR_HU)
    return hu
