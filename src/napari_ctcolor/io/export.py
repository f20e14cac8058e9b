"""Writers for `ColorVolume`: NIfTI-1 RGB24, a folder of PNG slices, an RGB DICOM series; and a grey DICOM series
(`write_grey_dicom`, a registered CT in HU).

All writers are atomic per file (`atomic_path`: a temporary file renamed into place) and refuse to replace existing
files unless ``overwrite=True``, so a mistyped output path never destroys data.

Example (the shared abdomen series, colorized)::

    ct = read_volume("../shared/data/ct/totalseg-abdomen-dicom")
    colour = colorize(ct, window="abdomen")
    write_rgb_nifti(colour, "abdomen-colour.nii.gz")      # ITK-SNAP / 3D Slicer open it as a colour volume
    write_png_slices(colour, "abdomen-colour-png")         # slice_0000.png ... slice_0019.png
    write_rgb_dicom(colour, "abdomen-colour-dicom", source_meta=ct.meta)
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..errors import InputError
from .nifti import nifti_affine
from .volume import ColorVolume, Volume
from .write import atomic_path, new_folder, save_nifti

__all__ = ["DICOM_MODALITY", "write_grey_dicom", "write_png_slices", "write_rgb_dicom", "write_rgb_nifti"]

# NIfTI-1 datatype 128 (DT_RGB24): one voxel = three uint8 samples R, G, B.
RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])

# Modality of the RGB DICOM series. "OT" (other), as for most Secondary Capture, not the source's "CT": the pixels are
# a rendering, not CT numbers, and CT-only tools (HU measurement, dose, our own reader's "CT series first" rule when
# the output sits beside the source) must not mistake it for the acquisition. The source modality is named in
# DerivationDescription.
DICOM_MODALITY = "OT"

# DICOM PS3.15 Annex E: Basic Application Level Confidentiality Profile, as coded in PS3.16 CID 7050.
_DEID_METHOD = "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile"
_DEID_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
# Attributes copied from the source only with keep_patient_info=True (Patient, General Study, institution). The
# Type 2 ones among them are written empty otherwise (the profile's "Z" action).
_PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "InstitutionName",
    "FrameOfReferenceUID",
)
_TYPE2_EMPTY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    """Raise before writing anything when any of ``paths`` exists and ``overwrite`` is False."""
    if overwrite:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise InputError(f"{existing[0]}: already exists{more}; choose another output or allow overwriting")


def _slice_paths(folder: Path, n_slices: int, suffix: str) -> list[Path]:
    digits = max(4, len(str(n_slices - 1)))
    return [folder / f"slice_{k:0{digits}d}{suffix}" for k in range(n_slices)]


def _prepare_folder(folder: Path, paths: list[Path], suffix: str, overwrite: bool) -> None:
    """Check ``folder`` (its parent must exist), refuse existing slices, and with ``overwrite`` remove stale
    ``slice_*`` files of an earlier, longer stack so the folder never mixes two volumes. The writers create the
    folder through `new_folder`."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder")
    if not folder.parent.exists():
        raise InputError(f"{folder}: parent folder {folder.parent} does not exist")
    _refuse_existing(paths, overwrite)
    if not folder.is_dir():
        return
    keep = set(paths)
    for stale in folder.glob(f"slice_*{suffix}"):
        if stale not in keep:
            stale.unlink()


def write_rgb_nifti(cv: ColorVolume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a ColorVolume as NIfTI-1 RGB24 (datatype 128): ITK-SNAP, 3D Slicer and SimpleITK read it as colour.

    The affine (qform and sform, code 1 "scanner") is exactly what `write_nifti` writes for the source volume:
    index (i, j, k) -> RAS mm, the LPS geometry with the first two axes negated.

    Args:
        cv: rgb uint8 (Z, Y, X, 3) with its geometry.
        path: ``.nii`` or ``.nii.gz``.
        overwrite: replace an existing file.

    Returns:
        ``path``.
    """
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise InputError(f"{path}: an RGB NIfTI needs a .nii or .nii.gz name")
    _refuse_existing([path], overwrite)
    affine = nifti_affine(cv.affine)
    # NIfTI stores (i, j, k) = (X, Y, Z) with i fastest, which is the memory order of our C-ordered (Z, Y, X, 3):
    # each voxel's three bytes become one RGB24 record and the transpose is a Fortran-ordered view, written as it
    # lies in memory (a transposed copy cost 2.5 s for 282 slices of 512², five times the compression).
    voxels = np.ascontiguousarray(cv.rgb).view(RGB24)[..., 0].T
    img = nib.Nifti1Image(voxels, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = _description(cv)[:79].encode("ascii", "replace")
    return save_nifti(img, path)


def write_png_slices(cv: ColorVolume, folder: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Write one 8-bit RGB PNG per slice: ``folder/slice_0000.png`` ... in array (Z) order.

    Slices are shown as a radiologist reads an axial image: patient right on the image's left, anterior at the top.
    In LPS that is +x to the right and +y downwards, so an in-plane axis whose direction points the other way (e.g.
    a NIfTI stored RAS) is flipped. The in-plane pixel size is recorded in the PNG
    pHYs chunk (as dpi); PNG has no slice position, so the geometry (and the flips) go into ``geometry.json`` beside
    the slices, from which `read_color_volume` restores the volume exactly.

    Args:
        cv: rgb uint8 (Z, Y, X, 3).
        folder: created if missing (its parent must exist).
        overwrite: replace existing ``slice_*.png`` files (stale ones beyond this volume's slices are removed).

    Returns:
        The written slice files (``geometry.json`` is written too).
    """
    from PIL import Image

    from .color_read import PNG_GEOMETRY

    folder = Path(folder)
    _refuse_existing([folder / PNG_GEOMETRY], overwrite)
    _prepare_folder(folder, _slice_paths(folder, cv.rgb.shape[0], ".png"), ".png", overwrite)
    dpi = (25.4 / cv.spacing[2], 25.4 / cv.spacing[1])  # pixels per inch along x, y
    # Index axis i (columns) and j (rows): flip where the dominant LPS component of the axis direction is negative.
    flip_x = bool(cv.direction[np.argmax(np.abs(cv.direction[:, 0])), 0] < 0)
    flip_y = bool(cv.direction[np.argmax(np.abs(cv.direction[:, 1])), 1] < 0)
    view = cv.rgb[:, :: -1 if flip_y else 1, :: -1 if flip_x else 1]
    geometry = {
        "written_by": "napari-ctcolor",
        "slices": cv.rgb.shape[0],
        "spacing": list(cv.spacing),
        "origin": list(cv.origin),
        "direction": cv.direction.flatten().tolist(),
        "display_flips": [flip_y, flip_x],
        "note": "LPS mm of the array before the display flips (rows, columns) applied to every PNG",
    }
    with new_folder(folder) as target:
        for k, path in enumerate(_slice_paths(target, cv.rgb.shape[0], ".png")):
            with atomic_path(path) as tmp:
                Image.fromarray(np.ascontiguousarray(view[k])).save(tmp, format="PNG", dpi=dpi)
        with atomic_path(target / PNG_GEOMETRY) as tmp:
            Path(tmp).write_text(json.dumps(geometry, indent=1), encoding="utf-8")
    return _slice_paths(folder, cv.rgb.shape[0], ".png")


def write_rgb_dicom(
    cv: ColorVolume,
    folder: str | os.PathLike,
    source_meta: Mapping[str, Any] | None = None,
    keep_patient_info: bool = False,
    source_datasets: Sequence[Any] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write an RGB DICOM series: Secondary Capture Image Storage, one file per slice (``slice_0000.dcm`` ...).

    Each file carries the source's geometry as Image Plane attributes (ImagePositionPatient of its slice,
    ImageOrientationPatient from the direction, PixelSpacing, SliceThickness, SpacingBetweenSlices), RGB pixels
    (SamplesPerPixel 3, PlanarConfiguration 0, 8 bits), a new SeriesInstanceUID and Modality `DICOM_MODALITY`
    ("OT"). Explicit VR little endian, uncompressed.

    De-identified by default (DICOM PS3.15 basic profile): the Type 2 patient and study attributes (PatientName,
    PatientID, PatientBirthDate, PatientSex, StudyDate, StudyTime, ...) are present but empty, as the profile's "Z"
    action and the IOD require; no institution, no series/content dates; new Study, Series, SOP Instance and Frame of
    Reference UIDs; PatientIdentityRemoved "YES".

    Args:
        cv: rgb uint8 (Z, Y, X, 3) with its geometry.
        folder: output folder, created if missing (its parent must exist).
        source_meta: the source `Volume.meta` (series description and modality, for the description only).
        keep_patient_info: copy patient, study and institution attributes, StudyInstanceUID and FrameOfReferenceUID
            from the first of ``source_datasets``, so the series joins the source's study and frame of reference.
        source_datasets: pydicom Datasets or DICOM file paths of the source series; only the first is read.
        overwrite: replace existing ``slice_*.dcm`` files (stale ones beyond this volume's slices are removed).

    Returns:
        The written files, in slice order.
    """
    meta = dict(source_meta or {})
    series = _series_dataset(
        cv,
        meta,
        keep_patient_info,
        source_datasets,
        modality=DICOM_MODALITY,
        derivation=_description(cv, str(meta.get("modality") or "CT")),
        suffix="colorized",
    )
    series.SamplesPerPixel = 3
    series.PhotometricInterpretation = "RGB"
    series.PlanarConfiguration = 0  # R, G, B interleaved per pixel
    series.BitsAllocated, series.BitsStored, series.HighBit = 8, 8, 7
    series.PixelRepresentation = 0
    return _write_series(series, cv, folder, lambda k: np.ascontiguousarray(cv.rgb[k]).tobytes(), "OB", overwrite)


def write_grey_dicom(
    volume: Volume,
    folder: str | os.PathLike,
    source_meta: Mapping[str, Any] | None = None,
    keep_patient_info: bool = False,
    source_datasets: Sequence[Any] | None = None,
    overwrite: bool = False,
    derivation: str = "registered (napari-ctcolor)",
    suffix: str = "registered",
) -> list[Path]:
    """Write a grey volume in HU (a registered CT) as a DICOM series, as `write_rgb_dicom` writes colour.

    Secondary Capture Image Storage with the source's modality, MONOCHROME2 signed 16-bit values rounded to whole HU
    (RescaleSlope 1, RescaleIntercept 0, RescaleType "HU") and the source's display window, so a PACS viewer windows
    it as the CT it came from. Identity, geometry and UIDs as in `write_rgb_dicom`.

    Args:
        volume: values in HU with their geometry.
        derivation: DerivationDescription (how the image was made).
        suffix: appended to the source's SeriesDescription ("<description> <suffix>").
        Others: as `write_rgb_dicom`.
    """
    meta = dict(source_meta or {})
    modality = str(meta.get("modality") or "CT")
    series = _series_dataset(
        volume, meta, keep_patient_info, source_datasets, modality=modality, derivation=derivation, suffix=suffix
    )
    series.SamplesPerPixel = 1
    series.PhotometricInterpretation = "MONOCHROME2"
    series.BitsAllocated, series.BitsStored, series.HighBit = 16, 16, 15
    series.PixelRepresentation = 1
    series.RescaleIntercept, series.RescaleSlope, series.RescaleType = "0", "1", "HU"
    if meta.get("window"):
        centre, width = meta["window"]
        series.WindowCenter, series.WindowWidth = _ds([centre])[0], _ds([width])[0]
    info = np.iinfo(np.int16)
    values = np.clip(np.rint(np.asarray(volume.array, dtype=np.float64)), info.min, info.max).astype("<i2")
    return _write_series(series, volume, folder, lambda k: np.ascontiguousarray(values[k]).tobytes(), "OW", overwrite)


def _series_dataset(
    image: Volume | ColorVolume,
    meta: Mapping[str, Any],
    keep_patient_info: bool,
    source_datasets: Sequence[Any] | None,
    modality: str,
    derivation: str,
    suffix: str,
):
    """The attributes every slice of a written series shares: SOP class, identity (kept or removed), UIDs, Image
    Plane geometry; the pixel module is the caller's."""
    from pydicom.dataset import Dataset
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    from .. import __version__

    source = _first_source(source_datasets) if keep_patient_info else None
    series = Dataset()
    series.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: copied names keep their characters
    series.SOPClassUID = SecondaryCaptureImageStorage
    series.Modality = modality
    series.ConversionType = "WSD"  # workstation
    series.Manufacturer = "napari-ctcolor"
    series.SecondaryCaptureDeviceManufacturer = "napari-ctcolor"
    series.SecondaryCaptureDeviceSoftwareVersions = __version__
    series.ImageType = ["DERIVED", "SECONDARY"]
    series.DerivationDescription = derivation[:1024]
    # Free text can identify the patient (PS3.15 basic profile removes SeriesDescription): copied only on request.
    described = str(meta.get("series_description") or "").strip() if keep_patient_info else ""
    series.SeriesDescription = f"{described} {suffix}"[:64] if described else f"{suffix} {meta.get('modality') or 'CT'}"
    series.SeriesInstanceUID = generate_uid()
    series.SeriesNumber = None
    for keyword in _TYPE2_EMPTY:
        setattr(series, keyword, None)
    series.StudyInstanceUID = generate_uid()
    series.FrameOfReferenceUID = generate_uid()
    series.PositionReferenceIndicator = None
    if source is None:
        series.PatientIdentityRemoved = "YES"
        series.DeidentificationMethod = _DEID_METHOD
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = _DEID_CODE
        series.DeidentificationMethodCodeSequence = [code]
    else:
        if "SpecificCharacterSet" in source:
            series.SpecificCharacterSet = source.SpecificCharacterSet  # decodes the copied names correctly
        for keyword in _PATIENT_STUDY_KEYWORDS:
            if keyword in source:
                setattr(series, keyword, source.data_element(keyword).value)
        number = source.get("SeriesNumber")
        series.SeriesNumber = int(number) + 1000 if number not in (None, "") else None
        now = datetime.datetime.now()
        series.SeriesDate = series.ContentDate = now.strftime("%Y%m%d")
        series.SeriesTime = series.ContentTime = now.strftime("%H%M%S")

    # Image Plane: row direction = index i (X), column direction = index j (Y), slices along index k (Z).
    direction = image.direction
    series.ImageOrientationPatient = _ds([*direction[:, 0], *direction[:, 1]])
    series.PatientOrientation = [_orientation_letters(direction[:, 0]), _orientation_letters(direction[:, 1])]
    series.PixelSpacing = _ds([image.spacing[1], image.spacing[2]])  # (between rows, between columns) mm
    series.SliceThickness = _ds([image.spacing[0]])[0]
    series.SpacingBetweenSlices = _ds([image.spacing[0]])[0]
    series.Rows, series.Columns = image.shape[1], image.shape[2]
    series.BurnedInAnnotation = "NO"
    series.LossyImageCompression = "00"
    return series


def _write_series(series, image: Volume | ColorVolume, folder, slice_bytes, vr: str, overwrite: bool) -> list[Path]:
    """One file per slice of ``image`` (``slice_0000.dcm`` ...): ``series`` plus the slice's UID, number, position
    and pixels (``slice_bytes(k)``); explicit VR little endian, each file written atomically, a new series into a
    folder that takes its name only when every slice is written (`new_folder`)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    _prepare_folder(folder, _slice_paths(folder, image.shape[0], ".dcm"), ".dcm", overwrite)
    affine = image.affine
    with new_folder(folder) as target:
        for k, path in enumerate(_slice_paths(target, image.shape[0], ".dcm")):
            ds = Dataset()
            ds.update(series)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = _ds(affine[:3, :3] @ (0.0, 0.0, float(k)) + affine[:3, 3])
            pixels = slice_bytes(k)
            ds.PixelData = pixels + b"\0" * (len(pixels) % 2)  # values have even length
            ds["PixelData"].VR = vr
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            with atomic_path(path) as tmp:
                pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    return _slice_paths(folder, image.shape[0], ".dcm")


def _first_source(source_datasets: Sequence[Any] | None):
    """The first source dataset (read from its path, without pixels, when given as a path), or None."""
    if not source_datasets:
        return None
    first = source_datasets[0]
    if isinstance(first, str | os.PathLike):
        import pydicom

        try:
            return pydicom.dcmread(first, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
            raise InputError(f"{first}: not a readable DICOM file ({type(exc).__name__})") from None
    return first


def _ds(values) -> list:
    """Decimal strings within DICOM's 16 characters (as close to the float as that allows)."""
    from pydicom.valuerep import DSfloat

    return [DSfloat(float(v) + 0.0, auto_format=True) for v in values]  # + 0.0 turns -0.0 into 0.0


def _orientation_letters(vector: np.ndarray) -> str:
    """Patient direction of an LPS unit vector, most significant first: (0, 1, 0) -> "P", (0.7, 0, -0.7) -> "LF"."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    order = np.argsort(-np.abs(vector), kind="stable")
    return "".join(letters[i][int(vector[i] > 0)] for i in order if abs(vector[i]) > 1e-3)


def _description(cv: ColorVolume, modality: str = "CT") -> str:
    """One line saying how the colours were made (settings recorded by the engine)."""
    settings = cv.settings
    parts = [f"colorized {modality} (napari-ctcolor); luminance = windowed {modality}"]
    if "window" in settings:
        centre, width = settings["window"]
        parts.append(f"window {centre:g}/{width:g} HU")
    if "model" in settings:
        parts.append(f"model {settings['model']}")
    if "chroma" in settings:
        parts.append(f"chroma {float(settings['chroma']):g}")
    return "; ".join(parts)
