"""`ctcolor info`: the JSON contract on real data, and one-line errors with exit 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import SimpleITK as sitk

from conftest import file_hashes
from test_io_dicom import bad_inputs

CONTRACT_KEYS = {"shape", "spacing", "origin", "direction", "modality", "hu_min", "hu_max", "window", "series_count"}


def ctcolor(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "napari_ctcolor", *args], capture_output=True, text=True, timeout=timeout
    )


def test_info_json_on_the_shared_series_matches_the_contract_and_simpleitk(dicom_series):
    result = ctcolor("info", str(dicom_series), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert CONTRACT_KEYS <= set(info)
    assert info["shape"] == [20, 512, 512]
    assert info["spacing"] == pytest.approx([2.0, 0.9765625, 0.9765625])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_series)))
    ref = reader.Execute()
    assert info["origin"] == pytest.approx(list(ref.GetOrigin()))
    assert info["direction"] == pytest.approx(list(ref.GetDirection()))
    assert info["modality"] == "CT"
    assert (info["hu_min"], info["hu_max"]) == (-1024, 1839)
    assert info["window"] == [40.0, 300.0]
    assert info["series_count"] == 1


def test_info_text_output_names_the_essentials(dicom_series):
    result = ctcolor("info", str(dicom_series))
    assert result.returncode == 0
    assert "20 slices x 512 x 512" in result.stdout and "centre 40, width 300" in result.stdout


def test_bad_inputs_exit_2_with_one_error_line_and_unchanged_files(dicom_series, tmp_path):
    cases = bad_inputs(tmp_path, sorted(dicom_series.iterdir())[0])
    before = file_hashes(tmp_path)
    for what, path in cases.items():
        result = ctcolor("info", str(path), "--json", timeout=30)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (what, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, result.stderr)
        assert str(path) in lines[0] and "Traceback" not in result.stderr
        assert result.stdout == ""
    assert file_hashes(tmp_path) == before


def test_usage_errors_are_one_line_with_exit_2():
    result = ctcolor("info")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
