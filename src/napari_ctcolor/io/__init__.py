"""Input and output: the `Volume` type, its readers (DICOM, NIfTI, MHA/NRRD) and writers; errors: `errors`."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from .color_read import is_color, read_color_volume
from .dicom import read_dicom_file, read_dicom_folder
from .dicomweb import is_series_url
from .nifti import ITK_SUFFIXES, NIFTI_SUFFIXES, read_itk, read_nifti, write_nifti, write_vector_nifti
from .volume import ColorVolume, Volume

__all__ = [
    "ColorVolume",
    "Volume",
    "read_volume",
    "read_image",
    "read_color_volume",
    "write_nifti",
    "write_vector_nifti",
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
]


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read a CT (or other scalar image) from a DICOM folder or file, NIfTI, MHA/MHD or NRRD.

    Args:
        path: a folder of DICOM files (the CT series with the most slices is read, or ``series_uid``), a DICOM
            file (any or no extension), ``.nii``/``.nii.gz``, ``.mha``/``.mhd``, ``.nrrd``/``.nhdr``, or a DICOMweb
            series URL ``ROOT/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>`` (`io.dicomweb`).
        series_uid: SeriesInstanceUID to pick in a folder with several series.

    Returns:
        A Volume, HU for CT; ``meta`` records modality, source, window and geometry notes.

    Raises:
        InputError: with a one-line message naming the file and the problem.
    """
    if is_series_url(path):  # DICOMweb: the same folder reader, on the series' instances retrieved as stored
        from .dicomweb import read_series

        return read_series(path, series_uid)
    path = Path(path)
    try:
        return _read_volume(path, series_uid)
    except InputError as exc:
        # The contract, whatever the reader below: one printable line that names the file.
        message = " ".join("".join(c if c.isprintable() else " " for c in str(exc)).split())
        message = message if str(path) in message else f"{path}: {message}"
        if message == str(exc):
            raise
        raise InputError(message) from None
    except OSError as exc:  # permissions, a file vanishing while read: the user can fix these
        raise InputError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None


def read_image(path: str | os.PathLike, series_uid: str | None = None) -> Volume | ColorVolume:
    """`read_volume`, or `read_color_volume` for an RGB image (what `ctcolor colorize` writes, in any of its formats).

    Raises:
        InputError: with a one-line message naming the file and the problem.
    """
    if is_series_url(path):
        from .dicomweb import read_series_image

        return read_series_image(path, series_uid)
    if series_uid is None and Path(path).exists() and is_color(path):
        try:
            return read_color_volume(path)
        except OSError as exc:
            raise InputError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    return read_volume(path, series_uid)


def _read_volume(path: Path, series_uid: str | None) -> Volume:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return read_dicom_folder(path, series_uid)
    if series_uid is not None:
        raise InputError(f"{path}: --series applies to DICOM folders only")
    name = path.name.lower()
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    if name.endswith(NIFTI_SUFFIXES):
        return read_nifti(path)
    if name.endswith(ITK_SUFFIXES):
        return read_itk(path)
    return read_dicom_file(path)
