"""`engines.body.body_mask`: the body without the table, its arms kept (colour, 3D views and metrics use it); and
when the field of view cuts through the chest wall, the lungs stay the patient's and the air around the patient stays
outside, on crops of the shared chest CTs and on synthetic slices beyond their range (emphysematous lung, noisy air,
padding outside the reconstruction circle)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_ctcolor.engines.body import body_mask, ellipsoid, in_plane_morphology
from napari_ctcolor.io import Volume, read_volume
from napari_ctcolor.training.exams import cut_fov
from napari_ctcolor.training.partial import derive_chest

from conftest import CT_DIR, require_shared


def test_the_table_goes_and_both_arms_stay():
    # 12 slices of 160 x 200 at 1 mm: a trunk ellipse (soft tissue with lungs), an arm disc on each side separated
    # from it by air, and a table below: a 2 mm curved shell of 400 HU, 6 mm under the back, on a foam mattress of
    # -800 HU that touches both.
    y, x = np.mgrid[:160, :200].astype(float)
    hu = np.full((160, 200), -1000.0)
    trunk = ((y - 70) / 45) ** 2 + ((x - 100) / 60) ** 2 < 1
    hu[trunk] = 40
    hu[(((y - 65) / 25) ** 2 + ((x - 75) / 18) ** 2 < 1)] = -850  # a lung: a hole, filled
    arms = [((y - 70) ** 2 + (x - c) ** 2 < 14**2) for c in (20, 180)]
    for arm in arms:
        hu[arm] = 50
    hu[(y > 115) & (y < 122)] = -800  # mattress
    hu[(y >= 122) & (y < 124)] = 400  # table shell
    volume = np.repeat(hu[None], 12, axis=0)
    body = body_mask(volume, (2.0, 1.0, 1.0))
    assert body[:, trunk].all() and all(body[:, arm].all() for arm in arms)
    assert not body[:, 122:124].any()  # the table
    assert not body[:, hu == -1000].any()  # the air


def test_a_single_slice_keeps_its_body():
    hu = np.full((1, 64, 64), -1000.0)
    hu[0, 10:50, 12:52] = 40.0
    body = body_mask(hu, (5.0, 1.0, 1.0))
    assert body[0, 10:50, 12:52].all() and body.sum() == 40 * 40


CHEST = ("chest-popi-2mm.nii.gz", "chest-lung2-5mm.nrrd", "chest-lung1-5mm.nrrd")


@pytest.mark.parametrize("name", CHEST)
def test_the_lungs_stay_inside_the_body_when_the_field_of_view_cuts_the_chest_wall(name):
    """Crops to 60 and 50 % of each slice's rows and columns (a cardiac or CTA field of view): the lungs found on the
    whole slices (`derive_chest`) lie inside the crop's body on at least 99.5 % of their voxels (before the cut-lung
    rule: 0.4-63 %), and the body takes at most 4 % of voxels that the whole slices' body does not hold (a foam
    mattress shown without the air beside it, module docstring of `engines.body`)."""
    ct = read_volume(require_shared(CT_DIR / name))
    masks = derive_chest(ct)
    for keep in (0.6, 0.5):
        cut, (lung, whole) = cut_fov(ct, keep, masks["lung"], masks["body"])
        body = body_mask(np.asarray(cut.array, dtype=np.float32), cut.spacing)
        inside, beyond = float(body[lung].mean()), float((body & ~whole).sum() / body.sum())
        print(name, keep, inside, beyond)
        assert inside >= 0.995 and beyond <= 0.04, (keep, inside, beyond)


def _slice(lung_hu: float, air_hu: float, noise: float, seed: int = 0) -> np.ndarray:
    """A synthetic axial slice at 1 mm (240 x 240): a 300 x 236 mm chest of soft tissue, cut by the image's left and
    right edges, its wall at least 26 mm thick elsewhere, with two lungs of ``lung_hu`` that reach those edges, in air
    of ``air_hu``; Gaussian noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:240, :240].astype(np.float32)
    hu = np.full((240, 240), air_hu, np.float32)
    chest = ((y - 120) / 118) ** 2 + ((x - 120) / 150) ** 2 <= 1.0
    hu[chest] = 40.0
    lungs = (((y - 120) / 60) ** 2 + ((np.abs(x - 120) - 80) / 60) ** 2 <= 1.0) & (np.abs(x - 120) > 25)
    hu[lungs] = lung_hu
    return hu + rng.normal(0, noise, hu.shape).astype(np.float32)


@pytest.mark.parametrize(
    ("lung_hu", "air_hu", "noise"),
    [(-850, -1000, 10), (-940, -1000, 10), (-850, -1000, 40), (-850, -3024, 10)],
    ids=["normal", "emphysema", "noisy", "padding"],
)
def test_synthetic_cut_lungs_are_inside_and_the_air_outside(lung_hu, air_hu, noise):
    """Beyond the shared CTs: lung at -850 and -940 HU (emphysema), air noise of 10 and 40 HU, the scanner's padding
    (-3024) as the air. Each lung reaches the image's left or right edge; 12 slices of 3 mm."""
    hu = np.stack([_slice(lung_hu, air_hu, noise, seed) for seed in range(12)])
    volume = Volume(hu, (3.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    body = body_mask(volume.array, volume.spacing)
    truth = np.stack([_slice(lung_hu, air_hu, 0.0)] * 12) > (air_hu + 1.0)
    assert body[truth].mean() >= 0.99
    assert body[~truth].mean() <= 0.001


@pytest.mark.parametrize("radius", [(1, 1), (2, 3), (0, 2)])
def test_in_plane_morphology_is_scipys(radius):
    """The opening's erosion (the image's edge counted as tissue) and dilation by shifts against scipy's binary
    morphology, on random masks whose pieces touch the edges: equal voxel for voxel."""
    rng = np.random.default_rng(5)
    mask = ndimage.gaussian_filter(rng.random((3, 40, 57)), (0, 1.5, 1.5)) > 0.5
    ball = ellipsoid([0, *radius])
    assert (in_plane_morphology(mask, ball, True) == ndimage.binary_erosion(mask, ball, border_value=1)).all()
    assert (in_plane_morphology(mask, ball, False) == ndimage.binary_dilation(mask, ball)).all()
