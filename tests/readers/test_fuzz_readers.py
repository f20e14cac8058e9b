"""Fuzzing the DICOM and NIfTI readers: mutated bytes of small valid files give a Volume or an InputError, nothing else.

Mutations: header-field edits (a DICOM element's value replaced, its length falsified or the element removed; a NIfTI
header field set to an extreme value), then random byte flips, truncations, insertions and deletions. DICOM cases are
read as a file, as a folder, and as a folder beside a valid slice; NIfTI as .nii, and as .nii.gz damaged inside or in
the compressed stream. The quick variant (CI) runs about 1,000 cases; set
``CTCOLOR_FUZZ_EXAMPLES=10000`` (the total over DICOM and NIfTI) for a long run. Cases are derandomized: the same
examples on every run. Reproducers of what the fuzzing found are pinned in `FUZZ_REGRESSIONS`.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword
from pydicom.uid import JPEG2000Lossless, RLELossless

from napari_ctcolor.errors import InputError
from napari_ctcolor.io import read_volume
from napari_ctcolor.memory import available_bytes

from make_bad_inputs import dicom_bytes, nifti_bytes, small_ct_array, synthetic_ct_slice

TOTAL_EXAMPLES = int(os.environ.get("CTCOLOR_FUZZ_EXAMPLES", "1000"))
DICOM_EXAMPLES = TOTAL_EXAMPLES // 2
NIFTI_EXAMPLES = TOTAL_EXAMPLES - DICOM_EXAMPLES
# A mutated header may claim gigabytes; the budget keeps any allocation it slips past the checks small.
FUZZ_MEMORY_BUDGET = 256 * 2**20

FUZZ_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}

#: How many cases each fuzz test ran (printed with ``-s``; the issue note records them).
RUN_COUNTS: dict[str, int] = {}


# --- valid seeds -----------------------------------------------------------------------------------------------------


def _compressed_slice(syntax: str) -> bytes:
    ds = synthetic_ct_slice()
    ds.compress(syntax)
    return dicom_bytes(ds)


DICOM_SEEDS = {
    "explicit_le": dicom_bytes(synthetic_ct_slice()),
    "rle": _compressed_slice(RLELossless),
    "jpeg2000": _compressed_slice(JPEG2000Lossless),
}
NIFTI_RAW = nifti_bytes(small_ct_array((12, 10, 6)))
NIFTI_FLOAT_RAW = nifti_bytes(small_ct_array((12, 10, 6)).astype(np.float32) * 0.5)


@dataclass(frozen=True)
class _Element:
    """Where one top-level explicit-VR little-endian element sits in a file."""

    tag: int
    length_at: int
    length_size: int
    value_at: int
    length: int


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def dicom_elements(data: bytes) -> list[_Element]:
    """The top-level elements (file meta included) of an explicit VR little-endian file, up to the first undefined
    length (encapsulated pixel data)."""
    elements, pos = [], 132
    while pos + 8 <= len(data):
        group, number = struct.unpack_from("<HH", data, pos)
        if data[pos + 4 : pos + 6] in _LONG_VRS:
            length_at, length_size = pos + 8, 4
            (length,) = struct.unpack_from("<I", data, length_at)
        else:
            length_at, length_size = pos + 6, 2
            (length,) = struct.unpack_from("<H", data, length_at)
        elements.append(_Element(group << 16 | number, length_at, length_size, length_at + length_size, length))
        if length == 0xFFFFFFFF:
            break
        pos = length_at + length_size + length
    return elements


DICOM_ELEMENTS = {name: dicom_elements(data) for name, data in DICOM_SEEDS.items()}
NIFTI_FIELDS = nib.nifti1.header_dtype.fields
# The fields that decide the shape, type, data offset, scaling and geometry: drawn half the time.
NIFTI_KEY_FIELDS = [
    "sizeof_hdr",
    "dim",
    "datatype",
    "bitpix",
    "pixdim",
    "vox_offset",
    "scl_slope",
    "scl_inter",
    "qform_code",
    "sform_code",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "srow_x",
    "srow_y",
    "srow_z",
    "magic",
]

# --- mutations -------------------------------------------------------------------------------------------------------

DICOM_VALUES = st.one_of(
    st.sampled_from(
        [
            b"",
            b"0",
            b"-1",
            b"abc",
            b"1e308",
            b"-1e308",
            b"nan",
            b"inf",
            b"65535",
            b"1\\2",
            b"1\\0\\0\\0\\0\\0",
            b"0\\0\\0\\0\\0\\0",
            b"1\\2\\3\\4\\5\\6\\7",
            b"\x00\x00",
            b"\xff\xff",
            b"\x00\x00\x00\x00",
            b"\xff\xff\xff\xff",
        ]
    ),
    st.binary(max_size=16),
)
INT_VALUES = st.sampled_from([0, -1, 1, 2, 3, 4, 5, 7, 8, 16, 64, 255, 256, 348, 352, 540, 32767, -32768, 2**31 - 1])
FLOAT_VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, -1e-30, 1e30, 3.4e38, np.nan, np.inf, -np.inf])
OFFSETS = st.one_of(st.integers(0, 400), st.integers(0, 1 << 16))


@st.composite
def byte_ops(draw) -> list[tuple]:
    """Byte-level edits: (kind, position, argument), positions taken modulo the current length."""
    op = st.one_of(
        st.tuples(st.just("flip"), OFFSETS, st.integers(1, 255)),
        st.tuples(st.just("truncate"), OFFSETS, st.just(0)),
        st.tuples(st.just("insert"), OFFSETS, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), OFFSETS, st.integers(1, 64)),
    )
    return draw(st.lists(op, max_size=3))


def apply_byte_ops(data: bytes, ops: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, position, argument in ops:
        at = position % (len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= argument
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = argument
        elif kind == "delete":
            del out[at : at + argument]
    return bytes(out)


@st.composite
def dicom_edits(draw, seed: str) -> list[tuple]:
    """(element index, new value, "drop" or None, new length or None): a value replaced (its length fixed up), an
    element removed, or a length that lies."""
    n = len(DICOM_ELEMENTS[seed])
    value = st.one_of(st.none(), st.just("drop"), DICOM_VALUES)
    edit = st.tuples(st.integers(0, n - 1), value, st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)))
    return draw(st.lists(edit, max_size=2))


def apply_dicom_edits(seed: str, edits: list[tuple]) -> bytes:
    data = bytearray(DICOM_SEEDS[seed])
    # Edit from the end backwards: earlier offsets stay valid while later values change length.
    for index, value, length in sorted(edits, key=lambda e: -e[0]):
        element = DICOM_ELEMENTS[seed][index]
        max_length = 0xFFFF if element.length_size == 2 else 0xFFFFFFFF
        if value == "drop":
            end = len(data) if element.length == 0xFFFFFFFF else element.value_at + element.length
            del data[_element_offset(seed, element.tag) : end]
            continue
        if value is not None and element.length != 0xFFFFFFFF:
            value = value + b" " * (len(value) % 2)  # DICOM values have even length
            data[element.value_at : element.value_at + element.length] = value
            length = len(value) if length is None else length
        if length is not None:
            fmt = "<H" if element.length_size == 2 else "<I"
            struct.pack_into(fmt, data, element.length_at, length % (max_length + 1))
    return bytes(data)


@st.composite
def nifti_edits(draw) -> list[tuple]:
    """(field, element index, value): a raw header field overwritten, unchecked."""
    names = st.one_of(st.sampled_from(NIFTI_KEY_FIELDS), st.sampled_from(sorted(NIFTI_FIELDS)))
    edits = []
    for name in draw(st.lists(names, max_size=3)):
        dtype = NIFTI_FIELDS[name][0]
        count = int(np.prod(dtype.shape)) if dtype.shape else 1
        index = draw(st.integers(0, count - 1))
        base = dtype.base
        if base.kind in "iu":
            value = draw(INT_VALUES)
        elif base.kind == "f":
            value = draw(FLOAT_VALUES)
        else:
            value = draw(st.binary(min_size=base.itemsize, max_size=base.itemsize))
        edits.append((name, index, value))
    return edits


def apply_nifti_edits(data: bytes, edits: list[tuple]) -> bytes:
    out = bytearray(data)
    for name, index, value in edits:
        dtype, offset = NIFTI_FIELDS[name][:2]
        base = dtype.base.newbyteorder("<")
        if base.kind in "iuf":
            # Wrap integers into the field's type (int16 dims, int8 dim_info) like a careless writer would.
            packed = np.array(value, dtype=np.int64 if base.kind in "iu" else np.float64).astype(base).tobytes()
        else:
            packed = value
        at = offset + index * base.itemsize
        out[at : at + len(packed)] = packed
    return bytes(out)


# --- the checks ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def small_memory_budget():
    """Refuse anything over FUZZ_MEMORY_BUDGET, whatever the machine: a fuzzed header must not eat the runner's RAM."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CTCOLOR_MEMORY_FRACTION", repr(FUZZ_MEMORY_BUDGET / available_bytes()))
        yield


def read_or_input_error(path: Path) -> str:
    """Read ``path``; "ok" or "input error", and any other exception propagates (the fuzz failure)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read_volume(path)
        except InputError as exc:
            message = str(exc)
            assert str(path) in message and "\n" not in message and message.isprintable(), message
            return "input error"
    return "ok"


def write_dicom_case(root: Path, data: bytes, layout: str) -> Path:
    """The mutated file alone, in a folder alone, or in a folder beside a valid slice of the same series."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    if layout == "file":
        path = root / "case.dcm"
        path.write_bytes(data)
        return path
    folder = root / "series"
    folder.mkdir()
    (folder / "case.dcm").write_bytes(data)
    if layout == "folder_with_neighbour":
        (folder / "neighbour.dcm").write_bytes(dicom_bytes(synthetic_ct_slice(z_mm=2.0, seed=1)))
    return folder


@settings(max_examples=DICOM_EXAMPLES, **FUZZ_SETTINGS)
@given(
    seed_and_edits=st.sampled_from(sorted(DICOM_SEEDS)).flatmap(lambda s: st.tuples(st.just(s), dicom_edits(s))),
    ops=byte_ops(),
    layout=st.sampled_from(["file", "file", "folder", "folder_with_neighbour"]),
)
def test_mutated_dicom_reads_or_raises_input_error(fuzz_dir, seed_and_edits, ops, layout):
    seed, edits = seed_and_edits
    data = apply_byte_ops(apply_dicom_edits(seed, edits), ops)
    RUN_COUNTS["dicom"] = RUN_COUNTS.get("dicom", 0) + 1
    read_or_input_error(write_dicom_case(fuzz_dir / "dicom", data, layout))


@settings(max_examples=NIFTI_EXAMPLES, **FUZZ_SETTINGS)
@given(
    seed=st.sampled_from(["int16", "float32"]),
    edits=nifti_edits(),
    ops=byte_ops(),
    container=st.sampled_from(["nii", "nii.gz inner", "nii.gz outer"]),
)
def test_mutated_nifti_reads_or_raises_input_error(fuzz_dir, seed, edits, ops, container):
    raw = apply_nifti_edits(NIFTI_RAW if seed == "int16" else NIFTI_FLOAT_RAW, edits)
    if container == "nii":
        data, name = apply_byte_ops(raw, ops), "case.nii"
    elif container == "nii.gz inner":  # the NIfTI inside is damaged, the gzip layer is sound
        data, name = gzip.compress(apply_byte_ops(raw, ops), mtime=0), "case.nii.gz"
    else:  # the compressed stream itself is damaged
        data, name = apply_byte_ops(gzip.compress(raw, mtime=0), ops), "case.nii.gz"
    RUN_COUNTS["nifti"] = RUN_COUNTS.get("nifti", 0) + 1
    path = fuzz_dir / name
    path.write_bytes(data)
    read_or_input_error(path)


def test_fuzz_case_counts_are_reported():
    """Runs after the two fuzz tests (file order): prints the counts for the issue note."""
    print(f"\nfuzz cases run: {RUN_COUNTS} (CTCOLOR_FUZZ_EXAMPLES={TOTAL_EXAMPLES})")
    if len(RUN_COUNTS) < 2:
        pytest.skip("the counts report the two fuzz tests of this run; run them together (file order)")
    assert sum(RUN_COUNTS.values()) >= TOTAL_EXAMPLES * 0.9


def test_mutations_leave_the_unmutated_seeds_readable(fuzz_dir):
    for seed in DICOM_SEEDS:
        assert read_or_input_error(write_dicom_case(fuzz_dir / "seed", apply_dicom_edits(seed, []), "file")) == "ok"
    for name, data in [("a.nii", NIFTI_RAW), ("b.nii", NIFTI_FLOAT_RAW), ("c.nii.gz", gzip.compress(NIFTI_RAW))]:
        (fuzz_dir / name).write_bytes(data)
        assert read_or_input_error(fuzz_dir / name) == "ok"
    assert zlib.crc32(DICOM_SEEDS["explicit_le"]) == zlib.crc32(dicom_bytes(synthetic_ct_slice()))  # deterministic


# --- what the fuzzer found (each raised something other than InputError before the fix) ----------------------------


def _element(seed: str, keyword: str | int) -> int:
    tag = tag_for_keyword(keyword) if isinstance(keyword, str) else keyword
    return next(i for i, e in enumerate(DICOM_ELEMENTS[seed]) if e.tag == tag)


def _dicom_regression(seed: str, edits: list[tuple[str, bytes | None, int | None]], ops=()) -> bytes:
    return apply_byte_ops(apply_dicom_edits(seed, [(_element(seed, k), v, n) for k, v, n in edits]), list(ops))


def _vr_flip(seed: str, keyword: str) -> list[tuple]:
    """A byte flip that turns the element's VR ("LO") into one pydicom does not know ("L\x92")."""
    element = DICOM_ELEMENTS[seed][_element(seed, keyword)]
    return [("flip", element.length_at - 1, 0xDD)]


def _cut_element(seed: str, keyword: str) -> list[tuple]:
    """A deletion of a short-VR element with a 2-byte value (tag, VR, length, value: 10 bytes)."""
    return [("delete", _element_offset(seed, keyword), 10)]


def _element_offset(seed: str, keyword: str | int) -> int:
    """Where the element starts (its tag): 8 bytes before a long VR's length field, 6 before a short one's."""
    element = DICOM_ELEMENTS[seed][_element(seed, keyword)]
    return element.length_at - (8 if element.length_size == 4 else 6)


FUZZ_REGRESSIONS = {
    # ValueError from float('\x01') for a single slice's thickness (found by hypothesis, shrunk). The thickness is
    # only the z size of one slice: it now falls back to 1 mm, as when it is absent, and the slice is read.
    "slice_thickness_not_a_number.dcm": lambda: _dicom_regression("explicit_le", [("SliceThickness", b"\x01", None)]),
    # ValueError from float('abc') for a position.
    "position_not_numbers.dcm": lambda: _dicom_regression("explicit_le", [("ImagePositionPatient", b"abc", None)]),
    # ValueError from float() of a rescale intercept.
    "intercept_not_a_number.dcm": lambda: _dicom_regression("rle", [("RescaleIntercept", b"\xb86\xf4", None)]),
    # TypeError from int([1, 256]): a US element of 4 bytes is two values.
    "samples_per_pixel_two_values.dcm": lambda: _dicom_regression(
        "explicit_le", [("SamplesPerPixel", b"\x01\x00\x00\x01", None)]
    ),
    # NotImplementedError from pydicom converting an element with an unknown VR, lazily, in the reader's _meta.
    "unknown_vr.dcm": lambda: _dicom_regression("rle", [], _vr_flip("rle", "SeriesDescription")),
    # A message of two lines: a modality with a newline in a file cut before its pixel data.
    "modality_with_newline.dcm": lambda: _dicom_regression(
        "explicit_le", [("Modality", b"CT\nMR", None)], [("truncate", _element_offset("explicit_le", "PixelData"), 0)]
    ),
    # AttributeError from `ds.Rows`: a damaged header (here, its Rows element cut out) still has pixel data.
    "rows_missing.dcm": lambda: _dicom_regression("jpeg2000", [], _cut_element("jpeg2000", "Rows")),
    # ValueError from reshape: dim = (12, -1, 0) has no voxels to read, and -1 became NumPy's "infer this axis".
    "negative_dim.nii": lambda: apply_nifti_edits(NIFTI_RAW, [("dim", 2, -1), ("dim", 3, 0)]),
    # A zero-size volume read "successfully"; `ctcolor info` then failed on min() of an empty array (exit 1).
    "zero_dim.nii": lambda: apply_nifti_edits(NIFTI_RAW, [("dim", 1, 0)]),
    # An infinite sform entry: the Volume's own check refused it, but its message did not name the file.
    "infinite_sform.nii": lambda: apply_nifti_edits(NIFTI_RAW, [("srow_x", 3, np.inf)]),
}


READ_AFTER_FIX = {"slice_thickness_not_a_number.dcm"}


@pytest.mark.parametrize("name", sorted(FUZZ_REGRESSIONS))
def test_fuzz_regressions_raise_input_error_or_read(fuzz_dir, name):
    path = fuzz_dir / "regressions" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(FUZZ_REGRESSIONS[name]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in READ_AFTER_FIX:
            assert read_volume(path).spacing[0] == 1.0
            return
        with pytest.raises(InputError) as info:
            read_volume(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and message.isprintable(), message
