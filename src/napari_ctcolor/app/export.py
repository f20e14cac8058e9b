"""Writing a colorized CT as the user asked: RGB NIfTI, a folder of PNG slices, or an RGB DICOM series, de-identified
unless the patient's identity is asked for; a DICOM series may also be stored back into the CT's study on its
DICOMweb server. ``ctcolor colorize`` (and each input of ``ctcolor batch colorize``) and the colorize widget's Export
both run these functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import ColorVolume

#: The export formats, each with what the widget's menu calls it: ``--format``'s values, and every front end's list.
FORMAT_NAMES = {"nifti": "NIfTI RGB (.nii.gz)", "dicom": "DICOM series (folder)", "png": "PNG slices (folder)"}
FORMATS = tuple(FORMAT_NAMES)


@dataclass(frozen=True)
class Identity:
    """Whose DICOM header a colour series copies its patient and study from (``keep``), and the header itself.

    Attributes:
        keep: the series keeps the patient's identity and joins the CT's study; else it is de-identified.
        header: the CT's first DICOM header: a pydicom Dataset (fetched from a DICOMweb server), or the path of
            the read series' first file; None when not kept.
    """

    keep: bool = False
    header: Any = None


def identity_of(meta: dict, keep: bool, fetched: Any = None) -> Identity:
    """The identity a DICOM export of the CT read with ``meta`` keeps, checked before any work.

    Args:
        meta: the CT's `Volume.meta`: ``first_file`` (a DICOM series read from disk) or ``dicomweb`` (read from a
            server).
        keep: whether the user asked to keep the patient's identity.
        fetched: the series' first header when the reader already retrieved it (`read_series` ``with_source``).

    Raises:
        InputError: the identity is asked for but the CT was not read from DICOM.
    """
    if not keep:
        return Identity()
    header = fetched or meta.get("first_file")
    if header is None and meta.get("dicomweb"):
        from ..io.dicomweb import SeriesURL, series_header

        header = series_header(SeriesURL(**meta["dicomweb"]))
    if header is None:
        raise InputError("this CT was not read from DICOM; there is no patient identity to keep")
    return Identity(True, header)


def export_color(
    color: ColorVolume,
    meta: dict,
    path: str | os.PathLike,
    fmt: str,
    identity: Identity | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``colour`` (on the grid of the CT read with ``meta``) to ``path`` in ``fmt``; returns the files written.

    Existing files are replaced only with ``overwrite``. A NIfTI ``path`` names the file; PNG and DICOM a folder.
    """
    from ..io.export import write_png_slices, write_rgb_dicom, write_rgb_nifti

    if fmt == "nifti":
        return [write_rgb_nifti(color, path, overwrite=overwrite)]
    if fmt == "png":
        return write_png_slices(color, path, overwrite=overwrite)
    if fmt != "dicom":
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    keep = identity is not None and identity.keep
    sources = [identity.header] if keep else None
    return write_rgb_dicom(color, path, meta, keep_patient_info=keep, source_datasets=sources, overwrite=overwrite)


def send_color(
    color: ColorVolume, meta: dict, written: list[Path], identity: Identity, fetched: Any = None
) -> tuple[str, int]:
    """Store the DICOM export ``written`` into the study of the DICOMweb series the CT was read from (STOW-RS; the
    sent series always keeps the patient's identity: it joins the patient's own study). Returns (server URL, count).

    ``fetched``: the series' first header when already retrieved (else `send_series` fetches it).
    """
    from ..io.dicomweb import send_series

    header = identity.header if identity.keep and not isinstance(identity.header, str | os.PathLike) else fetched
    return send_series(color, meta, header, files=written if identity.keep else None)
