"""The seeded CT phantom: determinism, geometry, plausible HU per tissue, anatomy sides, noise and label names."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from napari_ctcolor.errors import InputError
from napari_ctcolor.phantom import STRUCTURES, Phantom, make_phantom

from conftest import CT_DIR, require_shared

SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def phantoms() -> dict[int, Phantom]:
    return {seed: make_phantom(seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def phantom(phantoms) -> Phantom:
    return phantoms[0]


def centroid_mm(ph: Phantom, *names: str) -> np.ndarray:
    """LPS centroid (x, y, z) in mm of the union of the named structures."""
    ijk = np.argwhere(np.isin(ph.labels, [ph.label_id(n) for n in names]))[:, ::-1].mean(axis=0)
    return (ph.volume.affine @ np.append(ijk, 1))[:3]


def names_starting(ph: Phantom, prefix: str) -> list[str]:
    return [n for n in ph.label_names.values() if n.startswith(prefix)]


def mean_hu(ph: Phantom, where) -> float:
    """Mean HU over a boolean mask (or an index expression)."""
    values = ph.volume.array[where]
    assert values.size > 50, "too few voxels to average"
    return float(values.mean())


def interior(mask: np.ndarray, in_plane: int = 1) -> np.ndarray:
    """The mask eroded in-plane, away from partial-volume edges."""
    return ndimage.binary_erosion(mask, np.ones((1, 3, 3), bool), iterations=in_plane)


def body_depth_mm(ph: Phantom) -> np.ndarray:
    """Per slice, the in-plane distance (mm) from each body voxel to the air outside (0 outside the body)."""
    body = ndimage.binary_opening(ph.volume.array > -400, np.ones((1, 3, 3), bool))
    parts, _ = ndimage.label(body)
    body = parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1  # the patient, not the couch
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])
    return np.stack([ndimage.distance_transform_edt(s, sampling=ph.volume.spacing[1:]) for s in body])


def test_same_seed_gives_byte_identical_arrays():
    a, b = make_phantom(7), make_phantom(7)
    assert a.volume.array.tobytes() == b.volume.array.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes()
    assert a.label_names == b.label_names


def test_other_seeds_vary_the_anatomy(phantoms):
    liver = [centroid_mm(phantoms[s], "liver") for s in SEEDS]
    spread = np.ptp(liver, axis=0)
    assert spread.max() > 3.0, f"liver centroids barely move across seeds: spread {spread} mm"
    for s in SEEDS[1:]:
        changed = np.mean(phantoms[s].labels != phantoms[0].labels)
        assert changed > 0.01, f"seed {s} labels differ from seed 0 in only {changed:.2%} of voxels"


def test_zero_variation_keeps_the_anatomy_but_not_the_noise():
    a, b = make_phantom(1, variation=0), make_phantom(2, variation=0)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.volume.array, b.volume.array)


def test_volume_type_shape_and_geometry(phantom):
    vol = phantom.volume
    assert vol.array.dtype == np.int16 and vol.array.shape == (40, 192, 192)
    assert phantom.labels.dtype == np.uint8 and phantom.labels.shape == vol.array.shape
    assert vol.spacing == (3.0, 1.8, 1.8)
    np.testing.assert_array_equal(vol.direction, np.eye(3))
    centre = vol.affine @ np.append((np.array(vol.array.shape[::-1]) - 1) / 2, 1)
    np.testing.assert_allclose(centre[:3], 0, atol=1e-6)
    assert vol.meta["modality"] == "CT"
    assert vol.meta["series_description"] == "ctcolor phantom (seed 0)"
    assert tuple(vol.meta["window"]) == (40.0, 400.0)


def test_custom_grid_keeps_geometry_and_centre():
    ph = make_phantom(3, shape=(12, 150, 170), spacing=(10.0, 2.4, 2.2), centre_z_mm=-250.0, noise_hu=0)
    vol = ph.volume
    assert vol.array.shape == ph.labels.shape == (12, 150, 170)
    assert vol.spacing == (10.0, 2.4, 2.2)
    centre = vol.affine @ np.append((np.array(vol.array.shape[::-1]) - 1) / 2, 1)
    np.testing.assert_allclose(centre[:3], (0, 0, -250.0), atol=1e-6)
    assert {"liver", "heart", "kidney_left"} <= set(ph.label_names.values())


def test_label_ids_are_compact_and_all_present(phantoms):
    for ph in phantoms.values():
        ids = sorted(ph.label_names)
        assert ids == list(range(1, len(ids) + 1))
        assert len(set(ph.label_names.values())) == len(ids)
        present = np.flatnonzero(np.bincount(ph.labels.ravel(), minlength=len(ids) + 1))
        np.testing.assert_array_equal(present, np.arange(len(ids) + 1))


REQUIRED = (
    "liver", "spleen", "kidney_left", "kidney_right", "aorta", "heart", "stomach", "inferior_vena_cava", "esophagus",
    "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
    "lung_lower_lobe_right", "vertebrae_T10", "vertebrae_T12", "rib_left_9", "rib_right_9", "autochthon_left",
    "autochthon_right", "spinal_cord", "sternum",
)  # fmt: skip


@pytest.mark.parametrize("seed", SEEDS)
def test_listed_structures_are_labelled(phantoms, seed):
    missing = set(REQUIRED) - set(phantoms[seed].label_names.values())
    assert not missing, f"seed {seed} lacks {sorted(missing)}"


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_hu_per_tissue_is_plausible(phantoms, seed):
    ph = phantoms[seed]
    lungs = interior(np.isin(ph.labels, [ph.label_id(n) for n in names_starting(ph, "lung_")]))
    vertebrae = np.isin(ph.labels, [ph.label_id(n) for n in names_starting(ph, "vertebrae_")])
    muscle = interior(ph.mask("autochthon_left") | ph.mask("autochthon_right"), 2)
    assert mean_hu(ph, lungs) < -700
    assert 40 <= mean_hu(ph, interior(ph.mask("liver"), 2)) <= 80
    assert mean_hu(ph, vertebrae) > 200
    assert 30 <= mean_hu(ph, muscle) <= 70
    assert 30 <= mean_hu(ph, interior(ph.mask("spleen"))) <= 70
    assert 20 <= mean_hu(ph, interior(ph.mask("kidney_left") | ph.mask("kidney_right"))) <= 50

    # Subcutaneous fat: unlabelled tissue 3.5-6.5 mm under the skin.
    depth = body_depth_mm(ph)
    fat = (depth > 3.5) & (depth < 6.5) & (ph.labels == 0)
    assert -150 <= mean_hu(ph, fat) <= -50
    # Air: the rows in front of the patient (the couch lies behind).
    front = np.flatnonzero(depth.max(axis=(0, 2)) > 0)[0]
    assert mean_hu(ph, np.s_[:, : front - 2, :]) < -950


@pytest.mark.parametrize("seed", SEEDS)
def test_left_and_right_follow_lps(phantoms, seed):
    ph = phantoms[seed]
    x, y, z = {}, {}, {}
    groups = {
        "spine": names_starting(ph, "vertebrae_"),
        "kidney_left": ["kidney_left"],
        "kidney_right": ["kidney_right"],
        "liver": ["liver"],
        "spleen": ["spleen"],
        "heart": ["heart"],
        "aorta": ["aorta"],
        "ivc": ["inferior_vena_cava"],
        "lung_left": [n for n in names_starting(ph, "lung_") if n.endswith("left")],
        "lung_right": [n for n in names_starting(ph, "lung_") if n.endswith("right")],
        "ribs_left": names_starting(ph, "rib_left"),
        "ribs_right": names_starting(ph, "rib_right"),
    }
    for key, names in groups.items():
        x[key], y[key], z[key] = centroid_mm(ph, *names)
    # +x is the patient's left.
    assert x["kidney_left"] > x["spine"] > x["kidney_right"]
    assert x["liver"] < x["spine"] < x["spleen"]
    assert x["lung_left"] > x["lung_right"] and x["ribs_left"] > x["ribs_right"]
    assert x["heart"] > x["spine"] and x["aorta"] > x["ivc"]
    # +y is posterior: the spine lies behind the heart and the aorta, the kidneys behind the liver's centre.
    assert y["spine"] > y["aorta"] > y["heart"]
    assert y["kidney_left"] > y["liver"]
    # +z is superior: lungs above the heart's centre, the heart above the kidneys.
    assert z["lung_left"] > z["kidney_left"] and z["heart"] > z["liver"] > z["kidney_right"]


def test_noise_level_in_a_homogeneous_organ(phantom):
    liver = ndimage.binary_erosion(phantom.mask("liver"), np.ones((3, 7, 7), bool))
    std = float(phantom.volume.array[liver].std())
    assert 8 <= std <= 25, f"liver noise {std:.1f} HU"
    quiet = make_phantom(0, noise_hu=5.0)
    assert abs(float(quiet.volume.array[liver].std()) - 5.0) < 1.5


def test_noise_is_spatially_correlated(phantom):
    liver = ndimage.binary_erosion(phantom.mask("liver"), np.ones((1, 5, 9), bool))
    hu = phantom.volume.array.astype(np.float64)
    zs, ys, xs = np.nonzero(liver[:, :, :-1] & liver[:, :, 1:])
    a, b = hu[zs, ys, xs], hu[zs, ys, xs + 1]
    r = np.corrcoef(a, b)[0, 1]
    assert 0.1 < r < 0.8, f"neighbour correlation {r:.2f}"


def test_hu_overrides_change_a_tissue():
    ph = make_phantom(0, hu={"blood": 200.0})
    assert 180 <= float(ph.volume.array[interior(ph.mask("aorta"))].mean()) <= 220


def test_fixed_torso_length_keeps_organ_volume_across_slice_spacing():
    thick = make_phantom(4, shape=(40, 192, 192), spacing=(3.0, 1.8, 1.8), torso_length_mm=120)
    thin = make_phantom(4, shape=(80, 192, 192), spacing=(1.5, 1.8, 1.8), torso_length_mm=120)
    for name in ("liver", "heart", "spleen"):
        v_thick = thick.mask(name).sum() * np.prod(thick.volume.spacing)
        v_thin = thin.mask(name).sum() * np.prod(thin.volume.spacing)
        assert v_thin == pytest.approx(v_thick, rel=0.05), name


def test_centre_z_moves_the_field_of_view_along_a_fixed_torso():
    def structures(centre_z_mm: float) -> set[str]:
        ph = make_phantom(5, shape=(8, 192, 192), spacing=(2.0, 1.8, 1.8), torso_length_mm=200, centre_z_mm=centre_z_mm)
        return set(ph.label_names.values())

    chest, abdomen = structures(80.0), structures(-80.0)
    assert {"heart", "lung_lower_lobe_left"} <= chest and not {"kidney_left", "kidney_right"} & chest
    assert {"kidney_left", "kidney_right"} <= abdomen and not {"heart", "lung_upper_lobe_left"} & abdomen


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError, match="seed"):
        make_phantom(-1)
    with pytest.raises(InputError, match="shape"):
        make_phantom(0, shape=(0, 64, 64))
    with pytest.raises(InputError, match="spacing"):
        make_phantom(0, spacing=(3.0, -1.0, 1.0))
    with pytest.raises(InputError, match="unknown tissue"):
        make_phantom(0, hu={"bone": 700})


def test_every_label_name_is_a_totalsegmentator_v2_name(phantoms):
    names_file = require_shared(CT_DIR / "totalseg-v2-label-names.json")
    valid = set(json.loads(names_file.read_text(encoding="utf-8")).values())
    assert not set(STRUCTURES) - valid
    for ph in phantoms.values():
        assert not set(ph.label_names.values()) - valid
