"""Reading DICOM: one file, or a folder holding one or more series (compressed transfer syntaxes included).

Pixels are decoded by pydicom with the pylibjpeg plugins (JPEG 2000, JPEG lossless/baseline) and pydicom's own
RLE decoder. Geometry follows the image plane module (PS3.3 C.7.6.2): slices are ordered by ImagePositionPatient
projected on the slice normal, never by file name or InstanceNumber.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ..errors import InputError
from ..memory import check_memory
from .volume import Volume

log = logging.getLogger(__name__)

AIR_HU = -1024
# Positions closer than this along the normal are the same slice (mm).
_SAME_POSITION_MM = 1e-3
# Relative deviation from the median slice gap that counts as irregular spacing.
_IRREGULAR_FRACTION = 0.01
# In-plane drift of slice positions (mm) beyond which the stack is tilted (gantry tilt) and not a box.
_TILT_MM = 0.05
# What pydicom raises when a damaged element's raw bytes are converted: values are decoded lazily, on first access, so
# any header read of an untrusted file can raise these (fuzzing found ValueError, TypeError and NotImplementedError).
_DAMAGED = (ValueError, TypeError, KeyError, IndexError, NotImplementedError, OverflowError, struct.error, UnicodeError)


@dataclass
class _Slice:
    path: Path
    header: Dataset


@dataclass
class SeriesInfo:
    """One series found in a folder (headers only, pixels not decoded)."""

    uid: str
    modality: str
    description: str
    slices: list[_Slice] = field(default_factory=list)


def _text(value: object, limit: int = 64) -> str:
    """A header value fit for a one-line message: printable characters only, at most ``limit`` of them."""
    text = "".join(c if c.isprintable() else " " for c in str(value)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _damaged(where: Path, exc: Exception) -> InputError:
    detail = _text(f"{type(exc).__name__}: {exc}".splitlines()[0], 120)
    return InputError(f"{where}: damaged DICOM header ({detail})")


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """Give a file without a file meta header (no (0002,0010), as older archives hold) the transfer syntax its data
    set was read in: implicit VR little endian unless pydicom found otherwise. Its pixels are native then (compressed
    pixels need a transfer syntax to be stored at all). Only the dataset in memory changes, never the file.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return ds
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:  # nothing was read with an encoding: the standard's default
        implicit, little = True, True
    uid = (
        pydicom.uid.ImplicitVRLittleEndian
        if implicit
        else pydicom.uid.ExplicitVRLittleEndian
        if little
        else pydicom.uid.ExplicitVRBigEndian
    )
    if meta is None:
        ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
    meta.TransferSyntaxUID = uid
    return ds


def read_header(path: Path) -> Dataset | None:
    """The dataset of an image DICOM file, pixel data deferred; None for anything that is not one."""
    try:
        ds = _with_transfer_syntax(pydicom.dcmread(path, force=True, defer_size=1024))
        # force=True reads files without the 128-byte preamble, but also "reads" arbitrary bytes: insist on the
        # attributes every image has.
        if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
            return None
        int(ds.Rows), int(ds.Columns)
        # Convert what `scan_folder` reads now: a damaged element raises here, where the file is simply skipped.
        for keyword in ("SeriesInstanceUID", "Modality", "SeriesDescription"):
            str(ds.get(keyword, "") or "")
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a DICOM image here
        return None
    return ds


def scan_folder(folder: Path) -> list[SeriesInfo]:
    """All image series below ``folder`` (recursive), largest first; non-image and non-DICOM files are skipped."""
    series: dict[str, SeriesInfo] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            path = Path(root) / name
            ds = read_header(path)
            if ds is None:
                continue
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            info = series.setdefault(
                uid,
                SeriesInfo(uid, str(ds.get("Modality", "") or ""), str(ds.get("SeriesDescription", "") or "")),
            )
            info.slices.append(_Slice(path, ds))
    # CT first, then the series with the most slices.
    return sorted(series.values(), key=lambda s: (s.modality != "CT", -len(s.slices), s.uid))


def read_dicom_folder(folder: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read the CT series with the most slices in ``folder`` (or the series ``series_uid``) as a Volume in HU."""
    folder = Path(folder)
    found = scan_folder(folder)
    if not found:
        raise InputError(f"{folder}: no DICOM image files found in this folder")
    if series_uid is not None:
        chosen = [s for s in found if s.uid == series_uid]
        if not chosen:
            available = ", ".join(s.uid or "<no UID>" for s in found)
            raise InputError(f"{folder}: no series with UID {series_uid} (available: {available})")
        info = chosen[0]
    else:
        info = found[0]
    if len(found) > 1:
        log.info(
            "%s: %d series found; reading %s (%s, %d slices, %r)",
            folder,
            len(found),
            info.uid or "<no UID>",
            info.modality,
            len(info.slices),
            info.description,
        )
    try:
        volume = _stack_slices(info.slices, folder)
    except _DAMAGED as exc:
        raise _damaged(folder, exc) from None
    volume.meta["series_count"] = len(found)
    return volume


def read_dicom_file(path: str | os.PathLike) -> Volume:
    """Read one DICOM file (with or without the 128-byte preamble) as a Volume of one or more slices."""
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = _with_transfer_syntax(pydicom.dcmread(path, force=True, defer_size=1024))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
            raise InputError(f"{path}: not a readable DICOM file ({type(exc).__name__})") from None
    truncated = any("End of file" in str(w.message) for w in caught)
    try:
        if "PixelData" not in ds:
            _refuse_without_pixels(path, ds, truncated)
        volume = _stack_slices([_Slice(path, ds)], path)
    except _DAMAGED as exc:
        raise _damaged(path, exc) from None
    volume.meta["series_count"] = 1
    return volume


def _refuse_without_pixels(path: Path, ds: Dataset, truncated: bool) -> None:
    """Raise the InputError that says what a DICOM file without pixel data is."""
    modality = _text(ds.get("Modality", "") or "")
    sop_class = ds.get("SOPClassUID") or getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    image_class = "Image Storage" in getattr(sop_class, "name", "") or "ImageType" in ds
    if truncated:
        raise InputError(f"{path}: DICOM file is truncated (it ends inside a data element)")
    if not modality and not sop_class and "Rows" not in ds:
        with open(path, "rb") as f:
            magic = f.read(132)[128:]
        if magic == b"DICM":  # pydicom stops silently where a file ends: the header began, nothing usable follows
            raise InputError(f"{path}: DICOM file is truncated or damaged (no data elements after the file header)")
        raise InputError(f"{path}: not a DICOM file")
    kind = f"a {modality} object" if modality else "a non-image object"
    if image_class or "Rows" in ds:
        # An image's header without its pixels: pydicom stops silently where a file ends, or the pixels were stripped.
        raise InputError(f"{path}: DICOM image has no pixel data ({kind}); the file is truncated or its pixels removed")
    raise InputError(f"{path}: DICOM file has no pixel data ({kind}); open an image series instead")


def _float_list(ds: Dataset, keyword: str, n: int, path: Path) -> list[float]:
    value = ds.get(keyword)
    if value is None:
        raise InputError(f"{path}: DICOM image has no {keyword}; its geometry is unknown")
    try:
        values = [float(v) for v in (value if isinstance(value, pydicom.multival.MultiValue | list) else [value])]
    except (TypeError, ValueError):
        values = []  # text where numbers belong (pydicom keeps invalid DS values as strings)
    if len(values) != n or not all(np.isfinite(values)):
        raise InputError(f"{path}: {keyword} should be {n} finite numbers, got {_text(value)!r}")
    return values


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        value = value[0] if len(value) else None
    return None if value is None else float(value)


def _number(ds: Dataset, keyword: str, path: Path) -> float | None:
    """The first value of a numeric attribute; None when absent; InputError when it is not a finite number."""
    value = ds.get(keyword)
    try:
        number = _first(value)
    except (TypeError, ValueError):
        number = float("nan")
    if number is not None and not np.isfinite(number):
        raise InputError(f"{path}: {keyword} should be a finite number, got {_text(value)!r}")
    return number


def _optional_number(ds: Dataset, keyword: str) -> float | None:
    """Like `_number`, but a damaged optional attribute (a display window) is ignored."""
    try:
        number = _first(ds.get(keyword))
    except (TypeError, ValueError):
        return None
    return number if number is not None and np.isfinite(number) else None


#: Where a slice's plane is read: the image plane module's attributes (PS3.3 C.7.6.2), else the ACR-NEMA attributes
#: DICOM retired for them, Image Position (0020,0030) and Image Orientation (0020,0035), which old files carry instead.
#: GDCM (SimpleITK) reads the retired pair for a file without a SOP class; it ignores them beside one (origin 0, 0, 0).
_POSITION, _ORIENTATION = ("ImagePositionPatient", "ImagePosition"), ("ImageOrientationPatient", "ImageOrientation")
RETIRED_GEOMETRY = "retired ACR-NEMA Image Position (0020,0030) and Image Orientation (0020,0035)"


def _plane(ds: Dataset, keywords: tuple[str, str], n: int, path: Path) -> tuple[list[float] | None, bool]:
    """(values, retired) of the first of ``keywords`` present in ``ds``; (None, False) when neither is."""
    for keyword in keywords:
        if keyword in ds:
            return _float_list(ds, keyword, n, path), keyword != keywords[0]
    return None, False


def _geometry(slices: list[_Slice], where: Path):
    """Sort slices along their normal; return (sorted slices, spacing zyx, origin, direction, geometry notes).

    The notes say where the geometry came from when it is not the image plane module: ``geometry_source`` (the
    retired ACR-NEMA attributes), ``position_known`` False (no position at all: a single slice placed at 0, 0, 0).
    """
    first = slices[0].header
    iop, retired = _plane(first, _ORIENTATION, 6, slices[0].path)
    if iop is None:
        if len(slices) > 1:
            raise InputError(f"{where}: slices have no ImageOrientationPatient; cannot order them in space")
        iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    row, col = np.array(iop[:3]), np.array(iop[3:])
    if min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-6:
        raise InputError(f"{slices[0].path}: ImageOrientationPatient has a zero-length direction: {iop}")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    for s in slices[1:]:
        other, _ = _plane(s.header, _ORIENTATION, 6, s.path)
        if other is None or not np.allclose(other, iop, atol=1e-4):
            raise InputError(f"{where}: slices have inconsistent ImageOrientationPatient; not one image stack")

    pixel_spacing = _float_list(first, "PixelSpacing", 2, slices[0].path) if "PixelSpacing" in first else [1.0, 1.0]
    if min(pixel_spacing) <= 0:
        raise InputError(f"{slices[0].path}: PixelSpacing should be two positive numbers (mm), got {pixel_spacing}")
    planes = [_plane(s.header, _POSITION, 3, s.path) for s in slices]
    notes: dict = {"geometry_source": RETIRED_GEOMETRY} if retired or any(old for _, old in planes) else {}
    if len(slices) == 1:
        position = planes[0][0]
        if position is None:
            notes["position_known"] = False
        # Only a display hint for one slice: a damaged value falls back to 1 mm.
        dz = _optional_number(first, "SpacingBetweenSlices") or _optional_number(first, "SliceThickness") or 1.0
        origin = tuple(np.zeros(3) if position is None else np.array(position))
        return slices, (abs(dz), *pixel_spacing), origin, np.column_stack([row, col, normal]), notes

    for s, (position, _) in zip(slices, planes, strict=True):
        if position is None:  # the same line as `_float_list`'s for a missing attribute
            raise InputError(f"{s.path}: DICOM image has no {_POSITION[0]}; its geometry is unknown")
    positions = np.array([position for position, _ in planes])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    positions, along = positions[order], along[order]
    gaps = np.diff(along)
    if np.any(gaps < _SAME_POSITION_MM):
        n_dup = int(np.sum(gaps < _SAME_POSITION_MM))
        raise InputError(
            f"{where}: {n_dup} slice(s) share a position; the folder mixes acquisitions (pick one with --series)"
        )
    drift = positions - positions[0] - np.outer(along - along[0], normal)
    if np.max(np.linalg.norm(drift, axis=1)) > _TILT_MM:
        raise InputError(
            f"{where}: slice positions are not along the slice normal (gantry tilt); tilted stacks are not supported"
        )
    dz = float(np.median(gaps))
    if np.max(np.abs(gaps - dz)) > _IRREGULAR_FRACTION * dz:
        missing = int(np.sum((np.round(gaps / dz) - 1).clip(0)))
        notes |= {
            "irregular_spacing": True,
            "missing_slices": missing,
            "slice_gaps_mm": [round(float(g), 4) for g in gaps],
        }
        warnings.warn(
            f"{where}: irregular slice spacing (gaps {gaps.min():.3f}..{gaps.max():.3f} mm, about {missing} missing "
            f"slice(s)); the volume uses the median gap {dz:.3f} mm, so positions along z are approximate",
            stacklevel=3,
        )
    return slices, (dz, *pixel_spacing), tuple(positions[0]), np.column_stack([row, col, normal]), notes


def _decode(s: _Slice) -> np.ndarray:
    # Type 1, yet old CT files often omit them. For one sample per pixel (a missing SamplesPerPixel reads as one,
    # checked before decoding) GDCM and SimpleITK read such a file as MONOCHROME2, and so do we: set in memory only,
    # the file is never changed.
    if "SamplesPerPixel" not in s.header:
        s.header.SamplesPerPixel = 1
    if "PhotometricInterpretation" not in s.header:
        s.header.PhotometricInterpretation = "MONOCHROME2"
    try:
        raw = s.header.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing codec, truncated or corrupt pixel data
        # pydicom lists each decoder plugin's complaint on its own line: keep them all, on one line, without the
        # object reprs ("<_io.BytesIO object at 0x7f...>") that would make the message differ from run to run.
        detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        detail = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", detail).replace(":; ", ": ")
        detail = _text(f"{type(exc).__name__}: {detail}", 240)
        raise InputError(f"{s.path}: cannot decode pixel data ({detail})") from None
    return raw


_INT16 = np.iinfo(np.int16)


def _rescale(ds: Dataset, path: Path) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of a slice or a frame's Pixel Value Transformation item; (1, 0) if absent."""
    return _number(ds, "RescaleSlope", path) or 1.0, _number(ds, "RescaleIntercept", path) or 0.0


def _to_hu(
    stored: Iterable[np.ndarray], rescale: list[tuple[float, float]], header: Dataset, shape: tuple[int, int], where
) -> tuple[np.ndarray, int]:
    """(Z, Y, X) values of the slices' ``stored`` pixels under each one's ``rescale``, and the number of padding
    voxels (``header``'s PixelPaddingValue and range limit), which become air: the series' and the multi-frame path's
    one conversion. Integral rescaling goes straight into int16 (CT's stored range fits it), widened to int32 only
    when a slice does not fit: 2 bytes per voxel, where an int32 volume and its int16 copy took 6 (float32: 4)."""
    integral = all(float(m).is_integer() and float(b).is_integer() for m, b in rescale)
    check_memory(len(rescale) * shape[0] * shape[1] * (2 if integral else 4), where)
    out = np.empty((len(rescale), *shape), dtype=np.float32 if not integral else np.int16)
    padding, padding_limit = header.get("PixelPaddingValue"), header.get("PixelPaddingRangeLimit")
    air = AIR_HU if str(header.get("Modality", "") or "") == "CT" else 0
    padded_voxels = 0
    for z, (raw, (slope, intercept)) in enumerate(zip(stored, rescale, strict=True)):
        if integral:
            values = raw.astype(np.int32)
            values *= int(slope)
            values += int(intercept)
            if out.dtype == np.int16 and not _INT16.min <= values.min() <= values.max() <= _INT16.max:
                check_memory(len(rescale) * shape[0] * shape[1] * 4, where)
                out = out.astype(np.int32)
            out[z] = values
        else:
            out[z] = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        if padding is not None:
            lo, hi = sorted((int(padding), int(padding if padding_limit is None else padding_limit)))
            mask = (raw >= lo) & (raw <= hi)
            padded_voxels += int(mask.sum())
            out[z][mask] = air  # padding marks voxels outside the reconstructed field of view: air, not -3000 HU
    return out, padded_voxels


def _stack_slices(slices: list[_Slice], where: Path) -> Volume:
    first = slices[0].header
    samples = int(first.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        unstated = "" if "PhotometricInterpretation" in first else ", PhotometricInterpretation missing"
        raise InputError(
            f"{where}: colour DICOM ({samples} samples per pixel{unstated}) cannot be read as a grey volume"
        )
    frames = int(first.get("NumberOfFrames", 1) or 1)
    if frames > 1 and len(slices) > 1:
        raise InputError(f"{where}: a series of multi-frame files is not supported; open one file")
    missing = [k for k in ("Rows", "Columns") if k not in first]
    if missing:  # force=True parses damaged headers as far as it can: pixel data may come without its size
        raise InputError(f"{slices[0].path}: DICOM pixel data without {' and '.join(missing)}; damaged header")
    rows, cols = int(first.Rows), int(first.Columns)
    for s in slices:
        if (int(s.header.Rows), int(s.header.Columns)) != (rows, cols):
            raise InputError(
                f"{where}: slices differ in size ({rows}x{cols} vs {s.header.Rows}x{s.header.Columns}); not one stack"
            )
    if frames > 1:
        bits = int(first.get("BitsAllocated", 16) or 16)
        check_memory(frames * rows * cols * max(4, bits // 8), where)  # before SimpleITK allocates the frames
        _check_native_length(first, frames * rows * cols * samples * bits // 8, where)
        return _multiframe(slices[0], where)

    slices, spacing, origin, direction, notes = _geometry(slices, where)
    rescale = [_rescale(s.header, s.path) for s in slices]

    def stored() -> Iterator[np.ndarray]:
        for s in slices:
            raw = _decode(s)
            if raw.shape != (rows, cols):
                raise InputError(f"{s.path}: decoded pixels have shape {raw.shape}, header says {rows}x{cols}")
            s.header = None  # drop the decoded pixels as we go: peak memory stays near the output array
            yield raw

    out, padded_voxels = _to_hu(stored(), rescale, first, (rows, cols), where)
    meta = _meta(first, where)
    meta.update(notes)
    meta["first_file"] = str(slices[0].path)  # the series' own file, for exports that keep patient information
    if padded_voxels:
        meta["padded_voxels"] = padded_voxels
    return Volume(out, spacing=spacing, origin=origin, direction=direction, meta=meta)


def _check_native_length(ds: Dataset, expected: int, where: Path) -> None:
    """Refuse uncompressed pixel data shorter than the header's size (a header claiming far more than is stored)."""
    element = ds.get_item("PixelData")
    length = getattr(element, "length", None)
    if length is not None and length != 0xFFFFFFFF and length < expected:  # undefined length: encapsulated frames
        raise InputError(f"{where}: pixel data holds {length} bytes, the header describes {expected}; truncated file")


def _multiframe(s: _Slice, where: Path) -> Volume:
    """Multi-frame (enhanced) images: the geometry as SimpleITK/GDCM reads it from the functional groups (the header
    only), the values from the stored frames under each frame's own Pixel Value Transformation, padding made air, as
    for a series (`_to_hu`). GDCM applies one rescale to every frame; an Enhanced CT may give each frame its own."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(s.path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{where}: cannot read multi-frame DICOM ({str(exc).splitlines()[-1]})") from None
    ds = s.header
    stored = _decode(s)
    size = reader.GetSize()
    if stored.shape[::-1] != tuple(size):
        raise InputError(f"{where}: decoded frames have shape {stored.shape}, the header describes {size[::-1]}")
    # GDCM's header reading states frames stored against the normal as a negative spacing; reading the pixels, ITK
    # turns that into a flipped direction column, which this does too.
    signs = np.sign(reader.GetSpacing())
    spacing, origin = tuple(np.abs(reader.GetSpacing())[::-1]), reader.GetOrigin()
    direction = np.asarray(reader.GetDirection()).reshape(3, 3) * np.where(signs == 0, 1.0, signs)
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    _check_frame_positions(per_frame, origin, direction[:, 2] * spacing[0], where)
    rescale = [_frame_rescale(ds, per_frame[k] if k < len(per_frame) else None, s.path) for k in range(len(stored))]
    array, padded_voxels = _to_hu(iter(stored), rescale, ds, stored.shape[1:], where)
    meta = _meta(ds, where)
    if padded_voxels:
        meta["padded_voxels"] = padded_voxels
    return Volume(array, spacing=spacing, origin=origin, direction=direction, meta=meta)


def _frame_rescale(ds: Dataset, frame: Dataset | None, path: Path) -> tuple[float, float]:
    """A frame's (slope, intercept): its own Pixel Value Transformation item, else the shared one, else the
    top-level attributes (a multi-frame file of an older kind), else (1, 0)."""
    shared = list(ds.get("SharedFunctionalGroupsSequence") or [])
    for group in (frame, shared[0] if shared else None):
        items = list(group.get("PixelValueTransformationSequence") or []) if group is not None else []
        if items:
            return _rescale(items[0], path)
    return _rescale(ds, path)


def _check_frame_positions(per_frame: list[Dataset], origin, step: np.ndarray, where: Path) -> None:
    """Refuse an Enhanced image whose frames' Image Position (Patient) do not lie where GDCM's grid puts frame k
    (origin + k x step, file order): frames stored out of order, or unevenly spaced, would be read misplaced. Frames
    without a position say nothing."""
    for k, frame in enumerate(per_frame):
        items = list(frame.get("PlanePositionSequence") or [])
        if not items or "ImagePositionPatient" not in items[0]:
            return
        position = np.asarray(_float_list(items[0], "ImagePositionPatient", 3, where))
        gap = float(np.linalg.norm(position - (np.asarray(origin) + k * step)))
        if gap > max(_SAME_POSITION_MM, _IRREGULAR_FRACTION * float(np.linalg.norm(step))):
            raise InputError(
                f"{where}: frame {k + 1} lies {gap:.2f} mm from where an evenly spaced stack of the file's frames "
                "puts it; frames out of order or unevenly spaced are not supported"
            )


def _meta(ds: Dataset, where: Path) -> dict:
    """What the rest of the program needs to know; no patient identifiers."""
    windows = _windows(ds)
    meta = {
        "source": str(where),
        "format": "dicom",
        # Header text reaches messages and layer names: printable characters only.
        "modality": _text(ds.get("Modality", "") or "") or "OT",
        "series_uid": _text(ds.get("SeriesInstanceUID", "") or "", 128),
        "series_description": _text(ds.get("SeriesDescription", "") or "", 128),
        "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""),
    }
    if windows:  # the first is the default; a header may offer more (e.g. 40/300 and 300/1500)
        meta["window"] = windows[0]
        if len(windows) > 1:
            meta["windows"] = windows
    agent = _contrast(ds)
    if agent:
        meta["contrast"] = agent
    return meta


def _frame_groups(ds: Dataset) -> list[Dataset]:
    """The functional groups of a multi-frame (enhanced) image: the shared item, then each frame's; [] otherwise."""
    groups = []
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        with contextlib.suppress(*_DAMAGED):  # optional here: a damaged sequence only loses its windows
            groups += list(ds.get(keyword) or [])
    return groups


def _contrast(ds: Dataset) -> str:
    """What the header says of contrast, or "" when it says none was given: Contrast/Bolus Agent (0018,0010) (its
    name, or e.g. "APPLIED"), else an enhanced image's Contrast/Bolus Agent Sequence (0018,0012) or a frame's
    Contrast/Bolus Usage (0018,9341) with the agent administered."""
    agent = _text(ds.get("ContrastBolusAgent", "") or "", 64)
    if agent:
        return agent
    with contextlib.suppress(*_DAMAGED):
        for item in ds.get("ContrastBolusAgentSequence") or []:
            return _text(item.get("CodeMeaning", "") or "", 64) or "APPLIED"
        for group in _frame_groups(ds):
            for usage in group.get("ContrastBolusUsageSequence") or []:
                if str(usage.get("ContrastBolusAgentAdministered", "") or "").upper() == "YES":
                    return "APPLIED"
    return ""


def _windows(ds: Dataset) -> list[tuple[float, float]]:
    """Every (WindowCenter, WindowWidth) pair of the header with a finite centre and a positive width, in order; a
    damaged pair (an optional attribute) is left out. An enhanced image keeps them in its functional groups (Frame
    VOI LUT, (0028,9132)): the shared group's, then each frame's not seen before."""
    sources = [ds] if "WindowCenter" in ds else [item for group in _frame_groups(ds) for item in _voi(group)]
    pairs: list[tuple[float, float]] = []
    for source in sources:
        pairs += [pair for pair in _window_pairs(source) if pair not in pairs]
    return pairs


def _voi(group: Dataset) -> list[Dataset]:
    with contextlib.suppress(*_DAMAGED):
        return list(group.get("FrameVOILUTSequence") or [])
    return []


def _window_pairs(ds: Dataset) -> list[tuple[float, float]]:
    def values(keyword: str) -> list:
        try:
            value = ds.get(keyword)
        except _DAMAGED:
            return []
        if value is None or value == "":
            return []
        return list(value) if isinstance(value, pydicom.multival.MultiValue | list | tuple) else [value]

    pairs = []
    for centre, width in zip(values("WindowCenter"), values("WindowWidth"), strict=False):
        try:
            centre, width = float(centre), float(width)
        except (TypeError, ValueError):
            continue
        if np.isfinite(centre) and np.isfinite(width) and width > 0:
            pairs.append((centre, width))
    return pairs
