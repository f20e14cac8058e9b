"""The `ctcolor` CLI: info's JSON contract, colorize exports, and one-line errors with exit 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from napari_ctcolor.color import grey_to_lightness, srgb_to_lab
from napari_ctcolor.io import read_volume
from napari_ctcolor.windowing import window
from test_color import LUMINANCE_BOUND

from conftest import CT_DIR, SHARED_DATA, file_hashes, require_shared
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


def test_colorize_cli_writes_rgb24_nifti_png_and_deidentified_dicom(tmp_path):
    ct_path = require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz")
    before = file_hashes(ct_path)
    out = tmp_path / "colour.nii.gz"
    result = ctcolor("colorize", str(ct_path), "-o", str(out), "--window", "abdomen", timeout=300)
    assert result.returncode == 0, result.stderr
    rgb_img = nib.load(out)
    assert rgb_img.header.get_data_dtype().fields is not None and int(rgb_img.header["datatype"]) == 128
    np.testing.assert_array_equal(rgb_img.affine, nib.load(ct_path).affine)
    rgb = np.asarray(rgb_img.dataobj)
    rgb = np.stack([rgb["R"], rgb["G"], rgb["B"]], axis=-1).transpose(2, 1, 0, 3)  # (Z, Y, X, 3)
    itk = sitk.ReadImage(str(out))
    assert itk.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk), rgb)  # nibabel and SimpleITK agree on colours
    ct = read_volume(ct_path)
    lightness = srgb_to_lab(rgb)[..., 0]
    assert np.abs(lightness - grey_to_lightness(window(ct.array, 40, 400))).max() <= LUMINANCE_BOUND
    assert np.hypot(*srgb_to_lab(rgb)[..., 1:].transpose(3, 0, 1, 2)).max() > 20  # it is in colour

    png_dir = tmp_path / "png"
    assert ctcolor("colorize", str(ct_path), "-o", str(png_dir), timeout=300).returncode == 0
    assert len(list(png_dir.glob("*.png"))) == ct.shape[0]

    dcm_dir = tmp_path / "dicom"
    result = ctcolor("colorize", str(ct_path), "-o", str(dcm_dir), "--format", "dicom", timeout=300)
    assert result.returncode == 0, result.stderr
    files = sorted(dcm_dir.iterdir())
    assert len(files) == ct.shape[0]
    ds = pydicom.dcmread(files[0])
    assert ds.PhotometricInterpretation == "RGB" and ds.pixel_array.shape[-1] == 3
    assert not ds.get("PatientName") and not ds.get("PatientID")
    assert file_hashes(ct_path) == before


def test_colorize_cli_refuses_non_ct_existing_outputs_and_bad_settings(tmp_path):
    mr_path = require_shared(SHARED_DATA / "symnet-oasis" / "image_A_full_size.nii.gz")
    result = ctcolor("colorize", str(mr_path), "-o", str(tmp_path / "x.nii.gz"))
    assert result.returncode == 2 and "not CT" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    ct_path = require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz")
    existing = tmp_path / "exists.nii.gz"
    existing.write_bytes(b"keep me")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("name,R,G,B\nliver,120,40,30\nspleen,300,0,0\n")
    for args in (
        ["-o", str(existing)],
        ["-o", str(tmp_path / "y.nii.gz"), "--window", "nonsense"],
        ["-o", str(tmp_path / "z.nii.gz"), "--chroma", "1.5"],
        ["-o", str(tmp_path / "w.nii.gz"), "--model", str(tmp_path / "missing.safetensors")],
        ["-o", str(tmp_path / "v.nii.gz"), "--palette", "nonsense"],
        ["-o", str(tmp_path / "u.nii.gz"), "--palette", str(bad_csv)],
        ["-o", str(tmp_path / "t.nii.gz"), "--palette", str(tmp_path / "missing.csv")],
    ):
        result = ctcolor("colorize", str(ct_path), *args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        if str(bad_csv) in args:
            assert "line 3" in lines[0]  # the bad row is named
    assert existing.read_bytes() == b"keep me"
    assert not any(tmp_path.glob("[tuvwxyz].nii.gz"))


def test_moving_on_its_own_grid_matches_simpleitk_applying_the_written_fields(tmp_path):
    """`ctcolor register` with a moving image on another grid (2.5 mm in-plane, 3.5 mm slices, x flipped, smaller
    field of view): warped.nii.gz equals SimpleITK applying ddf.nii.gz read with its own header, jacobian.nii.gz
    equals det(I + du/dx) computed here from ddf.nii.gz, and inverse_ddf.nii.gz undoes ddf.nii.gz."""
    fixed_path = require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz")
    fixed = sitk.ReadImage(str(fixed_path))
    grid = sitk.Image([110, 100, 24], sitk.sitkInt16)
    grid.SetSpacing((2.5, 2.5, 3.5))
    direction = np.array(fixed.GetDirection()).reshape(3, 3) @ np.diag([-1.0, 1.0, 1.0])
    grid.SetDirection(direction.flatten().tolist())
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()])
    grid.SetOrigin(tuple(np.array(centre) - direction @ (np.array([109, 99, 23]) * (2.5, 2.5, 3.5) / 2)))
    shift = sitk.TranslationTransform(3, (4.0, -3.0, 2.0))
    moving = sitk.Resample(fixed, grid, shift, sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    moving_path = tmp_path / "moving.nii.gz"
    sitk.WriteImage(moving, str(moving_path))
    out = tmp_path / "out"
    done = ctcolor("register", str(fixed_path), str(moving_path), "-o", str(out), "--device", "cpu")
    assert done.returncode == 0, done.stderr

    field = sitk.ReadImage(str(out / "ddf.nii.gz"))
    forward = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    reference = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, forward, sitk.sitkLinear, -1024.0)
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    # Compare where p + ddf(p) falls between the moving image's voxel centres: within the last half voxel ITK
    # repeats the edge value and the engine fades to air (a boundary convention, not an error).
    u = sitk.GetArrayFromImage(field).astype(np.float64)  # (Z, Y, X, 3) LPS mm
    index = np.indices(u.shape[:3])[::-1].reshape(3, -1)
    to_mm = np.array(fixed.GetDirection()).reshape(3, 3) @ np.diag(fixed.GetSpacing())
    points = to_mm @ index + np.array(fixed.GetOrigin())[:, None] + u.reshape(-1, 3).T
    moving_to_mm = direction @ np.diag(moving.GetSpacing())
    continuous = np.linalg.solve(moving_to_mm, points - np.array(moving.GetOrigin())[:, None])
    inside = np.all((continuous >= 0) & (continuous <= np.array(moving.GetSize())[:, None] - 1), axis=0)
    difference = np.abs(warped - sitk.GetArrayFromImage(reference)).reshape(-1)[inside]
    assert inside.mean() > 0.4 and difference.max() <= 0.01, (inside.mean(), difference.max())

    # det(I + du/dx), du/dx from central differences along the index axes and the grid's index -> mm matrix.
    gradient = np.stack([np.stack(np.gradient(u[..., c], axis=(2, 1, 0)), axis=-1) for c in range(3)], axis=-2)
    determinant = np.linalg.det(np.eye(3) + gradient @ np.linalg.inv(to_mm))
    jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    inner = (slice(2, -2),) * 3
    assert np.abs(jacobian - determinant)[inner].max() <= 1e-4  # measured 1.1e-6

    backward = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(out / "inverse_ddf.nii.gz")), sitk.sitkVectorFloat64)
    )
    errors = []
    for k in range(3, 27, 4):
        for j in range(10, 91, 10):
            for i in range(10, 112, 10):
                p = fixed.TransformIndexToPhysicalPoint((i, j, k))
                errors.append(np.linalg.norm(np.subtract(backward.TransformPoint(forward.TransformPoint(p)), p)))
    assert np.median(errors) < 0.5, np.median(errors)  # measured 0.30 mm on 3 mm voxels


def test_colorize_flags_do_what_they_say(tmp_path):
    """Success paths of `--chroma`, `--batch-size` and `--model colorizer-3d`, each checked for its effect against the
    default run of the same CT."""
    from napari_ctcolor.color import srgb_to_lab

    ct_path = require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz")
    runs = {
        "default": [],
        "half chroma": ["--chroma", "0.5"],
        "batch 3": ["--batch-size", "3"],
        "3d": ["--model", "colorizer-3d"],
    }
    lab = {}
    for name, flags in runs.items():
        out = tmp_path / f"{name.replace(' ', '_')}.nii.gz"
        done = ctcolor("colorize", str(ct_path), "-o", str(out), "--device", "cpu", *flags)
        assert done.returncode == 0, (name, done.stderr)
        lab[name] = srgb_to_lab(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))
    chroma = {name: np.hypot(v[..., 1], v[..., 2]) for name, v in lab.items()}
    coloured = chroma["default"] > 10.0
    # Half the a*, b* at the same L*: C* halves where the full colour is in gamut (rounding moves C* by < 1).
    ratio = np.median(chroma["half chroma"][coloured] / chroma["default"][coloured])
    assert ratio == pytest.approx(0.5, abs=0.03), ratio
    np.testing.assert_allclose(lab["half chroma"][..., 0], lab["default"][..., 0], atol=0.6)
    # The batch size changes only how the slices are grouped, not the colours (a rare pixel may round differently).
    changed = np.any(np.abs(lab["batch 3"] - lab["default"]) > 1.0, axis=-1).mean()
    assert changed < 1e-3, changed
    # Another model: the same luminance, other colours.
    np.testing.assert_allclose(lab["3d"][..., 0], lab["default"][..., 0], atol=0.6)
    assert np.abs(chroma["3d"] - chroma["default"])[coloured].mean() > 1.0
