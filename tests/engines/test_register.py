"""Registration engine, checkerboard and their CLI commands, on the shared OASIS pair and CT (and analytic cases).

The official SYMNet checkpoint was trained on brain MRI, so on CT these tests pin down conventions and geometry (ddf
sign and units in mm LPS, agreement with SimpleITK's DisplacementFieldTransform), not registration accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from napari_ctcolor.cli import main
from napari_ctcolor.engines.checkerboard import checkerboard, checkerboard_mask
from napari_ctcolor.engines.device import cpu_bf16
from napari_ctcolor.engines.prealign import prealign
from napari_ctcolor.engines.register import (
    IC_STRIDE,
    LNCC_WINDOW,
    MAX_NETWORK_VOXELS,
    QUALITY_LIMITS,
    global_ncc,
    load_registration_model,
    local_ncc,
    quality_warnings,
    register,
    working_shape,
)
from napari_ctcolor.engines.register.fields import affine_parts, resize_field
from napari_ctcolor.engines.register.metrics import local_ncc_torch
from napari_ctcolor.engines.register.model import card_normalisation
from napari_ctcolor.engines.register.network import padded_voxels
from napari_ctcolor.errors import Cancelled, InputError
from napari_ctcolor.io import ColorVolume, Volume, read_volume, write_nifti
from napari_ctcolor.models.diffeo import warp
from napari_ctcolor.models.symnet import load_symnet_checkpoint, symnet_forward_fields
from napari_ctcolor.weights import save_weights

from conftest import CT_DIR, DICOM_SERIES, SHARED_DATA, assert_documented, ct_weights_shipped, require_shared

OASIS = SHARED_DATA / "symnet-oasis"
ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = OASIS / "SYMNet_neurite_oasis_smo30_update_80000.pth"
CT = CT_DIR / "totalseg-body-3mm-30slices.nii.gz"
CT_LABELS = CT_DIR / "totalseg-body-3mm-30slices-labels.nii.gz"
AIR_HU = -1100.0  # the shared CT's minimum


# --- helpers ----------------------------------------------------------------------------------------------------------


def _checkpoint() -> str:
    return str(require_shared(CHECKPOINT))


def _crop(volume: Volume, z: slice, y: slice, x: slice) -> Volume:
    """A sub-volume with the origin moved to its first voxel, so it stays at the same place in space."""
    origin = volume.affine[:3, :3] @ [x.start, y.start, z.start] + volume.affine[:3, 3]
    return Volume(volume.array[z, y, x], volume.spacing, origin, volume.direction, dict(volume.meta))


def _resampled(volume: Volume, transform: sitk.Transform, default: float, nearest: bool = False) -> Volume:
    """``volume`` on its own grid, sampled at transform(x): a synthetic moving image with a known deformation."""
    image = volume.to_sitk()
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(image, image, transform, interpolator, default)
    return Volume.from_sitk(out, meta={"source": "deformed copy"})


def _field_image(ddf: np.ndarray, grid: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(ddf.astype(np.float64), isVector=True)
    image.CopyInformation(grid.to_sitk())
    return image


def _points_inside(volume: Volume, grid: Volume, ddf: np.ndarray, margin: float = 1.0) -> np.ndarray:
    """(Z, Y, X) bool: grid voxel x maps to x + ddf(x) at least ``margin`` voxels inside ``volume``.

    At the border grid_sample (zeros padding, blended) and SimpleITK (default value) legitimately differ.
    """
    index = np.indices(grid.shape)[::-1].reshape(3, -1)  # (i, j, k) = (X, Y, Z)
    points = grid.affine[:3, :3] @ index + grid.affine[:3, 3:] + ddf.reshape(-1, 3).T
    moving_index = np.linalg.solve(volume.affine[:3, :3], points - volume.affine[:3, 3:])
    size = np.array(volume.shape[::-1])[:, None]
    inside = np.all((moving_index >= margin) & (moving_index <= size - 1 - margin), axis=0)
    return inside.reshape(grid.shape)


def _sitk_warped(moving: Volume, fixed: Volume, ddf: np.ndarray, default: float) -> np.ndarray:
    """The moving image resampled onto the fixed grid by SimpleITK through DisplacementFieldTransform(ddf)."""
    transform = sitk.DisplacementFieldTransform(_field_image(ddf, fixed))
    moving_image = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(sitk.Resample(moving_image, fixed.to_sitk(), transform, sitk.sitkLinear, default))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the labels present in ``a`` (0 is background)."""
    labels = [v for v in np.unique(a) if v != 0]
    return float(np.mean([2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in labels]))


@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_volume(require_shared(CT))


@pytest.fixture(scope="module")
def ct_labels() -> Volume:
    return read_volume(require_shared(CT_LABELS))


@pytest.fixture(scope="module")
def oasis_pair() -> tuple[Volume, Volume]:
    require_shared(CHECKPOINT)
    return tuple(read_volume(require_shared(OASIS / f"image_{ab}_full_size.nii.gz")) for ab in "AB")


# --- the engine on the OASIS pair -------------------------------------------------------------------------------------


@pytest.mark.slow  # one full-size exact registration: ~30-45 s on 2 CPU cores
def test_oasis_pair_registration_raises_ncc_without_folding(oasis_pair):
    fixed, moving = oasis_pair
    result = register(fixed, moving, model=_checkpoint(), device="cpu")
    m = result.metrics
    print(
        f"\nOASIS exact: NCC {m['ncc_before']:.4f} -> {m['ncc_after']:.4f}, {m['seconds']:.1f} s {m['stage_seconds']}"
    )
    assert m["ncc_after"] > m["ncc_before"] + 0.05
    assert m["folding_fraction"] < 1e-4
    assert m["inverse_consistency_mm"] < 0.1
    assert result.warped.shape == result.jacobian.shape == fixed.shape
    assert result.ddf.shape == result.inverse_ddf.shape == (*fixed.shape, 3)
    assert result.ddf.dtype == result.inverse_ddf.dtype == np.float32
    np.testing.assert_allclose(result.warped.affine, fixed.affine)


def test_engine_warp_equals_model_level_warp_on_an_oasis_crop_in_the_checkpoints_axis_order(oasis_pair):
    # 48 x 64 x 64 voxels, multiples of 16: the engine pads nothing, so it must reproduce the model-level call.
    fixed = _crop(oasis_pair[0], slice(88, 136), slice(64, 128), slice(48, 112))
    moving = _crop(oasis_pair[1], slice(88, 136), slice(64, 128), slice(48, 112))
    result = register(fixed, moving, model=_checkpoint(), device="cpu")

    def minmax(v: Volume) -> torch.Tensor:
        a = v.array.astype(np.float32)
        return torch.from_numpy((a - a.min()) / (a.max() - a.min()))[None, None]

    # The official network saw nibabel's array as stored: the (Z, Y, X) array transposed.
    with torch.inference_mode():
        as_stored = [minmax(v).permute(0, 1, 4, 3, 2) for v in (fixed, moving)]
        fields = symnet_forward_fields(load_symnet_checkpoint(CHECKPOINT), *as_stored)
        expected = warp(as_stored[1], fields.f_ba)[0, 0].numpy().transpose(2, 1, 0)
    low, high = float(moving.array.min()), float(moving.array.max())
    np.testing.assert_allclose((result.warped.array - low) / (high - low), expected, atol=2e-5, rtol=0)
    # ddf = direction @ (spacing_xyz * voxels_xyz), channel c of the field being array axis 2 - c: in the stored
    # order channel c runs along stored axis 2 - c, i.e. (Z, Y, X) array axis c, so the channels reverse.
    voxels = fields.f_ba[0].flip(0).permute(3, 2, 1, 0).numpy()
    m = fixed.direction @ np.diag(fixed.spacing[::-1])
    np.testing.assert_allclose(result.ddf, voxels @ m.T, atol=1e-4, rtol=0)


# --- one axis convention per model, through the command users run -----------------------------------------------------


def _ctcolor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "napari_ctcolor", *args], capture_output=True, text=True, check=False)


@pytest.mark.slow  # two whole registrations of the OASIS pair, ~80 s on 2 CPU cores
@pytest.mark.numeric
def test_cli_register_reproduces_the_official_reference_and_a_restored_copy_gives_the_same_physical_result(tmp_path):
    checkpoint = _checkpoint()
    nib = pytest.importorskip("nibabel")
    paths = [OASIS / "image_A_full_size.nii.gz", OASIS / "image_B_full_size.nii.gz"]
    reference = nib.load(OASIS / "reference-warped-B-to-A.nii.gz").get_fdata()
    moving_stored = nib.load(paths[1]).get_fdata()
    low, high = moving_stored.min(), moving_stored.max()

    done = _ctcolor("register", *map(str, paths), "-o", str(tmp_path / "out"), "--model", checkpoint, "--no-affine")
    assert done.returncode == 0, done.stderr
    warped = nib.load(tmp_path / "out" / "warped.nii.gz")
    diff = np.abs((warped.get_fdata() - low) / (high - low) - reference)
    print(f"\nctcolor register vs official reference: max {diff.max():.2e}")
    assert diff.max() <= 1e-3
    np.testing.assert_allclose(warped.affine, nib.load(paths[0]).affine, atol=1e-6)
    # Inter-subject brains change local volume: with CT's limits det J would be reported as a failure here.
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["volume_change_fraction"] > 0.5 and metrics["quality_limits"]["volume_change_fraction"] is None
    assert metrics["network_dtype"] == "float32"  # an official checkpoint never runs in bf16: parity
    assert not any("det J" in line for line in metrics["warnings"]), metrics["warnings"]

    # The same physical images stored in another order: axes (i, j, k) -> (k, i, j), i and k reversed. The affine
    # changes with the array, so every voxel keeps its position in space.
    order, flips = (2, 0, 1), (0, 2)

    def restored(path, out):
        image = nib.load(path)
        n = np.array(image.shape)
        flip = np.eye(4)
        for axis in flips:  # index i -> n - 1 - i along the reversed axes
            flip[axis, axis], flip[axis, 3] = -1.0, n[axis] - 1
        data = np.flip(image.get_fdata(dtype=np.float32), flips)
        affine = image.affine @ flip
        permute = np.eye(4)[:, [*order, 3]]  # new index axis a is old axis order[a]
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data.transpose(order)), affine @ permute), out)
        return out

    copies = [restored(p, tmp_path / f"copy-{k}.nii.gz") for k, p in enumerate(paths)]
    moved = read_volume(copies[0])
    original = read_volume(paths[0])
    np.testing.assert_allclose(
        moved.to_sitk().TransformIndexToPhysicalPoint((0, 0, 0)),
        original.to_sitk().TransformIndexToPhysicalPoint((159, 0, 223)),
        atol=1e-6,
    )
    done = _ctcolor("register", *map(str, copies), "-o", str(tmp_path / "copy"), "--model", checkpoint, "--no-affine")
    assert done.returncode == 0, done.stderr
    # Back on the original grid (an exact permutation of voxels), the result is the same image.
    again = read_volume(tmp_path / "copy" / "warped.nii.gz").to_sitk()
    back = sitk.GetArrayFromImage(sitk.Resample(again, original.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor))
    first = read_volume(tmp_path / "out" / "warped.nii.gz").array
    print(f"restored copy vs original: max {np.abs(back - first).max() / (high - low):.2e}")
    np.testing.assert_allclose(back, first, atol=1e-3 * (high - low), rtol=0)


def test_axis_map_moves_images_and_fields_consistently():
    # Warping in the network's axes and moving the result back equals warping the original with the moved-back field.
    from napari_ctcolor.engines.orientation import AxisMap

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 6, 7, 8, generator=generator, dtype=torch.float64)
    for axis_map in (AxisMap((2, 0, 1), (True, False, True)), AxisMap((1, 2, 0), (False, True, False))):
        net_image = axis_map.to_network(image)
        field = torch.rand(1, 3, *net_image.shape[2:], generator=generator, dtype=torch.float64) * 2 - 1
        expected = axis_map.to_network(warp(image, axis_map.field_from_network(field)))
        torch.testing.assert_close(warp(net_image, field), expected, atol=1e-12, rtol=0)


def _rigid_motion(ct: Volume, degrees: float, shift_mm: tuple[float, float, float]) -> tuple[Volume, np.ndarray]:
    """``ct`` moved rigidly (rotation about its centre's z axis, then ``shift_mm``), and the true ddf (mm, LPS)."""
    image = ct.to_sitk()
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    rigid.SetRotation(0.0, 0.0, np.deg2rad(degrees))
    rigid.SetTranslation(shift_mm)
    moving = _resampled(ct, rigid, AIR_HU)  # moving(q) = ct(T(q)): fixed point p is at T^-1(p) in the moving image
    index = np.indices(ct.shape)[::-1].reshape(3, -1)
    points = ct.affine[:3, :3] @ index + ct.affine[:3, 3:]
    inverse = rigid.GetInverse()
    moved = np.array([inverse.TransformPoint(p) for p in points.T.tolist()]).T
    return moving, (moved - points).T.reshape(*ct.shape, 3)


def _deformed(ct: Volume, labels: Volume, seed: int) -> tuple[Volume, Volume]:
    from napari_ctcolor.training.symnet import deform_pair

    pair = deform_pair(ct.array, labels.array, ct.spacing, np.random.default_rng(seed), {"max_mm": 12.0})
    moving = Volume(pair.moving[0, 0].numpy(), ct.spacing, ct.origin, ct.direction, {"source": "deformed"})
    return moving, Volume(pair.moving_labels, ct.spacing, ct.origin, ct.direction)


def _register_files(tmp_path: Path, fixed: Volume, moving: Volume, *options: str) -> tuple[dict, np.ndarray, str]:
    """``ctcolor register`` of the two volumes written as NIfTI: (metrics.json, ddf (Z, Y, X, 3) mm LPS, stderr)."""
    paths = [tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"]
    write_nifti(fixed, paths[0])
    write_nifti(moving, paths[1])
    done = _ctcolor("register", *map(str, paths), "-o", str(tmp_path / "out"), *options)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    return metrics, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "ddf.nii.gz"))), done.stderr


def test_cli_register_default_recovers_a_rigid_motion_without_inventing_volume_change(ct, tmp_path):
    """Issue 23: a plain repositioning (8 degrees, 14 mm) with no flags. The defaults pre-align and run the network,
    which finds nothing more (issue 82): the pre-alignment is kept; the error is measured in the body where the true
    moving point lies in the moving image's field of view (6 mm of the 90 mm slab leave it)."""
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not shipped in this checkout")
    moving, truth = _rigid_motion(ct, 8.0, (10.0, -8.0, 6.0))
    metrics, ddf, _ = _register_files(tmp_path, ct, moving)
    jacobian = read_volume(tmp_path / "out" / "jacobian.nii.gz").array
    body = (ct.array > -500) & _points_inside(moving, ct, truth, margin=0.0)
    error = np.linalg.norm(ddf - truth, axis=-1)[body]
    in_range = float(np.mean((jacobian[body] >= 0.8) & (jacobian[body] <= 1.25)))
    near_one = float(np.mean((jacobian[body] >= 0.95) & (jacobian[body] <= 1.05)))
    print(
        f"\nrigid 8 deg, 14 mm: error {error.mean():.2f} / {np.percentile(error, 95):.2f} mm (mean / p95), "
        f"det J in 0.8..1.25 on {100 * in_range:.1f} %, in 0.95..1.05 on {100 * near_one:.1f} % of the body, "
        f"{metrics['seconds']:.1f} s"
    )
    # The network finds nothing the pre-alignment left (`stages.NETWORK_GAIN_MIN`): the pre-alignment is the
    # registration, nothing is refined, and every voxel keeps its volume.
    assert metrics["affine"] and metrics["network_dropped"] and metrics["refine_iterations"] == 50  # planned
    assert metrics["network_gain"] < 0.1 and "refine" not in metrics["stage_seconds"]
    # The CT card allows bf16 on a CPU with bf16 instructions (the accuracy below holds either way).
    assert metrics["network_dtype"] == ("bfloat16" if cpu_bf16() else "float32")
    # Measured 0.25 / 0.36 mm, 100 % and 100 % (2026-11-29, the pre-alignment alone); refined from the network's map
    # 0.29 / 0.71 mm, 100 % and 93 % (2026-11-28); issue 23's targets are 1.5 / 3 mm and 98 %, issue 62 asks 99 % in
    # 0.95..1.05.
    assert error.mean() <= 1.5 and np.percentile(error, 95) <= 3.0
    assert in_range >= 0.98 and near_one >= 0.99 and metrics["folding_fraction"] <= 5e-4
    assert metrics["lncc_after"] > metrics["lncc_before"] + 0.3 and not metrics["warnings"], metrics["warnings"]
    # The CLI pre-aligns in the child that reads the inputs while torch imports (tests/readers/test_prefetch.py): the
    # same transform as the engine's own on the same files, to the rounding of ITK's threaded sums.
    here = affine_parts(prealign(read_volume(tmp_path / "fixed.nii.gz"), read_volume(tmp_path / "moving.nii.gz")))
    np.testing.assert_allclose(metrics["prealign_matrix"], here[0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(metrics["prealign_offset_mm"], here[1], rtol=0, atol=1e-6)


def test_cli_register_ends_at_the_prealignment_where_the_images_differ_only_by_noise(tmp_path):
    """Issue 82: a 512² series against itself turned 4 degrees and moved 7 mm, nothing else changed. After the
    pre-alignment the images averaged over 6 mm boxes differ by 5.5e-6 in mean square (deformations the network
    reduces: 1.7e-4 and more, `stages.PREALIGNED_MATCHED_METRIC`): the pre-alignment is the registration, without
    the network (whose map had taken nothing away: gain -0.16) or the refinement; det J that of the affine map on
    every voxel, the motion recovered. Measured: error 0.1-0.2 mm."""
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not shipped in this checkout")
    series = read_volume(require_shared(DICOM_SERIES))
    moving, truth = _rigid_motion(series, 4.0, (7.0, 0.0, 0.0))
    metrics, ddf, _ = _register_files(tmp_path, series, moving)
    assert metrics["prealigned_matched"] and metrics["prealigned_coarse_mse"] < 5e-5, metrics
    assert metrics["stage_seconds"]["forward"] < 0.01 and "refine" not in metrics["stage_seconds"]
    assert metrics["jacobian_body_near_1_fraction"] == 1.0 and metrics["folding_fraction"] == 0.0
    assert metrics["inverse_consistency_mm"] == 0.0 and not metrics["warnings"]
    body = (series.array > -500) & _points_inside(moving, series, truth, margin=0.0)
    error = np.linalg.norm(ddf - truth, axis=-1)[body]
    print(f"\nrigid 4 deg, 7 mm, 512²: coarse MSE {metrics['prealigned_coarse_mse']:.2g}, error {error.mean():.2f} mm")
    assert error.mean() <= 0.5 and np.percentile(error, 95) <= 1.0
    # The inverse written is the affine map's exact inverse: the two compose to the identity (SimpleITK's reading).
    inverse = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "inverse_ddf.nii.gz")))
    a, b = np.asarray(metrics["prealign_matrix"]), np.asarray(metrics["prealign_offset_mm"])
    index = np.indices(series.shape)[::-1].reshape(3, -1)  # (i, j, k) = (X, Y, Z)
    points = (series.affine[:3, :3] @ index + series.affine[:3, 3:]).T.reshape(*series.shape, 3)
    np.testing.assert_allclose(points + inverse, (points - b) @ np.linalg.inv(a).T, atol=1e-3)


def test_cli_register_aligns_two_scans_on_different_grids(ct, tmp_path):
    """Two scans never share a voxel grid. The rigid motion above (6 degrees, 11 mm), the moving scan resampled onto a
    grid of its own: 2.6 mm pixels, its origin off the fixed grid's, and 22 slices that cover 66 of the fixed scan's
    90 mm. Every default stage runs (ITK's demons takes one grid: the refinement crashed on this before 2026-11-25),
    and the motion is recovered within the issue's 1.5 / 3 mm (mean / p95) in the body where the true moving point
    lies in the moving scan. Measured: 0.93 / 1.88 mm; 1.82 / 5.26 mm (5.7 mm on the slice next to the moving scan's
    edge) before the fixed image was shown as background where the moving scan does not reach."""
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not shipped in this checkout")
    moved, truth = _rigid_motion(ct, 6.0, (8.0, -6.0, 4.0))
    source = moved.to_sitk()
    grid = sitk.Image([152, 112, 22], sitk.sitkInt16)
    grid.SetSpacing([2.6, 2.6, 3.0])
    grid.SetDirection(source.GetDirection())
    grid.SetOrigin(source.TransformContinuousIndexToPhysicalPoint([-0.7, 0.9, 4.3]))
    moving = Volume.from_sitk(sitk.Resample(source, grid, sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkInt16))
    metrics, ddf, _ = _register_files(tmp_path, ct, moving)
    body = (ct.array > -500) & _points_inside(moving, ct, truth, margin=0.0)
    error = np.linalg.norm(ddf - truth, axis=-1)[body]
    print(f"\nrigid 6 deg, 11 mm onto another grid: error {error.mean():.2f} / {np.percentile(error, 95):.2f} mm")
    assert metrics["refine_iterations"] > 0 and 0.6 < metrics["overlap_fraction"] < 0.8
    assert error.mean() <= 1.5 and np.percentile(error, 95) <= 3.0


def test_cli_register_of_a_follow_up_with_thicker_voxels_fits_no_blur_as_deformation(ct, tmp_path):
    """A follow-up reconstructed with 4.5 mm voxels against the fixed CT's 3 mm: a rigid motion (5 degrees, 10 mm).
    The coarser scan's blurred edges had been fitted as local deformation (`refine.match_resolution` now blurs the
    finer image to match before the refinement). Measured in the body where the true point lies in the moving scan,
    mean error / det J within 0.95-1.05: 0.99 mm / 0.485 at commit d4669a8, 0.74 mm / 0.581 with the matching
    (2026-11-28, Intel Xeon with AVX-512, 2 threads)."""
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not shipped in this checkout")
    moved, truth = _rigid_motion(ct, 5.0, (8.0, -6.0, 0.0))
    source = moved.to_sitk()
    size = [int(n * 3.0 / 4.5) for n in source.GetSize()]
    grid = sitk.Image(size, sitk.sitkInt16)
    grid.SetSpacing([4.5, 4.5, 4.5])
    grid.SetDirection(source.GetDirection())
    grid.SetOrigin(source.TransformContinuousIndexToPhysicalPoint([0.25, 0.25, 0.25]))
    moving = Volume.from_sitk(sitk.Resample(source, grid, sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkInt16))
    metrics, ddf, _ = _register_files(tmp_path, ct, moving)
    jacobian = read_volume(tmp_path / "out" / "jacobian.nii.gz").array
    body = (ct.array > -500) & _points_inside(moving, ct, truth, margin=0.0)
    error = np.linalg.norm(ddf - truth, axis=-1)[body]
    near_one = float(np.mean((jacobian[body] >= 0.95) & (jacobian[body] <= 1.05)))
    print(f"\n4.5 mm follow-up: error {error.mean():.2f} / {np.percentile(error, 95):.2f} mm, det J {near_one:.3f}")
    assert error.mean() <= 0.85 and near_one >= 0.53


def test_cli_register_without_prealignment_warns_that_a_rigid_motion_was_not_recovered(ct, tmp_path):
    """The failure issue 23 found silent: a large repositioning registered by the network alone. NCC still rises;
    the warnings must say the result is doubtful."""
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not shipped in this checkout")
    moving, truth = _rigid_motion(ct, 10.0, (15.0, -12.0, 8.0))
    metrics, ddf, stderr = _register_files(tmp_path, ct, moving, "--no-affine", "--refine", "0")
    error = np.linalg.norm(ddf - truth, axis=-1)[ct.array > -500]
    print(f"\nno pre-alignment: error {error.mean():.1f} mm, warnings {metrics['warnings']}")
    assert error.mean() > 5.0  # the premise: the network alone does not recover this motion
    assert metrics["warnings"], metrics
    printed = [line[len("warning: ") :] for line in stderr.splitlines() if line.startswith("warning: ")]
    assert printed == metrics["warnings"]


def test_cli_register_swapped_pair_gives_the_inverse_map(ct, ct_labels, tmp_path):
    """SYMNet's promise kept through the refinement: registering (B, A) gives the inverse of registering (A, B), and
    each run's inverse_ddf undoes its ddf. Measured in the body, away from the 2-voxel border, on this 3 mm grid:
    swap 0.41 / 1.20 mm, round trip 0.03 / 0.08 mm (median / p95). The demons refinement is symmetric in its forces,
    not exactly in its arithmetic, so the bounds are a third of a voxel / one voxel for the swap and 0.5 / 1.5 mm for
    the round trip (ITK's inversion stops at 0.1 voxel), far below the 12 mm deformation.
    """
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not shipped in this checkout")
    moving, _ = _deformed(ct, ct_labels, seed=5)
    paths = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    write_nifti(ct, paths[0])
    write_nifti(moving, paths[1])
    fields = {}
    for name, pair in (("ab", paths), ("ba", paths[::-1])):
        done = _ctcolor("register", *map(str, pair), "-o", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
        fields[name] = [
            sitk.ReadImage(str(tmp_path / name / f"{f}.nii.gz"), sitk.sitkVectorFloat64) for f in ("ddf", "inverse_ddf")
        ]
    inner = (slice(2, -2),) * 3
    body = (ct.array > -500)[inner]
    swap = np.linalg.norm(sitk.GetArrayFromImage(fields["ba"][0]) - sitk.GetArrayFromImage(fields["ab"][1]), axis=-1)
    swap = swap[inner][body]
    # Round trip p -> p + ddf(p) -> that point + inverse_ddf(...) as one composed SimpleITK transform.
    grid = fields["ab"][0]
    forward = sitk.DisplacementFieldTransform(sitk.Image(fields["ab"][0]))
    backward = sitk.DisplacementFieldTransform(sitk.Image(fields["ab"][1]))
    round_trip = sitk.TransformToDisplacementField(
        sitk.CompositeTransform([backward, forward]),  # applied last to first: forward, then backward
        sitk.sitkVectorFloat64,
        grid.GetSize(),
        grid.GetOrigin(),
        grid.GetSpacing(),
        grid.GetDirection(),
    )
    residual = np.linalg.norm(sitk.GetArrayFromImage(round_trip), axis=-1)[inner][body]
    print(
        f"\nswap: {np.median(swap):.2f} / {np.percentile(swap, 95):.2f} mm, round trip "
        f"{np.median(residual):.2f} / {np.percentile(residual, 95):.2f} mm (median / p95)"
    )
    assert np.median(swap) < 1.0 and np.percentile(swap, 95) < 3.0
    assert np.median(residual) < 0.5 and np.percentile(residual, 95) < 1.5


def _ours_and_demons(tmp_path: Path, seed: int, phase: bool) -> dict[str, tuple[float, float]]:
    """``ctcolor register`` (defaults) and ``ctcolor peer demons`` on the 3 mm CT and its `_deformed` copy (with a
    contrast-phase change when ``phase``), in the same run: {method: (mean Dice over all structures, over the aorta,
    vena cava and iliac vessels)}, through each written ddf."""
    from napari_ctcolor.engines.geometry import warp
    from napari_ctcolor.training.data import load_real_case
    from napari_ctcolor.training.symnet import dice_per_structure, phase_change

    case = load_real_case(require_shared(CT).parents[1], CT.name, CT_LABELS.name)
    labels = Volume(case.labels, case.ct.spacing, case.ct.origin, case.ct.direction)
    moving, moving_labels = _deformed(case.ct, labels, seed=seed)
    if phase:
        changed = phase_change(moving.array, moving_labels.array, case.label_names, np.random.default_rng(seed))
        moving = Volume(changed, moving.spacing, moving.origin, moving.direction, {"source": "other phase"})
    paths = [tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"]
    write_nifti(case.ct, paths[0])
    write_nifti(moving, paths[1])
    scores = {}
    for name, command in (("ours", ["register"]), ("demons", ["peer", "demons"])):
        done = _ctcolor(*command, *map(str, paths), "-o", str(tmp_path / name))
        assert done.returncode == 0, done.stderr
        ddf = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "ddf.nii.gz")))
        per = dice_per_structure(case.labels, warp(moving_labels, case.ct, ddf, "nearest", 0), case.label_names)
        vessels = [d for n, d in per.items() if n.startswith(("aorta", "inferior_vena_cava", "iliac_"))]
        assert vessels, sorted(per)
        scores[name] = (float(np.mean(list(per.values()))), float(np.mean(vessels)))
    return scores


def test_cli_register_keeps_vessels_together_across_a_contrast_phase_change_where_demons_does_not(tmp_path):
    """Issue 23: the moving scan in another contrast phase (arteries 150 HU darker, veins and liver brighter, kidneys
    and spleen darker, new noise: `training.symnet.phase_change`) after a 12 mm deformation. ``ctcolor register``
    (defaults) against ``ctcolor peer demons`` on the same files, in the same run; Dice through each written ddf.
    The refinement sees each image's local structure as well as its intensities (`refine._local_structure`).
    Measured here (all structures / aorta, vena cava and iliac vessels): ours 0.933 / 0.931 (2026-11-28; 0.927 /
    0.925 with the field's smoothing alone, 0.925 / 0.942 with Thirion's 0.5-voxel demons updates, before
    `engines.register.refine.step_length`), demons 0.919 / 0.909; with intensities alone (``LOCAL_WEIGHT = 0``) ours was
    0.919 / 0.907 and this test failed."""
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not shipped in this checkout")
    scores = _ours_and_demons(tmp_path, seed=7, phase=True)
    print(f"\nphase change, Dice all / vessels: ours {scores['ours']}, demons {scores['demons']}")
    # Margins of 0.014 / 0.022: far above the ~1e-3 that thread counts and CPUs move a Dice of either method.
    assert scores["ours"][0] >= scores["demons"][0] and scores["ours"][1] >= scores["demons"][1]


def test_cli_register_beats_demons_on_a_plain_deformation_of_a_3mm_ct(tmp_path):
    """Issue 23: a 3 mm grid's demons updates may move 0.75 of a voxel (`refine.step_length`; Thirion's 0.5
    stopped 50 iterations short of convergence there). ``ctcolor register`` (defaults) against ``ctcolor peer demons``
    on a 12 mm deformation of the 3 mm CT, same run. Measured (mean Dice over all structures): ours 0.9066 (2026-11-28,
    with the update's smoothing; 0.9101 with the field's alone), demons 0.9055; with Thirion's 0.5 ours was 0.9006 and
    this test failed (seeds 7 and 11: 0.9350 / 0.9270 against demons' 0.9295 / 0.9162)."""
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not shipped in this checkout")
    scores = _ours_and_demons(tmp_path, seed=3, phase=False)
    print(f"\nplain 3 mm deformation, Dice all: ours {scores['ours'][0]:.4f}, demons {scores['demons'][0]:.4f}")
    # A margin of 0.0011 (0.0046 before the update's smoothing): ours and demons gave the same four decimals with one
    # ITK thread as with two; the network in bfloat16 or float32 moves Dice by at most 0.0002 (the CT card).
    assert scores["ours"][0] >= scores["demons"][0]


def test_refinement_raises_dice_and_reports_each_chunk_of_iterations_with_cancel_inside_it(ct, ct_labels):
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not shipped in this checkout")
    from napari_ctcolor.engines.register.refine import CHUNK_ITERATIONS, level_chunks
    from napari_ctcolor.training.symnet import mean_dice

    moving, labels = _deformed(ct, ct_labels, seed=5)
    plain = register(ct, moving, refine=0, moving_labels=labels, device="cpu")
    steps: list[tuple[int, int]] = []
    refined = register(ct, moving, refine=20, moving_labels=labels, device="cpu", progress=lambda *s: steps.append(s))
    before = mean_dice(ct_labels.array, labels.array)
    dice = [mean_dice(ct_labels.array, r.warped_labels.array) for r in (plain, refined)]
    print(f"\nrefinement: Dice {before:.3f} -> {dice[0]:.3f} (network) -> {dice[1]:.3f} (20 iterations)")
    assert dice[1] > dice[0] + 0.02 and dice[0] > before
    assert refined.metrics["folding_fraction"] <= 5e-4 and refined.metrics["refine_iterations"] == 20
    # 7 stages, the pre-alignment, a tick per call of demons (3 mm: no coarser level; a probe iteration, then
    # CHUNK_ITERATIONS at a time), the refinement's end and the inversion.
    assert level_chunks(20) == [1, *[CHUNK_ITERATIONS] * 3, 4] and CHUNK_ITERATIONS == 5
    total = 7 + 1 + len(level_chunks(20)) + 2
    assert steps == [(k, total) for k in range(1, total + 1)]
    with pytest.raises(Cancelled):
        register(ct, moving, refine=20, cancel=lambda: len(steps) >= total + 5, progress=lambda *s: steps.append(s))
    assert len(steps) == total + 5  # cancelled inside the refinement, after its second chunk


TURNED = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("spacing,direction", [((3.0, 0.9, 1.1), np.eye(3)), ((2.0, 0.7, 0.8), TURNED)])
def test_the_inverse_is_upsampled_from_its_binned_grid_as_simpleitk_resamples_it(spacing, direction):
    """`inverse.upsample_binned` (torch) against SimpleITK's linear resampling of a ``BinShrink``-ed field onto the
    full grid: within 1e-5 mm (float32 against float64), the voxels past the last whole box 0 alike, on an
    anisotropic grid and a turned one whose sizes are no multiple of the boxes."""
    from napari_ctcolor.engines.register.inverse import INVERSE_MM, upsample_binned
    from napari_ctcolor.engines.register.refine import _image

    shape = (17, 64, 70)
    grid = Volume(np.zeros(shape, np.int16), spacing, (3.0, -20.0, 7.5), direction)
    field = np.random.default_rng(0).normal(0.0, 3.0, (*shape, 3))
    image = _image(field, grid, np.float64)
    factors = [max(1, int(INVERSE_MM / s)) for s in image.GetSpacing()]
    assert max(factors) > 1 and any(n % k for n, k in zip(shape[::-1], factors, strict=True))
    small = sitk.BinShrink(image, factors)
    want = sitk.Resample(small, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    small_t = torch.from_numpy(sitk.GetArrayFromImage(small)).permute(3, 0, 1, 2)[None]
    got = upsample_binned(small_t, tuple(factors[::-1]), shape)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), sitk.GetArrayFromImage(want), rtol=0, atol=1e-5)


def _smooth_field(shape: tuple[int, ...], spacing: tuple[float, ...], amplitude_mm: float) -> np.ndarray:
    rng = np.random.default_rng(1)
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), [15.0 / s for s in spacing]) for _ in "xyz"], -1)
    return field / np.abs(field).max() * amplitude_mm


@pytest.mark.parametrize("spacing,direction", [((3.0, 0.9, 1.1), np.eye(3)), ((2.0, 2.5, 2.5), TURNED)])
def test_the_inverse_undoes_the_field_and_agrees_with_itks_inversion(spacing, direction):
    """`inverse.invert_field` (torch fixed-point iteration) on a smooth field of up to 8 mm, away from the border: v
    agrees with ITK's ``InvertDisplacementField`` on the same boxes within 0.1 mm (measured: 0.04 mm at most on the
    3 mm CT's grid); the round trip p -> p + u(p) -> that point + v(...), composed by SimpleITK's displacement
    transforms, returns on average as close as ITK's inverse brings it (within 10 % and 0.005 mm), and everywhere
    within the iteration's stopping tolerance (a tenth of a box). A constant shift, which moves the border, inverts
    to minus the shift everywhere a box covers."""
    from napari_ctcolor.engines.register.inverse import INVERSE_MM, invert_field
    from napari_ctcolor.engines.register.refine import _image

    shape = (30, 64, 66)
    grid = Volume(np.zeros(shape, np.int16), spacing, (3.0, -20.0, 7.5), direction)
    field = _smooth_field(shape, spacing, 8.0)
    got = invert_field(torch.from_numpy(field.astype(np.float32)), grid).numpy()
    # Where q + v(q) stays inside the grid: ITK reads u outside it by its own rule.
    inner = tuple(slice(m, -m) for m in (int(np.ceil(8.0 / s)) + 3 for s in spacing))

    image = _image(np.zeros(shape), grid)
    factors = [max(1, int(INVERSE_MM / s)) for s in image.GetSpacing()]
    small = sitk.BinShrink(_image(field, grid, np.float64), factors)
    itk = sitk.InvertDisplacementField(small, 10, 0.1, 0.001, False)
    itk = sitk.Resample(itk, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    itk = sitk.GetArrayFromImage(itk)
    assert np.linalg.norm(got - itk, axis=-1)[inner].max() < 0.1

    points = [
        image.TransformIndexToPhysicalPoint((x, y, z))
        for z in range(inner[0].start, shape[0] + inner[0].stop, 2)
        for y in range(inner[1].start, shape[1] + inner[1].stop, 6)
        for x in range(inner[2].start, shape[2] + inner[2].stop, 6)
    ]
    forward = sitk.DisplacementFieldTransform(_image(field, grid, np.float64))

    def round_trip(inverse: np.ndarray) -> np.ndarray:
        backward = sitk.DisplacementFieldTransform(_image(inverse, grid, np.float64))
        ends = [backward.TransformPoint(forward.TransformPoint(p)) for p in points]
        return np.linalg.norm(np.subtract(ends, points), axis=1)

    ours, theirs = round_trip(got), round_trip(itk)
    print(f"\nround trip (mm, mean and max): ours {ours.mean():.4f} {ours.max():.4f}", end="")
    print(f", ITK's {theirs.mean():.4f} {theirs.max():.4f}")
    assert ours.mean() <= 1.1 * theirs.mean() + 0.005 and ours.max() < 0.1 * min(INVERSE_MM, max(spacing))

    shift = np.broadcast_to(np.array([12.0, -7.0, 4.0], np.float32), (*shape, 3))
    got = invert_field(torch.from_numpy(np.ascontiguousarray(shift)), grid).numpy()
    covered = tuple(slice(0, n - n % k) for n, k in zip(shape, factors[::-1], strict=True))
    np.testing.assert_allclose(got[covered], -shift[covered], atol=1e-4)


def _drained(steps):
    """The value a refinement generator returns, its progress yields ignored."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def test_the_device_demons_take_a_direction_matrix_with_negative_strides(ct):
    """A napari layer's direction matrix may be a view with negative strides, which torch refuses to wrap: `Volume`
    keeps a contiguous copy, so the refinement (`demons.refine_field`, on the CPU's kernels and in the GPU's torch
    code) refines as with a contiguous matrix."""
    from napari_ctcolor.engines.register.demons import refine_field

    crop = np.clip((ct.array[4:12, 20:52, 30:62].astype(np.float32) + 1000) / 2000, 0, 1)
    flipped_view = np.eye(3)[::-1, ::-1]  # the identity, as a view with negative strides
    assert any(stride < 0 for stride in flipped_view.strides)
    seed = torch.zeros((*crop.shape, 3), dtype=torch.float64)
    for kernels in (True, False):
        fields = []
        for direction in (flipped_view, np.ascontiguousarray(flipped_view)):
            fixed = Volume(crop, ct.spacing, ct.origin, direction)
            moving = fixed.with_array(np.roll(crop, 1, axis=2))
            fields.append(_drained(refine_field(fixed, moving, seed, 3, lambda: None, kernels=kernels)))
        assert fields[0].shape == (*crop.shape, 3)
        # The same arithmetic on the same values in one process; 1e-6 mm leaves room for a threaded sum's order.
        torch.testing.assert_close(fields[0], fields[1], rtol=0, atol=1e-6)


def _simpleitk_demons(fixed: Volume, moving: Volume, seed_mm: np.ndarray, iterations: int, step: float) -> np.ndarray:
    """The reference: SimpleITK's ``FastSymmetricForcesDemonsRegistrationFilter`` with the refinement's settings
    (`refine`) on the refinement's images (`refine.demons_images`), one level, from ``seed_mm`` (Z, Y, X, 3) LPS mm."""
    from napari_ctcolor.engines.register import refine

    fixed_image, moving_image = refine.demons_images(fixed, moving, lambda: None)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetStandardDeviations(refine.SMOOTHING_VOXELS)
    demons.SetSmoothUpdateField(True)
    demons.SetUpdateFieldStandardDeviations(refine.UPDATE_SMOOTHING_VOXELS)
    demons.SetMaximumUpdateStepLength(step)
    demons.SetNumberOfIterations(iterations)
    field = sitk.GetImageFromArray(seed_mm.astype(np.float64), isVector=True)
    field.CopyInformation(fixed_image)
    return sitk.GetArrayFromImage(demons.Execute(fixed_image, moving_image, field))


def test_one_demons_iteration_is_simpleitks_on_a_turned_grid_faces_included():
    """One iteration of the refinement's level (`demons._Level`: the CPU's numba kernels, and the GPU's torch code run
    on the CPU) against SimpleITK's filter from the same random smooth seed, on a grid of 3 x 1.2 x 1.1 mm turned 29
    degrees, every face included (where ITK takes one-sided differences of the warped image): equal to float32
    rounding. Measured 2026-11-29: 3e-6 mm (kernels) and 5e-4 mm (torch) at most over 2 iterations."""
    from scipy import ndimage

    from napari_ctcolor.engines.register import refine
    from napari_ctcolor.engines.register.demons import _Level

    rng = np.random.default_rng(0)
    shape, spacing = (24, 40, 44), (3.0, 1.2, 1.1)
    turn = 0.5
    direction = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1.0]])
    f = ndimage.gaussian_filter(rng.random(shape), 2).astype(np.float32) * 5
    m = ndimage.shift(f, (0.4, -1.3, 1.1), order=1, mode="nearest").astype(np.float32)
    seed = ndimage.gaussian_filter(rng.normal(0.0, 1.0, (*shape, 3)), (3, 3, 3, 0))
    images = [Volume(a, spacing, (0.0, 0.0, 0.0), direction) for a in (f, m)]
    expected = _simpleitk_demons(*images, seed, 2, refine.LONG_STEP)
    fixed_image, moving_image = refine.demons_images(*images, lambda: None)
    pair = [torch.from_numpy(sitk.GetArrayFromImage(i))[None, None] for i in (fixed_image, moving_image)]
    rotation = torch.as_tensor(direction, dtype=torch.float32)
    for kernels, tolerance in ((True, 1e-4), (False, 2e-3)):
        level = _Level(*pair, list(spacing), refine.LONG_STEP, kernels)
        field = (torch.from_numpy(seed.astype(np.float32)) @ rotation).permute(3, 0, 1, 2)[None].contiguous()
        for _ in range(2):
            field, _ = level.iterate(field)
        ours = (field[0].permute(1, 2, 3, 0) @ rotation.T).numpy()
        gap = np.linalg.norm(ours - expected, axis=-1)
        assert gap.max() <= tolerance and gap.mean() <= 1e-5, (kernels, gap.max(), gap.mean())


def test_the_refinement_refines_as_simpleitks_demons_do(ct, ct_labels):
    """The refinement (`demons.refine_field`: the CPU's kernels) against SimpleITK's filter (`_simpleitk_demons`)
    from the network's map on the 3 mm pair (one level, the card's iterations), and the GPU's torch code run on the
    CPU: the maps within a hundredth of a mm on average in the body (a tenth at the 99th percentile), the warped
    labels' Dice within 0.002. Measured 2026-11-29: both 0.0000 / 0.0002-0.0003 mm, Dice 0.93146 against 0.93140.
    Cancel is polled during every iteration."""
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not shipped in this checkout")
    from napari_ctcolor.engines.geometry import warp as warp_labels
    from napari_ctcolor.engines.register.demons import refine_field
    from napari_ctcolor.engines.register.refine import levels, step_length
    from napari_ctcolor.engines.register.stages import plan as plan_of
    from napari_ctcolor.training.symnet import mean_dice

    moving, labels = _deformed(ct, ct_labels, seed=5)
    seed = register(ct, moving, refine=0, device="cpu").ddf
    plan = plan_of(ct, moving, "ct", None, None, "cpu")
    assert levels(ct.spacing, plan.iterations) == [((1, 1, 1), plan.iterations)]  # one level, as the reference's

    def normalised(volume: Volume, which: int) -> Volume:
        image = plan.normalised(torch.from_numpy(volume.array.astype(np.float32))[None, None], which)[0, 0].numpy()
        return Volume(image, volume.spacing, volume.origin, volume.direction)

    images = normalised(ct, 0), normalised(moving, 1)
    theirs = _simpleitk_demons(*images, seed, plan.iterations, step_length(ct.spacing))
    body = ct.array > -500
    dice = {"SimpleITK": mean_dice(ct_labels.array, warp_labels(labels, ct, theirs, "nearest", 0))}
    for kernels in (True, False):
        ours = _drained(refine_field(*images, torch.from_numpy(seed), plan.iterations, lambda: None, kernels)).numpy()
        gap = np.linalg.norm(ours - theirs, axis=-1)[body]
        name = "kernels" if kernels else "torch"
        dice[name] = mean_dice(ct_labels.array, warp_labels(labels, ct, ours, "nearest", 0))
        print(f"\n{name} against SimpleITK's demons: {gap.mean():.4f} / {np.percentile(gap, 99):.4f} mm, Dice {dice}")
        assert gap.mean() <= 0.01 and np.percentile(gap, 99) <= 0.1
        assert abs(dice[name] - dice["SimpleITK"]) <= 0.002

    polls = []

    def check() -> None:  # raises from its 40th call on: during an iteration, or during a slow machine's set-up
        polls.append(threading.current_thread().name)
        if len(polls) >= 40:
            raise Cancelled("registration cancelled during the refinement")

    with pytest.raises(Cancelled):
        _drained(refine_field(*images, torch.from_numpy(seed), 20, check))
    for thread in [t for t in threading.enumerate() if t.name == "ctcolor-refinement"]:
        thread.join(timeout=60)
    # Nothing ran on after the raise: at most a set-up filter left behind polled once more (how many polls the
    # set-up's waiting makes depends on the machine's speed, so Cancel may come there).
    assert 40 <= len(polls) <= 41, len(polls)


def test_cancel_stops_a_stage_between_its_torch_operations(ct):
    """Cancel is polled between a stage's torch operations (`stages.PolledTorch`), not only between stages: pressed
    while the network runs, the registration stops inside that stage (its end never reported). On popi's 512² chest a
    stage had run up to 19 s between two polls."""
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not shipped in this checkout")
    turned, _ = _rigid_motion(ct, 5.0, (8.0, 0.0, 0.0))
    steps, asked = [], []

    def cancel() -> bool:  # pressed once the network's forward pass has begun: a poll from inside that stage
        asked.append(sys._getframe(1).f_locals.get("what", ""))  # the engine's `Stages._check_cancel(what)`
        return asked[-1] == "during stage 'forward'"

    with pytest.raises(Cancelled, match="during stage 'forward'"):
        register(ct, turned, refine=0, affine=False, cancel=cancel, progress=lambda *s: steps.append(s))
    assert "before stage 'forward'" in asked and asked.count("during stage 'forward'") == 1
    assert len(steps) == 2  # the model and the resampling ended; the network did not


def test_cancel_returns_while_one_operation_of_a_stage_still_runs(ct, monkeypatch):
    """Each stage runs in a thread of its own (`Stages.run`) while the registration polls Cancel: pressed while one
    operation holds the stage (a torch operation on a whole CT, an iteration of the pre-alignment: up to 1.9 s each on
    popi's 512² chest, 2 cores), Cancel returns while that operation still runs, and the stage left behind stops
    before its next torch operation. The operation here is a wait that only the test ends: no timing."""
    from napari_ctcolor.engines.register import stages

    real, entered, release, after = stages.run_network, threading.Event(), threading.Event(), []

    def held_network(*args):
        entered.set()
        release.wait(60)  # one long operation (it releases the GIL, as torch and SimpleITK do)
        torch.zeros(1).add_(1)  # the stage's next torch operation: never reached after Cancel
        after.append(1)
        return real(*args)

    monkeypatch.setattr(stages, "run_network", held_network)
    before = set(threading.enumerate())  # a stage an earlier test cancelled may still be ending its operation
    with pytest.raises(Cancelled, match="during stage 'forward'"):
        register(ct, ct, refine=0, affine=False, cancel=entered.is_set)
    behind = [t for t in set(threading.enumerate()) - before if t.name == "ctcolor-forward"]
    assert len(behind) == 1 and behind[0].is_alive()  # Cancel returned before the operation ended
    release.set()
    behind[0].join(timeout=60)
    assert not behind[0].is_alive() and not after


def test_cancel_stops_the_prealignment_within_an_iteration_and_the_refinement_within_a_kernel(ct):
    """Cancel polled inside SimpleITK's own iterations (`prealign.stop_on_cancel`): the pre-alignment of the 3 mm
    cut against a turned copy stops at the iteration after Cancel, not at the end of the call (hundreds of optimiser
    iterations). The refinement's set-up (SimpleITK's filters) runs in a thread of its own (`steps.in_thread`):
    Cancel returns while a filter still runs, and the filter left behind stops at its own next poll; its iterations
    poll between their kernels, so Cancel stops one within a kernel (on popi's 512² chest, 2 cores: under a second)."""
    from napari_ctcolor.engines.register.demons import refine_field

    turned, _ = _rigid_motion(ct, 5.0, (8.0, 0.0, 0.0))
    polls: list[int] = []
    with pytest.raises(Cancelled, match="pre-alignment"):
        prealign(ct, turned, lambda: polls.append(1) is None and len(polls) > 3)
    assert len(polls) <= 8  # polled at 3 iterations, then ITK stops within the next ones (a full run: hundreds)

    seed = torch.zeros((*ct.shape, 3))
    fixed = ct.with_array(np.clip((ct.array.astype(np.float32) + 1000) / 2000, 0, 1))
    moved = fixed.with_array(np.roll(fixed.array, 2, axis=2))
    for chunks_first in (0, 1):  # Cancel during the set-up; during the second chunk of iterations
        pressed = threading.Event()
        after: list[str] = []

        def check(pressed=pressed, after=after) -> None:
            if pressed.is_set():
                after.append(threading.current_thread().name)
                raise Cancelled("registration cancelled during the refinement")

        refining = refine_field(fixed, moved, seed, 40, check)
        for _ in range(chunks_first):
            next(refining)
        pressed.set()
        with pytest.raises(Cancelled, match="refinement"):
            next(refining)
        behind = [t for t in threading.enumerate() if t.name == "ctcolor-refinement"]
        for thread in behind:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in behind)
        # The first poll after Cancel raised, in this thread or in the set-up's filter left behind (which stops at its
        # own next poll): at most one of each.
        assert 1 <= len(after) <= 2 and len(set(after)) == len(after), after


def test_refinement_levels_coarsen_the_fine_axes_to_at_most_4_mm_and_keep_thick_slices():
    from napari_ctcolor.engines.register.refine import COARSE_ITERATIONS as N
    from napari_ctcolor.engines.register.refine import levels

    assert levels((1.0, 1.0, 1.0), 9) == [((4, 4, 4), N), ((2, 2, 2), N), ((1, 1, 1), 9)]
    assert levels((2.0, 0.98, 0.98), 9) == [((4, 4, 2), N), ((2, 2, 1), N), ((1, 1, 1), 9)]
    assert levels((3.0, 3.0, 3.0), 9) == [((1, 1, 1), 9)]  # 6 mm would be too coarse
    # 5 mm slices of 1.14 mm pixels: the pixels averaged to 2.3 mm (4.6 mm is too coarse), the slices kept as they are.
    assert levels((5.0, 1.14, 1.14), 9) == [((2, 2, 1), N), ((1, 1, 1), 9)]


def test_cli_refuses_bad_refinement_counts_and_models_of_the_wrong_kind_with_one_line(tmp_path, capsys):
    """The first as a whole ``ctcolor`` process, the others through the same `cli.main` in this process (a process
    start is 4-5 s)."""
    from napari_ctcolor.cli import main

    ct_path = str(require_shared(CT))
    colorizer = str(require_shared(ROOT / "weights" / "colorizer-2d.safetensors"))
    refine_message = "--refine must be 'auto' or a number of iterations from 0 to 10000"
    cases = {
        ("--refine", "-1"): refine_message,
        ("--refine", "10001"): refine_message,
        ("--refine", "many"): refine_message,
        ("--model", colorizer): "not a SYMNet checkpoint",
        ("--model", ct_path): "SYMNet weights are a .safetensors file with its card or an official .pth checkpoint",
    }
    for k, (args, message) in enumerate(cases.items()):
        command = ["register", ct_path, ct_path, "-o", str(tmp_path / f"out{k}"), *args]
        if k == 0:
            done = _ctcolor(*command)
            code, stderr = done.returncode, done.stderr
        else:
            code, stderr = main(command), capsys.readouterr().err
        assert code == 2, (args, stderr)
        assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
        assert message in stderr and "Traceback" not in stderr, (args, stderr)
        assert args[0] != "--refine" or args[1] in stderr, stderr  # the value refused is named
        assert_documented(stderr.strip())
        assert not (tmp_path / f"out{k}").exists()


# --- conventions and geometry on the shared CT ------------------------------------------------------------------------


def test_known_translation_is_recovered_with_its_sign_in_mm_lps(ct):
    shift_mm = np.array([6.0, -4.5, 3.0])  # LPS; the CT's direction is diag(-1, -1, 1), so x and y flip in index space
    # moving(x) = ct(x + shift): the fixed point x is found in the moving image at x - shift, so ddf ~ -shift.
    moving = _resampled(ct, sitk.TranslationTransform(3, shift_mm.tolist()), AIR_HU)
    result = register(ct, moving, model=_checkpoint(), device="cpu")
    body = ct.array > -500
    median = np.median(result.ddf[body], axis=0)
    print(f"\nCT translation {-shift_mm} mm: median ddf in the body {median} mm (MRI-trained weights)")
    assert np.all(np.sign(median) == -np.sign(shift_mm))
    # Measured: 0.39, 0.51 and 0.37 of the shift per axis (the MRI-trained weights under-register CT); the bounds
    # leave +-0.07..0.14 for other torch versions, not for a field in the wrong units or sense.
    recovered = np.abs(median) / np.abs(shift_mm)
    assert np.all(recovered >= 0.3) and np.all(recovered <= 0.65), recovered
    assert result.metrics["ncc_after"] > result.metrics["ncc_before"] + 0.05


def test_working_shape_keeps_small_grids_and_coarsens_large_ones():
    assert working_shape((160, 192, 224), (1.0, 1.0, 1.0)) == (160, 192, 224)  # OASIS: the network sees every voxel
    whole_ct = working_shape((300, 512, 512), (1.0, 0.78, 0.78))
    assert padded_voxels(whole_ct) <= MAX_NETWORK_VOXELS < padded_voxels((300, 512, 512))
    assert whole_ct[1] == whole_ct[2] and whole_ct[0] < 300 and whole_ct[1] < 512
    # A minimum spacing from the model card: 0.98 mm pixels run at ~1.5 mm; the 2 mm slices keep their count.
    assert working_shape((20, 512, 512), (2.0, 0.977, 0.977), min_spacing_mm=1.5) == (20, 333, 333)
    assert working_shape((1, 512, 512), (1.0, 0.5, 0.5), min_spacing_mm=1.0) == (1, 256, 256)  # 2D stays 2D
    # The CT card's network budget (inference.network_voxels, 4.2 million): the 2 mm chest CT of 512 x 512 x 141
    # (1.95 mm pixels) runs at about 2.65 mm; the 5 mm chest CTs and the DICOM series' 2 mm grid keep theirs.
    popi = working_shape((141, 256, 256), (2.0, 1.953125, 1.953125), 2.0, 4_194_304)
    assert popi == (107, 189, 189) and padded_voxels(popi) <= 4_194_304
    assert working_shape((61, 160, 160), (5.0, 2.0, 2.0), 2.0, 4_194_304) == (61, 160, 160)
    assert working_shape((20, 512, 512), (2.0, 0.977, 0.977), 2.0, 4_194_304) == (20, 250, 250)


def test_resize_field_is_the_geometric_partner_of_adaptive_average_pooling():
    """A linear displacement (in voxels) pooled onto a coarser grid and resized back is unchanged in the interior: a
    half-voxel offset between the two grids, or a channel scaled by the wrong axis ratio, would show."""
    shape, work = (24, 40, 56), (12, 20, 14)
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    field = torch.stack((0.05 * x + 0.02 * z, -0.03 * y + 1.0, 0.04 * z - 0.01 * x))[None]  # channels (x, y, z)
    ratio = torch.tensor([w / n for w, n in zip(work[::-1], shape[::-1], strict=True)], dtype=torch.float64)
    coarse = torch.nn.functional.adaptive_avg_pool3d(field, work) * ratio.view(1, 3, 1, 1, 1)  # in coarse voxels
    np.testing.assert_allclose(
        resize_field(coarse, shape)[..., 3:-3, 3:-3, 5:-5], field[..., 3:-3, 3:-3, 5:-5], atol=1e-9
    )


def test_card_normalisation_and_working_spacing_come_from_the_model_card(tmp_path):
    card = {
        "inputs": {
            "normalisation": {"mode": "window", "window_hu": [-1000, 1000]},
            "axes": ["S", "P", "L"],
            "min_spacing_mm": 1.5,
        }
    }
    assert card_normalisation(card, "x") == ("window", (-1000.0, 1000.0))
    assert card_normalisation({"inputs": {"normalisation": {"mode": "minmax"}}}, "x") == ("minmax", None)
    for bad in ({}, {"inputs": {"normalisation": {"mode": "window", "window_hu": [500, -500]}}}):
        with pytest.raises(InputError, match="x: its model card does not give the intensity normalisation"):
            card_normalisation(bad, "x")
    weights = tmp_path / "mine.safetensors"
    save_weights(load_symnet_checkpoint(_checkpoint()), {"name": "mine", **card}, tmp_path, "mine")
    loaded = load_registration_model(weights)
    assert loaded.name == "mine.safetensors" and loaded.min_spacing_mm == 1.5
    assert loaded.normalisation == ("window", (-1000.0, 1000.0))
    assert loaded.axes == ("S", "P", "L")
    official = load_registration_model(_checkpoint())
    assert official.normalisation == ("minmax", None) and official.min_spacing_mm is None
    assert official.axes == ("L", "I", "A")
    # Quality limits: CT's by default; the official inter-subject brain checkpoint does not report volume change; a
    # card may change a limit or switch it off, and names only known ones.
    assert loaded.limits == QUALITY_LIMITS and official.limits["volume_change_fraction"] is None
    card["inference"] = {"quality_limits": {"inverse_consistency_mm": 2, "volume_change_fraction": None}}
    save_weights(load_symnet_checkpoint(_checkpoint()), {"name": "mine", **card}, tmp_path, "mine")
    limits = load_registration_model(weights).limits
    assert limits["inverse_consistency_mm"] == 2.0 and limits["volume_change_fraction"] is None
    assert limits["lncc_after"] == QUALITY_LIMITS["lncc_after"]
    sound = {"overlap_fraction": 1.0, "lncc_after": 0.9, "folding_fraction": 0.0, "inverse_consistency_mm": 1.5}
    assert len(quality_warnings({**sound, "volume_change_fraction": 0.9, "affine": True})) == 2  # CT limits: two lines
    assert quality_warnings({**sound, "volume_change_fraction": 0.9, "affine": True}, limits) == []
    card["inference"] = {"quality_limits": {"jacobian": 0.5}}
    save_weights(load_symnet_checkpoint(_checkpoint()), {"name": "mine", **card}, tmp_path, "mine")
    with pytest.raises(InputError, match="quality_limits may set only"):
        load_registration_model(weights)
    # The network's voxel budget: the card's, never above the engine's own limit; a bad one is refused.
    assert official.network_voxels == MAX_NETWORK_VOXELS
    for given, expected in ((2_000_000, 2_000_000), (10**9, MAX_NETWORK_VOXELS), (0.5, None), (True, None)):
        card["inference"] = {"network_voxels": given}
        save_weights(load_symnet_checkpoint(_checkpoint()), {"name": "mine", **card}, tmp_path, "mine")
        if expected is None:
            with pytest.raises(InputError, match="inference.network_voxels must be a whole number"):
                load_registration_model(weights)
        else:
            assert load_registration_model(weights).network_voxels == expected
    del card["inference"]
    # A card that does not say which axes its network saw is refused: a CNN is not equivariant to transposes.
    del card["inputs"]["axes"]
    save_weights(load_symnet_checkpoint(_checkpoint()), {"name": "mine", **card}, tmp_path, "mine")
    with pytest.raises(InputError, match="does not state the network's axes"):
        load_registration_model(weights)


def test_working_grid_registration_upsamples_fields_onto_the_fixed_grid(ct, monkeypatch):
    """A translation registered on a coarser working grid (forced by a small voxel budget) gives full-grid outputs and
    the same displacement as the full-grid run, to a fraction of a working voxel."""
    shift_mm = np.array([6.0, -4.5, 3.0])
    moving = _resampled(ct, sitk.TranslationTransform(3, shift_mm.tolist()), AIR_HU)
    full = register(ct, moving, model=_checkpoint(), device="cpu")
    monkeypatch.setattr(load_registration_model(_checkpoint()), "network_voxels", 32 * 64 * 64)  # the cached model
    coarse = register(ct, moving, model=_checkpoint(), device="cpu")
    work = coarse.metrics["network_shape"]
    assert full.metrics["network_shape"] == list(ct.shape) and work != list(ct.shape)
    assert coarse.ddf.shape == (*ct.shape, 3) and coarse.jacobian.array.shape == ct.shape
    body = ct.array > -500
    median_full, median_coarse = np.median(full.ddf[body], axis=0), np.median(coarse.ddf[body], axis=0)
    print(f"\nworking grid {work}: median ddf {median_coarse} mm vs full grid {median_full} mm")
    assert np.all(np.sign(median_coarse) == -np.sign(shift_mm))
    assert np.abs(median_coarse - median_full).max() < 0.5 * max(ct.spacing) * max(np.divide(ct.shape, work))
    assert coarse.metrics["ncc_after"] > coarse.metrics["ncc_before"] + 0.05
    assert coarse.metrics["folding_fraction"] == 0.0


def test_ddf_applied_by_simpleitk_reproduces_warped_and_inverse_ddf_undoes_it(ct, ct_labels):
    # A smooth deformation of a few mm: moving(x) = ct(x + d(x)).
    index = np.indices(ct.shape)[::-1].reshape(3, -1)
    points = (ct.affine[:3, :3] @ index + ct.affine[:3, 3:]).T.reshape(*ct.shape, 3)
    rng = np.random.default_rng(0)
    d = np.zeros((*ct.shape, 3))
    for c in range(3):
        k = rng.normal(size=3) * 2 * np.pi / 150.0  # wavelengths around 150 mm
        d[..., c] = 4.0 * np.sin(points @ k + rng.uniform(0, 2 * np.pi))
    deformation = sitk.DisplacementFieldTransform(_field_image(d, ct))
    moving = _resampled(ct, deformation, AIR_HU)
    deformation = sitk.DisplacementFieldTransform(_field_image(d, ct))  # the constructor takes the image over
    moving_labels = _resampled(ct_labels, deformation, 0, nearest=True)

    result = register(ct, moving, model=_checkpoint(), device="cpu", moving_labels=moving_labels)

    inside = _points_inside(moving, ct, result.ddf)
    assert inside.mean() > 0.7
    reference = _sitk_warped(moving, ct, result.ddf, AIR_HU)
    np.testing.assert_allclose(result.warped.array[inside], reference[inside], atol=0.05, rtol=0)  # HU
    dice_before = _dice(ct_labels.array, moving_labels.array)
    dice_after = _dice(ct_labels.array, result.warped_labels.array)
    print(f"\nCT smooth deformation: label Dice {dice_before:.3f} -> {dice_after:.3f}")
    assert dice_after >= dice_before + 0.12  # measured 0.621 -> 0.779
    assert set(np.unique(result.warped_labels.array)) <= set(np.unique(moving_labels.array))
    assert result.warped_labels.array.dtype == moving_labels.array.dtype
    # Round trip: fixed point p -> moving point q = p + ddf(p) -> q + inverse_ddf(q) ~ p (interior points).
    forward = sitk.DisplacementFieldTransform(_field_image(result.ddf, ct))
    backward = sitk.DisplacementFieldTransform(_field_image(result.inverse_ddf, ct))
    errors = []
    for p in points[5:-5:4, 15:-15:10, 15:-15:10].reshape(-1, 3):
        q = forward.TransformPoint(p.tolist())
        errors.append(np.linalg.norm(np.subtract(backward.TransformPoint(q), p)))
    assert np.median(errors) < 0.3 and np.max(errors) < 1.5, (np.median(errors), np.max(errors))
    assert result.metrics["folding_fraction"] == 0.0 and result.jacobian.array.min() > 0


def test_affine_prealignment_is_composed_into_the_ddf(ct):
    image = ct.to_sitk()
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    rigid.SetRotation(0.0, 0.0, np.deg2rad(6.0))
    rigid.SetTranslation((9.0, -6.0, 4.0))
    moving = _resampled(ct, rigid, AIR_HU)
    steps = []
    result = register(ct, moving, model=_checkpoint(), affine=True, device="cpu", progress=lambda *a: steps.append(a))

    m = result.metrics
    assert m["ncc_before"] < m["ncc_prealigned"] < m["ncc_after"]
    assert steps == [(i, 8) for i in range(1, 9)]
    # The recovered in-plane rotation is the inverse of the applied one (the affine maps fixed to moving points). The
    # z scale of an affine fitted to 30 slices, 4 mm of which left the field of view, is left loose.
    inverse = np.linalg.inv(np.asarray(rigid.GetMatrix()).reshape(3, 3))
    np.testing.assert_allclose(np.asarray(m["prealign_matrix"])[:2, :2], inverse[:2, :2], atol=0.03)
    # The ddf maps to ORIGINAL moving points, affine included: SimpleITK reproduces warped in one interpolation.
    inside = _points_inside(moving, ct, result.ddf)
    reference = _sitk_warped(moving, ct, result.ddf, AIR_HU)
    np.testing.assert_allclose(result.warped.array[inside], reference[inside], atol=0.05, rtol=0)


def test_two_d_pair_registers_in_plane_with_zero_through_plane_displacement(ct):
    fixed = _crop(ct, slice(15, 16), slice(0, 101), slice(0, 122))
    moving = _resampled(fixed, sitk.TranslationTransform(3, (4.0, 3.0, 0.0)), AIR_HU)
    result = register(fixed, moving, model=_checkpoint(), device="cpu")
    assert result.warped.shape == result.jacobian.shape == (1, 101, 122)
    assert result.ddf.shape == (1, 101, 122, 3)
    assert np.all(result.ddf[..., 2] == 0.0)  # axial slice: the index z axis is LPS z
    assert result.metrics["two_d"] and result.metrics["ncc_after"] > result.metrics["ncc_before"]
    with pytest.raises(InputError, match="pre-alignment works on 3D volumes"):
        register(fixed, moving, model=_checkpoint(), affine=True)


def test_mismatched_dimensions_and_disjoint_extents_raise_one_line_input_errors(ct):
    one_slice = _crop(ct, slice(15, 16), slice(0, 101), slice(0, 122))
    with pytest.raises(InputError, match=r"3D \(30 slices\) moving image to a 2D \(1 slice\) fixed") as info:
        register(one_slice, ct, model=_checkpoint())
    assert "\n" not in str(info.value)
    far = Volume(ct.array, ct.spacing, (5000.0, 0.0, 0.0), ct.direction, {"source": "far.nii.gz"})
    with pytest.raises(InputError, match=r"far\.nii\.gz: its physical extent does not overlap"):
        register(ct, far, model=_checkpoint())


def test_model_names_and_cancellation(ct):
    if not ct_weights_shipped():
        with pytest.raises(InputError, match="CT weights not found"):
            register(ct, ct, model="ct")
    with pytest.raises(InputError, match="official: model file not found"):
        register(ct, ct, model="official")
    calls = []
    with pytest.raises(Cancelled):
        register(ct, ct, model=_checkpoint(), progress=lambda *a: calls.append(a), cancel=lambda: len(calls) >= 2)
    assert calls == [(1, 7), (2, 7)]


# --- checkerboard -----------------------------------------------------------------------------------------------------


def test_checkerboard_tiles_alternate_in_physical_mm_on_anisotropic_grey_volume():
    spacing = (2.0, 1.0, 0.5)
    a = Volume(np.zeros((9, 10, 23), np.int16), spacing=spacing)
    b = a.with_array(np.ones((9, 10, 23), np.int16))
    out = checkerboard(a, b, tile_mm=4.0)
    expected = np.zeros(a.shape, np.int16)
    for z, y, x in np.ndindex(a.shape):
        expected[z, y, x] = (int(z * 2.0 // 4) + int(y * 1.0 // 4) + int(x * 0.5 // 4)) % 2
    np.testing.assert_array_equal(out.array, expected)
    assert out.array.dtype == np.int16 and out.spacing == spacing and out.meta["checkerboard_mm"] == 4.0
    # 4 mm tiles are 2 slices, 4 rows and 8 columns: voxel counts per tile along each axis.
    assert list(out.array[:, 0, 0]) == [0, 0, 1, 1, 0, 0, 1, 1, 0]
    assert list(out.array[0, 0, :9]) == [0] * 8 + [1]


def test_checkerboard_of_color_slices_keeps_both_colors_exactly():
    red = np.zeros((1, 6, 8, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((1, 6, 8, 3), np.uint8)
    blue[..., 2] = 255
    a = ColorVolume(red, (3.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    b = ColorVolume(blue, (3.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    out = checkerboard(a, b, tile_mm=2.0)
    assert isinstance(out, ColorVolume) and out.rgb.dtype == np.uint8
    from_a = checkerboard_mask((1, 6, 8), (3.0, 1.0, 1.0), 2.0)
    assert np.array_equal(out.rgb[from_a], red[from_a]) and np.array_equal(out.rgb[~from_a], blue[~from_a])
    assert from_a[0, 0, 0] and not from_a[0, 0, 2] and not from_a[0, 2, 0] and from_a[0, 2, 2]


def test_checkerboard_resamples_b_onto_a_grid_first():
    a = Volume(np.zeros((4, 10, 10), np.float32), spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    # b is a linear ramp along LPS x on a coarser, shifted, flipped grid; resampled onto a's voxels it reads x + 100.
    direction = np.diag([-1.0, 1.0, 1.0])
    x_mm = 12.0 - 1.5 * np.arange(12)
    b = Volume(
        np.broadcast_to(x_mm + 100, (4, 12, 12)).astype(np.float32), (2.0, 1.5, 1.5), (12.0, -2.0, 0.0), direction
    )
    out = checkerboard(a, b, tile_mm=5.0)
    odd = ~checkerboard_mask(a.shape, a.spacing, 5.0)
    x_of_a = np.broadcast_to(np.arange(10.0), a.shape)
    np.testing.assert_allclose(out.array[odd], x_of_a[odd] + 100, atol=1e-4)
    assert np.all(out.array[~odd] == 0)


def test_checkerboard_refuses_mixed_kinds_and_bad_tile_size():
    grey = Volume(np.zeros((1, 4, 4), np.float32))
    color = ColorVolume(np.zeros((1, 4, 4, 3), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    with pytest.raises(InputError, match="grey and colour"):
        checkerboard(grey, color)
    with pytest.raises(InputError, match="positive"):
        checkerboard(grey, grey, tile_mm=0.0)


# --- the CLI ----------------------------------------------------------------------------------------------------------


def _run(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()


def test_cli_register_writes_outputs_on_the_fixed_grid_usable_by_simpleitk(ct, tmp_path, capsys):
    fixed_path, moving_path, outdir = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", tmp_path / "out"
    write_nifti(ct, fixed_path)
    moving = _resampled(ct, sitk.TranslationTransform(3, (6.0, -4.5, 3.0)), AIR_HU)
    write_nifti(moving, moving_path)
    outdir.mkdir()
    (outdir / "notes.txt").write_text("keep me", encoding="utf-8")

    code, err = _run(capsys, "register", str(fixed_path), str(moving_path), "-o", str(outdir), "--model", _checkpoint())
    assert code == 2 and len(err) == 1 and "not empty; use --overwrite" in err[0]
    code, err = _run(
        capsys,
        "register",
        str(fixed_path),
        str(moving_path),
        "-o",
        str(outdir),
        "--model",
        _checkpoint(),
        "--overwrite",
    )
    assert code == 0, err

    fixed_image = sitk.ReadImage(str(fixed_path))
    for name in ("warped", "ddf", "inverse_ddf", "jacobian", "checkerboard"):
        image = sitk.ReadImage(str(outdir / f"{name}.nii.gz"))
        assert image.GetSize() == fixed_image.GetSize(), name
        np.testing.assert_allclose(image.GetSpacing(), fixed_image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(image.GetOrigin(), fixed_image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), fixed_image.GetDirection(), atol=1e-6)
    ddf_image = sitk.ReadImage(str(outdir / "ddf.nii.gz"))
    assert ddf_image.GetPixelID() == sitk.sitkVectorFloat32 and ddf_image.GetNumberOfComponentsPerPixel() == 3
    ddf = sitk.GetArrayFromImage(ddf_image)
    # The file round-trips the LPS vectors, and SimpleITK applies it as is to give warped.nii.gz.
    warped = read_volume(outdir / "warped.nii.gz")
    inside = _points_inside(moving, ct, ddf)
    reference = _sitk_warped(moving, ct, ddf, AIR_HU)
    np.testing.assert_allclose(warped.array[inside], reference[inside], atol=0.05, rtol=0)
    assert np.median(ddf[ct.array > -500][:, 0]) < -1.5  # the translation's x sign, in LPS
    metrics = json.loads((outdir / "metrics.json").read_text(encoding="utf-8"))
    assert {
        "ncc_before",
        "ncc_after",
        "folding_fraction",
        "seconds",
        "model",
        "device",
        "refine_iterations",
        "warnings",
    } <= set(metrics)
    assert metrics["ncc_after"] > metrics["ncc_before"] and metrics["model"] == CHECKPOINT.name
    assert (outdir / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert sorted(p.name for p in outdir.iterdir()) == sorted(
        ["warped.nii.gz", "ddf.nii.gz", "inverse_ddf.nii.gz", "jacobian.nii.gz", "checkerboard.nii.gz"]
        + ["metrics.json", "notes.txt"]
    )


def test_cli_register_refuses_2d_against_3d_and_inputs_as_outputs_with_one_line(ct, tmp_path, capsys):
    fixed_path, slice_path = tmp_path / "fixed.nii.gz", tmp_path / "slice.nii.gz"
    write_nifti(ct, fixed_path)
    write_nifti(_crop(ct, slice(15, 16), slice(0, 101), slice(0, 122)), slice_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_ctcolor",
            "register",
            str(fixed_path),
            str(slice_path),
            "-o",
            str(tmp_path / "o"),
        ]
        + ["--model", _checkpoint()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: ") and "2D (1 slice)" in lines[0] and "3D (30 slices)" in lines[0]
    assert not (tmp_path / "o" / "warped.nii.gz").exists()

    (tmp_path / "out").mkdir()
    write_nifti(ct, tmp_path / "out" / "warped.nii.gz")
    args = ["register", str(fixed_path), str(tmp_path / "out" / "warped.nii.gz"), "-o", str(tmp_path / "out")]
    code, err = _run(capsys, *args, "--overwrite")
    assert code == 2 and len(err) == 1 and "would overwrite the input" in err[0]
    if not ct_weights_shipped():  # the default --model is ct
        code, err = _run(capsys, "register", str(fixed_path), str(fixed_path), "-o", str(tmp_path / "new"))
        assert code == 2 and len(err) == 1 and "CT weights not found" in err[0]


def test_cli_checkerboard_writes_nifti_on_a_grid(ct, tmp_path, capsys):
    a_path, b_path, out = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "board.nii.gz"
    write_nifti(ct, a_path)
    write_nifti(ct.with_array(np.full(ct.shape, 500, np.int16)), b_path)
    code, err = _run(capsys, "checkerboard", str(a_path), str(b_path), "-o", str(out), "--tile-mm", "15")
    assert code == 0, err
    board = read_volume(out)
    from_a = checkerboard_mask(ct.shape, ct.spacing, 15.0)
    np.testing.assert_array_equal(board.array[from_a], ct.array[from_a])
    assert np.all(board.array[~from_a] == 500)
    np.testing.assert_allclose(board.affine, ct.affine, atol=1e-4)
    code, err = _run(capsys, "checkerboard", str(a_path), str(b_path), "-o", str(tmp_path / "board.png"))
    assert code == 2 and len(err) == 1 and ".nii or .nii.gz" in err[0]
    code, err = _run(capsys, "checkerboard", str(a_path), str(b_path), "-o", str(b_path))
    assert code == 2 and len(err) == 1 and "would overwrite the input" in err[0]


def test_cli_peer_demons_writes_a_warped_image_and_an_lps_ddf_that_simpleitk_applies(ct, tmp_path):
    from napari_ctcolor.cli import PEER_NAMES
    from napari_ctcolor.peers import PEER_COMMANDS

    assert set(PEER_NAMES) == set(PEER_COMMANDS)  # the CLI's choices are the peers module's names
    moving = _resampled(ct, sitk.TranslationTransform(3, (5.0, -3.0, 0.0)), AIR_HU)
    paths = [write_nifti(v, tmp_path / f"{name}.nii.gz") for v, name in ((ct, "fixed"), (moving, "moving"))]
    done = _ctcolor("peer", "demons", *map(str, paths), "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ddf.nii.gz", "metrics.json", "warped.nii.gz"]
    warped = read_volume(tmp_path / "out" / "warped.nii.gz")
    ddf = sitk.Cast(sitk.ReadImage(str(tmp_path / "out" / "ddf.nii.gz")), sitk.sitkVectorFloat64)
    ddf_mm = sitk.GetArrayFromImage(ddf)  # (Z, Y, X, 3) LPS; the transform below takes the image over
    moving_image = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    again = sitk.Resample(moving_image, ct.to_sitk(), sitk.DisplacementFieldTransform(ddf), sitk.sitkLinear, AIR_HU)
    np.testing.assert_allclose(warped.array, sitk.GetArrayFromImage(again), atol=0.05)
    ncc = [
        global_ncc(torch.from_numpy(ct.array.astype(np.float32)), torch.from_numpy(v.astype(np.float32)))
        for v in (moving.array, warped.array)
    ]
    assert ncc[1] > ncc[0] + 0.02, ncc
    # moving(p) = fixed(p + 5 mm x): fixed point p is at moving point p - 5 mm, so ddf_x is about -5 mm.
    body = ct.array > -500
    assert np.median(ddf_mm[body][:, 0]) < -2.5
    assert json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))["peer"] == "demons"
    done = _ctcolor("peer", "demons", *map(str, paths), "-o", str(tmp_path / "out"))
    assert done.returncode == 2 and "not empty" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # Timed against `ctcolor register` as a whole process, the demons peer runs as a demons user would: without torch.
    args = [sys.executable, "-X", "importtime", "-m", "napari_ctcolor", "peer", "demons", *map(str, paths)]
    done = subprocess.run([*args, "-o", str(tmp_path / "out"), "--overwrite"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "SimpleITK" in imported and "torch" not in imported


@pytest.mark.parametrize("name", ["greedy", "convexadam"])
def test_cli_peer_greedy_and_convexadam_recover_a_shift_in_the_lps_convention(ct, tmp_path, name):
    """The fast optimisation peers through ``ctcolor peer``: moving(p) = fixed(p + 5 mm x - 3 mm y), so the written
    LPS ddf is about (-5, +3) mm in the body (tolerance 1 mm: a 3 mm grid's registration, not its voxels, decides)."""
    pytest.importorskip({"greedy": "picsl_greedy", "convexadam": "convexAdam"}[name])
    moving = _resampled(ct, sitk.TranslationTransform(3, (5.0, -3.0, 0.0)), AIR_HU)
    paths = [write_nifti(v, tmp_path / f"{n}.nii.gz") for v, n in ((ct, "fixed"), (moving, "moving"))]
    done = _ctcolor("peer", name, *map(str, paths), "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "Iter" not in done.stdout  # no optimiser log (Greedy prints one per iteration unless told not to)
    ddf_mm = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "ddf.nii.gz")))
    inner = ct.array > -500
    inner[:4], inner[-4:] = False, False  # the first and last slices see the shift's edge
    np.testing.assert_allclose(np.median(ddf_mm[inner], axis=0), [-5.0, 3.0, 0.0], atol=1.0)
    warped = read_volume(tmp_path / "out" / "warped.nii.gz")
    ncc = [
        global_ncc(torch.from_numpy(ct.array.astype(np.float32)), torch.from_numpy(v.astype(np.float32)))
        for v in (moving.array, warped.array)
    ]
    assert ncc[1] > ncc[0] + 0.02, ncc
    assert json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))["peer"] == name


def test_global_ncc_equals_numpys_correlation_and_is_zero_for_a_constant_image():
    """`global_ncc` sums in chunks (float64 sums of float32 voxels): numpy's correlation coefficient of the same
    values in float64 within 1e-9, over several chunks and a CT's offset; a constant image gives 0."""
    rng = np.random.default_rng(4)
    a = (rng.normal(40.0, 300.0, (3, 700, 1100)) - 1000.0).astype(np.float32)  # 2.3 million voxels: 3 chunks
    b = (0.5 * a + rng.normal(0.0, 200.0, a.shape)).astype(np.float32)
    expected = np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1]
    assert global_ncc(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, abs=1e-9)
    assert global_ncc(torch.from_numpy(a), torch.full(a.shape, -1024.0)) == 0.0


def test_local_ncc_equals_a_direct_window_computation_at_its_sampled_voxels():
    """The strided separable boxes against the definition: per sampled voxel, Pearson correlation over the box
    clipped at the border, averaged over the mask. Float32 sums of 7^3 values: agreement to 1e-4."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(9, 12, 11)).astype(np.float32)
    b = (0.5 * a + rng.normal(size=a.shape)).astype(np.float32)
    mask = rng.random(a.shape) < 0.6
    half, values = LNCC_WINDOW // 2, []
    for z, y, x in zip(*np.nonzero(mask), strict=True):
        if z % IC_STRIDE or y % IC_STRIDE or x % IC_STRIDE:
            continue
        box = tuple(slice(max(c - half, 0), c + half + 1) for c in (z, y, x))
        values.append(np.corrcoef(a[box].ravel(), b[box].ravel())[0, 1])
    as_tensor = lambda v: torch.from_numpy(v)[None, None]  # noqa: E731
    for ncc in (local_ncc, local_ncc_torch):  # numba's kernels on the CPU, torch's pooling on a GPU
        measured = ncc(as_tensor(a), as_tensor(b), as_tensor(mask))
        assert measured == pytest.approx(float(np.mean(values)), abs=1e-4)
        assert ncc(as_tensor(a), as_tensor(2 * a + 1), as_tensor(mask)) == pytest.approx(1.0, abs=1e-4)
    # A 2D image (one slice) has no box across z.
    values = []
    for y, x in zip(*np.nonzero(mask[0]), strict=True):
        if not y % IC_STRIDE and not x % IC_STRIDE:
            box = (0, slice(max(y - half, 0), y + half + 1), slice(max(x - half, 0), x + half + 1))
            values.append(np.corrcoef(a[box].ravel(), b[box].ravel())[0, 1])
    plane = [(a[:1], b[:1], mask[:1])]
    for ncc in (local_ncc, local_ncc_torch):
        measured = ncc(*(as_tensor(v) for v in plane[0]))
        assert measured == pytest.approx(float(np.mean(values)), abs=1e-4)
