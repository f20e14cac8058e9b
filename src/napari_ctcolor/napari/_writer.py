"""napari writer: image layers to NIfTI with the layer's physical geometry."""

from __future__ import annotations

from ..io import write_nifti
from ._layers import volume_from_layer


def write_image_nifti(path: str, data, attributes: dict) -> list[str]:
    """Write a grey image layer to ``path`` (.nii or .nii.gz), world geometry from the layer's transforms."""
    if not path.lower().endswith((".nii", ".nii.gz")):
        path = f"{path}.nii.gz"
    write_nifti(volume_from_layer(data, attributes), path)
    return [path]
