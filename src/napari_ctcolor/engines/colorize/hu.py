"""The CT's HU as the colorize stages read them: float32 slices, NaN as air."""

from __future__ import annotations

import numpy as np
import torch

from ...io import Volume

_AIR_HU = -1024.0


def hu_slices(volume: Volume, start: int, stop: int) -> np.ndarray:
    """float32 HU of slices [start, stop); NaN (unreconstructed voxels in some NIfTI) becomes air, +-inf clips."""
    hu = np.asarray(volume.array[start:stop], dtype=np.float32)
    if volume.array.dtype.kind == "f":
        np.nan_to_num(hu, copy=False, nan=_AIR_HU, posinf=np.finfo(np.float32).max, neginf=_AIR_HU)
    return hu


def device_hu(volume: Volume, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """(n, Y, X) float32 HU of slices [start, stop) on ``device``, as `hu_slices` gives them: the stored integers
    are copied as they are (an int16 CT: half the bytes of float32) and converted there."""
    array = np.ascontiguousarray(volume.array[start:stop])
    if not array.flags.writeable:  # a read-only memory map: torch shares only writeable memory
        array = array.copy()
    if array.dtype in (np.int16, np.uint8, np.int32, np.float32):
        hu = torch.from_numpy(array).to(device).float()
        if array.dtype == np.float32:
            hu = torch.nan_to_num(hu, nan=_AIR_HU, posinf=float(np.finfo(np.float32).max), neginf=_AIR_HU)
        return hu
    return torch.from_numpy(hu_slices(volume, start, stop)).to(device)
