"""Reading colour volumes back: what `export` writes (RGB NIfTI, RGB DICOM series, PNG slice folder), and RGB
MHA/NRRD, as a `ColorVolume` with its geometry.

NIfTI, MHA/NRRD and DICOM are read by SimpleITK (GDCM sorts a DICOM series by position), whose geometry is the
reference the grey readers are tested against. A PNG folder has no geometry of its own; `write_png_slices` leaves
it in ``geometry.json`` beside the slices (with the display flips it applied), and without that file the in-plane
pixel size comes from the PNGs' pHYs chunk, slices 1 mm apart.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .nifti import ITK_SUFFIXES, NIFTI_SUFFIXES
from .volume import ColorVolume

#: The sidecar `write_png_slices` writes beside the slices.
PNG_GEOMETRY = "geometry.json"
_PNG_SLICE = re.compile(r"slice_(\d+)\.png$", re.IGNORECASE)
_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")


def _png_slices(folder: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PNG_SLICE.match(p.name))]
    return [p for _, p in sorted(found)]


def _first_dicom(folder: Path, max_files: int = 64):
    """The header of the first DICOM image file below ``folder`` (a few files looked at), or None."""
    from .dicom import read_header

    seen = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.suffix.lower() not in _DICOM_SUFFIXES:
                continue
            header = read_header(path)
            if header is not None:
                return header
            seen += 1
            if seen >= max_files:
                return None
    return None


def _itk_components(path: Path) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return 1  # not ours to judge: the grey reader gives the one-line error
    return reader.GetNumberOfComponents()


def is_color(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a colour (RGB) image: cheap, headers only."""
    path = Path(path)
    if path.is_dir():
        if _png_slices(path):
            return True
        header = _first_dicom(path)
        return header is not None and int(header.get("SamplesPerPixel", 1) or 1) == 3
    name = path.name.lower()
    if not path.is_file():
        return False
    if name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
        return _itk_components(path) == 3
    from .dicom import read_header

    header = read_header(path)
    return header is not None and int(header.get("SamplesPerPixel", 1) or 1) == 3


def read_color_volume(path: str | os.PathLike) -> ColorVolume:
    """Read an RGB image (NIfTI, MHA/NRRD, DICOM file or series folder, PNG slice folder) as a `ColorVolume`.

    Raises:
        InputError: not a colour image, or not 8-bit RGB; one line naming the file.
    """
    path = Path(path)
    if path.is_dir() and _png_slices(path):
        return _read_png_folder(path)
    if path.is_dir() or not path.name.lower().endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
        _refuse_unstated_color_space(path)
    try:
        if path.is_dir():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise InputError(f"{path}: no DICOM series SimpleITK can read")
            image = sitk.ReadImage(files)
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        detail = [ln for ln in str(exc).splitlines() if ln.strip()]
        raise InputError(f"{path}: SimpleITK cannot read it ({detail[-1] if detail else 'unknown error'})") from None
    if image.GetNumberOfComponentsPerPixel() != 3 or image.GetDimension() not in (2, 3):
        raise InputError(f"{path}: not an RGB image ({image.GetNumberOfComponentsPerPixel()} components)")
    rgb = sitk.GetArrayFromImage(image)
    if rgb.dtype != np.uint8:
        raise InputError(f"{path}: RGB of type {rgb.dtype}; only 8-bit RGB is read as colour")
    if image.GetDimension() == 2:
        rgb = rgb[np.newaxis]
        spacing = (1.0, *image.GetSpacing()[::-1])
        origin = (*image.GetOrigin(), 0.0)
        direction = np.eye(3)
        direction[:2, :2] = np.asarray(image.GetDirection()).reshape(2, 2)
    else:
        spacing = image.GetSpacing()[::-1]
        origin = image.GetOrigin()
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
    settings = {"source": str(path), "format": _format(path)}
    return ColorVolume(np.ascontiguousarray(rgb), spacing, origin, direction, settings)


def _refuse_unstated_color_space(path: Path) -> None:
    """A DICOM colour image must say how its three samples are coded (RGB, YBR_FULL, ...): without
    PhotometricInterpretation any colours read from it would be a guess."""
    from .dicom import read_header

    header = _first_dicom(path) if path.is_dir() else read_header(path)
    if header is not None and "PhotometricInterpretation" not in header:
        samples = int(header.get("SamplesPerPixel", 1) or 1)
        raise InputError(
            f"{path}: colour DICOM ({samples} samples per pixel, PhotometricInterpretation missing): "
            "its colour space is unknown"
        )


def _format(path: Path) -> str:
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    return "nifti" if name.endswith(NIFTI_SUFFIXES) else name.rsplit(".", 1)[-1] if "." in name else "dicom"


def _read_png_folder(folder: Path) -> ColorVolume:
    from PIL import Image

    paths = _png_slices(folder)
    slices = []
    dpi = None
    for path in paths:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA", "L"):
                raise InputError(f"{path}: PNG mode {im.mode}; expected 8-bit RGB")
            dpi = dpi or im.info.get("dpi")
            slices.append(np.asarray(im.convert("RGB")))
    if len({s.shape for s in slices}) != 1:
        raise InputError(f"{folder}: the PNG slices differ in size")
    rgb = np.stack(slices)
    settings = {"source": str(folder), "format": "png"}
    sidecar = folder / PNG_GEOMETRY
    if sidecar.is_file():
        try:
            geometry = json.loads(sidecar.read_text(encoding="utf-8"))
            flip_y, flip_x = (bool(v) for v in geometry["display_flips"])
            spacing, origin = geometry["spacing"], geometry["origin"]
            direction = np.asarray(geometry["direction"], dtype=np.float64).reshape(3, 3)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{sidecar}: not a geometry file written by napari-ctcolor ({exc})") from None
        if rgb.shape[0] != int(geometry.get("slices", rgb.shape[0])):
            raise InputError(f"{folder}: {rgb.shape[0]} PNG slices, {geometry['slices']} in {PNG_GEOMETRY}")
        rgb = rgb[:, :: -1 if flip_y else 1, :: -1 if flip_x else 1]  # undo the display flips of the writer
        return ColorVolume(np.ascontiguousarray(rgb), spacing, origin, direction, settings)
    pixel = (25.4 / float(dpi[1]), 25.4 / float(dpi[0])) if dpi else (1.0, 1.0)
    return ColorVolume(rgb, (1.0, *pixel), (0.0, 0.0, 0.0), np.eye(3), {**settings, "geometry": "none"})
