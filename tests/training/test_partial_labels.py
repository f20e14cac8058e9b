"""Partial labels derived from HU (`training.partial`) on the real, unlabelled chest CTs, checked against what the HU
and the anatomy say independently of the derivation; and `ctcolor train colorizer` training on them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from filelock import FileLock
from scipy import ndimage

from napari_ctcolor.io import read_volume
from napari_ctcolor.models.colorizer import ColorizerConfig
from napari_ctcolor.training.colorizer import CHEST_BLOOD_HU, Sampler, TrainConfig
from napari_ctcolor.training.partial import BLOOD, IGNORE, derive_chest, partial_class_map
from napari_ctcolor.training.prepare import reduce_classes

from conftest import CT_DIR, REPO, TINY, require_shared

#: The two non-contrast chest CTs the shipped colorizer trains on (chest-lung1 is held out and shows contrast).
TRAINING_CHESTS = ("chest-popi-2mm.nii.gz", "chest-lung2-5mm.nrrd")
LUNG2_TUMOUR = "chest-lung2-5mm-tumour.nrrd"


@pytest.fixture(scope="module", params=TRAINING_CHESTS)
def derived(request, tmp_path_factory):
    """The CT and its derived masks, derived once per run: pytest-xdist may hand the tests of one CT to both workers,
    and each derivation takes 20-50 s, so the first worker keeps its masks in the run's shared folder for the other."""
    require_shared(CT_DIR / request.param)
    ct = read_volume(CT_DIR / request.param)
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, not a worker's
    kept = shared / f"derived-{request.param}.npz"
    with FileLock(f"{kept}.lock"):
        if kept.exists():
            with np.load(kept) as stored:
                masks = {name: stored[name] for name in stored.files}
        else:
            masks = derive_chest(ct, aorta=True)
            np.savez(kept, **masks)
    return ct, np.asarray(ct.array, dtype=np.float32), masks


def _ml(mask, ct) -> float:
    return float(mask.sum()) * float(np.prod(ct.spacing)) / 1000.0


def test_derived_masks_are_disjoint_and_inside_the_body(derived):
    ct, _, masks = derived
    names = ("airway", "lung", "bone", "fat", "muscle")
    total = sum(masks[n].astype(np.uint8) for n in names)
    assert total.max() == 1
    assert not (total.astype(bool) & ~masks["body"]).any()


def test_lung_is_two_aerated_lungs_of_plausible_volume(derived):
    ct, hu, masks = derived
    lung = masks["lung"]
    # Adult lungs hold 2-8 L (total capacity about 6 L at full inspiration; a chest CT can cut the apices or bases).
    assert 1500.0 <= _ml(lung, ct) <= 8000.0, _ml(lung, ct)
    # Parenchyma is -700..-900 HU; the small vessels closed into the mask raise the upper percentiles only.
    assert -900.0 <= float(np.median(hu[lung])) <= -700.0
    # One lung on each side of the body's midline (the body's x centroid), neither less than a third of both.
    x_mid = ndimage.center_of_mass(masks["body"])[2]
    right = lung[..., : int(x_mid)].sum() / lung.sum()
    assert 0.33 <= right <= 0.67, right


def test_airways_are_one_component_from_the_top_slice_down_the_trachea(derived):
    ct, hu, masks = derived
    airway = masks["airway"]
    superior = -1 if float(np.asarray(ct.direction)[2, 2]) > 0 else 0
    assert ndimage.label(airway)[1] == 1  # connected
    assert airway[superior].any()  # reaches the top slice
    # The trachea alone is 20-40 mL in adults; with main and lobar bronchi below 200 mL.
    assert 5.0 <= _ml(airway, ct) <= 200.0, _ml(airway, ct)
    assert np.count_nonzero(airway.any(axis=(1, 2))) * ct.spacing[0] >= 50.0  # at least 5 cm of trachea
    # Air, not lung: 95 % of it below -850 HU.
    assert float(np.percentile(hu[airway], 95)) < -850.0
    # The trachea is in the middle of the neck: within 30 mm of the body's midline in the top slice.
    x_air = ndimage.center_of_mass(airway[superior])[1]
    x_body = ndimage.center_of_mass(masks["body"][superior])[1]
    assert abs(x_air - x_body) * ct.spacing[2] <= 30.0


def test_bone_holds_the_cortical_bone_and_the_marrow_but_no_soft_tissue(derived):
    ct, hu, masks = derived
    bone = masks["bone"]
    # Independently: voxels above 700 HU (cortical bone; no soft tissue of a non-contrast CT gets there) in
    # components of at least 1 mL are bone, 98 % of them at least.
    cortical, _ = ndimage.label((hu >= 700.0) & masks["body"])
    sizes = np.bincount(cortical.ravel()) * float(np.prod(ct.spacing)) / 1000.0
    large = (sizes >= 1.0)[cortical] & (cortical > 0)
    assert bone[large].mean() >= 0.98, bone[large].mean()
    # Cancellous marrow (150-400 HU) makes up most of the mask: its median lies below the cortex's 700 HU.
    assert 200.0 <= float(np.median(hu[bone])) <= 600.0
    assert float(hu[bone].min()) > 100.0  # not the spinal canal or muscle beside it


def test_fat_and_muscle_keep_their_hu_and_muscle_stays_out_of_the_chest_cavity(derived):
    ct, hu, masks = derived
    in_body = masks["body"]
    adipose = (hu >= -190.0) & (hu <= -30.0) & in_body
    # Most of the body's adipose-range voxels are kept (the cleaning drops lung edges and specks only).
    assert masks["fat"].sum() >= 0.6 * adipose.sum()
    muscle = masks["muscle"]
    assert _ml(muscle, ct) >= 300.0
    assert float(np.median(hu[muscle])) == pytest.approx(25.0, abs=35.0)  # skeletal muscle, 30-60 HU unenhanced
    # Nothing of the mediastinum: every muscle voxel is more than 10 mm from the lungs in its slice.
    for z in np.flatnonzero(muscle.any(axis=(1, 2)))[::5]:
        distance = ndimage.distance_transform_edt(~masks["lung"][z], sampling=ct.spacing[1:])
        assert distance[muscle[z]].min() > 10.0


def test_the_descending_aorta_is_one_tube_of_unenhanced_blood_beside_the_spine(derived, request):
    ct, hu, masks = derived
    aorta = masks["aorta"]
    slices = np.flatnonzero(aorta.any(axis=(1, 2)))
    # Measured: chest-popi 172 mm (from the lungs' bases to the arch), chest-lung2 115 mm; a descending thoracic
    # aorta is about 200 mm long.
    assert slices.size * ct.spacing[0] >= 100.0 and np.all(np.diff(slices) == 1)
    pixel_mm2 = ct.spacing[1] * ct.spacing[2]
    for z in slices:
        pieces, _ = ndimage.label(aorta[z])
        assert np.bincount(pieces.ravel())[1:].max() >= 0.9 * aorta[z].sum()  # one piece (lung2's calcified wall cuts
        # a sliver off in places)
        # A 12-34 mm aorta less its 2-3 mm rim (the disc stays inside the lumen).
        assert 5.0 <= np.sqrt(aorta[z].sum() * pixel_mm2 / np.pi) <= 17.0
    # Unenhanced blood (30-50 HU at 120 kVp; chest-popi reads about 20 HU lower throughout): no bone, no calcified
    # wall, no lung; the fat mask's noisy voxels inside the lumen (chest-popi: +-40 HU noise) on under 1 % of it.
    assert 0.0 <= float(np.median(hu[aorta])) <= 70.0 and float(np.percentile(hu[aorta], 99)) < 150.0
    assert not (aorta & (masks["lung"] | masks["bone"])).any()
    assert (aorta & masks["fat"]).sum() <= 0.01 * aorta.sum(), (aorta & masks["fat"]).sum() / aorta.sum()
    # It is a tube: its centre moves little from slice to slice (a descending aorta leans at most ~20 degrees).
    centres = np.array([ndimage.center_of_mass(aorta[z]) for z in slices]) * np.asarray(ct.spacing[1:])
    step = np.hypot(*np.diff(centres, axis=0).T)
    assert float(np.percentile(step, 95)) <= 0.5 * ct.spacing[0] + 1.0, step.max()
    if request.node.callspec.params["derived"] == TRAINING_CHESTS[1]:  # lung2: a round mass in the lung by its spine
        tumour = np.asarray(read_volume(CT_DIR / LUNG2_TUMOUR).array) > 0
        assert not (aorta & tumour).any()
        # Without its mask the blood pool takes half the mass (measured 0.52): the shipped configs pass the mask.
        assert masks["blood"][tumour].mean() > 0.4


@pytest.mark.parametrize("seed", [0, 5])
def test_the_derived_aorta_lies_in_the_procedural_phantoms_aorta(seed):
    """An independent reference: the phantom's own aorta label (the phantom is drawn without contrast; its stomach
    touches its abdominal aorta, which is why the aorta is followed only where the lungs are)."""
    from napari_ctcolor.phantom import make_phantom

    phantom = make_phantom(seed=seed, shape=(60, 256, 256), spacing=(3.0, 1.4, 1.4))
    aorta = derive_chest(phantom.volume, aorta=True)["aorta"]
    truth = phantom.mask("aorta")
    # Measured: 98.3 % and 99.6 % inside, on 35 and 33 of the 60 slices.
    assert (aorta & truth).sum() >= 0.97 * aorta.sum()
    assert np.count_nonzero(aorta.any(axis=(1, 2))) >= 25


def test_voxels_without_a_derived_label_carry_no_loss():
    require_shared(CT_DIR / TRAINING_CHESTS[1])
    ct = read_volume(CT_DIR / TRAINING_CHESTS[1])
    config = ColorizerConfig.from_dict(
        yaml.safe_load((REPO / "configs" / "colorizer_2d.yaml").read_text(encoding="utf-8"))["model"]
    )
    tumour = np.asarray(read_volume(CT_DIR / LUNG2_TUMOUR).array) > 0
    classes = partial_class_map(ct, "chest_non_contrast", config.classes, tumour, aorta=True)
    assert (classes[tumour] == IGNORE).all()  # a lesion mask given with the CT: no label, no loss
    # No derived class: the mediastinum, heart, vessels, abdomen (measured 0.31), the blood pool among them (`BLOOD`,
    # trained only when a sample enhances it)
    assert 0.2 <= (classes >= BLOOD).mean() <= 0.5 and (classes == BLOOD).any()
    case = reduce_classes("lung2", ct.array, ct.spacing, classes, config, partial=True)
    factor = config.factor_for(float(np.mean(ct.spacing[1:])))
    z, h, w = classes.shape
    blocks = classes[:, : h - h % factor, : w - w % factor].reshape(z, h // factor, factor, w // factor, factor)
    unlabelled = torch.from_numpy((blocks >= BLOOD).all(axis=(2, 4)))
    assert unlabelled.any()
    assert (case.weight[unlabelled] == 0).all() and (case.target.sum(dim=1)[unlabelled] == 0).all()
    assert (case.weight[~unlabelled] > 0).all()
    assert case.blood is not None and (case.blood[unlabelled] > 0).any()
    # The derived aorta carries its class and is enhanced with the pool; an enhanced sample trains the pool as
    # contrast blood and keeps the aorta's class.
    aorta = config.classes.index("aorta")
    inside = case.target[:, aorta] == 255
    assert inside.any() and (case.blood[inside] == 255).all()
    sampler = Sampler([case], config, TrainConfig(name="t", seed=0, model={}, chest_blood=1.0), seed=0)
    z = int(torch.nonzero(inside.any(dim=(1, 2)))[0, 0])
    context = slice(z - 1, z + 2)
    hu, target, weight = sampler._enhance_pool(
        case.hu[context], case.target[context], case.weight[z : z + 1], case.blood[context], 1
    )
    assert (hu[1][inside[z]] - case.hu[z][inside[z]]).min() >= 0.5 * (CHEST_BLOOD_HU[0] - 45.0)  # tilt 1 +- 0.45
    assert (target[1, aorta][inside[z]] == 255).all()
    assert (target[1, config.classes.index("contrast_blood")][inside[z]] == 0).all()
    pool_only = (case.blood[z] == 255) & (case.target[z].sum(dim=0) == 0)
    assert (target[1, config.classes.index("contrast_blood")][pool_only] == 255).all()


def test_training_command_derives_the_partial_labels_itself_and_validates_on_an_unlabelled_ct(tmp_path):
    from conftest import ctcolor

    require_shared(CT_DIR / "chest-lung1-5mm.nrrd")
    config = yaml.safe_load((REPO / "configs" / "colorizer_2d.yaml").read_text(encoding="utf-8"))
    config.update(
        name="tiny-partial",
        steps=2,
        batch_size=2,
        crop=32,
        real_train=[],
        real_val=[],
        leave_one_out=[],
        real_partial=[["chest-lung2-5mm.nrrd", "chest_non_contrast"]],
        phantoms={"first_seed": 5, "count": 1, "slices": 4, "pixel_mm": [1.7, 1.8], "fov_mm": 340},
        val_phantoms={},
    )
    config["model"].update(TINY)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = ctcolor("train", "colorizer", "--config", str(path), "--weights-dir", str(tmp_path / "w"), timeout=600)
    assert done.returncode == 0, done.stderr
    card = json.loads((tmp_path / "w" / "tiny-partial.json").read_text(encoding="utf-8"))
    assert card["training"]["train_cases"][-1] == "chest-lung2-5mm (partial labels)"
    (row,) = card["metrics"]["tissue_val"]["cases"]
    assert row["case"] == "chest-lung1-5mm"
    assert set(row["tissues"]) == {
        "bone_ivory", "lung_hue", "fat_hue", "dense_contrast_blood", "abdominal_above_diaphragm",
    }  # fmt: skip
    # A derivation the trainer does not know: one line, exit 2.
    config["real_partial"] = [["chest-lung2-5mm.nrrd", "chest_by_hand"]]
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    done = ctcolor("train", "colorizer", "--config", str(path), "--weights-dir", str(tmp_path / "w2"), timeout=300)
    assert done.returncode == 2 and "chest_by_hand" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
