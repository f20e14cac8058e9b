"""Colorizer model, targets, weights loader and training command: shapes, analytic targets, reproducibility."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from napari_ctcolor.errors import InputError
from napari_ctcolor.models.colorizer import Colorizer, ColorizerConfig, context_indices, downsample_hu, prepare_input
from napari_ctcolor.palettes import load_palette
from napari_ctcolor.training.colorizer import Sampler, TrainConfig, train_colorizer
from napari_ctcolor.training.prepare import contrast_flags, real_cases, reduce_case
from napari_ctcolor.training.targets import ab_targets, class_targets
from napari_ctcolor.weights import find_weights, load_colorizer, save_weights
from napari_ctcolor.windowing import window

from conftest import CT_DIR, DICOM_SERIES, LUMINANCE_BOUND, REPO, TINY, require_shared

CLASSES = ("air", "lung", "fat", "soft_tissue", "contrast_blood", "bone", "liver", "kidney")


def test_prepare_input_is_window_major_and_matches_windowing():
    config = ColorizerConfig(classes=CLASSES)
    hu = torch.linspace(-1000, 1500, 3 * 16 * 16).reshape(1, 3, 16, 16)
    x = prepare_input(hu, config)
    assert x.shape == (1, 9, 16, 16)
    for w, (centre, width) in enumerate(config.windows):
        for k in range(3):
            np.testing.assert_allclose(x[0, 3 * w + k].numpy(), window(hu[0, k].numpy(), centre, width), atol=1e-6)


def test_downsample_is_an_area_mean_and_factor_follows_pixel_size():
    hu = torch.arange(16.0).reshape(1, 4, 4)
    np.testing.assert_allclose(downsample_hu(hu, 2)[0].numpy(), [[2.5, 4.5], [10.5, 12.5]])
    config = ColorizerConfig(chroma_mm=3.5, classes=CLASSES)
    assert [config.factor_for(mm) for mm in (0.68, 0.98, 1.8, 3.0, 5.0)] == [5, 4, 2, 1, 1]


def test_context_indices_clamp_at_the_volume_ends():
    np.testing.assert_array_equal(context_indices(4, 3).numpy(), [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])


def test_colorizer_gives_one_logit_per_class_and_shape_errors_name_both_shapes():
    config = ColorizerConfig(**TINY, classes=CLASSES)
    model = Colorizer(config).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, config.in_channels, 32, 32))
    assert logits.shape == (2, len(CLASSES), 32, 32)
    with pytest.raises(InputError, match=r"\(B, 9, h, w\).*\(2, 4, 32, 32\)"):
        model(torch.rand(2, 4, 32, 32))
    for classes in ((), ("fat",), ("fat", "fat")):
        with pytest.raises(InputError, match="two distinct colour classes"):
            ColorizerConfig(classes=classes)


def test_a_narrow_head_gives_the_same_logits_shape_from_a_1x1_classifier_over_its_features():
    wide = Colorizer(ColorizerConfig(classes=CLASSES)).eval()
    narrow = Colorizer(ColorizerConfig(classes=CLASSES, head=4)).eval()
    x = torch.rand(2, 9, 32, 32)
    with torch.no_grad():
        features = narrow.unet(x)
        logits = narrow(x)
    assert features.shape == (2, 4, 32, 32) and logits.shape == wide(x).shape == (2, len(CLASSES), 32, 32)
    # The classifier is pointwise: PReLU then a 1x1 convolution, so each pixel's logits depend on its features only.
    conv = narrow.head[1].conv
    expected = (
        torch.einsum("kc,bchw->bkhw", conv.weight[:, :, 0, 0], narrow.head[0](features)) + conv.bias[:, None, None]
    )
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="head must be >= 0"):
        ColorizerConfig(classes=CLASSES, head=-1)


@pytest.mark.parametrize(
    ("card", "units"), [("colorizer-2d", None), ("colorizer-3d", None), ("colorizer-2d", 0), ("colorizer-2d", 2)]
)
def test_the_inference_unet_is_monais_unet_module_for_module_and_gives_its_outputs(card, units):
    """`models._unet` rebuilds MONAI's UNet for inference without importing MONAI: for the shipped configurations
    (2D and 3D, and the 2D one with 0 and 2 residual units) the same state-dict keys and shapes, and, with MONAI's
    random weights loaded, the same logits within float32 rounding (the same operations in the same order: measured
    0.0)."""
    _, card_path = find_weights(card)
    spec = json.loads(card_path.read_text(encoding="utf-8"))["architecture"]["config"]
    config = ColorizerConfig.from_dict(spec if units is None else {**spec, "num_res_units": units})
    torch.manual_seed(3)
    reference, light = Colorizer(config, monai=True).eval(), Colorizer(config).eval()
    want = reference.state_dict()
    assert {k: v.shape for k, v in light.state_dict().items()} == {k: v.shape for k, v in want.items()}
    light.load_state_dict(want)
    size = (2, config.in_channels, 48, 64) if config.dims == 2 else (1, config.in_channels, 16, 32, 32)
    x = torch.rand(size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, got = reference(x), light(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_ctcolor_colorize_never_imports_monai(tmp_path):
    """The whole `ctcolor colorize` of the DICOM series with the default model imports no MONAI module
    (``python -X importtime`` lists every module a process imports)."""
    import subprocess
    import sys

    series = require_shared(DICOM_SERIES)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "napari_ctcolor", "colorize", str(series), "-o",
         str(tmp_path / "out.nii.gz"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "napari_ctcolor.engines.colorize" in imported and "torch" in imported
    assert not [name for name in imported if name.split(".")[0] == "monai"]


def test_targets_are_the_structure_class_inside_labels_and_the_tissue_class_elsewhere():
    hu = np.full((1, 64, 64), -100, np.int16)  # fat everywhere ...
    hu[0, :, :5] = -1000  # ... an air strip on the left
    hu[0, 60:, :] = 700  # ... bone at the bottom
    labels = np.zeros_like(hu, dtype=np.uint8)
    labels[0, 16:48, 16:32] = 7  # ... a "liver" square
    labels[0, 16:48, 32:48] = 9  # ... the left kidney (class "kidney")
    labels[0, 0:4, 40:44] = 11  # ... and a structure the model has no class for: its HU decide (fat)
    names = {7: "liver", 9: "kidney_left", 11: "brain"}
    classes = class_targets(hu, labels, names, CLASSES)
    assert [CLASSES[classes[0, y, x]] for y, x in ((32, 20), (32, 40), (32, 0), (32, 58), (62, 30), (2, 42))] == [
        "liver",
        "kidney",
        "air",
        "fat",
        "bone",
        "fat",
    ]
    # Between two tissue ranges, the nearer: -600 lung (to -560), -200 fat (from -170), 130 soft tissue (to 110).
    got = [CLASSES[k] for k in class_targets(np.array([[[-930, -600, -200, 0, 130, 300]]]), None, {}, CLASSES)[0, 0]]
    assert got == ["air", "lung", "fat", "soft_tissue", "soft_tissue", "contrast_blood"]
    with pytest.raises(InputError, match="tissue classes"):
        class_targets(hu, None, {}, ("liver", "fat"))
    palette = load_palette("dicom")
    ab = ab_targets(hu, labels, names, CLASSES, palette, smooth_mm=0)
    np.testing.assert_allclose(ab[0, 32, 20], palette.class_ab(["liver"])[0], atol=1e-4)
    np.testing.assert_allclose(ab[0, 32, 0], [0, 0], atol=1e-6)  # air has no colour


def test_weights_round_trip_and_sha256_mismatch_is_refused(tmp_path):
    model = Colorizer(ColorizerConfig(**TINY, classes=CLASSES))
    card = {"architecture": {"config": model.config.to_dict()}}
    path = save_weights(model, card, tmp_path, "tiny")
    loaded, loaded_card = load_colorizer(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    assert loaded_card["sha256"] == json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["sha256"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256 does not match"):
        load_colorizer(path)


def test_pickled_weights_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, evil)
    with pytest.raises(InputError, match="only .safetensors"):
        load_colorizer(evil)
    assert not marker.exists()


def _tiny_config(tmp_path: Path, steps: int, leave_one_out: list[str] | None = None) -> Path:
    config = yaml.safe_load((REPO / "configs" / "colorizer_2d.yaml").read_text(encoding="utf-8"))
    config.update(
        leave_one_out=leave_one_out or [],
        name="tiny",
        steps=steps,
        batch_size=2,
        crop=32,
        checkpoint_every=2,
        real_train=[],
        real_val=[],
        real_partial=[],
        tissue_val=[],
        phantoms={"first_seed": 5, "count": 1, "slices": 4, "pixel_mm": [1.7, 1.8], "fov_mm": 340},
        val_phantoms={"first_seed": 900, "count": 1, "slices": 3, "pixel_mm": [1.7, 1.8], "fov_mm": 340},
    )
    config["model"].update(TINY)
    path = tmp_path / f"tiny-{steps}{'-loo' if leave_one_out else ''}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.parametrize("elastic", [0.0, 1.0])
def test_training_is_deterministic_and_resume_continues_the_same_run(tmp_path, elastic):
    """Two runs of a seed give the same weights, and so does a run stopped and resumed: with the elastic
    deformation too (``elastic``), whose own random state travels in the checkpoint."""
    config = _tiny_config(tmp_path, steps=4)
    config.write_text(
        yaml.safe_dump({**yaml.safe_load(config.read_text(encoding="utf-8")), "elastic": elastic}), encoding="utf-8"
    )
    a, _, _ = train_colorizer(config, tmp_path / "a", log=lambda *_: None)
    b, _, _ = train_colorizer(config, tmp_path / "b", log=lambda *_: None)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    # Stop after 2 of the 4 steps, then resume from the checkpoint: the same weights as the straight run.
    train_colorizer(config, tmp_path / "c", log=lambda *_: None, stop_at=2)
    c, _, _ = train_colorizer(config, tmp_path / "c", resume=True, log=lambda *_: None)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(c.state_dict()[key], value, rtol=0, atol=0)


def test_loader_workers_draw_a_fixed_sequence_of_their_own_and_the_card_names_the_device(tmp_path):
    """``loader_workers`` (the GPU recipes): batches from DataLoader worker processes, each with a `Sampler` seeded by
    (seed, worker). Two runs with the same count give the same weights; the sequence is not the in-process one."""
    config = _tiny_config(tmp_path, steps=3)
    workers = tmp_path / "workers.yaml"
    workers.write_text(
        yaml.safe_dump({**yaml.safe_load(config.read_text(encoding="utf-8")), "loader_workers": 2}), encoding="utf-8"
    )
    a, _, facts = train_colorizer(workers, tmp_path / "a", log=lambda *_: None)
    b, _, _ = train_colorizer(workers, tmp_path / "b", log=lambda *_: None)
    serial, _, _ = train_colorizer(config, tmp_path / "c", log=lambda *_: None)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0)
    assert any(not torch.equal(serial.state_dict()[k], v) for k, v in a.state_dict().items())
    assert facts["device"] == "cpu"
    # A run trained on a GPU and resumed after its last step on a CPU (to be evaluated there) keeps the GPU's name.
    checkpoint = tmp_path / "a" / "tiny.checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["devices"] == ["cpu"]
    torch.save({**state, "devices": ["cuda"]}, checkpoint)
    again, _, facts = train_colorizer(workers, tmp_path / "a", resume=True, log=lambda *_: None)
    assert facts["device"] == "cuda" and facts["steps"] == 3
    for key, value in a.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


def test_training_command_writes_weights_with_a_card_and_metrics_and_eval_only_recomputes_them(tmp_path):
    from conftest import ctcolor

    config, weights = _tiny_config(tmp_path, steps=2), tmp_path / "weights"
    done = ctcolor("train", "colorizer", "--config", str(config), "--weights-dir", str(weights), timeout=300)
    assert done.returncode == 0, done.stderr
    path = weights / "tiny.safetensors"
    card = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    # --eval-only recomputes the metrics from the weights alone: blank them, and the same numbers come back (two
    # processes with the same thread count on one CPU: the same float operations, bit for bit).
    path.with_suffix(".json").write_text(json.dumps({**card, "metrics": {}}), encoding="utf-8")
    before = path.read_bytes()
    args = ("train", "colorizer", "--config", str(config), "--weights-dir", str(weights), "--eval-only")
    done = ctcolor(*args, timeout=300)
    assert done.returncode == 0 and "updated the metrics" in done.stdout, done.stderr
    assert json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["metrics"] == card["metrics"]
    assert path.read_bytes() == before  # the weights are not touched
    assert card["training"]["command"].startswith("ctcolor train colorizer --config")
    summary = card["metrics"]["phantom_val"]["summary"]
    assert set(summary) == {"anatomical", "dicom"} and all(v["max_abs_dL"] <= LUMINANCE_BOUND for v in summary.values())
    assert (
        card["classes"]
        == yaml.safe_load((REPO / "configs" / "colorizer_2d.yaml").read_text(encoding="utf-8"))["model"]["classes"]
    )
    model, _ = load_colorizer(path)
    assert model.config.channels == (4, 8, 16, 16)


def test_training_command_on_1_and_2_threads_gives_close_weights_and_the_same_metrics(tmp_path):
    """What the cards promise about reproduction on another machine: `ctcolor train` run with 1 and with 2 torch
    threads (other float kernels, as another CPU would choose) ends within Adam's reach of the same weights and with
    the same validation metrics at the card's rounding."""
    from safetensors.torch import load_file

    from conftest import ctcolor

    steps = 4
    config = _tiny_config(tmp_path, steps=steps)
    lr = float(yaml.safe_load(config.read_text(encoding="utf-8"))["lr"])
    cards, weights = [], []
    for threads in (1, 2):
        out = tmp_path / f"threads-{threads}"
        done = ctcolor("train", "colorizer", "--config", str(config), "--weights-dir", str(out), threads=threads)
        assert done.returncode == 0, done.stderr
        weights.append(load_file(out / "tiny.safetensors"))
        cards.append(json.loads((out / "tiny.json").read_text(encoding="utf-8")))
    difference = torch.cat([(weights[0][k] - weights[1][k]).abs().flatten() for k in weights[0]])
    # Adam moves each parameter by at most ~lr per step whatever its gradient: the bound any run obeys ...
    assert difference.max() <= 2 * lr * steps, float(difference.max())
    # ... while rounding noise leaves almost all parameters equal (measured: 99th percentile 1.5e-8, max 9.6e-4 on the
    # few whose gradient is near zero, where Adam's normalised step flips sign).
    assert torch.quantile(difference, 0.99) <= 1e-6, float(torch.quantile(difference, 0.99))
    summaries = [card["metrics"]["phantom_val"]["summary"] for card in cards]
    for palette in ("anatomical", "dicom"):
        mine, theirs = summaries[0][palette], summaries[1][palette]
        for group, value in mine["hue_within_25deg"].items():
            other = theirs["hue_within_25deg"][group]  # None: the group is absent from the validation phantom
            assert (value is None) == (other is None) and (value is None or abs(value - other) <= 0.01), group
        assert mine["dE00_mean"] == pytest.approx(theirs["dE00_mean"], abs=0.05), palette


def test_shipped_colorizers_load_with_verified_sha256_and_meet_the_luminance_bound():
    for name in ("colorizer-2d", "colorizer-3d"):
        try:
            path, card_path = find_weights(name)
        except InputError:
            pytest.fail(f"shipped weights {name} are missing from weights/")
        model, card = load_colorizer(name)
        assert card["sha256"] and card_path is not None
        metrics = card["metrics"]
        for group in ("real_val", "phantom_val"):
            assert all(palette["max_abs_dL"] <= LUMINANCE_BOUND for palette in metrics[group]["summary"].values())
        for row in metrics.get("leave_one_out", []):  # the held-out patients of the leave-one-out models
            for case in row["cases"]:
                assert all(case[palette]["max_abs_dL"] <= LUMINANCE_BOUND for palette in ("anatomical", "dicom"))


def test_real_training_cases_marked_contrast_get_no_synthetic_enhancement_and_bad_marks_are_refused():
    entries = [["a.nii.gz", "a-labels.nii.gz"], ["series", "series-labels.nii.gz", "contrast"]]
    assert contrast_flags(entries) == [False, True]
    for bad in (["a.nii.gz"], ["a.nii.gz", "a-labels.nii.gz", "arterial"]):
        with pytest.raises(InputError, match="contrast"):
            real_cases([bad])


def test_de_enhancement_draws_the_contrast_patient_unenhanced_and_leaves_other_tissue():
    """With ``deenhance: 0.5`` (off in the shipped recipe) half of the labelled contrast patient's samples have each
    blood pool and enhancing organ moved down to non-contrast HU (its portal-venous aorta is ~150 HU); other tissue
    keeps its HU."""
    require_shared(DICOM_SERIES)
    train = TrainConfig.load(Path(__file__).resolve().parents[2] / "configs" / "colorizer_2d.yaml")
    train.deenhance = 0.5
    config = ColorizerConfig.from_dict(train.model)
    case = reduce_case(
        real_cases([["totalseg-abdomen-dicom", "totalseg-abdomen-dicom-labels.nii.gz", "contrast"]])[0],
        config,
        real=True,
        contrast=True,
    )
    assert case.deenhance and not case.enhance
    sampler = Sampler([case], config, train, seed=3)
    aorta, fat = config.classes.index("aorta"), config.classes.index("fat")
    z = int((case.target[:, aorta] > 200).sum(dim=(1, 2)).argmax())
    hu, target = case.hu[z : z + 1], case.target[z : z + 1]
    in_aorta, in_fat = target[0, aorta] > 200, target[0, fat] > 200
    assert float(hu[0][in_aorta].mean()) > 120  # enhanced as scanned
    aorta_means, fat_shift = [], []
    for _ in range(40):
        out = sampler._augment(hu, target, case)[0]
        aorta_means.append(float(out[in_aorta].mean()))
        fat_shift.append(float((out[in_fat] - hu[0][in_fat]).mean()))
    aorta_means = np.array(aorta_means)
    # De-enhanced draws: blood 35-50 HU, then gain (+-4 %), offset (sd 8 HU) and noise (<=12 HU sd, mean 0 over the
    # aorta's pixels): within 35-50 +-30 HU. Enhanced draws stay above 120 HU.
    low = aorta_means < 100
    assert 8 <= low.sum() <= 32, aorta_means
    assert np.all((aorta_means[low] > 5) & (aorta_means[low] < 80)), aorta_means[low]
    assert np.all(aorta_means[~low] > 120), aorta_means[~low]
    assert np.abs(fat_shift).max() < 40  # fat only gets the global gain, offset and noise


def test_a_recipe_with_leave_one_out_rows_collects_them_and_refuses_to_train_without_them(tmp_path):
    """The shipped recipe's card carries its leave-one-out models' held-out rows: without those models, `ctcolor
    train` stops before training (one line, exit 2, nothing written); with one in weights/validation, the card gets
    its held-out case, its file and sha256."""
    from conftest import ctcolor

    weights = tmp_path / "weights"
    config = _tiny_config(tmp_path, steps=2, leave_one_out=["tiny-held-out"])
    done = ctcolor("train", "colorizer", "--config", str(config), "--weights-dir", str(weights), timeout=300)
    assert done.returncode == 2 and "leave-one-out model not found" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not weights.exists()
    # A leave-one-out model: the tiny recipe with a held-out "real" case in its card.
    plain = _tiny_config(tmp_path, steps=2)
    assert (
        ctcolor("train", "colorizer", "--config", str(plain), "--weights-dir", str(weights / "validation")).returncode
        == 0
    )
    card_path = weights / "validation" / "tiny.json"
    held_out = {"case": "patient-x", "trained_on": False, "classes": {}}
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["metrics"]["real_val"] = {"summary": {}, "cases": [held_out, {"case": "patient-y", "trained_on": True}]}
    card_path.write_text(json.dumps(card), encoding="utf-8")
    for suffix in (".safetensors", ".json"):
        (weights / "validation" / f"tiny{suffix}").rename(weights / "validation" / f"tiny-held-out{suffix}")
    done = ctcolor("train", "colorizer", "--config", str(config), "--weights-dir", str(weights), timeout=300)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads((weights / "tiny.json").read_text(encoding="utf-8"))["metrics"]["leave_one_out"]
    assert row == {"model": "validation/tiny-held-out.safetensors", "sha256": card["sha256"], "cases": [held_out]}


def test_vessel_crops_centre_samples_on_the_aorta_and_give_them_an_arterial_phase():
    """With ``vessel_crops: 1`` (configs/variants/vessel-confusion.yaml) every 2D sample of the labelled non-contrast
    CT is cropped around its aorta, the aorta inside the crop's middle half, and its aorta is raised by an arterial
    phase (`ENHANCEMENT`: 150-650 HU, then gain, offset and noise); at 0 the sampler draws exactly as before."""
    from napari_ctcolor.training.colorizer import ENHANCEMENT

    require_shared(CT_DIR)
    train = TrainConfig.load(Path(__file__).resolve().parents[2] / "configs" / "colorizer_2d.yaml")
    config = ColorizerConfig.from_dict(train.model)
    case = reduce_case(
        real_cases([["totalseg-body-3mm.nii.gz", "totalseg-body-3mm-labels.nii.gz"]])[0], config, real=True
    )
    aorta = config.classes.index("aorta")
    plain = Sampler([case], config, train, seed=5)
    again = Sampler([case], config, dataclasses.replace(train, vessel_crops=0.0), seed=5)
    assert not again.vessels and all(torch.equal(a, b) for a, b in zip(plain.batch(), again.batch(), strict=True))
    sampler = Sampler([case], config, dataclasses.replace(train, vessel_crops=1.0, limbs=0.0, elastic=0.0), seed=5)
    quarter = train.crop // 4
    for _ in range(3):
        seen = []
        for _ in range(4):
            z, y, x = sampler._vessel_crop(0, *case.hu.shape[1:])
            crop = case.target[z, aorta, y : y + train.crop, x : x + train.crop] > 127
            assert crop[quarter:-quarter, quarter:-quarter].any()
            hu = sampler._augment(
                case.hu[z : z + 1, y : y + train.crop, x : x + train.crop],
                case.target[z : z + 1, :, y : y + train.crop, x : x + train.crop],
                case,
                True,
            )
            seen.append(float((hu[0] - case.hu[z, y : y + train.crop, x : x + train.crop])[crop].mean()))
        low, high = ENHANCEMENT["arterial"]["aorta"]
        assert all(0.96 * low - 40 <= s <= 1.04 * high + 60 for s in seen), seen
