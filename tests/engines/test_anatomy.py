"""The colorizer's anatomy step (`engines.colorize.anatomy`): its body-region rules against the labelled CTs, and its
probability arithmetic on analytic cases. What it does to the shipped model's output is measured through
`ctcolor colorize` in test_colorizer_shipped.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_ctcolor.engines.colorize import anatomy
from napari_ctcolor.models.colorizer import downsample_hu
from napari_ctcolor.palettes import color_class
from napari_ctcolor.training.data import load_real_case
from napari_ctcolor.weights import load_colorizer

from conftest import CT_DIR, require_shared

LABELLED = (
    ("totalseg-body-3mm.nii.gz", "totalseg-body-3mm-labels.nii.gz"),
    ("totalseg-abdomen-dicom", "totalseg-abdomen-dicom-labels.nii.gz"),
)


@pytest.mark.parametrize("names", LABELLED, ids=lambda n: n[0])
def test_region_rules_never_rule_out_a_structure_where_the_labels_put_it(names):
    """On both labelled patients (lower chest to pelvis; upper abdomen below the lungs), found from HU alone: every
    labelled voxel of a class lies on a slice where that class is allowed."""
    require_shared(CT_DIR / names[0])
    case = load_real_case(CT_DIR.parent, *names)
    ct = case.ct
    factor = load_colorizer("colorizer-2d")[0].config.factor_for(float(np.mean(ct.spacing[1:])))
    small = downsample_hu(torch.from_numpy(np.asarray(ct.array, dtype=np.float32))[:, None], factor)[:, 0].numpy()
    superior = anatomy.slice_superior_mm(ct.shape[0], ct.spacing[0], ct.origin, ct.direction)
    region = anatomy.body_region(small, ct.spacing[1] * ct.spacing[2] * factor**2, superior)
    classes = tuple(sorted({color_class(n) for n in case.label_names.values()}))
    allowed = region.allowed(classes).numpy()
    present = set(np.unique(case.labels).tolist()) - {0}
    ruled_out = {}
    for label in present:
        k = classes.index(color_class(case.label_names[label]))
        per_slice = (case.labels == label).sum(axis=(1, 2))
        if per_slice[~allowed[:, k]].sum():
            ruled_out[case.label_names[label]] = int(per_slice[~allowed[:, k]].sum())
    assert not ruled_out, ruled_out
    # ... and the rules bite: the 3 mm CT shows its lung bases, so no femur beside them and no heart below them; the
    # upper-abdomen series shows no lung (20 slices below the bases), so no heart anywhere.
    if names[0].startswith("totalseg-body"):
        assert region.above_base is not None
        assert not allowed[-1, classes.index("femur")] and not allowed[0, classes.index("heart")]
    else:
        assert region.above_base is None and not allowed[:, classes.index("heart")].any()


MODELS = (
    "colorizer-2d",
    "weights/validation/colorizer-2d-heldout-body3mm.safetensors",
    "weights/validation/colorizer-2d-heldout-dicom.safetensors",
)


@pytest.mark.parametrize("names", LABELLED, ids=lambda n: n[0])
def test_pelvis_rule_never_rules_out_a_labelled_pelvic_structure_and_bites_above_it(names):
    """The network's own sure liver, spleen and kidney sections (`above_pelvis`), from the shipped model and both
    leave-one-out models (each blind to one of these patients): no slice that holds a labelled pelvic structure is
    ruled out; on the upper-abdomen series, which shows no lung, every slice is, and on the 3 mm CT every slice from
    15 mm above the kidneys' lowest labelled slice up (with the models trained on it: 12 mm, 2026-11-26; the model blind
    to it, sure of no kidney there, from 69 mm, by its liver)."""
    from napari_ctcolor.engines.colorize import predict_chroma

    require_shared(CT_DIR / names[0])
    case = load_real_case(CT_DIR.parent, *names)
    ct = case.ct
    pelvic_ids = [k for k, n in case.label_names.items() if color_class(n).startswith(anatomy.PELVIS)]
    pelvic = np.isin(case.labels, pelvic_ids).any(axis=(1, 2))
    kidney_ids = [k for k, n in case.label_names.items() if color_class(n) == "kidney"]
    superior = anatomy.slice_superior_mm(ct.shape[0], ct.spacing[0], ct.origin, ct.direction)
    for model in MODELS:
        chroma = predict_chroma(ct, model, device="cpu", anatomy=False, bf16=False)
        pixel_mm2 = ct.spacing[1] * ct.spacing[2] * chroma.factor**2
        allowed = anatomy.above_pelvis(chroma.top, chroma.prob, chroma.classes, pixel_mm2, superior).numpy()
        femur = chroma.classes.index("femur")
        assert allowed[pelvic, femur].all(), model
        if names[0].startswith("totalseg-abdomen"):
            assert not allowed[:, femur].any(), model
        elif "heldout-body3mm" not in model:  # trained on this patient: its kidneys' lower poles place the pelvis
            kidney_low = superior[np.isin(case.labels, kidney_ids).any(axis=(1, 2))].min()
            assert not allowed[superior >= kidney_low + 5 * ct.spacing[0], femur].any(), model
        else:  # blind to it, the model is sure of no kidney here; its sure liver still rules out the upper slices
            assert not allowed[np.argmax(superior), femur] and allowed[:, femur].any(), model


def test_a_sure_organ_section_rules_out_the_pelvis_on_and_above_its_slices():
    """Analytic: slices ordered inferior (0) to superior (5); liver sure on slices 3-4 (with a neighbour), a lone
    kidney section on slice 1 (no neighbour: not enough), nothing on 0, 2 and 5. The pelvis is ruled out on 3, 4
    and 5 (above the liver's lowest sure slice, although 5 shows no organ), allowed on 0-2."""
    classes = ("air", "fat", "soft_tissue", "liver", "femur", "gluteus_maximus", "kidney")
    top = torch.zeros((6, 2, 10, 10), dtype=torch.uint8)
    prob = torch.zeros((6, 2, 10, 10), dtype=torch.uint8)
    top[:, 0], prob[:, 0] = 2, 200  # soft tissue, sure, everywhere...
    top[3:5, 0] = 3  # ... liver on slices 3 and 4
    top[1, 0] = 6  # a kidney section on slice 1 alone
    pixel_mm2 = anatomy.ABOVE_PELVIS_CM2["liver"] * 100.0 / 60.0  # 60 pixels of liver make the threshold
    superior = np.arange(6) * 5.0
    allowed = anatomy.above_pelvis(top, prob, classes, pixel_mm2, superior)
    pelvic = [classes.index("femur"), classes.index("gluteus_maximus")]
    assert allowed[:3][:, pelvic].all() and not allowed[3:][:, pelvic].any()
    assert allowed[:, [0, 1, 2, 3, 6]].all()
    prob[3:5, 0] = 100  # unsure (0.39) liver places nothing
    assert anatomy.above_pelvis(top, prob, classes, pixel_mm2, superior).all()
    # the order is the patient's, not the array's: the same volume stored superior first
    prob[3:5, 0] = 200
    flipped = anatomy.above_pelvis(top.flip(0), prob.flip(0), classes, pixel_mm2, superior[::-1].copy())
    assert torch.equal(flipped, allowed.flip(0))


def test_unsure_structures_are_named_by_their_tissue_and_impossible_ones_removed():
    classes = ("air", "lung", "fat", "soft_tissue", "contrast_blood", "bone", "liver", "ribs", "heart", "femur")
    # Six pixels, their kept classes (most probable first) and probabilities:
    top = torch.tensor([[6, 3, 0, 1], [3, 6, 8, 0], [5, 7, 8, 0], [9, 7, 0, 1], [9, 0, 1, 2], [1, 6, 7, 0]])
    prob = torch.tensor(
        [[0.9, 0.1, 0, 0], [0.4, 0.3, 0.3, 0], [0.5, 0.3, 0.2, 0], [0.8, 0.2, 0, 0], [1, 0, 0, 0], [0.6, 0.25, 0.15, 0]]
    )
    top, prob = top.T[None, :, None, :], prob.T[None, :, None, :]
    hu = torch.tensor([[[60.0, 40.0, 300.0, 500.0, 40.0, -600.0]]])
    allowed = torch.ones((1, len(classes)), dtype=torch.bool)
    allowed[0, 9] = False  # no femur on this slice
    new_top, new_prob = anatomy.consistent_top(top, prob, hu, classes, allowed)
    assert torch.allclose(new_prob.sum(dim=1), torch.ones(1, 1, 6))
    # 0: sure liver kept. 1: liver vs heart unsure at soft-tissue HU -> soft tissue (the heart's blood is soft tissue
    # below CONTRAST_MIN_HU). 2: rib vs heart unsure at 300 HU -> each structure's probability to its own tissue,
    # bone 0.8 and contrast blood 0.2, so that each CT voxel's own HU chooses between them. 3: a femur ruled out
    # leaves ribs at 0.2 of what the network said, unsure -> bone (the ruled-out femur counts as doubt, not as support
    # for ribs, but as bone). 4: a pixel of femur alone (a humerus beside the lungs) -> its tissue family, bone.
    # 5: a pixel mostly lung, unsure of liver and rib -> all lung (no bone or soft tissue tint in the parenchyma).
    assert new_top[0, 0, 0].tolist() == [6, 3, 5, 5, 5, 1]
    assert new_prob[0, 0, 0].tolist() == pytest.approx([0.9, 1.0, 0.8, 1.0, 1.0, 1.0])
    assert int(new_top[0, 1, 0, 2]) == 4 and float(new_prob[0, 1, 0, 2]) == pytest.approx(0.2)


@pytest.mark.parametrize("names", LABELLED, ids=lambda n: n[0])
def test_lateral_rules_never_rule_out_a_structure_where_the_labels_put_it(names):
    """`LATERAL_MM` against both labelled patients, the midline found as the engine finds it (the body at the
    network's resolution): every labelled voxel of the spleen, gallbladder and heart lies where its class is allowed,
    and the spleen, present in both, at least 30 mm inside its bound."""
    from napari_ctcolor.engines.body import body_mask

    require_shared(CT_DIR / names[0])
    case = load_real_case(CT_DIR.parent, *names)
    ct = case.ct
    factor = load_colorizer("colorizer-2d")[0].config.factor_for(float(np.mean(ct.spacing[1:])))
    small = downsample_hu(torch.from_numpy(np.asarray(ct.array, dtype=np.float32))[:, None], factor)[:, 0].numpy()
    pixel_mm = (ct.spacing[1] * factor, ct.spacing[2] * factor)
    lateral = anatomy.lateral_mm(body_mask(small, (ct.spacing[0], *pixel_mm)), pixel_mm, ct.direction)
    assert lateral is not None
    z, y, x = np.indices(ct.shape)
    at_voxel = lateral[z, np.minimum(y // factor, lateral.shape[1] - 1), np.minimum(x // factor, lateral.shape[2] - 1)]
    checked = {}
    for label, name in case.label_names.items():
        low, high = anatomy.LATERAL_MM.get(color_class(name), (None, None))
        mask = case.labels == label
        if low is None or not mask.any():
            continue
        where = at_voxel[mask]
        assert np.isfinite(where).all() and (where >= low).all() and (where <= high).all(), name
        checked[color_class(name)] = float(where.min() - low) if np.isfinite(low) else float(high - where.max())
    assert checked["spleen"] >= 30.0, checked


def test_an_organ_on_the_wrong_side_of_the_midline_is_not_named_nor_is_its_second_guess():
    # The patient's left is +: the spleen on the right (lateral -50 mm) loses its name. The kidney behind it keeps
    # 0.3 of what the network said: unsure, so the pixel is named by its tissue, soft tissue. At +50 mm the spleen
    # stays; without a known midline (NaN: no body on the slice) too.
    classes = ("air", "lung", "fat", "soft_tissue", "contrast_blood", "bone", "spleen", "kidney")
    top = torch.tensor([[6, 7, 3, 0]] * 3).T[None, :, None, :]
    prob = torch.tensor([[0.6, 0.3, 0.1, 0.0]] * 3).T[None, :, None, :]
    hu = torch.full((1, 1, 3), 45.0)
    allowed = torch.ones((1, len(classes)), dtype=torch.bool)
    lateral = np.array([[[-50.0, 50.0, np.nan]]], dtype=np.float32)
    new_top, new_prob = anatomy.consistent_top(top, prob, hu, classes, allowed, lateral=lateral)
    assert new_top[0, 0, 0].tolist() == [3, 6, 6]
    assert new_prob[0, 0, 0].tolist() == pytest.approx([1.0, 0.6, 0.6])


def test_lateral_mm_measures_towards_the_patients_left_from_each_slices_body_midline():
    body = np.zeros((2, 4, 10), dtype=bool)
    body[0, :, 2:7] = True  # midline at column 4
    direction = np.diag([-1.0, -1.0, 1.0])  # columns run to the patient's right (a NIfTI's RAS grid read as LPS)
    lateral = anatomy.lateral_mm(body, (1.0, 2.0), direction)
    assert lateral[0, 0].tolist() == pytest.approx([8.0, 6.0, 4.0, 2.0, 0.0, -2.0, -4.0, -6.0, -8.0, -10.0])
    assert np.isnan(lateral[1]).all()  # no body on the slice
    sagittal = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # rows and columns run A-P and S-I
    assert anatomy.lateral_mm(body, (1.0, 2.0), sagittal) is None


def test_fat_in_a_pixel_denser_than_fat_allows_moves_to_the_denser_tissue_around_it():
    # A non-contrast kidney at 10-20 HU that the network calls fat: a pixel above FAT_RAMP_HU cannot be mostly fat.
    # Fat's probability goes to the tissue of the family the pixel's other classes favour (soft tissue beside a
    # kidney, bone beside a vertebra): added to its entry, or fat's entry renamed, or the weakest entry replaced when
    # only part of fat moves (inside the ramp). A pixel at fat's own HU keeps it; named structures keep theirs.
    classes = ("air", "lung", "fat", "soft_tissue", "contrast_blood", "bone", "kidney", "vertebrae_lumbar")
    top = torch.tensor([[2, 6, 3, 0], [2, 6, 1, 0], [2, 6, 3, 0], [2, 6, 1, 0], [2, 7, 3, 0]]).T[None, :, None, :]
    prob = torch.tensor(
        [[0.5, 0.4, 0.1, 0], [0.5, 0.4, 0.1, 0], [0.5, 0.4, 0.1, 0], [0.5, 0.4, 0.1, 0], [0.4, 0.5, 0.1, 0]]
    )
    low, high = anatomy.FAT_RAMP_HU
    hu = torch.tensor([[[high + 20, high + 20, low - 50, (low + high) / 2, high + 100]]])
    allowed = torch.ones((1, len(classes)), dtype=torch.bool)
    new_top, new_prob = anatomy.consistent_top(top, prob.T[None, :, None, :], hu, classes, allowed)
    got = [
        dict(zip(t.tolist(), p.tolist(), strict=True))
        for t, p in zip(new_top[0, :, 0].T, new_prob[0, :, 0].T, strict=True)
    ]
    assert got[0] == pytest.approx({3: 0.6, 6: 0.4, 2: 0.0, 0: 0.0})
    assert got[1] == pytest.approx({3: 0.5, 6: 0.4, 1: 0.1, 0: 0.0})
    assert got[2] == pytest.approx({2: 0.5, 6: 0.4, 3: 0.1, 0: 0.0})
    assert got[3] == pytest.approx({6: 0.4, 2: 0.25, 3: 0.25, 1: 0.1})
    assert got[4] == pytest.approx({7: 0.5, 5: 0.4, 3: 0.1, 0: 0.0})  # a fatty vertebra: fat -> bone
    assert torch.allclose(new_prob.sum(dim=1), torch.ones(1, 1, 5))


def test_an_organ_named_in_several_pieces_keeps_its_name_only_on_the_largest():
    # Liver named on a large block and on a small separate blob (a psoas the network took for liver): the blob is
    # renamed by its HU (soft tissue; fat below FAT_MAX_HU), its probability kept. Kidneys keep two pieces (left and
    # right) and lose a third. The second kept class is untouched.
    classes = ("air", "lung", "fat", "soft_tissue", "contrast_blood", "bone", "liver", "kidney")
    top = torch.zeros((4, 2, 12, 12), dtype=torch.uint8)
    top[:, 1] = 2
    top[:, 0] = 3
    top[:, 0, 0:6, 0:6] = 6  # the liver
    top[1:3, 0, 9:11, 9:11] = 6  # a stray liver blob
    top[:, 0, 8:10, 0:2] = 7  # kidney 1
    top[:, 0, 8:10, 4:6] = 7  # kidney 2 (as large)
    top[0, 0, 11, 8] = 7  # a one-pixel third kidney piece
    hu = torch.full((4, 12, 12), 40.0)
    hu[2] = -80.0  # the blob's lower slice at fat's HU
    anatomy.keep_main_pieces(top, hu, classes, voxel_ml=1.0)  # every piece above MIN_PIECE_ML
    assert (
        (top[:, 0, 0:6, 0:6] == 6).all() and (top[1, 0, 9:11, 9:11] == 3).all() and (top[2, 0, 9:11, 9:11] == 2).all()
    )
    assert (top[:, 0, 8:10, 0:2] == 7).all() and (top[:, 0, 8:10, 4:6] == 7).all() and top[0, 0, 11, 8] == 3
    assert (top[:, 1] == 2).all()


def test_a_structure_named_on_an_island_smaller_than_the_minimum_piece_takes_its_tissue_name():
    # 0.1 ml pixels, MIN_PIECE_ML 0.5: islands of 4 pixels (0.4 ml) lose their names, to the tissue of their family
    # (bone for a rib, contrast blood for an aorta island at 200 HU, soft tissue for a small-bowel island); pieces of
    # 5 or more pixels keep theirs, whichever class.
    classes = ("air", "lung", "fat", "soft_tissue", "contrast_blood", "bone", "small_bowel", "aorta", "ribs")
    top = torch.full((3, 2, 10, 10), 3, dtype=torch.uint8)
    hu = torch.full((3, 10, 10), 40.0)
    top[0, 0, 0:2, 0:2] = 6  # 4 pixels of small bowel
    top[0:2, 0, 5, 0:2] = 7  # 4 pixels of aorta over two slices
    hu[0:2, 5, 0:2] = 200.0
    top[2, 0, 8, 0:4] = 8  # 4 pixels of rib
    top[1:3, 0, 0:1, 6:9] = 7  # 6 pixels of aorta: kept
    top[0, 0, 8:9, 6:9] = 8  # 3 pixels of rib beside 2 more in the next slice (faces and edges): 5, kept
    top[1, 0, 9, 8:10] = 8
    assert anatomy.MIN_PIECE_ML == 0.5
    lone = top[:1].clone()  # a lone slice has no extent through the plane: its islands keep their names
    anatomy.keep_main_pieces(lone, hu[:1], classes, voxel_ml=None)
    assert torch.equal(lone, top[:1])
    anatomy.keep_main_pieces(top, hu, classes, voxel_ml=0.1)
    assert (top[0, 0, 0:2, 0:2] == 3).all() and (top[0:2, 0, 5, 0:2] == 4).all() and (top[2, 0, 8, 0:4] == 5).all()
    assert (top[1:3, 0, 0:1, 6:9] == 7).all() and (top[0, 0, 8:9, 6:9] == 8).all() and (top[1, 0, 9, 8:10] == 8).all()


def test_z_smoothing_keeps_a_constant_distribution_spreads_within_a_tissue_and_stops_at_an_hu_step():
    kernel = anatomy.z_smoothing_kernel(1.0)  # sigma 3 slices
    assert kernel is not None and kernel.sum() == pytest.approx(1.0) and anatomy.z_smoothing_kernel(5.0) is None
    r = len(kernel) // 2
    n = 2 * r + 1
    top = torch.tensor([6, 7]).view(1, 2, 1, 1).repeat(n, 1, 1, 1)  # liver, then spleen, on every slice
    prob = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1).repeat(n, 1, 1, 1)
    hu = torch.zeros((n, 1, 1))
    assert torch.allclose(anatomy.smooth_along_z(top, prob, hu, kernel, r, r + 1), prob[:1])
    # The middle slice alone says spleen: its neighbours outvote it, by the kernel's weights.
    flipped = prob.clone()
    flipped[r] = torch.tensor([0.4, 0.6]).view(2, 1, 1)
    spleen = float(anatomy.smooth_along_z(top, flipped, hu, kernel, r, r + 1)[0, 1])
    assert spleen == pytest.approx(0.4 + 0.2 * float(kernel[r]), abs=1e-6)
    # ... unless it is 400 HU denser than they are (something else crosses it): then it keeps its own.
    step = hu.clone()
    step[r] = 400.0
    assert float(anatomy.smooth_along_z(top, flipped, step, kernel, r, r + 1)[0, 1]) == pytest.approx(0.6, abs=1e-5)


def test_z_smoothing_equals_its_definition_pixel_by_pixel():
    # The numba pass against the filter written out for each pixel: sum over neighbours o (the edge slice repeated
    # beyond the ends) and their kept classes b of kernel[o] * exp(-dHU² / 2 Z_SMOOTH_HU²) * p_o,b, onto the centre's
    # class equal to b; normalised. float32 and the tabulated exp: 1e-5. Probabilities stored as uint8 x 255 give the
    # same (the filter is normalised).
    generator = torch.Generator().manual_seed(0)
    kernel = anatomy.z_smoothing_kernel(1.5)
    r = len(kernel) // 2
    top = torch.randint(0, 6, (5, 4, 5, 7), generator=generator, dtype=torch.uint8)
    prob = torch.rand(top.shape, generator=generator)
    prob /= prob.sum(dim=1, keepdim=True)
    hu = torch.randn(top.shape[0], 5, 7, generator=generator) * 40.0
    got = anatomy.smooth_along_z(top, prob, hu, kernel).numpy()
    for z, y, x in np.ndindex(5, 5, 7):
        total = np.zeros(4)
        for o in range(-r, r + 1):
            n = min(max(z + o, 0), 4)
            like = np.exp(-0.5 * ((hu[n, y, x] - hu[z, y, x]).item() / anatomy.Z_SMOOTH_HU) ** 2)
            for b in range(4):
                same = (top[z, :, y, x] == top[n, b, y, x]).numpy()
                total += float(kernel[o + r]) * like * float(prob[n, b, y, x]) * same
        np.testing.assert_allclose(got[z, :, y, x], total / total.sum(), atol=1e-5)
    stored = (prob * 255).round().to(torch.uint8)
    middle = anatomy.smooth_along_z(top, stored, hu, kernel, 1, 4).numpy()
    np.testing.assert_allclose(middle, got[1:4], atol=0.01)  # uint8 rounding of the inputs only
