"""Shared fixtures: the real data in ../shared/data (skipped cleanly when absent)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

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
    from napari_ctcolor.io import InputError
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
