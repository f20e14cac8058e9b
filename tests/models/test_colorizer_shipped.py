"""The shipped colorizers on CT they never saw: colours where they must be, none where they must not, through
`ctcolor colorize` as a user runs it, against the figures in their model cards.

colorizer-2d is trained on both labelled patients, so its card's held-out rows come from its leave-one-out models
(the same recipe less one patient, shipped in weights/validation/ for this test): each is run through the CLI on the
patient it never saw, and the figures are recomputed by the same `color_metrics`, `class_metrics` and
`tissue_metrics` as the card, from the CLI's own class map and colours (the other windows the figures read composed
in process from the same network, once equal to the CLI's: `cli_render`), so the card, the engine and the command
must agree.
The unlabelled chest CT held out of every training (lung1) is the shipped model's own held-out row.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_ctcolor.color import srgb_to_lab
from napari_ctcolor.engines.colorize import compose_chroma, predict_chroma
from napari_ctcolor.engines.device import cpu_bf16
from napari_ctcolor.io import read_volume
from napari_ctcolor.training.data import LabelledCT, load_real_case
from napari_ctcolor.training.evaluate import class_metrics, color_metrics, tissue_metrics, vessel_mask
from napari_ctcolor.weights import find_weights, load_colorizer
from napari_ctcolor.windowing import PRESETS

from conftest import CT_DIR, DICOM_SERIES, LUMINANCE_BOUND, assert_same_colors, require_shared

PALETTES = ("anatomical", "dicom")
#: Organs and vessels: a colour class a limb or a vertebra crop must not take.
VISCERA = (
    "liver", "spleen", "kidney", "gallbladder", "stomach", "pancreas", "adrenal_gland", "esophagus", "small_bowel",
    "duodenum", "colon", "urinary_bladder", "prostate", "heart",
)  # fmt: skip


WEIGHTS = Path(__file__).resolve().parents[2] / "weights"


def held_out_rows() -> list[tuple[str, str]]:
    """(leave-one-out model file under weights/, held-out case) for each row of colorizer-2d's card."""
    card = json.loads((WEIGHTS / "colorizer-2d.json").read_text(encoding="utf-8"))
    return [(row["model"], case["case"]) for row in card["metrics"]["leave_one_out"] for case in row["cases"]]


def validation_case(model_card: dict, name: str) -> tuple[LabelledCT, Path]:
    """The labelled CT ``name`` of a card's ``real_val`` (its CT and label files as the training config names them)
    and the CT's path, the CLI's input."""
    (entry,) = [e for e in model_card["training"]["config"]["real_val"] if e[0].split(".")[0] == name]
    source = require_shared(CT_DIR / entry[0])
    return load_real_case(CT_DIR.parent, entry[0], entry[1]), source


#: The renders `cli_render` takes from ``ctcolor colorize`` processes: the card's display window in both palettes.
THROUGH_CLI = (("abdomen", "dicom"), ("abdomen", "anatomical"))


def cli_render(tmp_path, model: str, source: Path = DICOM_SERIES):
    """render(window, palette) for `color_metrics`: one ``ctcolor colorize`` process of ``source`` for each window and
    palette of `THROUGH_CLI` (the first also writes the class map, ``--classes``, to tmp_path / "classes.nii.gz"),
    and every other window composed in this process from one run of the network (`predict_chroma`, `compose_chroma`:
    the code the command runs), once its colours are those of the processes within `assert_same_colors`' bound. A
    card's figures read 10-20 windows; a process for each took 150-200 s of a test (2026-11-27, 2-core AMD EPYC)."""
    done: dict[tuple, np.ndarray] = {}
    volume = read_volume(source)
    chroma = predict_chroma(volume, model, device="cpu")  # the command's precision on this CPU (`cpu_bf16`)

    def composed(centre: float, width: float, palette: str) -> np.ndarray:
        return compose_chroma(volume, chroma, (centre, width), 1.0, "cpu", palette).rgb

    for number, (win, palette) in enumerate(THROUGH_CLI):
        centre, width = PRESETS[win]
        out = tmp_path / f"{number}.nii.gz"
        command = [sys.executable, "-m", "napari_ctcolor", "colorize", str(source), "-o", str(out)]
        command += ["--model", model, "--palette", palette, "--window", f"{centre},{width}", "--device", "cpu"]
        command += [] if number else ["--classes", str(tmp_path / "classes.nii.gz")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))  # (Z, Y, X, 3), the CT's grid
        assert_same_colors(rgb, composed(centre, width, palette), f"{win} {palette}")
        done[(centre, width, palette)] = rgb

    def render(win, palette: str) -> np.ndarray:
        centre, width = PRESETS[win] if isinstance(win, str) else win
        key = (centre, width, palette)
        if key not in done:
            done[key] = composed(centre, width, palette)
        return done[key]

    return render


def cli_classes(tmp_path, classes) -> np.ndarray:
    """The class map `ctcolor colorize --classes` wrote (0 air, k for ``classes[k - 1]``), its table checked."""
    table = json.loads((tmp_path / "classes.json").read_text(encoding="utf-8"))["labels"]
    assert [table[str(k + 1)] for k in range(1, len(classes))] == list(classes[1:])
    return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "classes.nii.gz")))


def assert_figures(got: dict, expected: dict, tol: float) -> None:
    """Every figure the card claims (None where a structure is missing) within ``tol``."""
    for key, value in expected.items():
        mine = got[key]
        assert (mine is None) == (value is None) and (value is None or mine == pytest.approx(value, abs=tol)), key


def share_tolerance() -> float:
    """How far a share of voxels (a hue share, a structure named right) may move from a card computed in float32:
    0.01 where `ctcolor colorize` runs in float32 too (another CPU's rounding), 0.02 where it runs in bfloat16."""
    return 0.02 if cpu_bf16() else 0.01


@pytest.mark.parametrize("model_file,case_name", held_out_rows())
def test_held_out_patient_through_the_cli_matches_the_model_card(tmp_path, model_file, case_name):
    """The card's figures were computed in float32 on another CPU; the CLI may run bfloat16 here (`cpu_bf16`). A class
    flips only where two were nearly equally probable, so shares scatter a little: in float32 on another Intel CPU
    they matched the card to the third decimal; bfloat16 on a Xeon with AMX moved the DICOM row's vessel hue and aorta
    name by 0.010 and 0.009 (2026-11-25). Shares within `share_tolerance`, dE00 within 0.05, the share of absent
    structures named within 0.002."""
    shipped = json.loads((WEIGHTS / "colorizer-2d.json").read_text(encoding="utf-8"))
    path = WEIGHTS / model_file
    net, card = load_colorizer(str(path))  # checks the file against its own card's sha256
    (row,) = [r for r in shipped["metrics"]["leave_one_out"] if r["model"] == model_file]
    assert row["sha256"] == card["sha256"]
    (card_case,) = [c for c in card["metrics"]["real_val"]["cases"] if c["case"] == case_name]
    assert not card_case["trained_on"] and card_case in row["cases"]  # the shipped card states this model's row
    case, source = validation_case(card, case_name)
    render = cli_render(tmp_path, str(path), source)
    got = color_metrics(case, net.config.classes, render, ["dicom", "anatomical"])
    labels = cli_classes(tmp_path, net.config.classes)
    classes = class_metrics(case, labels, net.config.classes)
    tissues = tissue_metrics(case.ct, labels, net.config.classes, render, vessel_mask(case))
    print(json.dumps([got, classes, tissues]))
    share_tol = share_tolerance()
    assert_figures(classes["right_or_tissue"], card_case["classes"]["right_or_tissue"], share_tol)
    assert classes["absent_named"] == pytest.approx(card_case["classes"]["absent_named"], abs=0.002)
    assert classes["flicker"] == pytest.approx(card_case["classes"]["flicker"], abs=0.01)
    assert_figures(tissues, card_case["tissues"], share_tol)
    # Bone and lung keep their colour families on a patient the model never saw (the DICOM slab holds no lung).
    assert tissues["lung_hue"] is None or tissues["lung_hue"] >= 0.9
    assert tissues["bone_ivory"] is None or tissues["bone_ivory"] >= BONE_IVORY_MIN
    # Nothing outside the body takes colour: the DICOM patient's table (400-1000 HU, a bone's HU) and blankets.
    assert_grey_outside_the_body(case.ct, render("bone", "anatomical"))
    for palette in ("dicom", "anatomical"):
        mine, theirs = got[palette], card_case[palette]
        assert_figures(mine["hue_within_25deg"], theirs["hue_within_25deg"], share_tol)
        assert mine["dE00_mean"] == pytest.approx(theirs["dE00_mean"], abs=0.05)
        # No chroma in air, in every window; the luminance contract.
        assert mine["air_max_chroma"] <= 2.0 and mine["max_abs_dL"] <= LUMINANCE_BOUND


def test_held_out_chest_ct_through_the_cli_matches_the_model_card(tmp_path):
    """The chest CT no model was trained on (lung1, contrast, 5 mm): bone ivory, lung and fat hues and organs named
    above the diaphragm, recomputed from `ctcolor colorize` with the shipped model, within `share_tolerance` of its
    card."""
    net, card = load_colorizer("colorizer-2d")
    (row,) = card["metrics"]["tissue_val"]["cases"]
    assert row["case"] + ".nrrd" in card["training"]["config"]["tissue_val"]
    assert all(row["case"] not in str(entry) for entry in card["training"]["config"]["real_partial"])
    source = require_shared(CT_DIR / f"{row['case']}.nrrd")
    render = cli_render(tmp_path, "colorizer-2d", source)
    labels = cli_classes(tmp_path, net.config.classes)
    tissues = tissue_metrics(read_volume(source), labels, net.config.classes, render)
    print(json.dumps(tissues))
    assert_figures(tissues, row["tissues"], share_tolerance())
    assert tissues["bone_ivory"] >= BONE_IVORY_MIN and tissues["lung_hue"] >= 0.9
    assert tissues["abdominal_above_diaphragm"] < 0.02
    # Organs this chest CT does not reach are named nowhere: before the island rule (`anatomy.MIN_PIECE_ML`), 36-108
    # voxels each of kidney, adrenal gland, small bowel and duodenum, islands beside the oesophagus at the heart.
    absent = [net.config.classes.index(name) + 1 for name in ("kidney", "adrenal_gland", "small_bowel", "duodenum")]
    assert not np.isin(labels, absent).any()


#: Bone shown between 40 % and 85 % grey in the bone window, ivory under `anatomical`, on every held-out row: the
#: issue's 0.9. Measured 0.974 (DICOM patient), 0.999 (3 mm patient), 0.995 (chest CT). Before the composition
#: re-weighted each network pixel's classes by the voxel's HU (`colorize.HU_GROUPS`), thin bone at 0.7 mm shared its
#: 3.5 mm pixel with soft tissue and came out salmon (0.678 on the DICOM patient); the models before the chest partial
#: labels measured 0.46 and 0.34.
BONE_IVORY_MIN = 0.9
#: Outside the body, this far from it (mm: two network pixels and more), no voxel may show colour.
OUTSIDE_MM = 8.0


def assert_grey_outside_the_body(ct, rgb: np.ndarray) -> None:
    """C* <= 2 on every voxel above -400 HU (the table, blankets) farther than `OUTSIDE_MM` from the body."""
    from scipy import ndimage

    from napari_ctcolor.engines.body import body_mask

    hu = np.asarray(ct.array, dtype=np.float32)
    far = ndimage.distance_transform_edt(~body_mask(hu, ct.spacing), sampling=ct.spacing) > OUTSIDE_MM
    lab = srgb_to_lab(rgb[far & (hu > -400.0)])
    assert len(lab) == 0 or np.hypot(lab[:, 1], lab[:, 2]).max() <= 2.0


def _limb_slab(seed: int = 0) -> np.ndarray:
    """A thigh-like cross-section (anatomy outside the colorizer's classes): skin, fat, muscle with fat septa, a femur
    with cortex and marrow, in air; 12 slices of 256 x 256 at 0.8 mm, noise 15 HU."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:256, :256] - 127.5
    r = np.hypot(y, x * 1.1)
    hu = np.full((256, 256), -1000.0)
    hu[r < 100] = 30  # skin
    hu[r < 97] = -100  # subcutaneous fat
    hu[r < 80] = 50  # muscle
    septa = (np.abs(np.sin(np.arctan2(y, x) * 3)) < 0.04) & (r < 80) & (r > 30)
    hu[septa] = -90
    rb = np.hypot(y - 10, x + 5)
    hu[rb < 22] = 1300  # cortical bone
    hu[rb < 14] = -40  # fatty marrow
    slab = np.repeat(hu[None], 12, axis=0) + rng.normal(0, 15, (12, 256, 256))
    return slab.astype(np.int16)


def test_anatomy_outside_the_classes_falls_back_to_tissue_colors():
    import pydicom
    from pydicom.data import get_testdata_file

    from napari_ctcolor.io import Volume

    require_shared()  # the shipped weights are always there; the threshold comes from measured runs
    find_weights("colorizer-2d")
    limb = Volume(_limb_slab(), (3.0, 0.8, 0.8), (0.0, 0.0, 0.0), np.eye(3), {"modality": "CT"})
    shares = predict_chroma(limb, "colorizer-2d", device="cpu").class_shares()
    body = 1.0 - shares.get("air", 0.0)
    viscera = sum(shares.get(name, 0.0) for name in VISCERA) / body
    print("limb", {k: round(v, 3) for k, v in shares.items()})
    assert viscera < LIMB_VISCERA_MAX

    vertebra = read_volume(get_testdata_file("CT_small.dcm"))  # a crop around a thoracic vertebra, 0.66 mm
    assert pydicom.dcmread(get_testdata_file("CT_small.dcm")).Modality == "CT"
    shares = predict_chroma(vertebra, "colorizer-2d", device="cpu").class_shares()
    print("CT_small", {k: round(v, 3) for k, v in shares.items()})
    assert sum(shares.get(name, 0.0) for name in VISCERA) < SMALL_VISCERA_MAX


#: Share of the limb's body (or of the CT_small crop) whose most probable class is an organ. Measured with the shipped
#: colorizer-2d: limb 0.070 (0.082 for the previous model with a 39-channel top level, 0.151 for one trained without
#: synthetic limbs, 0.14 for one trained on 96-pixel crops with elastic deformation, not shipped), CT_small 0.014; the
#: margins allow a retrained model's scatter, not a model that colours arms as organs.
LIMB_VISCERA_MAX = 0.12
SMALL_VISCERA_MAX = 0.05


def test_palettes_example_recomposes_one_run_in_both_palettes(tmp_path):
    require_shared(DICOM_SERIES)
    script = Path(__file__).resolve().parents[2] / "examples" / "palettes.py"
    command = [sys.executable, str(script), str(DICOM_SERIES), "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    anatomical, dicom = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{p}.nii.gz"))) for p in PALETTES)
    assert anatomical.shape == dicom.shape == (20, 512, 512, 3)
    lightness = [srgb_to_lab(rgb[::4])[..., 0] for rgb in (anatomical, dicom)]
    assert np.abs(lightness[0] - lightness[1]).max() <= 0.6  # the same picture (each within 0.3 of the grey's L*)
    assert np.abs(anatomical.astype(int) - dicom).mean() > 2  # in other colours
    assert "liver" in result.stdout


@pytest.mark.slow  # two whole ctcolor colorize processes of a 20-slice 512² series per model
@pytest.mark.parametrize("model", ["colorizer-2d", "colorizer-3d"])  # the shipped weights, by name
def test_the_same_series_stored_in_another_order_gets_the_same_colors_and_names(tmp_path, model):
    """The DICOM patient as read (rows towards posterior, columns towards the patient's left, slices towards
    superior) and the same image saved in the reverse order on all three axes (the affine adjusted: every voxel
    keeps its place in space; in-plane this is NIfTI's RAS order), each colorized by `ctcolor colorize`: the class
    maps and the colours, compared voxel by voxel in space, agree. The network sees both as the same slices
    (`AxialView`). Where a slice needs padding to the network's multiple, the padding falls on the other side and
    the 3.5 mm pixels' grid starts elsewhere, so voxels at edges between classes may change: hence the 0.5 % allowed.
    Measured: 0.0001 % (2D) and 0 % (3D) named otherwise, none coloured otherwise (512² slices need no padding).
    Before, each network saw the slices in the order stored: the in-plane reversal alone named 32.8 % of the body
    otherwise with the 2D model (the spleen kept 160 of its 126,131 voxels), the reversal of all three axes 34.2 %
    with the 3D model."""
    require_shared(DICOM_SERIES)
    image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(DICOM_SERIES)))
    paths = {"lps": tmp_path / "lps.nii.gz", "ras": tmp_path / "ras.nii.gz"}
    sitk.WriteImage(image, str(paths["lps"]))
    sitk.WriteImage(sitk.Flip(image, [True, True, True]), str(paths["ras"]))  # same voxels in space, reversed
    assert np.diag(read_volume(paths["ras"]).direction).tolist() == [-1.0, -1.0, -1.0]  # another order indeed
    out = {}
    for name, path in paths.items():
        rgb, labels = tmp_path / f"{name}-rgb.nii.gz", tmp_path / f"{name}-cls.nii.gz"
        command = [sys.executable, "-m", "napari_ctcolor", "colorize", str(path), "-o", str(rgb), "--classes"]
        command += [str(labels), "--model", model, "--window", "40,400", "--device", "cpu"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        # onto the first file's grid by their geometry: a pure reordering, which nearest neighbour keeps exact
        reference = sitk.ReadImage(str(tmp_path / "lps-cls.nii.gz"))
        out[name] = [
            sitk.GetArrayFromImage(
                sitk.Resample(sitk.ReadImage(str(f)), reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            )
            for f in (labels, rgb)
        ]
    body = out["lps"][0] > 0
    named_otherwise = float((out["lps"][0] != out["ras"][0])[body].mean())
    color_otherwise = float((np.abs(out["lps"][1].astype(int) - out["ras"][1].astype(int)).max(-1) > 8)[body].mean())
    print(f"\n{model}, reversed: named otherwise {named_otherwise:.4%}, colour >8 codes {color_otherwise:.4%}")
    assert named_otherwise <= 0.005 and color_otherwise <= 0.005


@pytest.mark.slow  # two whole ctcolor colorize processes of the 112-slice 3 mm CT
def test_vertebrae_named_bone_are_shown_in_their_bone_hue_wherever_the_window_leaves_room(tmp_path):
    """T10-L5 of the 3 mm patient, held out from the model that colours it, through `ctcolor colorize --classes`: of
    the voxels named a bone class, >= 90 % in that class's palette hue (within 25 deg, at least half its chroma)
    where the window leaves the colour room (L* < 98), and in the bone window everywhere. In the abdomen window 40/400
    a vertebra's cortex lies above the window (240 HU: 22 % of T12) and is pure white, which no hue can colour without
    changing the CT's luminance; that is the share 'T12 in the bone hue' misses there (measured 2026-11-28, 2-core
    AMD EPYC: every named-bone voxel below L* 98 at the palette's chroma 14)."""
    from napari_ctcolor.engines.colorize.anatomy import family
    from napari_ctcolor.palettes import load_palette

    source = require_shared(CT_DIR / "totalseg-body-3mm.nii.gz")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(CT_DIR / "totalseg-body-3mm-labels.nii.gz")))
    names = json.loads((CT_DIR / "totalseg-v2-label-names.json").read_text(encoding="utf-8"))
    vertebrae = np.isin(labels, [int(k) for k, n in names.items() if n.startswith(("vertebrae_T1", "vertebrae_L"))])
    model = str(WEIGHTS / "validation" / "colorizer-2d-heldout-body3mm.safetensors")
    palette = load_palette("anatomical")
    for window in ("abdomen", "bone"):
        out, classes_out = tmp_path / f"{window}.nii.gz", tmp_path / f"{window}-classes.nii.gz"
        command = [sys.executable, "-m", "napari_ctcolor", "colorize", str(source), "-o", str(out), "--model", model]
        command += ["--window", window, "--device", "cpu", "--classes", str(classes_out)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        table = json.loads(classes_out.with_name(f"{window}-classes.json").read_text(encoding="utf-8"))["labels"]
        named = sitk.GetArrayFromImage(sitk.ReadImage(str(classes_out)))
        lab = srgb_to_lab(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))
        shown, total = 0, 0
        for code, name in table.items():
            if family(name) != "bone":
                continue
            where = vertebrae & (named == int(code)) & (lab[..., 0] < 98.0)
            _, a, b = srgb_to_lab(np.asarray(palette.class_rgb(name), dtype=np.uint8))
            hue = np.degrees(np.arctan2(lab[..., 2][where], lab[..., 1][where]) - np.arctan2(b, a))
            near = np.abs((hue + 180.0) % 360.0 - 180.0) <= 25.0
            strong = np.hypot(lab[..., 1][where], lab[..., 2][where]) >= 0.5 * np.hypot(a, b)
            shown, total = shown + int((near & strong).sum()), total + int(where.sum())
        assert total > 0.5 * vertebrae.sum() if window == "bone" else total > 1000, (window, total)
        assert shown / total >= 0.9, (window, shown / total)
