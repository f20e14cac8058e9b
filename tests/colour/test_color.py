"""The colour layer: skimage agreement, luminance-exact gamut mapping, the uint8 L* invariant, and the palettes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.color import lab2rgb, rgb2lab

from napari_ctcolor import color
from napari_ctcolor.color import (
    compose_rgb,
    gamut_map_ab,
    grey_to_lightness,
    lab_to_srgb,
    lightness_to_grey,
    srgb_to_lab,
)
from napari_ctcolor.color_torch import compose_rgb_torch, gamut_map_ab_torch, lab_to_srgb_torch, srgb_to_lab_torch
from napari_ctcolor.errors import InputError
from napari_ctcolor.palettes import color_class, load_palette

from conftest import LUMINANCE_BOUND

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CT_DIR = SHARED_DATA / "ct"
LABEL_NAMES = SHARED_DATA / "ct" / "totalseg-v2-label-names.json"
STRUCTURE_TABLE = SHARED_DATA / "ct" / "totalseg-structures-snomed-rgb.csv"


def shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: this test compares against the shared TotalSegmentator tables")
    return path


def ts_v2_names() -> list[str]:
    return list(json.loads(shared(LABEL_NAMES).read_text(encoding="utf-8")).values())


def dicom_table() -> dict[str, tuple[int, int, int]]:
    with shared(STRUCTURE_TABLE).open(newline="") as f:
        return {r["Structure"]: tuple(int(c) for c in r["DicomRGBColor"].split(",")) for r in csv.DictReader(f)}


def lightness_of_uint8(rgb: np.ndarray) -> np.ndarray:
    """Exact CIE L* (float64, skimage) of uint8 sRGB pixels (..., 3)."""
    return rgb2lab(rgb.astype(np.float64) / 255.0)[..., 0]


def linear_rgb_unclipped(lab: np.ndarray) -> np.ndarray:
    """Linear sRGB of Lab (..., 3) without skimage's clipping, float64: shows how far out of gamut a colour is."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
    xyz = np.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787) * np.asarray(color.WHITE_D65)
    return xyz @ color.RGB_FROM_XYZ.T


def hue_difference_deg(ab1: np.ndarray, ab2: np.ndarray) -> np.ndarray:
    h1 = np.arctan2(ab1[..., 1], ab1[..., 0])
    h2 = np.arctan2(ab2[..., 1], ab2[..., 0])
    return np.degrees(np.abs(np.angle(np.exp(1j * (h1 - h2)))))


def adversarial_inputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Greys (dense random plus 0, 1 and every uint8 level) with a*b* from tiny to far outside the gamut (+-128)."""
    rng = np.random.default_rng(seed)
    grey = np.concatenate([rng.random(n), [0.0, 1.0], np.arange(256) / 255.0, rng.random(64) * 1e-3])
    m = grey.size
    ab = np.concatenate(
        [
            rng.uniform(-128, 128, (m // 2, 2)),
            rng.normal(0, 20, (m // 4, 2)),
            rng.choice([-128.0, 128.0], (m - m // 2 - m // 4, 2)),  # the corners of the network's range
        ]
    )
    return grey, ab[rng.permutation(m)]


# --------------------------------------------------------------------------------------------------------------------
# grey -> L*, Lab <-> sRGB
# --------------------------------------------------------------------------------------------------------------------


def test_grey_to_lightness_matches_skimage_rgb2lab_of_grey_pixels():
    g = np.concatenate([np.linspace(0, 1, 1001), np.random.default_rng(0).random(5000)])
    expected = rgb2lab(np.repeat(g[:, None], 3, axis=1))[:, 0]
    np.testing.assert_allclose(grey_to_lightness(g), expected, atol=1e-9)
    np.testing.assert_allclose(grey_to_lightness(g.astype(np.float32)), expected, atol=1e-4)
    np.testing.assert_allclose(grey_to_lightness(torch.from_numpy(g)).numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(grey_to_lightness(torch.from_numpy(g).float()).numpy(), expected, atol=1e-4)
    assert grey_to_lightness(0.0) == pytest.approx(0.0, abs=1e-12)
    assert grey_to_lightness(1.0) == pytest.approx(100.0, abs=1e-9)
    assert grey_to_lightness(0.5) == pytest.approx(53.389, abs=1e-3)


def test_lightness_to_grey_inverts_grey_to_lightness():
    g = np.random.default_rng(1).random(10000)
    np.testing.assert_allclose(lightness_to_grey(grey_to_lightness(g)), g, atol=1e-9)
    gt = torch.from_numpy(g)
    np.testing.assert_allclose(lightness_to_grey(grey_to_lightness(gt)).numpy(), g, atol=1e-9)


def random_in_gamut_lab(n: int, seed: int) -> np.ndarray:
    """Lab of random sRGB colours (so in gamut by construction), float64 (n, 3)."""
    return rgb2lab(np.random.default_rng(seed).random((n, 3)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_lab_to_srgb_matches_skimage_on_in_gamut_lab(dtype):
    lab = random_in_gamut_lab(20000, seed=2)
    expected = lab2rgb(lab)
    got = lab_to_srgb_torch(torch.from_numpy(lab).to(dtype)).double().numpy()
    assert np.abs(got - expected).max() <= 1e-4
    np.testing.assert_allclose(lab_to_srgb(lab), expected, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_srgb_to_lab_matches_skimage(dtype):
    rgb = np.random.default_rng(3).random((20000, 3))
    expected = rgb2lab(rgb)
    got = srgb_to_lab_torch(torch.from_numpy(rgb).to(dtype)).double().numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_torch_conversions_keep_leading_shape_and_accept_uint8():
    rgb8 = np.random.default_rng(4).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    lab = srgb_to_lab_torch(torch.from_numpy(rgb8))
    assert lab.shape == (2, 5, 7, 3) and lab.dtype == torch.float32
    np.testing.assert_allclose(lab.double().numpy(), srgb_to_lab(rgb8), atol=1e-3)
    assert lab_to_srgb_torch(lab).shape == (2, 5, 7, 3)


def test_srgb_lab_srgb_round_trip():
    rgb = np.random.default_rng(5).random((20000, 3))
    np.testing.assert_allclose(lab_to_srgb(srgb_to_lab(rgb)), rgb, atol=1e-6)
    rgb_t = torch.from_numpy(rgb)
    np.testing.assert_allclose(lab_to_srgb_torch(srgb_to_lab_torch(rgb_t)).numpy(), rgb, atol=1e-6)
    rgb8 = np.random.default_rng(6).integers(0, 256, (1000, 3), dtype=np.uint8)
    assert np.array_equal(np.rint(lab_to_srgb(srgb_to_lab(rgb8)) * 255).astype(np.uint8), rgb8)


def test_conversions_reject_wrong_channel_count():
    with pytest.raises(InputError, match=r"\(\.\.\., 3\)"):
        lab_to_srgb(np.zeros((4, 2)))
    with pytest.raises(InputError, match=r"\(\.\.\., 3\)"):
        srgb_to_lab_torch(torch.zeros(3, 4, 4))


# --------------------------------------------------------------------------------------------------------------------
# gamut mapping
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wild_lab() -> tuple[np.ndarray, np.ndarray]:
    """200k random (L*, a*, b*) with |a*|, |b*| <= 128: most are far out of the sRGB gamut."""
    rng = np.random.default_rng(7)
    return rng.uniform(0, 100, 200_000), rng.uniform(-128, 128, (200_000, 2))


def test_gamut_map_keeps_lightness_and_hue_and_lands_in_gamut(wild_lab):
    lightness, ab = wild_lab
    mapped = gamut_map_ab(lightness, ab).astype(np.float64)
    lab = np.column_stack([lightness, mapped])
    rgb = linear_rgb_unclipped(lab)
    # in gamut: the only slack is the white-point residual (<= 1e-4, documented) and float32 rounding
    assert rgb.min() >= -1e-6 and rgb.max() <= 1.0 + 1e-4
    # L* never changes (float32 arithmetic: 1e-2 is generous; it is ~3e-3)
    assert np.abs(rgb2lab(lab2rgb(lab))[:, 0] - lightness).max() <= 1e-2
    chroma_in = np.hypot(ab[:, 0], ab[:, 1])
    chroma_out = np.hypot(mapped[:, 0], mapped[:, 1])
    assert np.all(chroma_out <= chroma_in + 1e-3)  # chroma only ever goes down
    changed = np.any(mapped != ab.astype(np.float32), axis=1)
    assert changed.mean() > 0.5  # the case is really adversarial
    colored = changed & (chroma_out > 1.0)  # hue is meaningless for (near) greys
    assert hue_difference_deg(mapped[colored], ab[colored]).max() <= 0.5


def test_gamut_map_leaves_in_gamut_colors_unchanged():
    lab = random_in_gamut_lab(50000, seed=8)
    lab = lab[np.all((linear_rgb_unclipped(lab) >= 0) & (linear_rgb_unclipped(lab) <= 1), axis=1)]
    mapped = gamut_map_ab(lab[:, 0], lab[:, 1:])
    assert np.array_equal(mapped, lab[:, 1:].astype(np.float32))


def test_gamut_map_goes_to_the_boundary_not_towards_grey(wild_lab):
    """Mapped colours sit on the gamut boundary: 1% more chroma leaves the gamut for 99.9% of them, 5% for all.

    The slack is the Cmax table's bilinear interpolation at the sharp corners of the gamut (e.g. the blue primary's
    hue); above L* = 90 the yellow cusp makes the gamut slices non-star-shaped, so that range is left out.
    """
    lightness, ab = wild_lab
    keep = (lightness > 1.0) & (lightness < 90.0)
    lightness, ab = lightness[keep], ab[keep]
    mapped = gamut_map_ab(lightness, ab).astype(np.float64)
    changed = np.any(mapped != ab.astype(np.float32), axis=1)

    def outside(factor):
        rgb = linear_rgb_unclipped(np.column_stack([lightness[changed], factor * mapped[changed]]))
        return (rgb.min(axis=1) < 0) | (rgb.max(axis=1) > 1.0 + 1e-4)

    assert outside(1.01).mean() >= 0.999
    assert outside(1.05).all()


def test_gamut_map_black_and_white_have_no_chroma():
    mapped = gamut_map_ab(np.array([0.0, 0.0, 100.0, 100.0]), np.array([[50.0, 50.0], [-128, 128], [20, -20], [0, 0]]))
    np.testing.assert_allclose(mapped, 0.0, atol=0.05)


def test_gamut_map_torch_matches_numpy(wild_lab):
    lightness, ab = wild_lab
    expected = gamut_map_ab(lightness, ab)
    got = gamut_map_ab_torch(torch.from_numpy(lightness).float(), torch.from_numpy(ab).float()).numpy()
    assert np.abs(got - expected).max() <= 0.05


def test_gamut_map_rejects_mismatched_shapes():
    with pytest.raises(InputError, match=r"\(4, 2\)"):
        gamut_map_ab(np.zeros(4), np.zeros((4, 3)))
    with pytest.raises(InputError):
        gamut_map_ab_torch(torch.zeros(4), torch.zeros(5, 2))


# --------------------------------------------------------------------------------------------------------------------
# compose: the luminance invariant after uint8 quantisation
# --------------------------------------------------------------------------------------------------------------------


def test_uint8_rounding_error_bound_over_the_whole_srgb_cube():
    """Worst L* change from quantising any colour, over all 2**24 codes: the margin the invariant relies on.

    `compose_rgb` picks, per channel, a code within 0.525 of 255 * encode(y) (its table adds at most 0.025 to exact
    rounding). L* rises with each channel, so over the cube of floats that share a code the extreme L* sit at its
    corners; we evaluate those corners for every code.
    """
    half = 0.525 / 255.0
    codes = np.arange(256) / 255.0
    weights = color.XYZ_FROM_RGB[1]  # Y = weights . linear(rgb)
    lin = np.stack(
        [
            color.srgb_decode(np.clip(codes - half, 0.0, 1.0)),
            color.srgb_decode(codes),
            color.srgb_decode(np.clip(codes + half, 0.0, 1.0)),
        ]
    )  # (3: low corner, code, high corner, 256)

    def lstar(y):
        return 116.0 * color.lab_f(y) - 16.0

    worst = 0.0
    gb = lin[:, :, None] * weights[1] + lin[:, None, :] * weights[2]  # (corner, green, blue)
    for r in range(256):
        y = lin[:, r, None, None] * weights[0] + gb
        l_low, l_code, l_high = lstar(y[0]), lstar(y[1]), lstar(y[2])
        worst = max(worst, float(np.max(l_code - l_low)), float(np.max(l_high - l_code)))
    assert worst <= 0.28, worst  # 0.274; with the float path's <= 0.03 every output pixel has |dL*| < 0.31 < 1.0


@pytest.mark.parametrize("chroma", [0.0, 0.3, 1.0])
def test_compose_rgb_keeps_lightness_on_every_pixel(chroma):
    grey, ab = adversarial_inputs(300_000, seed=9)
    rgb = compose_rgb(grey, ab, chroma=chroma)
    assert rgb.shape == (grey.size, 3) and rgb.dtype == np.uint8
    error = np.abs(lightness_of_uint8(rgb) - grey_to_lightness(grey))
    assert error.max() <= LUMINANCE_BOUND  # the rounding bound 0.274 plus the float path's <= 0.03


@pytest.mark.parametrize("chroma", [0.0, 0.3, 1.0])
def test_compose_rgb_torch_keeps_lightness_on_every_pixel(chroma):
    grey, ab = adversarial_inputs(100_000, seed=10)
    rgb = compose_rgb_torch(torch.from_numpy(grey), torch.from_numpy(ab), chroma=chroma).numpy()
    assert rgb.shape == (grey.size, 3) and rgb.dtype == np.uint8
    error = np.abs(lightness_of_uint8(rgb) - grey_to_lightness(grey))
    assert error.max() <= LUMINANCE_BOUND


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_compose_rgb_at_chroma_zero_is_exactly_the_grey_ct(dtype):
    grey = np.concatenate(
        [np.random.default_rng(11).random(100_000), np.arange(256) / 255.0, (np.arange(255) + 0.5) / 255]
    )
    grey = grey.astype(dtype)
    ab = np.full((grey.size, 2), 100.0)
    expected = np.round(255.0 * grey).astype(np.uint8)
    rgb = compose_rgb(grey, ab, chroma=0.0)
    assert np.array_equal(rgb, np.repeat(expected[:, None], 3, axis=1))
    rgb_t = compose_rgb_torch(torch.from_numpy(grey), torch.from_numpy(ab), chroma=0.0).numpy()
    if dtype == np.float32:  # torch rounds in float32, like the float32 input itself
        assert np.array_equal(rgb_t, np.repeat(expected[:, None], 3, axis=1))
    else:
        assert np.abs(rgb_t.astype(int) - expected[:, None]).max() <= 1


def test_compose_rgb_with_zero_ab_is_grey_within_one_code():
    grey = np.random.default_rng(12).random(50_000)
    rgb = compose_rgb(grey, np.zeros((grey.size, 2)))
    assert np.abs(rgb.astype(int) - np.round(255 * grey)[:, None]).max() <= 1
    assert np.abs(rgb.astype(int) - rgb[:, 1:2]).max() <= 1  # R = G = B up to rounding


def test_compose_rgb_keeps_hue_of_in_gamut_colors():
    """In-gamut colours pass through unchanged apart from 8-bit rounding."""
    rgb_in = np.random.default_rng(13).integers(30, 226, (20000, 3), dtype=np.uint8)
    lab = srgb_to_lab(rgb_in)
    rgb_out = compose_rgb(lightness_to_grey(lab[:, 0]), lab[:, 1:])
    assert np.abs(rgb_out.astype(int) - rgb_in).max() <= 1


def test_compose_rgb_numpy_and_torch_agree():
    grey, ab = adversarial_inputs(100_000, seed=14)
    a = compose_rgb(grey, ab, chroma=0.7)
    b = compose_rgb_torch(torch.from_numpy(grey), torch.from_numpy(ab), chroma=0.7).numpy()
    differ = np.any(a != b, axis=1)
    # numpy reads Y from a 16384-level grey table and codes from a 65536-entry table; torch computes both exactly
    assert np.abs(a.astype(int) - b).max() <= 1
    assert differ.mean() < 0.03


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compose_rgb_torch_on_cuda_matches_cpu():
    grey, ab = adversarial_inputs(200_000, seed=17)
    grey_t, ab_t = torch.from_numpy(grey).float(), torch.from_numpy(ab).float()
    cpu = compose_rgb_torch(grey_t, ab_t, chroma=0.8)
    gpu = compose_rgb_torch(grey_t.cuda(), ab_t.cuda(), chroma=0.8)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu().int() - cpu.int()).abs().max() <= 1
    assert np.abs(lightness_of_uint8(gpu.cpu().numpy()) - grey_to_lightness(grey)).max() <= 0.31


def test_compose_rgb_keeps_image_shape():
    rng = np.random.default_rng(15)
    grey = rng.random((3, 64, 48)).astype(np.float32)
    ab = rng.normal(0, 30, (3, 64, 48, 2)).astype(np.float32)
    assert compose_rgb(grey, ab).shape == (3, 64, 48, 3)
    assert compose_rgb_torch(torch.from_numpy(grey), torch.from_numpy(ab)).shape == (3, 64, 48, 3)


def test_compose_rgb_rejects_bad_arguments():
    with pytest.raises(InputError, match=r"\(4, 5, 2\)"):
        compose_rgb(np.zeros((4, 5)), np.zeros((5, 4, 2)))
    with pytest.raises(InputError, match="chroma"):
        compose_rgb(np.zeros((4, 5)), np.zeros((4, 5, 2)), chroma=1.5)
    with pytest.raises(InputError, match=r"\(4, 5, 2\)"):
        compose_rgb_torch(torch.zeros(4, 5), torch.zeros(2, 4, 5))
    with pytest.raises(InputError, match="chroma"):
        compose_rgb_torch(torch.zeros(4, 5), torch.zeros(4, 5, 2), chroma=-0.1)
    with pytest.raises(InputError, match="floating point"):
        compose_rgb(np.zeros((4, 5), dtype=np.uint8), np.zeros((4, 5, 2)))
    with pytest.raises(InputError, match="floating point"):
        compose_rgb_torch(torch.zeros(4, 5, dtype=torch.uint8), torch.zeros(4, 5, 2))
    nan_ab = np.zeros((4, 5, 2))
    nan_ab[1, 2, 0] = np.nan
    with pytest.raises(InputError, match="finite"):
        compose_rgb(np.zeros((4, 5)), nan_ab)
    with pytest.raises(InputError, match="finite"):
        compose_rgb_torch(torch.zeros(4, 5), torch.from_numpy(nan_ab))


# --------------------------------------------------------------------------------------------------------------------
# palettes
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["anatomical", "dicom"])
def test_palette_covers_all_totalsegmentator_v2_names(name):
    palette = load_palette(name)
    groups = {color_class(n) for n in ts_v2_names()} - set(ts_v2_names()) - {"lung"}  # lung: a tissue class
    assert set(ts_v2_names()) <= set(palette.names) <= set(ts_v2_names()) | groups
    assert len(ts_v2_names()) == 117 and all(palette.class_rgb(g) is not None for g in groups)


@pytest.mark.parametrize("name", ["anatomical", "dicom"])
def test_palette_file_cites_its_source_and_holds_tissue_classes(name):
    palette = load_palette(name)
    assert len(palette.source) > 40
    assert [tc.name for tc in palette.tissue_classes] == [
        "air",
        "lung",
        "fat",
        "soft_tissue",
        "contrast_blood",
        "bone",
    ]
    assert palette.tissue_classes[0].rgb is None


def test_dicom_palette_is_the_tables_dicom_rgb_color():
    table = dicom_table()
    palette = load_palette("dicom")
    assert "DicomRGBColor" in palette.source
    assert palette.rgb["liver"] == (40, 140, 40) == table["liver"]
    assert palette.rgb["aorta"] == (216, 108, 54) == table["aorta"]
    assert palette.rgb["spleen"] == (50, 170, 60) == table["spleen"]
    assert all(palette.rgb[n] == table[n] for n in palette.names)
    fat = next(tc for tc in palette.tissue_classes if tc.name == "fat")
    assert fat.rgb == table["torso_fat"]


def test_palette_ab_is_the_lab_of_its_rgb():
    palette = load_palette("dicom")
    lab = rgb2lab(np.asarray(palette.rgb["aorta"], dtype=np.float64) / 255.0)
    np.testing.assert_allclose(palette.ab("aorta"), lab[1:], atol=1e-9)
    np.testing.assert_allclose(palette.lab("aorta"), lab, atol=1e-9)
    with pytest.raises(InputError, match="no structure"):
        palette.ab("appendix")


def test_anatomical_palette_tissue_colors_are_ordered_like_cryosections():
    """Hue h = atan2(b*, a*) in degrees: red ~ 30, yellow ~ 90, purple < 0."""
    pal = load_palette("anatomical")

    def lch(name):
        lightness, a, b = pal.lab(name)
        return lightness, np.hypot(a, b), np.degrees(np.arctan2(b, a))

    muscle = lch("iliopsoas_right")
    assert lch("gluteus_maximus_left") == muscle  # all muscles share one colour
    fat_a, fat_b = next(tc.ab for tc in pal.tissue_classes if tc.name == "fat")  # fat has no TS v2 structure
    fat_hue = np.degrees(np.arctan2(fat_b, fat_a))
    assert fat_hue > muscle[2] + 30  # fat is much more yellow than muscle
    assert 75 < fat_hue < 100
    liver, spleen, kidney = lch("liver"), lch("spleen"), lch("kidney_left")
    assert liver[0] < muscle[0] and liver[0] < kidney[0]  # liver darker
    assert spleen[2] < liver[2] - 20  # spleen purplish
    assert kidney[2] <= muscle[2] and kidney[1] > muscle[1]  # kidney redder
    lung = lch("lung_lower_lobe_right")
    assert lung[0] > muscle[0] + 20 and lung[2] < muscle[2]  # lung lighter and pinker
    artery, vein = lch("aorta"), lch("inferior_vena_cava")
    assert artery[1] > muscle[1] and vein[2] < artery[2] - 20 and vein[0] < artery[0]  # veins darker, purplish
    for bone in ("vertebrae_L1", "rib_left_3", "femur_right", "skull", "costal_cartilages"):
        lightness, chroma, hue = lch(bone)
        assert lightness > 85 and chroma < 15  # ivory
    bowel = lch("small_bowel")
    assert bowel[0] > muscle[0] + 15 and bowel[2] < 45  # pinkish
    for fluid in ("gallbladder", "urinary_bladder", "kidney_cyst_right"):
        assert 60 < lch(fluid)[2] < 110  # yellowish


def test_anatomical_colors_fit_the_gamut_at_mid_lightness():
    """The colour is shown at the CT's L*, not its own: its chroma must be reachable at typical soft-tissue L*."""
    pal = load_palette("anatomical")
    ab = np.array([pal.ab(n) for n in pal.names])
    for lightness in (50.0, 65.0):
        mapped = gamut_map_ab(np.full(len(ab), lightness), ab)
        np.testing.assert_allclose(mapped, ab, atol=1e-4)


def test_color_classes_join_sides_levels_ribs_and_lobes():
    got = [
        color_class(n)
        for n in ("kidney_left", "vertebrae_T7", "vertebrae_L5", "vertebrae_S1", "rib_right_11", "lung_upper_lobe_left")
    ]
    assert got == ["kidney", "vertebrae_thoracic", "vertebrae_lumbar", "sacrum", "ribs", "lung"]
    assert [color_class(n) for n in ("liver", "heart_myocardium", "costal_cartilages")] == [
        "liver",
        "heart",
        "costal_cartilages",
    ]


def test_class_colors_come_from_structures_groups_tissues_or_members():
    dicom = load_palette("dicom")
    table = dicom_table()
    assert dicom.class_rgb("kidney") == table["kidney"] and dicom.class_rgb("ribs") == table["ribs"]
    assert dicom.class_rgb("air") is None and dicom.class_rgb("fat") == table["torso_fat"]
    # A class no palette row names takes the mean Lab of its members: both brachiocephalic veins.
    left, right = (srgb_to_lab(np.asarray(table[f"brachiocephalic_vein_{s}"], np.uint8)) for s in ("left", "right"))
    mean = srgb_to_lab(np.asarray(dicom.class_rgb("brachiocephalic_vein"), np.uint8))
    np.testing.assert_allclose(mean, (left + right) / 2, atol=1.0)
    assert dicom.class_rgb("not_a_class") is None
    ab = dicom.class_ab(["air", "liver"])
    np.testing.assert_allclose(ab[0], [0, 0]) and np.testing.assert_allclose(ab[1], dicom.ab("liver"), atol=1e-5)


def test_a_csv_palette_overrides_what_it_names_and_errors_name_the_line(tmp_path):
    good = tmp_path / "mine.csv"
    good.write_text("name,R,G,B\nliver,10,20,200\nkidney_left,200,0,0\nfat,250,250,0\n\n", encoding="utf-8")
    mine = load_palette(str(good))
    anatomical = load_palette("anatomical")
    assert mine.name == "mine" and mine.class_rgb("liver") == (10, 20, 200)
    assert mine.class_rgb("kidney") == (200, 0, 0)  # the group follows the member the file names
    assert mine.class_rgb("fat") == (250, 250, 0)  # a tissue class
    assert mine.class_rgb("spleen") == anatomical.class_rgb("spleen")  # the rest stays anatomical
    table = load_palette(CT_DIR / "totalseg-structures-snomed-rgb.csv") if CT_DIR.exists() else None
    if table is not None:  # TotalSegmentator's own table reads as the dicom palette's structure colours
        assert all(table.class_rgb(n) == load_palette("dicom").class_rgb(n) for n in ("liver", "aorta", "ribs"))
    for text, message in (
        ("liver,10,20\n", "line 1"),
        ("name,R,G,B\nliver,10,20,300\n", "line 2"),
        ("liver,10,20,30\nlivr,1,2,3\n", r"line 2: unknown name 'livr'"),
        ("name,R,G,B\n", "no name,R,G,B rows"),
    ):
        bad = tmp_path / "bad.csv"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(InputError, match=message):
            load_palette(bad)
    with pytest.raises(InputError, match="cannot read"):
        load_palette(tmp_path / "missing.csv")


def test_load_palette_rejects_unknown_names():
    with pytest.raises(InputError, match="anatomical, dicom or a .csv file"):
        load_palette("rainbow")
