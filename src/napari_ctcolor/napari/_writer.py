"""napari writers: grey image layers to NIfTI; RGB layers to NIfTI RGB24 or a folder of PNG slices.

napari picks a writer by file extension only (an RGB layer is an "image" layer too), so the NIfTI writer looks at
the layer itself: grey layers are written in their own units, RGB layers as RGB24 colour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import ColorVolume, write_nifti
from ..io.export import write_png_slices, write_rgb_nifti
from ._layers import volume_from_layer


def write_image_nifti(path: str, data, attributes: dict) -> list[str]:
    """Write an image layer to ``path`` (.nii or .nii.gz), world geometry from the layer's transforms.

    Grey layers keep their values (HU for CT); RGB layers become NIfTI-1 RGB24 with the same affine.
    """
    if not path.lower().endswith((".nii", ".nii.gz")):
        path = f"{path}.nii.gz"
    if attributes.get("rgb"):
        write_rgb_nifti(color_volume_from_layer(data, attributes), path, overwrite=True)
    else:
        write_nifti(volume_from_layer(data, attributes), path)
    return [path]


def write_rgb_png(path: str, data, attributes: dict) -> list[str]:
    """Write an RGB layer as a folder of PNG slices (``slice_0000.png`` ...).

    ``path`` names the folder: ``colour.png`` and ``colour`` both write ``colour/``. Existing slices are replaced,
    as napari's save dialog has already asked about the name.
    """
    if not attributes.get("rgb"):
        raise InputError(f"{path}: PNG stacks are written for RGB layers; save grey layers as NIfTI")
    folder = Path(path)
    if folder.suffix.lower() == ".png":
        folder = folder.with_suffix("")
    write_png_slices(color_volume_from_layer(data, attributes), folder, overwrite=True)
    return [str(folder)]


def color_volume_from_layer(data, attributes: dict[str, Any]) -> ColorVolume:
    """The ColorVolume an RGB(A) image layer shows: uint8 (Z, Y, X, 3) and the layer's physical geometry.

    uint8 data is taken as is; other types are mapped through the layer's contrast limits, as napari displays
    them. Alpha is dropped. 2D layers (Y, X, 3) become one slice.
    """
    rgb = np.asarray(data[0] if attributes.get("multiscale") else data)
    if rgb.ndim not in (3, 4) or rgb.shape[-1] not in (3, 4):
        raise InputError(f"expected RGB(A) image data (..., Y, X, 3 or 4), got shape {rgb.shape}")
    rgb = rgb[..., :3]
    if rgb.dtype != np.uint8:
        low, high = (float(v) for v in attributes.get("contrast_limits") or (0.0, 1.0))
        scaled = (rgb.astype(np.float32) - low) * np.float32(255.0 / max(high - low, 1e-12))
        rgb = np.round(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
    geometry = volume_from_layer(rgb[..., 0], attributes)  # same transforms; the channel axis is not spatial
    return ColorVolume(
        np.ascontiguousarray(rgb.reshape(geometry.shape + (3,))), geometry.spacing, geometry.origin, geometry.direction
    )
