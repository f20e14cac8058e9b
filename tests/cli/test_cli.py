"""The `ctcolor` CLI: info's JSON contract, colorize exports, and one-line errors with exit 2 for bad input."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from napari_ctcolor.cli import main
from napari_ctcolor.color import grey_to_lightness, srgb_to_lab
from napari_ctcolor.io import read_volume, write_nifti
from napari_ctcolor.phantom import make_phantom
from napari_ctcolor.windowing import window

from conftest import (
    CT_DIR,
    LUMINANCE_BOUND,
    SHARED_DATA,
    assert_documented,
    assert_same_colors,
    ctcolor,
    file_hashes,
    require_shared,
)
from make_bad_inputs import bad_inputs

CONTRACT_KEYS = {"shape", "spacing", "origin", "direction", "modality", "hu_min", "hu_max", "window", "series_count"}


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
    for args in (["info"], ["colorise", "ct.nii.gz"], ["colorize", "ct.nii.gz", "-o", "c.nii.gz", "--chroma", "x"]):
        result = ctcolor(*args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert_documented(lines[0])


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
    chroma = np.hypot(*srgb_to_lab(rgb)[..., 1:].transpose(3, 0, 1, 2))
    soft_tissue = (ct.array > -100) & (ct.array < 200)
    # Colour on soft tissue (measured: 10th percentile C* 26), none in air (the target: C* <= 2 where HU < -900).
    assert np.percentile(chroma[soft_tissue], 10) > 13 and chroma[ct.array < -900].max() <= 2.0

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


def test_colorize_cli_refuses_non_ct_existing_outputs_and_bad_settings(tmp_path, capsys):
    """The MR image as a whole ``ctcolor`` process (its exit code and streams); the bad settings and outputs through
    the same `cli.main` in this process, which spares a process start (4-5 s) for each."""
    mr_path = require_shared(SHARED_DATA / "symnet-oasis" / "image_A_full_size.nii.gz")
    result = ctcolor("colorize", str(mr_path), "-o", str(tmp_path / "x.nii.gz"))
    assert result.returncode == 2 and "not CT" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    ct_path = require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz")
    existing = tmp_path / "exists.nii.gz"
    existing.write_bytes(b"keep me")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("name,R,G,B\nliver,120,40,30\nspleen,300,0,0\n", encoding="utf-8")
    for args in (
        ["-o", str(existing)],
        ["-o", str(tmp_path / "y.nii.gz"), "--window", "nonsense"],
        ["-o", str(tmp_path / "z.nii.gz"), "--chroma", "1.5"],
        ["-o", str(tmp_path / "w.nii.gz"), "--model", str(tmp_path / "missing.safetensors")],
        ["-o", str(tmp_path / "v.nii.gz"), "--palette", "nonsense"],
        ["-o", str(tmp_path / "u.nii.gz"), "--palette", str(bad_csv)],
        ["-o", str(tmp_path / "t.nii.gz"), "--palette", str(tmp_path / "missing.csv")],
        ["-o", str(tmp_path / "x.nii.gz"), "--classes", str(tmp_path / "labels.txt")],
        ["-o", str(tmp_path / "x.nii.gz"), "--classes", str(tmp_path / "x.nii.gz")],
        ["-o", str(tmp_path / "x.nii.gz"), "--classes", str(existing)],
        ["-o", str(tmp_path / "s.mha")],  # another file format's name, not a folder of PNG slices
        ["-o", str(existing / "r.nii.gz")],  # a file where the folder should be: refused before the network runs
        ["-o", str(tmp_path / "q.nii.gz"), "--batch-size", "0"],
    ):
        code = main(["colorize", str(ct_path), *args])
        stderr = capsys.readouterr().err
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, stderr)
        assert_documented(lines[0])
        if str(bad_csv) in args:
            assert "line 3" in lines[0]  # the bad row is named
        if "--chroma" in args:  # the rule's one function, as batch says it (tests/cli/test_batch.py)
            assert lines[0] == "error: chroma strength must be in [0, 1], got 1.5", lines
    assert existing.read_bytes() == b"keep me"
    assert not any(tmp_path.glob("[qtuvwxyz].nii.gz")) and not (tmp_path / "s.mha").exists()


def _warped_against_simpleitk(out, fixed, moving):
    """A `ctcolor register` run's warped.nii.gz in ``out`` against SimpleITK applying its ddf.nii.gz to ``moving``.

    Returns: |warped - SimpleITK's| per fixed voxel (flat); p + ddf(p) of each fixed voxel as a continuous index of
    the moving image ((3, N), x y z); the bound of the difference: the engine maps positions between the two grids in
    float32, so a position up to R mm from the scanner's origin carries a rounding of 2**-24 R on each of the three
    axes, up to `shift` of the moving image's voxels, times the steepest step between neighbouring voxels of the
    moving image (a bone edge); the field (Z, Y, X, 3) LPS mm; the fixed grid's index -> mm matrix.
    """
    field = sitk.ReadImage(str(out / "ddf.nii.gz"))
    forward = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    reference = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, forward, sitk.sitkLinear, -1024.0)
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    u = sitk.GetArrayFromImage(field).astype(np.float64)
    index = np.indices(u.shape[:3])[::-1].reshape(3, -1)
    to_mm = np.array(fixed.GetDirection()).reshape(3, 3) @ np.diag(fixed.GetSpacing())
    points = to_mm @ index + np.array(fixed.GetOrigin())[:, None] + u.reshape(-1, 3).T
    moving_to_mm = np.array(moving.GetDirection()).reshape(3, 3) @ np.diag(moving.GetSpacing())
    continuous = np.linalg.solve(moving_to_mm, points - np.array(moving.GetOrigin())[:, None])
    difference = np.abs(warped - sitk.GetArrayFromImage(reference)).reshape(-1)
    values = sitk.GetArrayFromImage(moving).astype(np.float64)
    steepest = max(float(np.abs(np.diff(values, axis=axis)).max()) for axis in range(3))
    shift = 3.0 * float(np.abs(points).max()) * 2.0**-24 / min(moving.GetSpacing())
    return difference, continuous, shift * steepest, u, to_mm


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
    done = ctcolor(
        "register", str(fixed_path), str(moving_path), "-o", str(out), "--device", "cpu", "--refine", "0", "--no-affine"
    )
    assert done.returncode == 0, done.stderr

    # Compare where p + ddf(p) falls between the moving image's voxel centres (measured 0.010 HU against a bound of
    # 0.023): without a pre-alignment, the engine fades to air within the last half voxel, where ITK repeats the edge
    # value (a boundary convention, not an error).
    difference, continuous, bound, u, to_mm = _warped_against_simpleitk(out, fixed, moving)
    inside = np.all((continuous >= 0) & (continuous <= np.array(moving.GetSize())[:, None] - 1), axis=0)
    assert inside.mean() > 0.4 and difference[inside].max() <= bound, (difference[inside].max(), bound)

    # det(I + du/dx), du/dx from central differences along the index axes and the grid's index -> mm matrix.
    gradient = np.stack([np.stack(np.gradient(u[..., c], axis=(2, 1, 0)), axis=-1) for c in range(3)], axis=-2)
    determinant = np.linalg.det(np.eye(3) + gradient @ np.linalg.inv(to_mm))
    jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    inner = (slice(2, -2),) * 3
    assert np.abs(jacobian - determinant)[inner].max() <= 1e-4  # measured 1.1e-6

    forward, backward = (
        sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(out / name)), sitk.sitkVectorFloat64))
        for name in ("ddf.nii.gz", "inverse_ddf.nii.gz")
    )
    errors = []
    for k in range(3, 27, 4):
        for j in range(10, 91, 10):
            for i in range(10, 112, 10):
                p = fixed.TransformIndexToPhysicalPoint((i, j, k))
                errors.append(np.linalg.norm(np.subtract(backward.TransformPoint(forward.TransformPoint(p)), p)))
    assert np.median(errors) < 0.5, np.median(errors)  # measured 0.30 mm on 3 mm voxels


def test_after_a_prealignment_the_warp_reads_the_edge_voxel_within_half_a_voxel_as_simpleitk_does(tmp_path):
    """`ctcolor register` with its pre-alignment, on a 30-slice CT and a copy tilted by 1 degree about x: where
    p + ddf(p) falls up to half a voxel beyond the moving image's first or last voxel centre, warped.nii.gz equals
    SimpleITK applying ddf.nii.gz (which repeats the edge value there), not a fade to air. Before, a 0.02 degree tilt
    had darkened the first slice of the 20-slice DICOM series by 13 HU on average. Bound: the float32 rounding of the
    positions times the steepest step of the image, as in the test above."""
    fixed_path = require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz")
    fixed = sitk.ReadImage(str(fixed_path))
    tilt = sitk.Euler3DTransform()
    tilt.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    tilt.SetRotation(np.deg2rad(1.0), 0.0, 0.0)
    moving = sitk.Resample(fixed, fixed, tilt, sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    moving_path, out = tmp_path / "tilted.nii.gz", tmp_path / "out"
    sitk.WriteImage(moving, str(moving_path))
    done = ctcolor("register", str(fixed_path), str(moving_path), "-o", str(out), "--device", "cpu", "--refine", "0")
    assert done.returncode == 0, done.stderr

    difference, continuous, bound, _, _ = _warped_against_simpleitk(out, fixed, moving)
    last = np.array(moving.GetSize())[:, None] - 1
    within = np.all((continuous >= -0.5) & (continuous <= last + 0.5), axis=0)
    margin = within & ~np.all((continuous >= 0) & (continuous <= last), axis=0)
    print(f"\nhalf-voxel margin: {margin.sum()} voxels, largest difference {difference[margin].max():.4f} HU")
    assert margin.sum() > 1000 and difference[within].max() <= bound, (difference[within].max(), bound)


def _phantom_pair(tmp_path, moving: str) -> tuple[str, str]:
    """A small phantom CT and a moving image on its grid: the phantom moved by one voxel, or noise."""
    fixed = make_phantom(seed=0, shape=(16, 96, 96), spacing=(3.0, 3.6, 3.6)).volume
    if moving == "moved":
        array = np.roll(fixed.array, 1, axis=2)
    else:
        array = np.random.default_rng(0).integers(-1000, 1000, fixed.shape).astype(np.int16)
    fixed_path, moving_path = tmp_path / "fixed.nii.gz", tmp_path / f"{moving}.nii.gz"
    write_nifti(fixed, fixed_path)
    write_nifti(fixed.with_array(array), moving_path)
    return str(fixed_path), str(moving_path)


def test_register_of_one_scan_twice_is_the_identity_and_two_acquisitions_are_registered(tmp_path):
    """Issue 51: the shared DICOM series against the same series written as NIfTI is one scan twice: the identity
    (zero ddf, det J 1, the warped image the moving one exactly) without pre-alignment, network or refinement. The
    same scan with a second scan's noise (15 HU, as two acquisitions differ at least), a 6 degree rotation of it and
    the same voxels under another header are not taken for copies (`register.COPIES_METRIC`): they are registered, by
    the pre-alignment alone, since after it the images differ only by noise and resampling (issue 82,
    `stages.PREALIGNED_MATCHED_METRIC`). Those three are made from the series' central 320 x 320 voxels (the spine,
    the aorta and the organs around them: a quarter of the work)."""
    series = require_shared(CT_DIR / "totalseg-abdomen-dicom")
    volume = read_volume(series)
    nifti = write_nifti(volume, tmp_path / "series.nii.gz")
    image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)[96:416, 96:416, :]
    centre = tmp_path / "centre.nii.gz"
    sitk.WriteImage(image, str(centre))
    rotation = sitk.Euler3DTransform()
    rotation.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    rotation.SetRotation(0.0, 0.0, np.deg2rad(6.0))
    rotated = tmp_path / "rotated.nii.gz"
    sitk.WriteImage(sitk.Resample(image, image, rotation, sitk.sitkLinear, -1024.0), str(rotated))
    noisy = tmp_path / "noisy.nii.gz"
    noise = np.random.default_rng(5).normal(0.0, 15.0, sitk.GetArrayViewFromImage(image).shape).astype(np.float32)
    noisy_image = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) + noise)
    noisy_image.CopyInformation(image)
    sitk.WriteImage(noisy_image, str(noisy))
    # The same voxels under another header (turned 10 degrees, moved 30 mm): after the pre-alignment the two agree
    # within noise, and nothing is left for the network or the refinement to do.
    reheadered_image = sitk.Image(image)
    turn = np.deg2rad(10.0)
    axes = np.array(image.GetDirection()).reshape(3, 3)
    turned = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]]) @ axes
    reheadered_image.SetDirection(turned.ravel().tolist())
    reheadered_image.SetOrigin((np.array(image.GetOrigin()) + (30.0, -10.0, 5.0)).tolist())
    reheadered = tmp_path / "reheadered.nii.gz"
    sitk.WriteImage(reheadered_image, str(reheadered))
    metrics, stderr = {}, {}
    pairs = (("twice", series, nifti), ("noisy", centre, noisy), ("rotated", centre, rotated))
    for name, fixed, moving in (*pairs, ("reheadered", centre, reheadered)):
        out = tmp_path / name
        done = ctcolor("register", str(fixed), str(moving), "-o", str(out), "--device", "cpu")
        assert done.returncode == 0, done.stderr
        metrics[name], stderr[name] = json.loads((out / "metrics.json").read_text(encoding="utf-8")), done.stderr
    twice = metrics["twice"]
    assert twice["copies"] and not twice["affine"] and twice["refine_iterations"] == 0, twice
    assert {"prealign", "refine"}.isdisjoint(twice["stage_seconds"]) and twice["stage_seconds"]["forward"] < 0.01
    assert twice["ncc_after"] == twice["ncc_before"] and twice["inverse_consistency_mm"] == 0
    # The same series twice is most often a slip (the moving series picked twice): said once, on stderr too.
    assert len(twice["warnings"]) == 1 and "one scan twice" in twice["warnings"][0], twice["warnings"]
    assert f"warning: {twice['warnings'][0]}" in stderr["twice"].splitlines()
    np.testing.assert_array_equal(read_volume(tmp_path / "twice" / "warped.nii.gz").array, read_volume(nifti).array)
    assert np.all(sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / "twice" / "ddf.nii.gz"))) == 0)
    assert np.all(read_volume(tmp_path / "twice" / "jacobian.nii.gz").array == 1)
    for name in ("noisy", "rotated"):
        assert not metrics[name]["copies"] and metrics[name]["refine_iterations"] > 0, metrics[name]
        assert metrics[name]["ncc_after"] > metrics[name]["ncc_before"] - 1e-3
    assert metrics["rotated"]["ncc_after"] > metrics["rotated"]["ncc_before"] + 0.05
    # A second scan's noise, a rotation: registered by the pre-alignment alone (det J 1, no warning of one scan twice).
    for name in ("noisy", "rotated"):
        m = metrics[name]
        assert m["prealigned_matched"] and m["stage_seconds"]["forward"] < 0.01 and not m["warnings"], m
        assert m["jacobian_body_near_1_fraction"] == 1.0 and m["inverse_consistency_mm"] == 0
    # The re-headered copy: the pre-alignment is the registration (before, the network and the refinement lowered
    # such a pair's NCC from 0.99999 to 0.985 and spread its det J over 0.88-1.09).
    again = metrics["reheadered"]
    assert again["prealigned_matched"] and not again["copies"] and again["stage_seconds"]["forward"] < 0.01, again
    # det J of the pre-alignment alone: its affine's determinant, 1 for this rigid placement (1e-3: the optimiser's)
    assert "refine" not in again["stage_seconds"] and np.allclose(again["jacobian_body_p1_p99"], 1.0, atol=1e-3)
    assert again["ncc_after"] >= again["ncc_prealigned"] - 1e-6 and again["ncc_prealigned"] > 0.999
    assert not again["warnings"] and again["folding_fraction"] == 0, again["warnings"]
    seconds = {name: m["seconds"] for name, m in metrics.items()}
    print(f"\nengine seconds: {seconds}")


def test_register_prints_the_registrations_warnings_and_still_succeeds(tmp_path):
    """Default flags (the card's pre-alignment) with the network alone: a sound pair prints no warning; noise against
    the phantom is registered, written, and its warnings (metrics.json's) are stderr lines ``warning: ...``."""
    for moving in ("moved", "noise"):
        fixed, moving_path = _phantom_pair(tmp_path, moving)
        out = tmp_path / moving
        done = ctcolor("register", fixed, moving_path, "-o", str(out), "--refine", "0", "--device", "cpu")
        assert done.returncode == 0, done.stderr
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        assert metrics["affine"] and metrics["refine_iterations"] == 0
        printed = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
        assert printed == [f"warning: {w}" for w in metrics["warnings"]], (done.stderr, metrics["warnings"])
        if moving == "moved":
            assert metrics["warnings"] == []
        else:
            assert any("local NCC in the body" in w for w in metrics["warnings"]), metrics["warnings"]
            assert (out / "warped.nii.gz").exists()


def test_colorize_flags_do_what_they_say(tmp_path):
    """Success paths of `--chroma`, `--batch-size`, `--model colorizer-3d`, `--model FILE` and `--window C,W`, each
    checked for its effect against the default run of the same CT."""
    import shutil

    from napari_ctcolor.weights import find_weights

    ct_path = require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz")
    shipped_copy = tmp_path / "my-colorizer.safetensors"  # the shipped weights, given as a file
    weights, card = find_weights("colorizer-2d")
    shutil.copyfile(weights, shipped_copy)
    shutil.copyfile(card, shipped_copy.with_suffix(".json"))
    runs = {
        "default": [],
        "half chroma": ["--chroma", "0.5"],
        "batch 3": ["--batch-size", "3"],
        "3d": ["--model", "colorizer-3d"],
        "weights file": ["--model", str(shipped_copy)],
        "lung window": ["--window", "-600,1500"],
    }
    rgb = {}
    for name, flags in runs.items():
        out = tmp_path / f"{name.replace(' ', '_')}.nii.gz"
        done = ctcolor("colorize", str(ct_path), "-o", str(out), "--device", "cpu", *flags)
        assert done.returncode == 0, (name, done.stderr)
        rgb[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    lab = {name: srgb_to_lab(v) for name, v in rgb.items()}
    chroma = {name: np.hypot(v[..., 1], v[..., 2]) for name, v in lab.items()}
    colored = chroma["default"] > 10.0
    # Half the a*, b* at the same L*: C* halves where the full colour is in gamut (rounding moves C* by < 1).
    ratio = np.median(chroma["half chroma"][colored] / chroma["default"][colored])
    assert ratio == pytest.approx(0.5, abs=0.03), ratio
    np.testing.assert_allclose(lab["half chroma"][..., 0], lab["default"][..., 0], atol=0.6)
    # The batch size changes only how the slices are grouped, not the colours (a rare pixel may round differently).
    changed = np.any(np.abs(lab["batch 3"] - lab["default"]) > 1.0, axis=-1).mean()
    assert changed < 1e-3, changed
    # Another model: the same luminance, other colours.
    np.testing.assert_allclose(lab["3d"][..., 0], lab["default"][..., 0], atol=0.6)
    assert np.abs(chroma["3d"] - chroma["default"])[colored].mean() > 1.0
    # The same weights from a file: the same colours (two processes: within the stated run-to-run tolerance).
    assert_same_colors(rgb["weights file"], rgb["default"])
    # A window given as centre,width (negative centre included): luminance is the CT in exactly that window.
    ct = read_volume(ct_path)
    lung = grey_to_lightness(window(ct.array, -600.0, 1500.0))
    assert np.abs(lab["lung window"][..., 0] - lung).max() <= LUMINANCE_BOUND
    assert np.abs(lab["default"][..., 0] - lung).max() > 10  # the default (DICOM) window is another one


def _two_series_folder(dicom_series, folder):
    """Slices 0-5 of the shared series as series A (with a patient identity) and slices 10-13 as series B."""
    from conftest import IDENTITY

    folder.mkdir()
    study = pydicom.uid.generate_uid(entropy_srcs=["napari-ctcolor cli study"])
    uids = {}
    for name, picks in {"A": range(0, 6), "B": range(10, 14)}.items():
        uids[name] = pydicom.uid.generate_uid(entropy_srcs=[f"napari-ctcolor cli series {name}"])
        for k in picks:
            path = sorted(dicom_series.iterdir())[k]
            ds = pydicom.dcmread(path)
            for keyword, value in IDENTITY.items():
                setattr(ds, keyword, value)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uids[name]
            ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[f"napari-ctcolor cli {name} {k}"])
            ds.save_as(folder / f"{name}{k:02d}.dcm")
    return uids


def test_keeping_the_identity_of_a_ct_not_read_from_dicom_is_refused_before_any_work(tmp_path):
    """A NIfTI CT has no patient header to keep: `--keep-patient-info` is one line, exit 2, nothing written (the
    colorize widget's Export refuses it through the same `app.export.identity_of`)."""
    ct = write_nifti(make_phantom(seed=0, shape=(8, 64, 64)).volume, tmp_path / "ct.nii.gz")
    out = tmp_path / "dcm"
    done = ctcolor("colorize", str(ct), "-o", str(out), "--format", "dicom", "--keep-patient-info", "--device", "cpu")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "not read from DICOM" in lines[0] and str(ct) in lines[0]
    assert not out.exists()


def test_series_choice_dicom_export_and_identity_from_a_dicom_folder(tmp_path, dicom_series):
    """`info --series`, `colorize --series`, and DICOM export from DICOM input: de-identified by default, exactly the
    source's identity with `--keep-patient-info`."""
    from conftest import IDENTITY

    folder = tmp_path / "two-series"
    uids = _two_series_folder(dicom_series, folder)
    before = file_hashes(folder)
    reader = sitk.ImageSeriesReader()  # the independent reading of series B
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), uids["B"]))
    series_b = reader.Execute()

    info = {
        name: ctcolor("info", str(folder), "--json", *flags)
        for name, flags in {"default": [], "B": ["--series", uids["B"]]}.items()
    }
    assert all(done.returncode == 0 for done in info.values()), [d.stderr for d in info.values()]
    described = {name: json.loads(done.stdout) for name, done in info.items()}
    assert described["default"]["series_count"] == 2 and described["default"]["shape"] == [6, 512, 512]
    assert described["B"]["shape"] == [4, 512, 512]
    np.testing.assert_allclose(described["B"]["origin"], series_b.GetOrigin(), atol=1e-3)

    out = tmp_path / "b.nii.gz"
    done = ctcolor("colorize", str(folder), "--series", uids["B"], "-o", str(out), "--device", "cpu", timeout=300)
    assert done.returncode == 0, done.stderr
    color = sitk.ReadImage(str(out))
    np.testing.assert_allclose(color.GetOrigin(), series_b.GetOrigin(), atol=1e-3)
    lightness = srgb_to_lab(sitk.GetArrayFromImage(color))[..., 0]
    centre, width = described["B"]["window"]  # the series' own DICOM window, the default
    grey = grey_to_lightness(window(sitk.GetArrayFromImage(series_b).astype(np.float32), centre, width))
    assert np.abs(lightness - grey).max() <= LUMINANCE_BOUND

    first_source = pydicom.dcmread(folder / "A00.dcm")
    for flags, kept in (([], False), (["--keep-patient-info"], True)):
        dcm = tmp_path / ("kept" if kept else "anonymous")
        done = ctcolor(
            "colorize", str(folder), "-o", str(dcm), "--format", "dicom", "--device", "cpu", *flags, timeout=300
        )
        assert done.returncode == 0, done.stderr
        files = sorted(dcm.iterdir())
        assert len(files) == 6  # series A, the one with the most slices
        for path in files:
            ds = pydicom.dcmread(path)
            if kept:
                assert {k: str(ds.get(k)) for k in IDENTITY} == IDENTITY
                assert ds.StudyInstanceUID == first_source.StudyInstanceUID
                assert ds.SeriesInstanceUID not in uids.values()  # a new series in the same study
            else:
                assert ds.PatientIdentityRemoved == "YES" and ds.StudyInstanceUID != first_source.StudyInstanceUID
                text = str(ds)
                assert not [v for v in (*IDENTITY.values(), "Test^Patient", "CTC-0001") if v in text], text[:200]
    assert file_hashes(folder) == before  # the inputs are never modified


def test_unavailable_device_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    """The first as a whole ``ctcolor`` process, the others through the same `cli.main` in this process."""
    import torch

    ct_path = require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz")
    absent = [
        d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())) if not ok
    ]
    if not absent:
        pytest.skip("this machine has both a CUDA and an Apple GPU")
    for device in absent:
        for args in (
            ("colorize", str(ct_path), "-o", str(tmp_path / "c.nii.gz")),
            ("register", str(ct_path), str(ct_path), "-o", str(tmp_path / "r")),
        ):
            if device == absent[0] and args[0] == "colorize":
                done = ctcolor(*args, "--device", device)
                code, stderr = done.returncode, done.stderr
            else:
                code, stderr = main([*args, "--device", device]), capsys.readouterr().err
            assert code == 2 and stderr.count("\n") == 1, stderr
            assert f"device {device} requested" in stderr and "--device cpu" in stderr
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_half_way_leaves_no_partial_output(tmp_path, monkeypatch, capsys):
    """A full disk in the middle of an export: `ctcolor colorize` to a PNG folder and to a DICOM folder, and
    `ctcolor register` to OUTDIR, each fail on a later file than the first (in-process `main`, the writer patched to
    raise ENOSPC as a full disk does). Exit 2 with one error line, and neither the output folder nor a temporary one is
    left; an existing empty output folder stays as it was."""
    import errno

    import pydicom
    from PIL import Image

    from napari_ctcolor.app import register as register_job

    ct_path = str(require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz"))

    def fail_on(write, count: int):
        calls = []

        def patched(*args, **kwargs):
            calls.append(1)
            if len(calls) == count:
                raise OSError(errno.ENOSPC, "No space left on device")
            return write(*args, **kwargs)

        return patched

    (tmp_path / "empty").mkdir()
    runs = [
        (Image.Image, "save", 4, ["colorize", ct_path, "-o", str(tmp_path / "pngs")]),
        (Image.Image, "save", 4, ["colorize", ct_path, "-o", str(tmp_path / "empty")]),
        (pydicom, "dcmwrite", 4, ["colorize", ct_path, "-o", str(tmp_path / "dcm"), "--format", "dicom"]),
        (register_job, "write_nifti", 3, ["register", ct_path, ct_path, "-o", str(tmp_path / "reg"), "--refine", "0"]),
    ]
    for owner, name, count, args in runs:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, fail_on(getattr(owner, name), count))
            capsys.readouterr()
            code = main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "No space left" in err[0], (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


def test_register_reads_nan_voxels_as_air_and_writes_finite_outputs(tmp_path):
    """Some NIfTI files mark unreconstructed voxels NaN. `ctcolor register` with such a fixed image (a corner of
    the 3 mm slab NaN, and a voxel +inf) and `ctcolor peer demons` read them as the image's minimum, as the
    colorizer does: no SimpleITK noise on stderr, and every output finite (the checkerboard, the warped image and
    the fields carried NaN before)."""
    ct_path = require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz")
    image = sitk.Cast(sitk.ReadImage(str(ct_path)), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[:, :20, :20] = np.nan
    array[15, 50, 60] = np.inf
    nan_image = sitk.GetImageFromArray(array)
    nan_image.CopyInformation(image)
    nan_path = tmp_path / "nan.nii.gz"
    sitk.WriteImage(nan_image, str(nan_path))
    pair = [str(nan_path), str(ct_path)]
    for command, out in ((["register"], tmp_path / "reg"), (["peer", "demons"], tmp_path / "peer")):
        options = ["--refine", "5"] if command == ["register"] else []
        done = ctcolor(*command, *pair, "-o", str(out), *options)
        assert done.returncode == 0, done.stderr
        assert all(line.startswith("warning: ") for line in done.stderr.strip().splitlines()), done.stderr
        for path in out.glob("*.nii.gz"):
            assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all(), path.name


def test_window_auto_takes_the_contrast_window_where_the_hu_or_the_colorizer_find_blood(tmp_path, dicom_series):
    """``--window auto``: the shared contrast series stored as NIfTI (no header that says contrast was given) is
    composed in the contrast window of the enhanced blood its HU show (`enhanced_blood`: the aorta at about 155 HU,
    followed over its 40 mm), and the CLI says so; the luminance is that window's grey. Cut to 20 mm, too short for
    the HU to tell, it is the colorizer that finds the blood (its named blood: a median of about 100 HU). The
    non-contrast 3 mm cut keeps its default window."""
    from napari_ctcolor.app.window import contrast_window
    from napari_ctcolor.engines.vessels import blood_window, enhanced_blood

    series = read_volume(dicom_series)
    short = dataclasses.replace(series, array=np.ascontiguousarray(series.array[:10]))
    blood = enhanced_blood(series.array, series.spacing)
    assert blood is not None and 140 <= blood <= 170 and enhanced_blood(short.array, short.spacing) is None
    for volume, win in ((series, blood_window(blood)), (short, contrast_window(short.array, short.spacing))):
        nifti, out = tmp_path / f"{volume.shape[0]}.nii.gz", tmp_path / f"c{volume.shape[0]}.nii.gz"
        write_nifti(volume, nifti)
        done = ctcolor("colorize", str(nifti), "-o", str(out), "--window", "auto", "--device", "cpu")
        assert done.returncode == 0, done.stderr
        assert f"window {win.centre:g}/{win.width:g}: contrast-enhanced blood found" in done.stdout, done.stdout
        assert f"window {win.centre:g}/{win.width:g} HU" in nib.load(out).header["descrip"].tobytes().decode()
        lightness = srgb_to_lab(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))[..., 0]
        grey = grey_to_lightness(window(np.asarray(volume.array, np.float32), *win))
        assert np.abs(lightness - grey).max() <= LUMINANCE_BOUND

    cut = require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz")
    plain = tmp_path / "p.nii.gz"
    done = ctcolor("colorize", str(cut), "-o", str(plain), "--window", "auto", "--device", "cpu")
    assert done.returncode == 0 and "contrast-enhanced" not in done.stdout, done.stderr
    assert "window 40/400 HU" in nib.load(plain).header["descrip"].tobytes().decode()
