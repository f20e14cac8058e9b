"""Shared fixtures: the real data in ../shared/data (skipped cleanly when absent); torch's thread count; the
tolerances within which two runs of the same computation agree.

``CTCOLOR_TEST_THREADS=N`` runs the suite, and every ``ctcolor`` process it starts, on N torch threads (`make test`
runs it with 1 in two pytest-xdist workers, then the `numeric` tests again with 2). A CPU's float results depend on
the thread count, so a test that compares two runs (two processes, a worker and the command, the engine and a front
end) asserts a stated tolerance, never bit equality; a test run twice on the same thread count gives the same result
bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from napari_ctcolor.cli.batch import SAME_AS_SINGLE
from napari_ctcolor.io import Volume

THREADS = os.environ.get("CTCOLOR_TEST_THREADS")
if THREADS:
    # Inherited by every subprocess (ctcolor, examples); torch in this process follows in pytest_configure.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = THREADS


def pytest_configure(config) -> None:
    if THREADS:
        import torch

        torch.set_num_threads(int(THREADS))


def pytest_report_header(config) -> str:
    import torch

    return f"torch threads: {torch.get_num_threads()} (CTCOLOR_TEST_THREADS={THREADS or 'unset'})"


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CT_DIR = SHARED_DATA / "ct"
DICOM_SERIES = CT_DIR / "totalseg-abdomen-dicom"


def require_shared(path: Path = SHARED_DATA) -> Path:
    """Skip the calling test when the shared data (or ``path`` inside it) is missing."""
    if not path.exists():
        pytest.skip(f"{path} not found: these tests need the shared TotalSegmentator/SYMNet data beside the checkout")
    return path


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (or of ``root`` itself): proves inputs are left unchanged."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def ct_weights_shipped() -> bool:
    """Whether the project's CT SYMNet weights exist (tests of the "not found" message depend on it)."""
    from napari_ctcolor.errors import InputError
    from napari_ctcolor.weights import find_weights

    try:
        find_weights("symnet-ct")
    except InputError:
        return False
    return True


@pytest.fixture(scope="session")
def dicom_series() -> Path:
    return require_shared(DICOM_SERIES)


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    """Messages the "Colorize volume" widget shows with napari's show_error (test_register_widget has its own)."""
    from napari_ctcolor.napari import _colorize_widget

    shown: list[str] = []
    monkeypatch.setattr(_colorize_widget, "show_error", shown.append)
    return shown


def assert_same_colors(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    """Two uint8 RGB renderings of one colorization whose runs may differ in thread count: each channel within
    `SAME_AS_SINGLE`'s step on at most its share of voxels, all other voxels equal."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8, (what, got.shape, want.shape)
    step = np.abs(got.astype(np.int16) - want.astype(np.int16)).max(axis=-1)
    share = float((step > 0).mean())
    assert step.max() <= SAME_AS_SINGLE["color_step"], (what, int(step.max()), share)
    assert share <= SAME_AS_SINGLE["color_fraction"], (what, share)


def assert_same_registration(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Two registrations of one pair (arrays by output name: warped, checkerboard, ddf, inverse_ddf, jacobian) whose
    runs may differ in thread count: within `SAME_AS_SINGLE`."""
    assert sorted(got) == sorted(want)
    bounds = {"ddf": "ddf_mm", "inverse_ddf": "ddf_mm", "jacobian": "jacobian"}
    for name in got:
        a, b = (np.asarray(x, dtype=np.float64) for x in (got[name], want[name]))
        assert a.shape == b.shape, name
        bound = SAME_AS_SINGLE[bounds.get(name, "warped_hu")]
        np.testing.assert_allclose(a, b, rtol=0, atol=bound, err_msg=name)


def ctcolor(*args: str, timeout: float = 120, threads: int | None = None) -> subprocess.CompletedProcess:
    """`ctcolor ARGS` as its own process (``threads``: its torch thread count, else this environment's)."""
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    # UTF-8 whatever the locale (make runs under C/ASCII): progress bars draw with block characters.
    return subprocess.run(
        [sys.executable, "-m", "napari_ctcolor", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        env=env,
    )


#: |dL*| of every composed pixel against the windowed grey: 8-bit rounding moves L* by at most 0.274 (derived in
#: `test_uint8_rounding_error_bound_over_the_whole_srgb_cube`) and the float path by <= 0.03. Every test of the
#: luminance invariant (engine, CLI, widgets, model cards) uses this bound, not the documented ceiling of 1.0.
LUMINANCE_BOUND = 0.31


def rotated_volume() -> Volume:
    """A small analytic volume with an oblique, left-handed direction and anisotropic spacing."""
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rotation @ np.diag([1.0, -1.0, 1.0])
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    return Volume(array, spacing=(2.5, 0.7, 0.9), origin=(-10.0, 20.0, 30.5), direction=direction)


IDENTITY = {"PatientName": "Test^Patient", "PatientID": "CTC-0001", "PatientBirthDate": "19600101"}


def write_headless(ds: Dataset, path: Path) -> Path:
    """``ds`` as old archives hold it: implicit VR little endian, no preamble, no file meta header."""
    with open(path, "wb") as f:
        fp = pydicom.filebase.DicomFileLike(f)
        fp.is_little_endian, fp.is_implicit_VR = True, True
        pydicom.filewriter.write_dataset(fp, Dataset(ds))
    return path


#: The image position and orientation an ACR-NEMA file gives in the retired (0020,0030) and (0020,0035).
RETIRED_POSITION = [-80.31, -111.31, 52.0]


def write_acr_nema(path: Path, orientation: list[float], sop_class: bool = False) -> Path:
    """pydicom's CT_small slice as an ACR-NEMA archive holds it: its plane only in the retired Image Position and
    Image Orientation (no (0020,0032) nor (0020,0037)), without a SOP class (``sop_class``: with CT Image Storage's),
    implicit VR without a file meta header."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    if not sop_class:
        del ds.SOPClassUID
    ds.add_new(0x00200030, "DS", RETIRED_POSITION)  # Image Position (RET)
    ds.add_new(0x00200035, "DS", orientation)  # Image Orientation (RET)
    return write_headless(ds, path)


def write_enhanced(series: Path, path: Path, contrast: str = "agent") -> Path:
    """The DICOM ``series`` converted by highdicom to one Legacy Converted Enhanced CT file: the windows of its
    slices (40/300 and 300/1500 for the shared series) in the Frame VOI LUT functional group. ``contrast``: "agent"
    keeps the series' Contrast/Bolus Agent (0018,0010) as converted; "usage" states it only as a Contrast/Bolus Usage
    item (0018,9341) with the agent administered, as an Enhanced CT does; "none" says nothing of contrast."""
    import highdicom

    slices = []
    for file in sorted(series.iterdir()):
        ds = pydicom.dcmread(file)
        ds.decompress()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID  # empty in the de-identified series
        slices.append(ds)
    enhanced = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        slices,
        series_instance_uid=highdicom.UID(),
        series_number=900,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
    )
    if contrast != "agent":
        for keyword in [k for k in enhanced.dir() if k.startswith("Contrast")]:
            delattr(enhanced, keyword)
    if contrast == "usage":
        usage = Dataset()
        usage.ContrastBolusAgentNumber = 1
        usage.ContrastBolusAgentAdministered = "YES"
        enhanced.SharedFunctionalGroupsSequence[0].ContrastBolusUsageSequence = [usage]
    enhanced.save_as(path, enforce_file_format=True)
    return path


REPO = Path(__file__).resolve().parents[1]  # the checkout


TINY = {"channels": [4, 8, 16, 16], "strides": [2, 2, 2], "num_res_units": 0}


#: The placeholders docs/troubleshooting.md writes for the file, folder, address or option an error line names first.
_NAMED = r"(PATH|OUT|OUTDIR|MOVING|URL|LIST|CSV|ADDRESS|LAYER|NODE|CONFIG)"


@functools.cache
def troubleshooting_messages() -> tuple[str, ...]:
    """The error lines docs/troubleshooting.md lists: each backticked message in the first cell of a table row."""
    page = (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    return tuple(m for row in rows for m in re.findall(r"`([^`]+)`", row.split(" | ")[0]))


@functools.cache
def _documented_patterns() -> tuple[re.Pattern, ...]:
    """`troubleshooting_messages` as patterns: ``...`` and a leading placeholder (`_NAMED`) stand for any text."""
    patterns = []
    for documented in troubleshooting_messages():
        named = re.match(rf"{_NAMED}(?=:| line)", documented)
        rest = documented[named.end() :] if named else documented
        pattern = (".*" if named else "") + re.escape(rest).replace(re.escape("..."), ".*")
        patterns.append(re.compile(pattern, re.DOTALL))
    return tuple(patterns)


def assert_documented(line: str) -> None:
    """``line`` (``error: ...``, as ``ctcolor`` prints it) matches a message of docs/troubleshooting.md."""
    message = line.removeprefix("error: ")
    if not any(pattern.fullmatch(message) for pattern in _documented_patterns()):
        raise AssertionError(f"not in docs/troubleshooting.md: {message!r}")


def export_and_wait(qtbot, widget, timeout_ms: int = 120_000) -> list[str]:
    """Press the colorize widget's Export as a user does and wait for its worker: the files it wrote ([] when it wrote
    none). The viewer's event loop runs meanwhile."""
    if widget.export() is not None:
        qtbot.waitUntil(lambda: not widget.busy, timeout=timeout_ms)
    return widget.exporter.written
