"""Weights safety, the memory guard and loss-free writing, through the CLI as a user meets them."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_ctcolor.cli import main
from napari_ctcolor.engines.colorize import colorize
from napari_ctcolor.errors import InputError
from napari_ctcolor.io import Volume, read_volume, write_nifti
from napari_ctcolor.io.write import atomic_path

from conftest import assert_documented


class _CreatesFile:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _run(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def small_ct(tmp_path) -> Path:
    hu = np.full((4, 32, 32), -1000, np.int16)
    hu[:, 8:24, 8:24] = 40
    hu[:, 14:18, 14:18] = 700  # some bone: NIfTI has no modality tag, and air-to-bone HU is what marks a CT
    return write_nifti(Volume(hu, spacing=(3.0, 1.0, 1.0), meta={"modality": "CT"}), tmp_path / "ct.nii.gz")


@pytest.mark.parametrize("command", ["colorize", "register"])
def test_crafted_pickle_model_is_refused_and_never_runs(tmp_path, capsys, small_ct, command):
    marker = tmp_path / "created_by_pickle"
    evil = tmp_path / "evil.pth"
    torch.save({"eninput.0.weight": _CreatesFile(marker)}, evil)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_CreatesFile(marker), f)
    for model in (evil, tmp_path / "evil.pkl"):
        if command == "colorize":
            args = ["colorize", str(small_ct), "-o", str(tmp_path / "out.nii.gz"), "--model", str(model)]
        else:
            args = ["register", str(small_ct), str(small_ct), "-o", str(tmp_path / "reg"), "--model", str(model)]
        code, err = _run(capsys, *args)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and str(model) in err[0], err
        assert_documented(err[0])
    assert not marker.exists()


def test_memory_guard_refuses_before_loading(monkeypatch, capsys, small_ct):
    monkeypatch.setenv("CTCOLOR_MEMORY_FRACTION", "1e-9")
    code, err = _run(capsys, "info", str(small_ct))
    assert code == 2 and len(err) == 1 and "memory budget" in err[0] and "CTCOLOR_MEMORY_FRACTION" in err[0]


def test_failed_write_leaves_the_previous_file_and_no_partial_one(tmp_path):
    target = tmp_path / "result.nii.gz"
    target.write_bytes(b"previous result")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["result.nii.gz"]


def test_outputs_get_the_usual_permissions(tmp_path, small_ct):
    mode = small_ct.stat().st_mode & 0o777
    assert mode & 0o044 == 0o044, oct(mode)  # readable by group and others under the default umask


def test_existing_outputs_and_outputs_equal_to_inputs_are_refused(tmp_path, capsys, small_ct):
    before = small_ct.read_bytes()
    code, err = _run(capsys, "colorize", str(small_ct), "-o", str(small_ct), "--overwrite")
    assert code == 2 and len(err) == 1 and "overwrite the input" in err[0]
    code, err = _run(capsys, "checkerboard", str(small_ct), str(small_ct), "-o", str(small_ct))
    assert code == 2 and len(err) == 1 and "overwrite the input" in err[0]
    assert small_ct.read_bytes() == before
    existing = tmp_path / "done.nii.gz"
    existing.write_bytes(b"keep")
    for args in (
        ["checkerboard", str(small_ct), str(small_ct), "-o", str(existing)],
        ["colorize", str(small_ct), "-o", str(existing)],
    ):
        code, err = _run(capsys, *args)
        assert code == 2 and len(err) == 1 and "--overwrite" in err[0], (args, err)
    assert existing.read_bytes() == b"keep"
    code, _ = _run(capsys, "checkerboard", str(small_ct), str(small_ct), "-o", str(existing), "--overwrite")
    assert code == 0 and existing.read_bytes() != b"keep"


def test_colorize_memory_guard_refuses_before_the_output_is_allocated(monkeypatch, capsys, small_ct, tmp_path):
    volume = read_volume(small_ct)
    monkeypatch.setattr("napari_ctcolor.memory.available_bytes", lambda: 1000)
    with pytest.raises(InputError, match="memory budget"):
        colorize(volume, device="cpu")
