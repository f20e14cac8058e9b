"""SYMNet CT training: synthetic deformations, the loss, determinism/resume, the training command and the shipped
CT weights (Dice improvement on held-out deformations, folding)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from napari_ctcolor.engines.register import register
from napari_ctcolor.io import Volume
from napari_ctcolor.models.diffeo import folding_fraction
from napari_ctcolor.models.symnet import SYMNet
from napari_ctcolor.training.data import load_real_case
from napari_ctcolor.training.symnet import (
    deform_pair,
    dice_per_structure,
    random_displacement,
    symnet_loss,
    train_symnet,
)
from napari_ctcolor.weights import load_symnet

from conftest import CT_DIR, ct_weights_shipped, require_shared

REPO = Path(__file__).resolve().parents[2]
QUIET = {"log": lambda *_: None}


def test_random_displacement_is_smooth_invertible_and_bounded():
    spacing = (3.0, 1.5, 1.5)
    shape = (20, 40, 48)
    ddf = random_displacement(shape, spacing, np.random.default_rng(1), max_mm=15.0, control_mm=40.0)
    assert ddf.shape == (1, 3, *shape)
    mm = ddf * torch.tensor(spacing[::-1]).view(1, 3, 1, 1, 1)
    largest = float(mm.norm(dim=1).max())
    assert 10.0 < largest < 16.5  # the velocity is scaled to 15 mm; its flow moves about as far
    assert float(folding_fraction(ddf)) == 0.0
    again = random_displacement(shape, spacing, np.random.default_rng(1), max_mm=15.0, control_mm=40.0)
    torch.testing.assert_close(again, ddf, rtol=0, atol=0)


def test_rigid_and_identity_pairs_move_nothing_but_rigidly():
    """A rigid displacement is R p + t - p about the volume's centre: its Jacobian is 1 everywhere, its lengths are
    kept, and it stays within the asked turn and shift; an identity pair is not moved; a spec without these shares
    draws what it drew before they existed."""
    from napari_ctcolor.models.diffeo import jacobian_determinant
    from napari_ctcolor.training.symnet import rigid_displacement

    spacing, shape = (2.5, 1.25, 1.0), (12, 40, 44)
    ddf = rigid_displacement(shape, spacing, np.random.default_rng(3), degrees=5.0, shift_mm=8.0)
    det = jacobian_determinant(ddf)
    # Anisotropic voxels: the determinant in voxel units is that of the same rotation, 1 (float32 differences).
    assert float((det - 1).abs().max()) < 1e-4
    mm = ddf[0].numpy() * np.asarray(spacing[::-1]).reshape(3, 1, 1, 1)
    centre = mm[:, 5:7, 19:21, 21:23].reshape(3, -1).mean(axis=1)  # the centre moves by the shift alone
    assert np.linalg.norm(centre) <= 8.0 + 1e-3
    corner = np.array(
        [(shape[2] - 1) / 2 * spacing[2], (shape[1] - 1) / 2 * spacing[1], (shape[0] - 1) / 2 * spacing[0]]
    )
    turn = np.linalg.norm(mm[:, -1, -1, -1] - centre) / np.linalg.norm(corner)  # chord of the turn at the corner
    assert 0 < turn <= 2 * np.sin(np.deg2rad(5.0) / 2) + 1e-3
    hu = np.random.default_rng(4).normal(0, 100, shape).astype(np.float32)
    quiet = {"noise_hu": [0.0, 0.0], "gain": [1, 1], "offset_hu": [0, 0]}
    same = deform_pair(hu, None, spacing, np.random.default_rng(5), {**quiet, "identity": 1.0})
    np.testing.assert_array_equal(same.moving.numpy(), same.fixed.numpy())
    a = deform_pair(hu, None, spacing, np.random.default_rng(6), {**quiet, "control_mm": [30, 40]})
    b = deform_pair(hu, None, spacing, np.random.default_rng(6), {**quiet, "control_mm": [30, 40], "rigid": 0.0})
    np.testing.assert_array_equal(a.moving.numpy(), b.moving.numpy())


def test_a_symnet_comparison_names_held_out_cases_in_exams(tmp_path):
    """For SYMNet recipes `--exams` names held-out cases (the bundle's smoke sweep measures one, trained and measured
    in tests/cli/test_gpu_bundle.py); anything else is refused before any training."""
    from conftest import ctcolor

    variant = str(REPO / "configs" / "variants" / "symnet-rigid.yaml")
    refused = ctcolor("train", "compare", str(REPO / "configs" / "symnet_ct.yaml"), variant, "-o", str(tmp_path),
                      "--exams", "arterial_300,totalseg-body-3mm-30slices")  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    known = "totalseg-body-3mm-30slices, totalseg-abdomen-dicom"
    assert f"--exams arterial_300: no such held-out case (known: {known})" in refused.stderr
    assert not any(tmp_path.iterdir())


def test_deformed_pair_keeps_label_ids_and_moves_the_image():
    rng = np.random.default_rng(0)
    hu = np.full((16, 32, 32), -1000.0, np.float32)
    hu[4:12, 8:24, 8:24] = 50.0
    labels = np.zeros(hu.shape, np.uint8)
    labels[4:12, 8:24, 8:24] = 5
    spec = {"max_mm": 6.0, "control_mm": [20.0, 30.0], "noise_hu": [0.0, 0.0], "gain": [1, 1], "offset_hu": [0, 0]}
    pair = deform_pair(hu, labels, (2.0, 2.0, 2.0), rng, spec)
    assert pair.fixed.shape == pair.moving.shape == (1, 1, 16, 32, 32)
    np.testing.assert_array_equal(pair.fixed[0, 0].numpy(), hu)  # no noise or jitter asked for
    assert set(np.unique(pair.moving_labels)) <= {0, 5}
    assert not np.array_equal(pair.moving_labels, labels)
    # The image and its labels move together: the box's voxels in the moving image are where its moved label is.
    inside = pair.moving[0, 0].numpy() > -475.0
    assert np.mean(inside == (pair.moving_labels == 5)) > 0.98


def test_loss_parts_and_gradients():
    torch.manual_seed(0)
    model = SYMNet(start_channel=2)
    fixed, moving = torch.rand(1, 1, 16, 32, 32), torch.rand(1, 1, 16, 32, 32)
    labels = (torch.rand(1, 3, 16, 32, 32).round(), torch.rand(1, 3, 16, 32, 32).round())
    weights = {"smooth": 3.0, "antifold": 1e5, "magnitude": 1e-3, "dice": 1.0}
    loss, parts = symnet_loss(model, fixed, moving, weights, labels)
    assert set(parts) == {"ncc_half", "ncc_full", "smooth", "antifold", "magnitude", "dice"}
    assert -3.0 <= parts["ncc_half"] + parts["ncc_full"] <= 0.0 and 0.0 <= parts["dice"] <= 1.0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _tiny_config(tmp_path: Path, steps: int, real_val: list | None = None) -> Path:
    config = yaml.safe_load((REPO / "configs" / "symnet_ct.yaml").read_text(encoding="utf-8"))
    config.update(
        name="tiny-symnet",
        start_channel=2,
        init=None,
        steps=steps,
        crop=[16, 32, 32],
        spacing_mm=[6.0],
        checkpoint_every=2,
        real_train=[],
        real_val=real_val or [],
        val_pairs_per_case=1,
        phantoms={"first_seed": 7, "count": 1, "slices": 12, "pixel_mm": [3.0, 3.2], "slice_mm": [5, 6], "fov_mm": 340},
    )
    path = tmp_path / f"tiny-{steps}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_training_is_deterministic_and_resume_continues_the_same_run(tmp_path):
    config = _tiny_config(tmp_path, steps=4)
    a, _, facts = train_symnet(config, tmp_path / "a", **QUIET)
    b, _, _ = train_symnet(config, tmp_path / "b", **QUIET)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    train_symnet(config, tmp_path / "c", stop_at=2, **QUIET)
    c, _, _ = train_symnet(config, tmp_path / "c", resume=True, **QUIET)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(c.state_dict()[key], value, rtol=0, atol=0)
    assert facts["steps"] == 4 and set(facts["final_loss"]) >= {"loss", "ncc_full", "antifold"}


def _without_timings(metrics):
    """The card's metrics without wall-clock seconds, which differ from run to run."""
    if isinstance(metrics, dict):
        return {k: _without_timings(v) for k, v in metrics.items() if k != "seconds"}
    if isinstance(metrics, list):
        return [_without_timings(v) for v in metrics]
    return metrics


def test_training_command_writes_weights_the_engine_loads_and_eval_only_recomputes_the_card(tmp_path):
    from conftest import ctcolor

    val = [["totalseg-body-3mm-30slices.nii.gz", "totalseg-body-3mm-30slices-labels.nii.gz"]]
    for name in val[0]:
        require_shared(CT_DIR / name)
    config, weights = _tiny_config(tmp_path, steps=2, real_val=val), tmp_path / "weights"
    args = ("train", "symnet", "--config", str(config), "--weights-dir", str(weights))
    done = ctcolor(*args, timeout=600)
    assert done.returncode == 0, done.stderr
    [path] = weights.glob("*.safetensors")
    card = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    path.with_suffix(".json").write_text(json.dumps({**card, "metrics": {}}), encoding="utf-8")
    done = ctcolor(*args, "--eval-only", timeout=600)
    assert done.returncode == 0 and "updated the metrics" in done.stdout, done.stderr
    recomputed = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["metrics"]
    # Two processes with the same thread count on one CPU: the same float operations, bit for bit.
    assert _without_timings(recomputed) == _without_timings(card["metrics"])
    assert card["training"]["command"].startswith("ctcolor train symnet --config")
    assert card["inputs"]["normalisation"] == {"mode": "window", "window_hu": [-1000, 1000]}
    assert [pair["pair"] for pair in card["metrics"]["pairs"]] == ["totalseg-body-3mm-30slices/0"]
    model, loaded_card = load_symnet(path)
    assert model.start_channel == 2 and loaded_card["sha256"] == card["sha256"]


def _ct_card() -> dict:
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not in this checkout")
    return load_symnet("symnet-ct")[1]


def test_shipped_ct_weights_register_a_fresh_deformation_of_the_real_ct():
    """A deformation from a seed used neither in training nor in the card's evaluation."""
    _ct_card()
    names = ("totalseg-body-3mm-30slices.nii.gz", "totalseg-body-3mm-30slices-labels.nii.gz")
    for name in names:
        require_shared(CT_DIR / name)
    case = load_real_case(CT_DIR.parent, *names)
    spec = {"max_mm": 12.0, "control_mm": [40.0, 60.0], "noise_hu": [10.0, 10.0]}
    pair = deform_pair(case.ct.array, case.labels, case.ct.spacing, np.random.default_rng(424242), spec)
    geometry = {"spacing": case.ct.spacing, "origin": case.ct.origin, "direction": case.ct.direction}
    moving = Volume(pair.moving[0, 0].numpy(), **geometry)
    result = register(case.ct, moving, model="ct", moving_labels=Volume(pair.moving_labels, **geometry))

    def mean_dice(labels: np.ndarray) -> float:
        return float(np.mean(list(dice_per_structure(case.labels, labels, case.label_names).values())))

    before, after = mean_dice(pair.moving_labels), mean_dice(result.warped_labels.array)
    assert after > before + 0.05, (before, after)
    assert result.metrics["folding_fraction"] <= 5e-4
    assert result.metrics["ncc_after"] > result.metrics["ncc_before"]


@pytest.mark.numeric
def test_ct_default_through_ctcolor_register_reproduces_the_cards_held_out_dicom_pair(tmp_path):
    """The user's path: `ctcolor register FIXED MOVING` with the default `--model ct` (padding, window normalisation,
    2 mm working grid) on the card's first held-out deformation of the DICOM patient (never trained on). The moving
    labels are warped by SimpleITK through the written ddf.nii.gz, as the README tells users, and the Dice is
    recomputed and compared with the card, not read from it."""
    import SimpleITK as sitk

    from napari_ctcolor.io import write_nifti
    from napari_ctcolor.training.symnet import SymnetTrainConfig, evaluation_pairs, mean_dice

    from conftest import ctcolor

    card = _ct_card()
    require_shared(CT_DIR / "totalseg-abdomen-dicom")
    require_shared(CT_DIR / "totalseg-abdomen-dicom-labels.nii.gz")
    train = SymnetTrainConfig.load(REPO / "configs" / "symnet_ct.yaml")
    name, case, moving, moving_labels = next(p for p in evaluation_pairs(train) if p[0] == "totalseg-abdomen-dicom/0")
    expected = next(p for p in card["metrics"]["pairs"] if p["pair"] == name)
    moving_path = write_nifti(moving, tmp_path / "moving.nii.gz")
    done = ctcolor("register", str(CT_DIR / "totalseg-abdomen-dicom"), str(moving_path), "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    field = sitk.ReadImage(str(tmp_path / "out" / "ddf.nii.gz"))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    labels = moving_labels.to_sitk()
    warped = sitk.GetArrayFromImage(sitk.Resample(labels, case.ct.to_sitk(), transform, sitk.sitkNearestNeighbor, 0))
    before, after = mean_dice(case.labels, moving_labels.array), mean_dice(case.labels, warped)
    print(
        f"{name} via the CLI: Dice {before:.4f} -> {after:.4f} (card {expected['dice_after']}), "
        f"folding {metrics['folding_fraction']:.2e}"
    )
    assert before == pytest.approx(expected["dice_before"], abs=1e-3)  # the same held-out pair as the card's
    assert after >= expected["dice_after"] - 0.02  # margin: SimpleITK's nearest-neighbour resampling vs the engine's
    assert metrics["folding_fraction"] <= 5e-4  # the target: at most 0.05 %


def test_sliding_breathing_moves_the_lungs_not_the_spine_or_the_wall():
    """The bench's sliding breathing deformation on a real chest CT (lung2, masks from HU): the lung bases move
    towards the feet by most of the 20 mm, the apices hardly, while the bone (spine, ribs) and the body wall outside
    the lungs' hull stay within 1 mm (a 3 mm shear layer); the map stays invertible (det J > 0 everywhere)."""
    import SimpleITK as sitk
    from scipy import ndimage

    from napari_ctcolor.io import read_volume
    from napari_ctcolor.models.diffeo import jacobian_determinant
    from napari_ctcolor.training.symnet import CHEST_LABEL_IDS, chest_masks, sliding_breathing_displacement

    ct = read_volume(require_shared(CT_DIR / "chest-lung2-5mm.nrrd"))
    ct = Volume.from_sitk(sitk.BinShrink(sitk.Cast(ct.to_sitk(), sitk.sitkFloat32), [2, 2, 1]))
    labels = chest_masks(ct.array)
    ddf = sliding_breathing_displacement(ct, labels, max_mm=20.0)
    mm = (ddf[0] * torch.tensor(ct.spacing[::-1], dtype=torch.float32).view(3, 1, 1, 1)).numpy()  # x, y, z in mm
    feet_down = -(mm[2] if ct.direction[2, 2] > 0 else -mm[2])  # towards the feet (LPS -z), in mm
    lungs = labels == CHEST_LABEL_IDS["lungs"]
    with_lungs = np.flatnonzero(lungs.any(axis=(1, 2)))
    base, apex = with_lungs[:3], with_lungs[-3:]  # the third axis points to the head: low indices are the feet end
    assert float(np.median(feet_down[base][lungs[base]])) > 12.0
    assert float(np.median(np.abs(feet_down[apex][lungs[apex]]))) < 3.0
    bone = labels == CHEST_LABEL_IDS["bone"]
    assert float(np.percentile(np.linalg.norm(mm[:, bone], axis=0), 95)) < 1.0
    body = ct.array > -500
    hull_far = ~ndimage.binary_dilation(lungs.any(axis=0), iterations=8)[None] & body  # 8 px (18 mm) outside any lung
    assert float(np.percentile(np.linalg.norm(mm[:, hull_far], axis=0), 95)) < 1.0
    assert float(jacobian_determinant(ddf).min()) > 0.0
