"""The bad-input corpus of issue 7: files and folders every reader and `ctcolor` command must refuse cleanly.

Run as a script to write the corpus somewhere and list it::

    python tests/make_bad_inputs.py /tmp/corpus [--shared ../shared/data]

The tests (`test_bad_inputs.py`) build the same corpus into a session tmp folder with `make_corpus`. Cases made from
the real shared CT are left out when ``../shared/data`` is absent; the synthetic ones are always made. The small valid
files (`synthetic_ct_slice`, `nifti_bytes`) also seed the fuzz tests.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.22"


@dataclass(frozen=True)
class Case:
    """One bad input and what the program must say about it.

    Attributes:
        name: short identifier (the pytest id).
        inputs: the path given to ``info``/``colorize``; for registration cases (FIXED, MOVING).
        problem: regex (case-insensitive) the one-line error must match, besides naming ``culprit``.
        culprit: the path the error must name (the input itself; MOVING for most registration cases).
        info_reads: the input is a valid image (an MR slice) that ``info`` reads and ``colorize`` refuses.
        color_reads: a valid colour image that ``info`` and the napari reader read as RGB; ``colorize`` and
            ``register`` refuse it (they need HU).
        register: a registration case: ``ctcolor register FIXED MOVING`` must refuse it (``info`` reads each).
    """

    name: str
    inputs: tuple[Path, ...]
    problem: str
    culprit: Path
    info_reads: bool = False
    color_reads: bool = False
    register: bool = False


# --- small valid inputs ---------------------------------------------------------------------------------------------


def synthetic_ct_slice(
    rows: int = 32,
    cols: int = 32,
    z_mm: float = 0.0,
    modality: str = "CT",
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    seed: int = 0,
) -> Dataset:
    """A minimal uncompressed CT image (explicit VR little endian): uint16 stored values, intercept -1024 HU."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.2.{seed}.{int(z_mm * 10) % 100000}"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SeriesDescription = "synthetic"
    ds.ImagePositionPatient = [-12.4, -12.4, z_mm]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 2.0
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = np.random.default_rng(seed).integers(0, 2000, (rows, cols), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    """The DICOM file (preamble, file meta) of ``ds`` as bytes."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def nifti_bytes(
    array: np.ndarray, affine: np.ndarray | None = None, gz: bool = False, header: dict | None = None
) -> bytes:
    """A NIfTI-1 file of ``array`` (nibabel's (X, Y, Z[, T]) order), then raw header fields overwritten.

    The fields in ``header`` are written as given, unchecked (a header bomb keeps its 30000^3 ``dim``). The gzip layer
    has mtime 0, so the bytes are the same on every run (the fuzzer mutates them).
    """
    img = nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.0, 1.0]) if affine is None else affine)
    if affine is not None:
        img.set_sform(affine, code=1)
    raw = img.to_bytes()
    if header:
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
        for key, value in header.items():
            hdr[key] = value
        raw = hdr.binaryblock + raw[len(hdr.binaryblock) :]
    return gzip.compress(raw, mtime=0) if gz else raw


def small_ct_array(shape: tuple[int, int, int] = (16, 16, 16), seed: int = 0) -> np.ndarray:
    """HU-like int16 voxels spanning air to bone, so the NIfTI reader takes them for CT."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1200, shape, dtype=np.int16)
    array.flat[0], array.flat[1] = -1024, 1500
    return array


# --- the corpus -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Maker:
    build: Callable[[Path, Path | None], Case]
    needs_shared: bool


MAKERS: dict[str, _Maker] = {}


def _case(name: str, needs_shared: bool = False):
    """Register a builder ``(root, shared_dicom_file) -> Case`` under ``name`` (its files go in ``root``)."""

    def decorate(build: Callable[[Path, Path | None], Case]) -> Callable[[Path, Path | None], Case]:
        MAKERS[name] = _Maker(build, needs_shared)
        return build

    return decorate


def _one(name: str, path: Path, problem: str, **kwargs) -> Case:
    return Case(name, (path,), problem, path, **kwargs)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# Synthetic DICOM.


@_case("empty_file")
def _(root: Path, _real: Path | None) -> Case:
    return _one("empty_file", _write(root / "empty.dcm", b""), "empty")


@_case("random_bytes_dcm")
def _(root: Path, _real: Path | None) -> Case:
    data = np.random.default_rng(1).bytes(4096)
    return _one("random_bytes_dcm", _write(root / "random.dcm", data), "not a DICOM|not a readable DICOM")


@_case("random_bytes_without_suffix")
def _(root: Path, _real: Path | None) -> Case:
    # No suffix and no "DICM" magic: the napari reader declines it, the CLI tries DICOM and says it is not one.
    path = _write(root / "scan_0001", np.random.default_rng(7).bytes(1500))
    return _one("random_bytes_without_suffix", path, "not a DICOM")


@_case("random_bytes_with_dicm_magic")
def _(root: Path, _real: Path | None) -> Case:
    data = b"\0" * 128 + b"DICM" + np.random.default_rng(2).bytes(2048)
    return _one("random_bytes_with_dicm_magic", _write(root / "magic.dcm", data), "DICOM")


@_case("truncated_synthetic_in_pixels")
def _(root: Path, _real: Path | None) -> Case:
    data = dicom_bytes(synthetic_ct_slice())
    path = _write(root / "synthetic_truncated.dcm", data[: len(data) - 700])
    return _one("truncated_synthetic_in_pixels", path, "truncated|pixel data")


@_case("dicom_header_without_pixel_data_synthetic")
def _(root: Path, _real: Path | None) -> Case:
    ds = synthetic_ct_slice()
    del ds.PixelData
    path = root / "no_pixels_synthetic.dcm"
    ds.save_as(path, enforce_file_format=True)
    return _one("dicom_header_without_pixel_data_synthetic", path, r"no pixel data \(a CT object\)")


def non_image(modality: str, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[modality])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[modality, "series"])
    return ds


@_case("rtstruct")
def _(root: Path, _real: Path | None) -> Case:
    ds = non_image("RTSTRUCT", RTSTRUCT_STORAGE)
    ds.StructureSetLabel = "contours"
    path = root / "rtstruct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return _one("rtstruct", path, r"no pixel data \(a RTSTRUCT object\)")


@_case("structured_report")
def _(root: Path, _real: Path | None) -> Case:
    ds = non_image("SR", SR_STORAGE)
    ds.ValueType = "CONTAINER"
    path = root / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return _one("structured_report", path, r"no pixel data \(a SR object\)")


@_case("folder_of_non_image_dicom")
def _(root: Path, _real: Path | None) -> Case:
    folder = root / "rtstruct_folder"
    folder.mkdir()
    non_image("RTSTRUCT", RTSTRUCT_STORAGE).save_as(folder / "rs.dcm", enforce_file_format=True)
    return _one("folder_of_non_image_dicom", folder, "no DICOM image files")


@_case("folder_with_only_garbage")
def _(root: Path, _real: Path | None) -> Case:
    folder = root / "garbage_folder"
    rng = np.random.default_rng(3)
    _write(folder / "a.dcm", rng.bytes(1000))
    _write(folder / "b", b"\0" * 128 + b"DICM" + rng.bytes(300))
    _write(folder / "notes.txt", b"not an image\n")
    _write(folder / "sub" / "c.dcm", b"")
    return _one("folder_with_only_garbage", folder, "no DICOM image files")


@_case("empty_folder")
def _(root: Path, _real: Path | None) -> Case:
    folder = root / "empty_folder"
    folder.mkdir()
    return _one("empty_folder", folder, "no DICOM image files")


@_case("nonexistent_path")
def _(root: Path, _real: Path | None) -> Case:
    return _one("nonexistent_path", root / "does_not_exist.dcm", "no such file")


@_case("rgb_ultrasound")
def _(root: Path, _real: Path | None) -> Case:
    ds = synthetic_ct_slice(modality="US")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    for keyword in ("RescaleIntercept", "RescaleSlope", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    ds.PixelData = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8).tobytes()
    path = root / "ultrasound_rgb.dcm"
    ds.save_as(path, enforce_file_format=True)
    return _one("rgb_ultrasound", path, "colour DICOM|3 samples per pixel", color_reads=True)


@_case("pixel_data_shorter_than_rows_columns")
def _(root: Path, _real: Path | None) -> Case:
    ds = synthetic_ct_slice()
    ds.PixelData = ds.PixelData[:600]
    path = root / "short_pixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    return _one("pixel_data_shorter_than_rows_columns", path, "pixel data")


@_case("rows_zero")
def _(root: Path, _real: Path | None) -> Case:
    ds = synthetic_ct_slice()
    ds.Rows = 0
    path = root / "rows_zero.dcm"
    ds.save_as(path, enforce_file_format=True)
    return _one("rows_zero", path, "Rows|size|pixel data")


@_case("zero_pixel_spacing")
def _(root: Path, _real: Path | None) -> Case:
    ds = synthetic_ct_slice()
    ds.PixelSpacing = [0, 0]
    path = root / "zero_spacing.dcm"
    ds.save_as(path, enforce_file_format=True)
    return _one("zero_pixel_spacing", path, "spacing")


@_case("non_numeric_position")
def _(root: Path, _real: Path | None) -> Case:
    data = dicom_bytes(synthetic_ct_slice())
    # The DS value "-12.4\-12.4\0.0" (16 bytes) becomes text of the same length: a header no parser can fix.
    value = b"-12.4\\-12.4\\0.0 "
    assert data.count(value) == 1
    path = _write(root / "text_position.dcm", data.replace(value, b"left\\right\\up   "))
    return _one("non_numeric_position", path, "ImagePositionPatient")


@_case("huge_multiframe_header")
def _(root: Path, _real: Path | None) -> Case:
    ds = synthetic_ct_slice()
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 65535  # 65535^3 voxels claimed, 32x32 stored
    path = root / "multiframe_bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    return _one("huge_multiframe_header", path, "GiB|pixel data")


def _series(folder: Path, n: int = 4, edit: Callable[[int, Dataset], None] | None = None) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        ds = synthetic_ct_slice(z_mm=2.0 * i, seed=i)
        if edit is not None:
            edit(i, ds)
        ds.save_as(folder / f"im{i}.dcm", enforce_file_format=True)
    return folder


@_case("series_slices_of_different_sizes")
def _(root: Path, _real: Path | None) -> Case:
    def edit(i: int, ds: Dataset) -> None:
        if i == 2:
            ds.Rows = ds.Columns = 16
            ds.PixelData = ds.PixelData[: 16 * 16 * 2]

    return _one("series_slices_of_different_sizes", _series(root / "mixed_sizes", edit=edit), "differ in size")


@_case("series_slice_without_position")
def _(root: Path, _real: Path | None) -> Case:
    def edit(i: int, ds: Dataset) -> None:
        if i == 1:
            del ds.ImagePositionPatient

    return _one("series_slice_without_position", _series(root / "no_position", edit=edit), "ImagePositionPatient")


# Real DICOM (the shared abdomen series: JPEG 2000, 512 x 512).

# Where a truncated copy of a real file ends: inside the preamble, right after "DICM", inside the file meta, inside
# the dataset header, inside the pixel data element's header, at the start of the codestream, halfway through it, and
# 100 bytes before the end. (Cutting only the last 1-4 bytes loses part of the sequence delimiter but no pixel: such a
# file is read, and is not a case.)
TRUNCATIONS = {
    "preamble": 64,
    "after_magic": 132,
    "file_meta": 190,
    "header": 2000,
    "pixel_tag": 4830,
    "pixel_start": 4880,
}


def _truncated(name: str, cut: int | None):
    @_case(f"truncated_real_{name}", needs_shared=True)
    def build(root: Path, real: Path | None) -> Case:
        data = real.read_bytes()
        end = cut if cut is not None else (len(data) // 2 if name == "half" else len(data) - 100)
        path = _write(root / f"truncated_{name}.dcm", data[:end])
        return _one(f"truncated_real_{name}", path, "truncated|not a DICOM|not a readable DICOM|pixel data|empty")

    return build


for _name, _cut in [*TRUNCATIONS.items(), ("half", None), ("end", None)]:
    _truncated(_name, _cut)


def _real_dataset(real: Path) -> Dataset:
    return pydicom.dcmread(real)


@_case("dicom_header_without_pixel_data_real", needs_shared=True)
def _(root: Path, real: Path | None) -> Case:
    ds = _real_dataset(real)
    del ds.PixelData
    path = root / "real_no_pixels.dcm"
    ds.save_as(path)
    return _one("dicom_header_without_pixel_data_real", path, r"no pixel data \(a CT object\)")


@_case("corrupt_jpeg2000_codestream", needs_shared=True)
def _(root: Path, real: Path | None) -> Case:
    data = bytearray(real.read_bytes())
    start = data.find(b"\xff\x4f\xff\x51")  # J2K SOC + SIZ: the codestream's main header
    assert start > 0, "the shared series is JPEG 2000"
    data[start + 4 : start + 64] = np.random.default_rng(5).bytes(60)  # image size, tiling and components
    path = _write(root / "corrupt_j2k.dcm", bytes(data))
    return _one("corrupt_jpeg2000_codestream", path, "cannot decode pixel data")


@_case("mr_slice_to_colorize", needs_shared=True)
def _(root: Path, real: Path | None) -> Case:
    ds = _real_dataset(real)
    ds.Modality = "MR"
    path = root / "mr_slice.dcm"
    ds.save_as(path)
    return _one("mr_slice_to_colorize", path, "modality is MR, not CT", info_reads=True)


def _real_series(root: Path, real: Path, name: str, edit: Callable[[list[Dataset]], None]) -> Path:
    """Four consecutive slices of the shared series (headers edited, JPEG 2000 pixels kept) in ``root / name``."""
    files = sorted(real.parent.iterdir())[:4]
    datasets = sorted((pydicom.dcmread(p) for p in files), key=lambda d: float(d.ImagePositionPatient[2]))
    edit(datasets)
    folder = root / name
    folder.mkdir()
    for i, ds in enumerate(datasets):
        ds.save_as(folder / f"{i}.dcm")
    return folder


@_case("series_duplicate_positions", needs_shared=True)
def _(root: Path, real: Path | None) -> Case:
    def edit(datasets: list[Dataset]) -> None:
        datasets[2].ImagePositionPatient = copy.deepcopy(datasets[1].ImagePositionPatient)

    return _one("series_duplicate_positions", _real_series(root, real, "duplicates", edit), "share a position")


@_case("series_inconsistent_orientation", needs_shared=True)
def _(root: Path, real: Path | None) -> Case:
    def edit(datasets: list[Dataset]) -> None:
        datasets[2].ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]

    folder = _real_series(root, real, "orientation", edit)
    return _one("series_inconsistent_orientation", folder, "inconsistent ImageOrientationPatient")


@_case("series_gantry_tilt", needs_shared=True)
def _(root: Path, real: Path | None) -> Case:
    def edit(datasets: list[Dataset]) -> None:
        z0 = float(datasets[0].ImagePositionPatient[2])
        for ds in datasets:  # each slice shifted in y by tan(10 deg) * z: a tilted stack
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, round(y + 0.176 * (z - z0), 4), z]

    return _one("series_gantry_tilt", _real_series(root, real, "tilt", edit), "gantry tilt")


# NIfTI, MHA, NRRD.


@_case("nifti_not_gzip_named_nii_gz")
def _(root: Path, _real: Path | None) -> Case:
    path = _write(root / "plain.nii.gz", nifti_bytes(small_ct_array()))
    return _one("nifti_not_gzip_named_nii_gz", path, "gzip")


@_case("plain_text_named_nii")
def _(root: Path, _real: Path | None) -> Case:
    path = _write(root / "notes.nii", b"patient list\nnot an image at all\n" * 20)
    return _one("plain_text_named_nii", path, "not a readable NIfTI")


@_case("random_bytes_named_nii_gz")
def _(root: Path, _real: Path | None) -> Case:
    path = _write(root / "random.nii.gz", np.random.default_rng(6).bytes(3000))
    return _one("random_bytes_named_nii_gz", path, "gzip|not a readable NIfTI")


@_case("nifti_4d_to_colorize")
def _(root: Path, _real: Path | None) -> Case:
    array = np.stack([small_ct_array(seed=s) for s in range(3)], axis=-1)
    path = _write(root / "four_d.nii.gz", nifti_bytes(array, gz=True))
    return _one("nifti_4d_to_colorize", path, "4D image")


@_case("nifti_all_nan")
def _(root: Path, _real: Path | None) -> Case:
    path = _write(root / "all_nan.nii.gz", nifti_bytes(np.full((8, 8, 8), np.nan, np.float32), gz=True))
    return _one("nifti_all_nan", path, "NaN")


@_case("nifti_zero_spacing")
def _(root: Path, _real: Path | None) -> Case:
    # No sform or qform: the affine comes from pixdim alone.
    header = {"pixdim": [1, 0, 0, 0, 1, 0, 0, 0], "qform_code": 0, "sform_code": 0}
    path = _write(root / "zero_spacing.nii", nifti_bytes(small_ct_array(), header=header))
    return _one("nifti_zero_spacing", path, "spacing|zero")


@_case("nifti_zero_spacing_qform")
def _(root: Path, _real: Path | None) -> Case:
    header = {"pixdim": [1, 0.8, 0, 2, 1, 0, 0, 0], "qform_code": 1, "sform_code": 0}
    path = _write(root / "zero_spacing_qform.nii", nifti_bytes(small_ct_array(), header=header))
    return _one("nifti_zero_spacing_qform", path, "spacing|zero")


@_case("nifti_negative_spacing")
def _(root: Path, _real: Path | None) -> Case:
    header = {"pixdim": [1, -0.8, 0.8, 2, 1, 0, 0, 0], "qform_code": 1, "sform_code": 0}
    path = _write(root / "negative_spacing.nii", nifti_bytes(small_ct_array(), header=header))
    return _one("nifti_negative_spacing", path, "pixdim|spacing|negative|positive")


@_case("nifti_sheared_affine")
def _(root: Path, _real: Path | None) -> Case:
    affine = np.array([[0.8, 0.3, 0, 0], [0, 0.8, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    header = {"qform_code": 0, "sform_code": 1}
    path = _write(root / "sheared.nii.gz", nifti_bytes(small_ct_array(), affine, gz=True, header=header))
    return _one("nifti_sheared_affine", path, "shear|orthonormal|orthogonal")


def _bomb_header() -> dict:
    return {"dim": [3, 30000, 30000, 30000, 1, 1, 1, 1]}


@_case("nifti_header_bomb")
def _(root: Path, _real: Path | None) -> Case:
    # 30000^3 int16 voxels claimed (54 TB), 8 KB stored.
    path = _write(root / "bomb.nii", nifti_bytes(small_ct_array(), header=_bomb_header()))
    return _one("nifti_header_bomb", path, "30000|GiB|TiB|bytes")


@_case("nifti_header_bomb_gz")
def _(root: Path, _real: Path | None) -> Case:
    path = _write(root / "bomb.nii.gz", nifti_bytes(small_ct_array(), gz=True, header=_bomb_header()))
    return _one("nifti_header_bomb_gz", path, "GiB|TiB|memory")


@_case("nifti_truncated_data")
def _(root: Path, _real: Path | None) -> Case:
    data = nifti_bytes(small_ct_array())
    path = _write(root / "truncated.nii", data[: len(data) - 1000])
    return _one("nifti_truncated_data", path, "truncated|bytes|cannot read")


@_case("nifti_gz_truncated_stream")
def _(root: Path, _real: Path | None) -> Case:
    data = nifti_bytes(small_ct_array(), gz=True)
    path = _write(root / "truncated.nii.gz", data[: len(data) // 2])
    return _one("nifti_gz_truncated_stream", path, "truncated|cannot read|not a readable")


@_case("mha_huge_dimsize")
def _(root: Path, _real: Path | None) -> Case:
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "DimSize = 100000 100000 100000\nElementSpacing = 1 1 1\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path = _write(root / "huge.mha", header.encode() + b"\0" * 512)
    return _one("mha_huge_dimsize", path, "GiB|TiB|memory|bytes")


@_case("nrrd_garbage_header")
def _(root: Path, _real: Path | None) -> Case:
    header = "NRRD0004\ntype: short\ndimension: 3\nsizes: 4 four -4\nspacings: x y z\nencoding: raw\n\n"
    path = _write(root / "garbage.nrrd", header.encode() + b"\0" * 128)
    return _one("nrrd_garbage_header", path, "SimpleITK cannot read|NRRD")


# Registration pairs: two valid images that cannot be registered to each other.


@_case("register_2d_to_3d")
def _(root: Path, _real: Path | None) -> Case:
    fixed = _write(root / "reg_fixed_3d.nii.gz", nifti_bytes(small_ct_array(), gz=True))
    moving = _write(root / "reg_moving_2d.nii.gz", nifti_bytes(small_ct_array((16, 16, 1)), gz=True))
    return Case("register_2d_to_3d", (fixed, moving), "2D .*3D", moving, register=True)


@_case("register_no_overlap")
def _(root: Path, _real: Path | None) -> Case:
    fixed = _write(root / "reg_fixed.nii.gz", nifti_bytes(small_ct_array(), gz=True))
    far = np.diag([0.8, 0.8, 2.0, 1.0])
    far[:3, 3] = (500.0, 0.0, 0.0)
    moving = _write(root / "reg_moving_far.nii.gz", nifti_bytes(small_ct_array(seed=1), far, gz=True))
    return Case("register_no_overlap", (fixed, moving), "does not overlap", moving, register=True)


@_case("register_submillimetre_extent")
def _(root: Path, _real: Path | None) -> Case:
    fixed = _write(root / "reg_fixed_mm.nii.gz", nifti_bytes(small_ct_array(), gz=True))
    micro = np.diag([0.001, 0.001, 0.001, 1.0])  # a header with microns for millimetres: 16 voxels span 0.016 mm
    moving = _write(root / "reg_moving_micro.nii.gz", nifti_bytes(small_ct_array(seed=1), micro, gz=True))
    return Case("register_submillimetre_extent", (fixed, moving), "too small to register", moving, register=True)


@_case("nifti_submillimetre_pixels")
def _(root: Path, _real: Path | None) -> Case:
    micro = np.diag([0.001, 0.001, 0.002, 1.0])  # 512 pixels of 0.001 mm: the colorizer's grid would need 100 GiB
    path = _write(root / "micro_pixels.nii.gz", nifti_bytes(small_ct_array((512, 512, 2)), micro, gz=True))
    return _one("nifti_submillimetre_pixels", path, "finer than any CT", info_reads=True)


def make_corpus(root: Path, shared_data: Path | None = SHARED_DATA) -> dict[str, Case]:
    """Write every case under ``root``; the cases needing the shared CT are left out when it is missing."""
    series = None if shared_data is None else shared_data / "ct" / "totalseg-abdomen-dicom"
    real = sorted(series.iterdir())[0] if series is not None and series.is_dir() else None
    root.mkdir(parents=True, exist_ok=True)
    cases = {}
    for name, maker in MAKERS.items():
        if maker.needs_shared and real is None:
            continue
        case_root = root / name
        case_root.mkdir()
        cases[name] = maker.build(case_root, real)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="new folder for the corpus")
    parser.add_argument(
        "--shared", type=Path, default=SHARED_DATA, help="the shared data folder (default: %(default)s)"
    )
    args = parser.parse_args()
    cases = make_corpus(args.root, args.shared)
    for case in cases.values():
        print(f"{case.name:45s} {' '.join(str(p) for p in case.inputs)}")
    print(f"{len(cases)} cases ({len(MAKERS) - len(cases)} left out: no shared data)")


if __name__ == "__main__":
    main()


def bad_inputs(root: Path, real_file: Path) -> dict[str, Path]:
    """The foundation's bad inputs, made fresh under ``root``."""
    rng = np.random.default_rng(0)
    (root / "empty_folder").mkdir()
    (root / "random.dcm").write_bytes(rng.bytes(4096))
    data = real_file.read_bytes()
    (root / "truncated.dcm").write_bytes(data[: len(data) // 2])
    non_image("SR", "1.2.840.10008.5.1.4.1.1.88.22").save_as(root / "no_pixels.dcm", enforce_file_format=True)
    return {
        "empty folder": root / "empty_folder",
        "random bytes": root / "random.dcm",
        "truncated": root / "truncated.dcm",
        "no pixel data": root / "no_pixels.dcm",
        "nonexistent": root / "does_not_exist.dcm",
    }
