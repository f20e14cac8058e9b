"""Colour that holds on every exam of a patient, through `ctcolor colorize --classes` as a user runs it.

Each labelled patient is run through the leave-one-out model that never saw it (weights/validation/), as the exams
of `training.exams.PHASES` would show its blood: non-contrast, portal-venous, and arterial with the aorta at 300,
450 and 600 HU (a CT angiography's range); the 3 mm patient also as a scan that ends above the pelvis. The chest CT
that no model was trained on (lung1) is run through the shipped model with its mediastinal blood pool raised to
those densities, and with a field of view that cuts its chest wall. The class maps the command writes are scored by
`evaluate.class_metrics` against the reference labels (the patients' TotalSegmentator masks; lung1's pool and lungs
from `training.partial.derive_chest`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_ctcolor.engines.colorize.anatomy import PELVIS, family
from napari_ctcolor.io import Volume, read_volume
from napari_ctcolor.training import exams
from napari_ctcolor.training.data import LabelledCT, load_real_case
from napari_ctcolor.training.evaluate import CUT_FOV, POOL_HU, _aerated_lung, _inner, class_metrics
from napari_ctcolor.training.partial import derive_chest

from conftest import CT_DIR, require_shared

WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
#: (CT, labels, the leave-one-out model that never saw the patient)
PATIENTS = (
    ("totalseg-body-3mm.nii.gz", "totalseg-body-3mm-labels.nii.gz", "colorizer-2d-heldout-body3mm"),
    ("totalseg-abdomen-dicom", "totalseg-abdomen-dicom-labels.nii.gz", "colorizer-2d-heldout-dicom"),
)
#: What is asserted, per exam. Issue 49's targets are stricter: vessels named right or as their tissue on 90 % and
#: bone on at most 2 %, vertebrae bone or themselves on 90 % and blood on at most 5 %, pelvic names on at most 0.2 %
#: of a scan above the pelvis, lung named lung on 90 % of a cut field of view. The leave-one-out models reach
#: (2026-11-26, CPU float32, `ctcolor train ... --eval-only` rows in weights/validation/*.json): the held-out 3 mm
#: patient's aorta named bone on 14-24 % of its inner voxels in the portal-venous and arterial exams (0.60-1.00 with
#: the models and rules before), named right or by tissue on 0.755 without contrast (0.98 before: 19 % now named
#: oesophagus); the held-out DICOM patient's aorta bone 0.1-7.7 % (2.5-24 % before); lung1's blood pool bone
#: 0.8-1.9 % (33-47 % before), its cut lungs named lung 0.999 (0.024 before). With the chest CTs' derived aorta in
#: training (2026-11-27, same machine) the held-out aortas in these exams are named bone on 0-4.4 % (3 mm patient)
#: and 1.1-13.2 % (DICOM patient), against 1.5-24.9 % for the models of commit 2716ae8. The bounds below sit between
#: the two, so that the test fails on the earlier code and models, with room for another CPU's float kernels
#: (bfloat16 moves a share by about 0.01).
VESSEL_RIGHT, VESSEL_AS_BONE = 0.70, 0.20
BONE_RIGHT, BONE_AS_BLOOD = 0.85, 0.05
ABSENT_PELVIS = 0.002
POOL_AS_BONE, POOL_BLOOD = 0.05, 0.90
LUNG_NAMED = 0.90


def colorize_classes(tmp_path: Path, ct: Volume, name: str, model: str) -> tuple[np.ndarray, list[str]]:
    """Write ``ct`` as int16 NIfTI, run ``ctcolor colorize --classes`` on it; the class map (0 air, k the k-th name
    of the returned list, `ctcolor colorize`'s table) on the CT's grid."""
    source = tmp_path / f"{name}.nii.gz"
    sitk.WriteImage(ct.with_array(np.round(np.asarray(ct.array)).astype(np.int16)).to_sitk(), str(source))
    classes = tmp_path / f"{name}-classes.nii.gz"
    command = [
        sys.executable,
        "-m",
        "napari_ctcolor",
        "colorize",
        str(source),
        "-o",
        str(tmp_path / f"{name}-rgb.nii.gz"),
    ]
    command += ["--model", model, "--classes", str(classes), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    table = json.loads(classes.with_name(f"{name}-classes.json").read_text(encoding="utf-8"))["labels"]
    names = [table.get(str(k), "air") for k in range(1, max(map(int, table)) + 1)]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(classes))), names


@pytest.mark.parametrize("patient", PATIENTS, ids=lambda p: p[0].split(".")[0])
def test_vessels_are_blood_and_bones_bone_in_every_contrast_phase_on_the_held_out_patient(tmp_path, patient):
    require_shared(CT_DIR / patient[0])
    case = load_real_case(CT_DIR.parent, patient[0], patient[1])
    model = str(WEIGHTS / "validation" / f"{patient[2]}.safetensors")
    failures = {}
    for phase in exams.PHASES:
        version = exams.with_blood(case, phase)
        labels, names = colorize_classes(tmp_path, version.ct, phase, model)
        named = class_metrics(version, labels, names)["named"]
        print(phase, json.dumps(named))
        aorta, vertebrae = named["aorta"], named["vertebrae"]
        if aorta["right"] + aorta["tissue"] < VESSEL_RIGHT or aorta["bone"] > VESSEL_AS_BONE:
            failures[f"{phase} aorta"] = aorta
        if vertebrae["right"] + vertebrae["tissue"] < BONE_RIGHT or vertebrae["blood"] > BONE_AS_BLOOD:
            failures[f"{phase} vertebrae"] = vertebrae
    assert not failures, failures


def test_nothing_pelvic_is_named_on_a_scan_that_ends_above_the_pelvis(tmp_path):
    """The 3 mm patient (lower chest to pelvis) cut at its kidneys' lowest labelled slice, as a chest-to-upper-abdomen
    exam ends, in its arterial version, through the model that never saw it."""
    names3 = PATIENTS[0]
    require_shared(CT_DIR / names3[0])
    case = exams.with_blood(load_real_case(CT_DIR.parent, names3[0], names3[1]), "arterial_450")
    kidney = [k for k, n in case.label_names.items() if n.startswith("kidney")]
    slices = np.flatnonzero(np.isin(case.labels, kidney).any(axis=(1, 2)))
    superior_first = np.asarray(case.ct.direction)[2, 2] < 0
    start, stop = (0, int(slices.max()) + 1) if superior_first else (int(slices.min()), case.ct.shape[0])
    ct, (labels,) = exams.crop_z(case.ct, start, stop, case.labels)
    assert not np.isin(labels, [k for k, n in case.label_names.items() if n.startswith(("hip", "femur"))]).any()
    got, names = colorize_classes(
        tmp_path, ct, "above-pelvis", str(WEIGHTS / "validation" / f"{names3[2]}.safetensors")
    )
    body = LabelledCT("crop", ct, labels, case.label_names).body & (np.asarray(ct.array) >= -900)
    pelvic = [k + 1 for k, n in enumerate(names) if n.startswith(PELVIS)]
    share = float(np.isin(got[body], pelvic).mean())
    print("pelvic names above the pelvis", share)
    assert share <= ABSENT_PELVIS


@pytest.fixture(scope="module")
def lung1():
    ct = read_volume(require_shared(CT_DIR / "chest-lung1-5mm.nrrd"))
    return ct, derive_chest(ct)


@pytest.mark.parametrize("value", POOL_HU)
def test_a_dense_blood_pool_in_the_chest_is_blood_not_bone(tmp_path, lung1, value):
    """lung1 (never trained on) with its heart and great vessels (the derived mediastinal pool) at CTA densities."""
    ct, masks = lung1
    pool = _inner(masks["blood"])
    labels, names = colorize_classes(tmp_path, exams.with_pool(ct, pool, value), f"pool{value:.0f}", "colorizer-2d")
    families = np.array(["air"] + [family(n) for n in names])[labels[pool]]
    bone, blood = float((families == "bone").mean()), float((families == "contrast_blood").mean())
    print(value, "pool named bone", bone, "blood", blood)
    assert bone <= POOL_AS_BONE and blood >= POOL_BLOOD


def test_lungs_are_named_lung_when_the_field_of_view_cuts_the_chest_wall(tmp_path, lung1):
    ct, masks = lung1
    cut, (lung_full,) = exams.cut_fov(ct, CUT_FOV, masks["lung"])
    hu = np.asarray(cut.array, dtype=np.float32)
    lung = _inner(lung_full & _aerated_lung(hu, np.ones(hu.shape, bool), cut.spacing))
    labels, names = colorize_classes(tmp_path, cut, "cut-fov", "colorizer-2d")
    share = float((labels[lung] == names.index("lung") + 1).mean())
    print("lung named lung", share)
    assert share >= LUNG_NAMED


#: Issue 61's target: on a scan without contrast, the tissue class contrast blood on at most this share of the body's
#: voxels below 100 HU (the heart and great vessels, unenhanced: 30-60 HU).
NO_CONTRAST_BLOOD = 0.001


@pytest.mark.parametrize("case", ["chest-popi-2mm.nii.gz", "chest-lung2-5mm.nrrd", "lung1 pool 45 HU"])
def test_a_ct_without_contrast_names_no_contrast_blood(tmp_path, lung1, case):
    """Two non-contrast chests the shipped model never saw (the Philips popi chest and lung2), and lung1 with its
    mediastinal blood pool set to unenhanced blood's 45 HU (the same CT at 300-600 HU keeps its pool contrast blood:
    `test_a_dense_blood_pool_in_the_chest_is_blood_not_bone`), through ``ctcolor colorize --classes``."""
    from napari_ctcolor.engines.body import body_mask

    if case.startswith("lung1"):
        ct, masks = lung1
        ct = exams.with_pool(ct, _inner(masks["blood"]), 45.0)
    else:
        ct = read_volume(require_shared(CT_DIR / case))
    labels, names = colorize_classes(tmp_path, ct, "plain", "colorizer-2d")
    hu = np.asarray(ct.array, dtype=np.float32)
    low = body_mask(hu, ct.spacing) & (hu < 100.0)
    share = float((labels[low] == names.index("contrast_blood") + 1).mean())
    print(case, "contrast blood on the body below 100 HU", share)
    assert share <= NO_CONTRAST_BLOOD
