"""napari reader: DICOM folders and files, NIfTI, MHA/MHD, NRRD and DICOMweb series URLs -> one image layer in HU at
its physical place; the colour images we write (RGB NIfTI, RGB DICOM series, PNG slice folders) -> one RGB layer at
their physical place."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ..io import ITK_SUFFIXES, NIFTI_SUFFIXES, ColorVolume, Volume, read_image
from ..io.color_read import PNG_GEOMETRY
from ..io.dicomweb import is_series_url
from ._layers import image_layer_data, rgb_layer_data
from ._window_drag import install_mouse_controls

_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM suffix, the "DICM" magic after the preamble, or the start of an old archive's file without either: an
    implicit VR little endian data set whose first element is in group 0008 (identifying) with a short length."""
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group, _, length = struct.unpack("<HHI", head[:8])
    return group == 0x0008 and length < 1024


def _folder_has_dicom(folder: Path, max_files: int = 64) -> bool:
    """Cheap check on the first files only: a folder napari offers us may be huge."""
    seen = 0
    for root, _, files in os.walk(folder):
        for name in files:
            if _looks_like_dicom(Path(root) / name):
                return True
            seen += 1
            if seen >= max_files:
                return False
    return False


def get_reader(path):
    """Return `read_ct` when ``path`` is something we read, else None (napari then tries other readers)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if is_series_url(path):  # ROOT/studies/<uid>/series/<uid>: read over DICOMweb
        return read_ct
    path = Path(path)
    if path.is_dir():
        return read_ct if (path / PNG_GEOMETRY).is_file() or _folder_has_dicom(path) else None
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES) or _looks_like_dicom(path):
        return read_ct
    return None


def axis_ordered(volume: Volume) -> Volume:
    """``volume`` with its array axes (Z, Y, X) running along LPS z, y, x, each in either sense.

    napari slices world axes: when the array axes are stored permuted (a sagittal or coronal acquisition, or the
    neurite-OASIS brains, stored LIA), the displayed plane takes its rows and columns from other axes and vispy's
    transform is singular. Such volumes are reordered with SimpleITK's ``DICOMOrient`` (an exact transpose and
    reversal of axes, no interpolation); every voxel keeps its physical position. Other volumes are returned as is.
    """
    if np.array_equal(np.argmax(np.abs(volume.direction), axis=0), [0, 1, 2]):
        return volume
    import SimpleITK as sitk

    return Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), "LPS"), meta=dict(volume.meta))


def read_ct(path):
    """Read one CT (or other scalar image, or one of our colour images) into a layer; errors reach napari as one-line
    InputError messages."""
    if isinstance(path, list):
        path = path[0]
    image = read_image(path)
    if isinstance(image, ColorVolume):
        return [rgb_layer_data(image)]
    import napari

    install_mouse_controls(napari.current_viewer())  # right-drag window/level and double-click, from the first image
    return [image_layer_data(axis_ordered(image))]
