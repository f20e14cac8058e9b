"""The colorize engine on the shared DICOM series (tiny untrained model) and the ColorVolume exports.

The luminance contract (docs/architecture.md): L* of every output pixel equals L* of the windowed CT's grey within
1.0. An untrained network predicts arbitrary a*, b*, which exercises the gamut mapping at least as hard as a
trained one.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import torch
from monai.inferers import SlidingWindowInferer
from pydicom.dataset import Dataset

from napari_ctcolor.color import compose_rgb, grey_to_lightness, srgb_to_lab
from napari_ctcolor.engines.colorize import (
    TOP_K,
    Chroma,
    colorize,
    compose_chroma,
    compose_plane,
    guided_upsample,
    iter_colorize,
    iter_predict_chroma,
    predict_chroma,
    upsample_chroma,
)
from napari_ctcolor.engines.colorize.chroma import compact
from napari_ctcolor.engines.colorize.compose import COMPOSE_CHUNK
from napari_ctcolor.engines.colorize.enclosure import enclosure_bits
from napari_ctcolor.engines.colorize.fused import top_classes
from napari_ctcolor.engines.colorize.groups import PLAIN_FADE_HU
from napari_ctcolor.engines.colorize.predict import ROI_3D
from napari_ctcolor.engines.device import cpu_bf16
from napari_ctcolor.errors import Cancelled, InputError
from napari_ctcolor.io import Volume, read_color_volume, read_volume, write_nifti
from napari_ctcolor.io.export import DICOM_MODALITY, write_png_slices, write_rgb_dicom, write_rgb_nifti
from napari_ctcolor.models.colorizer import Colorizer, ColorizerConfig, downsample_hu, prepare_input
from napari_ctcolor.palettes import load_palette
from napari_ctcolor.windowing import PRESETS, window

from conftest import LUMINANCE_BOUND

WINDOW = "abdomen"


#: Colour classes of the tiny test models: the tissue classes and a few structures.
CLASSES = ("air", "lung", "fat", "soft_tissue", "contrast_blood", "bone", "liver", "spleen", "aorta")


def tiny_colorizer(dims: int = 2) -> Colorizer:
    """An untrained, seeded colorizer small enough for 2 CPU cores."""
    torch.manual_seed(0)
    return Colorizer(ColorizerConfig(dims=dims, channels=(8, 16, 32, 64), classes=CLASSES))


def lightness_error(rgb: np.ndarray, hu: np.ndarray, win=PRESETS[WINDOW]) -> float:
    """max |L*(output) - L*(windowed CT grey)| over all voxels."""
    return float(np.abs(srgb_to_lab(rgb)[..., 0] - grey_to_lightness(window(hu, *win))).max())


@pytest.fixture(scope="module")
def ct(dicom_series):
    return read_volume(dicom_series)


@pytest.fixture(scope="module")
def model():
    return tiny_colorizer()


@pytest.fixture(scope="module")
def chroma(ct, model):
    return predict_chroma(ct, model, device="cpu")


@pytest.fixture(scope="module")
def color(ct, chroma):
    return compose_chroma(ct, chroma, WINDOW, 1.0, device="cpu")


# ------------------------------------------------------------------------------------------------------------------
# Engine
# ------------------------------------------------------------------------------------------------------------------


def test_color_volume_has_the_ct_shape_and_geometry(ct, chroma, color):
    assert color.rgb.shape == (20, 512, 512, 3) and color.rgb.dtype == np.uint8
    assert color.spacing == ct.spacing and color.origin == ct.origin
    np.testing.assert_array_equal(color.direction, ct.direction)
    assert color.settings == {"window": [40.0, 400.0], "model": "custom", "chroma": 1.0, "palette": "anatomical"}
    # 512 px at 0.98 mm -> 4x reduction to the network's 3.5 mm pixels; the 4 most probable classes per pixel.
    assert chroma.factor == 4 and tuple(chroma.top.shape) == tuple(chroma.prob.shape) == (20, TOP_K, 128, 128)
    assert chroma.top.dtype == chroma.prob.dtype == torch.uint8 and chroma.classes == CLASSES
    # Probabilities renormalised over the kept classes: 255 up to the rounding of each of the four.
    assert (chroma.prob.int().sum(dim=1) - 255).abs().max() <= 2


def test_luminance_is_the_windowed_ct_on_every_voxel(ct, color):
    assert lightness_error(color.rgb, ct.array) <= LUMINANCE_BOUND


def test_color_lands_where_the_network_put_it_and_never_in_air(ct, chroma, color):
    # The composed a*, b* against the network's own upsampled palette colour, on voxels the window shows mid-grey
    # (black and white hold no colour). Measured: median 0.25 a*b* units (gamut mapping moves the most saturated);
    # the same colour moved 4 network pixels (14 mm) sideways gives 4.7.
    lab = srgb_to_lab(color.rgb[10])
    hu = torch.from_numpy(ct.array[10:11].astype(np.float32))
    expected = upsample_chroma(chroma, load_palette("anatomical"), hu, 10)
    grey = window(ct.array[10], *PRESETS[WINDOW])
    mid = (grey > 0.1) & (grey < 0.9)
    offset = np.hypot(*(lab[..., 1:] - expected[0].numpy()).transpose(2, 0, 1))
    assert mid.mean() > 0.2 and np.median(offset[mid]) < 1.0, np.median(offset[mid])
    # No chroma in air (the target: C* <= 2 where HU < -900).
    assert np.hypot(lab[..., 1], lab[..., 2])[ct.array[10] < -900].max() <= 2.0


def test_zero_chroma_is_exactly_the_grey_ct(ct, chroma):
    grey = compose_chroma(ct, chroma, WINDOW, 0.0, device="cpu").rgb
    expected = np.round(window(ct.array, *PRESETS[WINDOW]) * 255).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(grey[..., channel], expected)


def _unfused(volume, chroma, palette, win, strength):
    """The composition as two separate passes (guided upsampling, then `compose_rgb`): the fused kernel's reference."""
    out = np.empty((*volume.shape, 3), dtype=np.uint8)
    for z in range(volume.shape[0]):
        hu = torch.from_numpy(volume.array[z : z + 1].astype(np.float32))
        ab = upsample_chroma(chroma, load_palette(palette), hu, z)
        out[z : z + 1] = compose_rgb(window(hu.numpy(), *win), ab.numpy(), chroma=strength)
    return out


@pytest.mark.parametrize(("palette", "strength", "pixel_mm"), [("anatomical", 1.0, None), ("dicom", 0.6, 4.5)])
def test_fused_compose_equals_the_two_pass_composition(ct, model, palette, strength, pixel_mm):
    # compose_chroma on the CPU runs colorize.fused (one pass per voxel); the same float32 arithmetic in another order,
    # so every channel within one 8-bit code of upsample_chroma + compose_rgb, and rarely off at all. 4.5 mm pixels:
    # the network's own resolution (factor 1, no upsampling).
    volume = ct
    if pixel_mm is not None:
        step = round(pixel_mm / ct.spacing[1])
        volume = Volume(ct.array[:6, ::step, ::step], spacing=(ct.spacing[0], pixel_mm, pixel_mm), meta=ct.meta)
    chroma = predict_chroma(volume, model, device="cpu")
    assert chroma.factor == (4 if pixel_mm is None else 1)
    fused = compose_chroma(volume, chroma, WINDOW, strength, device="cpu", palette=palette).rgb
    reference = _unfused(volume, chroma, palette, PRESETS[WINDOW], strength)
    difference = np.abs(fused.astype(np.int16) - reference)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, ((difference > 0).mean(), difference.max())
    assert lightness_error(fused, volume.array) <= LUMINANCE_BOUND


def test_top_classes_from_logits_equal_softmax_then_top_k():
    # fused.top_classes (the CPU path) against torch's softmax over all classes, topk and renormalisation (the GPU
    # path): the same classes in the same order, except where rounding makes two probabilities equal and either
    # order is right (none in this draw; allowed on 0.1 %), probabilities within one uint8 step.
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, len(CLASSES) * 4, 20, 30, generator=generator) * 3.0
    top, prob = top_classes(logits.numpy(), TOP_K, 2)
    expected_top, expected_prob = compact(logits.softmax(dim=1))
    assert (torch.from_numpy(top) == expected_top).float().mean() >= 0.999
    assert (torch.from_numpy(prob).int() - expected_prob.int()).abs().max() <= 1
    assert top.dtype == prob.dtype == np.uint8 and (prob.astype(int).sum(axis=1) - 255).max() <= 2
    # bfloat16 logits (the CPU network under autocast) given as their bits: exactly the float32 of those values.
    half = logits.to(torch.bfloat16)
    from_bits = top_classes(half.view(torch.int16).numpy().view(np.uint16), TOP_K, 2)
    from_float = top_classes(half.float().numpy(), TOP_K, 2)
    assert all((a == b).all() for a, b in zip(from_bits, from_float, strict=True))


def test_cpu_runs_are_byte_identical_and_colorize_equals_predict_then_compose(ct, model, color):
    # `colour` is a first run (predict_chroma + compose_chroma, same default batch size); this is the second, in the
    # same process on the same thread count: the same float operations, so bit for bit (other thread counts or CPUs
    # agree only within batch.SAME_AS_SINGLE).
    again = colorize(ct, model, WINDOW, device="cpu")
    assert again.rgb.tobytes() == color.rgb.tobytes()


_THREADS_AFTER_COLORIZE = """
import torch
torch.set_num_threads(1)
from napari_ctcolor.engines.colorize import colorize
from napari_ctcolor.phantom import make_phantom
colorize(make_phantom(shape=(6, 96, 96), spacing=(3.0, 3.6, 3.6)).volume, device="cpu")
print(torch.get_num_threads())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: numba's pool has one thread, nothing to change")
def test_a_colorize_leaves_torch_on_the_thread_count_the_process_chose():
    # A fresh process: numba's OpenMP pool starts with the first kernel and once set the OpenMP count that torch reads
    # to every core, so a process on 1 torch thread (a Dask batch worker, OMP_NUM_THREADS=1) ran its later networks
    # on 2 threads and its first colorize differed from the next in the last bits.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", _THREADS_AFTER_COLORIZE]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]


def test_progress_reaches_total_and_cancel_raises(ct, model):
    steps = []
    colorize(ct, model, WINDOW, device="cpu", batch_size=8, progress=lambda done, total: steps.append((done, total)))
    # network: 8, 16, 20 slices; compose: chunks of COMPOSE_CHUNK slices; out of 2 x 20.
    compose = [(20 + min(20, k), 40) for k in range(COMPOSE_CHUNK, 20 + COMPOSE_CHUNK, COMPOSE_CHUNK)]
    assert steps == [(8, 40), (16, 40), (20, 40), *compose]

    reported = []

    def cancel_after_first_batch() -> bool:
        return len(reported) > 0

    with pytest.raises(Cancelled):
        colorize(
            ct,
            model,
            device="cpu",
            batch_size=4,
            progress=lambda d, _: reported.append(d),
            cancel=cancel_after_first_batch,
        )
    assert reported == [4]  # stopped before the second batch


def test_generator_yields_each_batch_and_returns_the_chroma(ct, model, chroma):
    steps = iter_predict_chroma(ct, model, device="cpu", batch_size=8)
    assert [next(steps), next(steps), next(steps)] == [(8, 20), (16, 20), (20, 20)]
    with pytest.raises(StopIteration) as stop:
        next(steps)
    # Batches of 8 here, 16 for the fixture: float reductions may round a probability to the next 1/255.
    assert torch.equal(stop.value.value.top, chroma.top)
    assert (stop.value.value.prob.int() - chroma.prob.int()).abs().max() <= 1


def test_bad_settings_are_input_errors_before_the_network_runs(ct, model):
    for kwargs in ({"chroma": 1.5}, {"window": "nonsense"}, {"batch_size": -1}, {"palette": "nonsense"}):
        with pytest.raises(InputError):
            next(iter_colorize(ct, model, device="cpu", **kwargs))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            colorize(ct, model, device="cuda")


def test_3d_model_matches_monai_sliding_window_and_keeps_luminance(ct):
    # A 256 x 256 crop: at the network's 4x reduction (64 x 64 x 20) it is smaller than the 3D patch on every side,
    # so the padding path runs too.
    crop = Volume(ct.array[:, 128:384, 128:384], ct.spacing, ct.origin, ct.direction, dict(ct.meta))
    net = tiny_colorizer(dims=3)
    got = predict_chroma(crop, net, device="cpu", batch_size=8, anatomy=False)  # the network's own probabilities
    # Reference: MONAI's inferer blending the class probabilities of the same network input (the engine runs its own
    # loop to report progress), reduced to the 4 most probable classes as the engine keeps them; in the engine's
    # precision (bfloat16 autocast on a CPU with bf16 instructions, `cpu_bf16`).
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16()):
        small = downsample_hu(torch.from_numpy(crop.array.astype(np.float32)), 4)
        x = prepare_input(small[None], net.config)
        inferer = SlidingWindowInferer(ROI_3D, sw_batch_size=2, overlap=0.5, mode="gaussian", padding_mode="replicate")
        expected = inferer(x, lambda patch: net(patch).softmax(dim=1))[0].permute(1, 0, 2, 3)
        top, prob = compact(expected)
    assert tuple(got.top.shape) == (20, TOP_K, 64, 64)
    # Where two classes are nearly tied, float rounding may order them either way; the probabilities still agree.
    assert (got.top == top).float().mean() > 0.99
    assert (got.prob.int() - prob.int()).abs().max() <= 1
    color = compose_chroma(crop, got, WINDOW, 1.0, device="cpu")
    assert color.rgb.shape == (20, 256, 256, 3)
    assert lightness_error(color.rgb, crop.array) <= LUMINANCE_BOUND


def test_3d_slabs_cover_a_long_volume_like_one_sliding_window(ct):
    # 60 slices: two slabs of the 3D patch depth (32), each run with half a patch of context on either side.
    crop = ct.array[:, 192:320, 192:320]
    long = Volume(np.concatenate([crop, crop[::-1], crop]), ct.spacing, ct.origin, ct.direction, dict(ct.meta))
    net = tiny_colorizer(dims=3)
    got = predict_chroma(long, net, device="cpu", batch_size=8, anatomy=False)  # the network's own probabilities
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16()):  # as the engine
        x = prepare_input(downsample_hu(torch.from_numpy(long.array.astype(np.float32)), 4)[None], net.config)
        inferer = SlidingWindowInferer(ROI_3D, sw_batch_size=2, overlap=0.5, mode="gaussian", padding_mode="replicate")
        expected = inferer(x, lambda patch: net(patch).softmax(dim=1))[0].permute(1, 0, 2, 3)
        top, prob = compact(expected)
    palette = load_palette("anatomical")
    want = Chroma(top, prob, CLASSES, 4, got.pad, "reference").ab(palette)
    diff = (got.ab(palette) - want).abs()
    # Measured: mean 0.003 a*b* units, 0.05 % of values off by more than 1 in float32; 0.037 and 0.44 % under
    # bfloat16, whose 8-bit mantissa differs between two blends of the same patches more (an untrained network's
    # nearly flat distribution lets rounding reorder near-tied classes); a missing or misplaced slab is off by tens.
    # Limits: about 3x and 4x those.
    mean_limit, share_limit = (0.1, 0.02) if cpu_bf16() else (0.01, 0.002)
    assert diff.mean() < mean_limit and (diff > 1.0).float().mean() < share_limit, (
        diff.mean(),
        (diff > 1.0).float().mean(),
    )


def test_guided_upsampling_is_smooth_in_uniform_tissue_and_stops_at_an_edge():
    # Uniform tissue: a constant colour stays exactly constant, a smooth one is interpolated smoothly.
    uniform = torch.full((1, 32, 32), 40.0)
    constant = torch.tensor([30.0, -12.0]).view(1, 2, 1, 1).expand(1, 2, 8, 8).contiguous()
    torch.testing.assert_close(guided_upsample(constant, uniform, 4), constant[..., :1, :1].expand(1, 2, 32, 32))
    y, x = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = torch.stack((10 * torch.sin(x / 3), 10 * torch.cos(y / 3)))[None]
    bilinear = torch.nn.functional.interpolate(smooth, size=(32, 32), mode="bilinear", align_corners=False)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))  # the clamped edges differ by design
    assert (guided_upsample(smooth, uniform, 4) - bilinear)[inner].abs().max() < 0.5

    # Liver (60 HU, colour A) on the left, fat (-100 HU, colour B) on the right; the boundary falls mid-pixel of the
    # network grid, so its pixel 3 is a blend in HU and colour.
    hu = torch.full((1, 32, 32), -100.0)
    hu[..., :14] = 60.0
    low_hu = torch.nn.functional.avg_pool2d(hu[:, None], 4)[:, 0]
    share = (low_hu + 100.0) / 160.0  # liver share of each network pixel
    a, b = torch.tensor([40.0, 20.0]), torch.tensor([-5.0, 60.0])
    ab = (share[:, None] * a.view(1, 2, 1, 1) + (1 - share[:, None]) * b.view(1, 2, 1, 1)).expand(1, 2, 8, 8)
    up = guided_upsample(ab.contiguous(), hu, 4)
    blended = torch.nn.functional.interpolate(ab.contiguous(), size=(32, 32), mode="bilinear", align_corners=False)
    # Every full-resolution voxel next to the boundary keeps the colour of its own side within 4 a*b* units (measured
    # 3.1, at the voxel touching it; the two colours are 60 apart); bilinear upsampling is 20 off there.
    liver, fat = up[0, :, :, 10:14], up[0, :, :, 14:18]
    assert (liver - a.view(2, 1, 1)).abs().max() < 4.0 and (fat - b.view(2, 1, 1)).abs().max() < 4.0
    assert (blended[0, :, :, 12] - a.view(2, 1)).abs().max() > 10.0


def _uniform_chroma(name: str, shape: tuple[int, int, int], factor: int = 4) -> Chroma:
    """A Chroma whose every pixel is ``name`` with probability 1."""
    z, h, w = shape
    top = torch.zeros((z, TOP_K, h // factor, w // factor), dtype=torch.uint8)
    others = [k for k in range(len(CLASSES)) if CLASSES[k] != name][: TOP_K - 1]
    top[:, 0] = CLASSES.index(name)
    top[:, 1:] = torch.tensor(others, dtype=torch.uint8).view(1, -1, 1, 1)
    prob = torch.zeros_like(top)
    prob[:, 0] = 255
    return Chroma(top, prob, CLASSES, factor, ((0, 0), (0, 0)), "handmade")


def test_palette_colors_the_class_and_switching_needs_no_network(ct, tmp_path):
    chroma = _uniform_chroma("liver", ct.shape)
    body = _inner_mask((ct.array > -100) & (ct.array < 220))  # mid-grey in the 60/400 window: room for chroma
    hues = {}
    for palette in ("anatomical", "dicom"):
        rgb = compose_chroma(ct, chroma, (60, 400), 1.0, device="cpu", palette=palette).rgb
        assert lightness_error(rgb, ct.array, win=(60, 400)) <= LUMINANCE_BOUND
        lab = srgb_to_lab(rgb[body])
        hues[palette] = np.degrees(np.arctan2(lab[:, 2], lab[:, 1]))
        want = load_palette(palette).class_ab(["liver"])[0]
        hue_diff = np.abs((hues[palette] - np.degrees(np.arctan2(want[1], want[0])) + 180) % 360 - 180)
        assert np.percentile(hue_diff, 99) < 5.0  # 8-bit rounding moves hue by a few degrees at most
    assert np.abs(np.median(hues["anatomical"]) - np.median(hues["dicom"])) > 60  # brown-red vs green
    csv = tmp_path / "mine.csv"
    csv.write_text("name,R,G,B\nliver,40,60,200\n", encoding="utf-8")
    lab = srgb_to_lab(compose_chroma(ct, chroma, (60, 400), 1.0, device="cpu", palette=csv).rgb[body])
    assert np.median(lab[:, 2]) < -20  # blue: b* well below zero


def test_air_is_never_tinted_even_when_the_network_says_liver(ct):
    chroma = _uniform_chroma("liver", ct.shape)
    air = ct.array < -900
    for win in ("lung", "abdomen", (-900, 200)):
        lab = srgb_to_lab(compose_chroma(ct, chroma, win, 1.0, device="cpu").rgb[air])
        assert np.hypot(lab[:, 1], lab[:, 2]).max() <= 2.0


def _inner_mask(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask, structure=np.ones((1, 9, 9), bool))


def test_most_probable_names_every_voxel_as_the_pointer_does(ct, chroma):
    """`Chroma.most_probable` (one numba pass per voxel: the class map of ``--classes`` and the viewer's class layer)
    against `Chroma.class_at` (the pointer's, in torch, voxel by voxel) on 3000 voxels drawn at random and on every
    voxel of the series at or above 110 HU in rows 150-350 of three slices, where the HU weights and the bone
    enclosure decide: the same class wherever the two best scores differ by more than float32 rounding (the same
    float32 arithmetic in the same order; another CPU may round an operation differently, so a near-tie may go
    either way, and only there)."""
    labels = chroma.most_probable(ct.array)
    rng = np.random.default_rng(7)
    picked = [tuple(rng.integers(0, n, 3000)) for n in ct.shape]
    dense = np.argwhere(ct.array[:3, 150:350] >= PLAIN_FADE_HU[0]) + [0, 150, 0]
    voxels = list(zip(*picked, strict=True)) + [tuple(v) for v in dense[:: max(1, len(dense) // 3000)]]
    differ = 0
    for z, y, x in voxels:
        hu = float(ct.array[z, y, x])
        name = chroma.class_at(int(z), int(y), int(x), hu)[0]
        if labels[z, y, x] != (0 if name == "air" else CLASSES.index(name) + 1):
            differ += 1
            scores = _pointer_scores(chroma, int(z), int(y), int(x), hu)
            kernel = "air" if labels[z, y, x] == 0 else CLASSES[labels[z, y, x] - 1]
            assert abs(scores[kernel] - scores[name]) <= 1e-5 * scores[name], (z, y, x, scores)
    assert len(voxels) > 5000 and differ <= 5


def _pointer_scores(chroma, z: int, y: int, x: int, hu: float) -> dict[str, float]:
    """Each kept class's score at a voxel as `Chroma.class_at` weighs it (probability x its HU group's weight)."""
    from napari_ctcolor.engines.colorize.groups import MARROW_GROUP_HU, hu_group_of, hu_group_weights

    row, col = chroma.network_pixel(y, x)
    marrow, no_bone = chroma.enclosure[:, z, y, x // 8] >> (7 - x % 8) & 1
    hu = max(hu, MARROW_GROUP_HU) if marrow else hu
    fit = hu_group_weights(torch.tensor(hu), torch.tensor(bool(no_bone)), chroma.blood_fade_hu)
    top, prob = chroma.top[z, :, row, col].long(), chroma.prob[z, :, row, col].float()
    scores = (prob * fit[hu_group_of(chroma.classes)[top]]).tolist()
    return {chroma.classes[int(k)]: score for k, score in zip(top, scores, strict=True)}


def test_class_at_and_most_probable_follow_the_network_grid(ct, chroma):
    # At or below the plain tissue's fade start (110 HU) the HU weights are all 1 outside the marrow and away from
    # unenclosed bone classes (`Chroma.enclosure`): the network pixel's most probable class. Voxel (3, y, x) is one
    # such in network pixel (50, 75) (factor 4, no padding at 512²).
    either = np.unpackbits(chroma.enclosure, axis=-1, count=ct.shape[2]).view(bool).any(axis=0)
    dy, dx = np.argwhere((ct.array[3, 200:204, 300:304] <= PLAIN_FADE_HU[0]) & ~either[3, 200:204, 300:304])[0]
    y, x = 200 + int(dy), 300 + int(dx)
    name, probability = chroma.class_at(3, y, x, float(ct.array[3, y, x]))
    assert name == CLASSES[int(chroma.top[3, 0, 50, 75])] and probability == chroma.prob[3, 0, 50, 75].item() / 255
    labels = chroma.most_probable(ct.array)
    assert labels.shape == ct.shape and labels.dtype == np.uint8
    expected = chroma.top[3, 0, 50, 75].item() + 1
    assert labels[3, y, x] == (0 if CLASSES[expected - 1] == "air" else expected)
    soft = (ct.array <= PLAIN_FADE_HU[0]) & ~either
    rows, cols = torch.arange(ct.shape[1]) // 4, torch.arange(ct.shape[2]) // 4  # no padding at 512²
    labels_by_pixel = chroma.top[:, 0].index_select(1, rows).index_select(2, cols)
    labels_by_pixel = (labels_by_pixel.numpy() + 1) * (labels_by_pixel.numpy() != CLASSES.index("air"))
    np.testing.assert_array_equal(labels[soft], labels_by_pixel[soft])
    assert abs(sum(chroma.class_shares().values()) - 1.0) < 1e-9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_keeps_luminance_exact_and_colors_close_to_cpu(ct, model, color):
    gpu = colorize(ct, copy.deepcopy(model), WINDOW, device="cuda")  # a copy: the engine moves the model it is given
    assert gpu.rgb.shape == color.rgb.shape
    assert lightness_error(gpu.rgb, ct.array) <= LUMINANCE_BOUND
    # bf16 network + float32 torch composition vs the float32 CPU path: the same picture, not the same bytes.
    delta_e = np.linalg.norm(srgb_to_lab(gpu.rgb[::4]) - srgb_to_lab(color.rgb[::4]), axis=-1)  # CIE76
    assert delta_e.mean() < 2.0 and np.percentile(delta_e, 99) < 6.0


# ------------------------------------------------------------------------------------------------------------------
# Exports
# ------------------------------------------------------------------------------------------------------------------


def test_rgb_nifti_has_the_colors_and_the_affine_of_the_grey_nifti(ct, color, tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    path = write_rgb_nifti(color, tmp_path / "colour.nii.gz")
    grey = nib.load(write_nifti(ct, tmp_path / "grey.nii.gz"))
    img = nib.load(path)
    assert int(img.header["datatype"]) == 128  # DT_RGB24
    np.testing.assert_array_equal(img.affine, grey.affine)
    np.testing.assert_array_equal(img.get_qform(), grey.get_qform())
    np.testing.assert_array_equal(img.get_sform(), grey.get_sform())
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    voxels = np.asarray(img.dataobj)  # (X, Y, Z) RGB24 records
    rgb = np.stack([voxels["R"], voxels["G"], voxels["B"]], axis=-1).transpose(2, 1, 0, 3)
    np.testing.assert_array_equal(rgb, color.rgb)

    image = sitk.ReadImage(str(path))  # what ITK-SNAP and 3D Slicer use
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert image.GetPixelID() == sitk.sitkVectorUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), color.rgb)
    reference = ct.to_sitk()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)

    with pytest.raises(InputError, match="already exists"):
        write_rgb_nifti(color, path)
    write_rgb_nifti(color, path, overwrite=True)
    with pytest.raises(InputError, match=r"\.nii"):
        write_rgb_nifti(color, tmp_path / "colour.png")


def test_png_slices_round_trip_one_file_per_slice(color, tmp_path):
    from PIL import Image

    folder = tmp_path / "png"
    paths = write_png_slices(color, folder)
    assert [p.name for p in paths] == [f"slice_{k:04d}.png" for k in range(20)]
    # No temporary files left behind; geometry.json lets the folder open again in place.
    assert sorted(folder.iterdir()) == sorted([*paths, folder / "geometry.json"])
    back = read_color_volume(folder)
    np.testing.assert_array_equal(back.rgb, color.rgb)
    np.testing.assert_allclose(back.affine, color.affine, atol=1e-9)
    for k in (0, 13):
        with Image.open(paths[k]) as png:
            assert png.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(png), color.rgb[k])
            assert png.info["dpi"][0] == pytest.approx(25.4 / 0.9765625, rel=1e-3)
    with pytest.raises(InputError, match="already exists"):
        write_png_slices(color, folder)


def test_rgb_dicom_series_has_the_pixels_and_geometry_and_no_patient_identity(ct, color, tmp_path):
    paths = write_rgb_dicom(color, tmp_path / "dicom", source_meta=ct.meta)
    assert len(paths) == 20
    series_uids = set()
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert ds.Modality == DICOM_MODALITY == "OT"
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration) == ("RGB", 3, 0)
        assert ds.BitsAllocated == 8
        np.testing.assert_array_equal(ds.pixel_array, color.rgb[k])
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], (ct.affine @ (0, 0, k, 1))[:3], atol=1e-4
        )
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0], atol=1e-6)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], ct.spacing[1:])
        assert float(ds.SliceThickness) == ct.spacing[0]
        # PS3.15 basic profile: Type 2 identifiers present but empty, no dates or institution.
        assert not ds.get("PatientName") and not ds.get("PatientID") and not ds.get("PatientBirthDate")
        assert not ds.get("StudyDate") and "SeriesDate" not in ds and "InstitutionName" not in ds
        assert ds.PatientIdentityRemoved == "YES"
        series_uids.add(ds.SeriesInstanceUID)
    assert len(series_uids) == 1 and ct.meta["series_uid"] not in series_uids
    assert ds.SeriesDescription == "colorized CT"  # free text of the source can identify a patient
    with pytest.raises(InputError, match="already exists"):
        write_rgb_dicom(color, tmp_path / "dicom")


def test_rgb_dicom_keeps_patient_and_study_only_when_asked(color, tmp_path):
    source = Dataset()
    source.PatientName, source.PatientID, source.StudyInstanceUID = "Doe^Jane", "12345", "1.2.3.4"
    source.InstitutionName, source.StudyDate, source.SeriesNumber = "General Hospital", "20240102", 3
    written = write_rgb_dicom(color, tmp_path / "kept", keep_patient_info=True, source_datasets=[source])
    kept = pydicom.dcmread(written[0])
    assert (kept.PatientName, kept.PatientID, kept.StudyInstanceUID) == ("Doe^Jane", "12345", "1.2.3.4")
    assert (kept.InstitutionName, kept.StudyDate, kept.SeriesNumber) == ("General Hospital", "20240102", 1003)
    assert "PatientIdentityRemoved" not in kept
    removed = pydicom.dcmread(write_rgb_dicom(color, tmp_path / "removed", source_datasets=[source])[0])
    assert not removed.PatientName and removed.StudyInstanceUID != "1.2.3.4" and "InstitutionName" not in removed


@pytest.mark.parametrize("fused", [True, False])
def test_a_dense_voxel_takes_the_bone_color_of_a_pixel_it_shares_with_muscle(fused):
    # One network pixel class mix everywhere: 30 % bone, 70 % soft tissue, as on a thin rib at 3.5 mm. Voxels at
    # 700 HU (cortex) must show the bone's palette colour, voxels at 40 HU keep the network's mix exactly (all group
    # weights are 1 at or below 110 HU).
    shape = (2, 32, 32)
    top = torch.zeros((2, TOP_K, 8, 8), dtype=torch.uint8)
    mix = ["bone", "soft_tissue", "aorta", "fat"]
    top[:] = torch.tensor([CLASSES.index(n) for n in mix], dtype=torch.uint8).view(1, -1, 1, 1)
    prob = torch.zeros_like(top)
    prob[:, 0], prob[:, 1] = 77, 178
    chroma = Chroma(top, prob, CLASSES, 4, ((0, 0), (0, 0)), "handmade")
    hu = np.full(shape, 40, dtype=np.int16)
    hu[:, :, 12:20] = 700  # a band of cortex, in every network pixel's neighbourhood
    volume = Volume(hu, spacing=(2.0, 0.875, 0.875), meta={"modality": "CT"})
    palette = load_palette("anatomical")
    rib, muscle = palette.class_ab(["bone", "soft_tissue"])
    win = (300.0, 1800.0)  # 700 HU at 72 % grey, 40 HU at 36 %: both with room for chroma
    if fused:
        rgb = compose_chroma(volume, chroma, win, 1.0, device="cpu").rgb
        lab = srgb_to_lab(rgb)[..., 1:]
    else:  # the torch path (GPUs) with the same arithmetic
        lab = upsample_chroma(chroma, palette, torch.from_numpy(hu.astype(np.float32)), 0).numpy()
    # Within 1.5 a*b* units of the bone colour (8-bit rounding and the 1e-3 floor of soft tissue's weight); the mix
    # is 0.7 of the way to soft tissue, 10+ units away.
    cortex = lab[:, 4:28, 13:19]
    assert np.abs(cortex - rib).max() < 1.5, np.abs(cortex - rib).max()
    expected_mix = 0.3 * rib + 0.7 * muscle
    assert np.linalg.norm(expected_mix - rib) > 10.0
    soft = lab[:, 4:28, 2:8]
    assert np.abs(soft - expected_mix).max() < 1.5, np.abs(soft - expected_mix).max()
    # The names follow: the cortex is bone, the rest soft tissue (the pixel's most probable class).
    labels = chroma.most_probable(hu)
    assert (labels[:, :, 12:20] == CLASSES.index("bone") + 1).all()
    assert (labels[:, :, :12] == CLASSES.index("soft_tissue") + 1).all()
    assert chroma.class_at(0, 5, 14, 700.0)[0] == "bone" and chroma.class_at(0, 5, 5, 40.0)[0] == "soft_tissue"


@pytest.mark.parametrize("other", ["soft_tissue", "kidney"])
def test_a_voxel_denser_than_muscle_is_the_bone_of_its_pixel_not_the_muscle_but_an_organ_keeps_it(other):
    # A pixel 40 % vertebra, 60 % something else, as at a vertebral body's rim at 3.5 mm. A 180 HU voxel there is the
    # vertebra's cancellous bone when the other is muscle (skeletal muscle stays below about 100 HU, enhanced or not:
    # its weight is (210 - 180) / 100 = 0.3, so 0.6 x 0.3 < 0.4), but stays the organ's when the other is a kidney,
    # whose enhancing cortex reaches 150-250 HU (an organ's weight is 1 up to 200 HU). At 90 HU both keep the
    # network's most probable class.
    classes = (*CLASSES, "vertebrae_lumbar", "kidney")
    top = torch.zeros((1, TOP_K, 4, 4), dtype=torch.uint8)
    mix = ["vertebrae_lumbar", other, "aorta", "fat"]
    top[:] = torch.tensor([classes.index(n) for n in mix], dtype=torch.uint8).view(1, -1, 1, 1)
    prob = torch.zeros_like(top)
    prob[:, 0], prob[:, 1] = 102, 153
    chroma = Chroma(top, prob, classes, 4, ((0, 0), (0, 0)), "handmade")
    hu = np.full((1, 16, 16), 90, dtype=np.int16)
    hu[:, :, 8:] = 180
    labels = chroma.most_probable(hu)
    dense_name = "vertebrae_lumbar" if other == "soft_tissue" else other
    assert (labels[:, :, 8:] == classes.index(dense_name) + 1).all()
    assert (labels[:, :, :8] == classes.index(other) + 1).all()
    assert chroma.class_at(0, 3, 12, 180.0)[0] == dense_name and chroma.class_at(0, 3, 3, 90.0)[0] == other


@pytest.mark.parametrize("fused", [True, False])
def test_bone_is_named_by_what_its_cortex_encloses(fused):
    # Every network pixel: 30 % bone, 70 % soft tissue. One slice holds, at 1 mm pixels, in 40 HU tissue: a ring of
    # cortex (700 HU) around 120 HU marrow (a vertebral body); the same ring around 30 HU (the spinal canal); the same
    # ring open on one side around 120 HU (not enclosed); a ring around 120 HU of 60 x 60 mm (3600 mm², more than a
    # vertebral body: a pelvic or thoracic ring). Only the first is marrow: named and coloured bone. The canal keeps
    # the network's mix (all group weights are 1 at 30 HU; bone may lie below 60 HU inside a rim). The 120 HU
    # voxels that are not marrow keep the mix as 120 HU weighs it; the 40 HU tissue outside every ring takes soft
    # tissue's own colour: below 60 HU, bone is not named where no rim encloses it (`colorize.CORTEX_HU`). Where the
    # pixels hold 30 % bone and 70 % liver, a partial-volumed cortex of 200 HU around marrow is bone where it reaches
    # 700 HU somewhere (compact bone); the same ring that nowhere does (an enhancing kidney's cortex around its
    # medulla) is liver, inside and out. A rib's fatty marrow (20 HU) in a 36 mm² hole is bone, unlike the canal.
    size = 128
    top = torch.zeros((1, TOP_K, size // 4, size // 4), dtype=torch.uint8)
    mix = ["bone", "soft_tissue", "aorta", "fat"]
    top[:] = torch.tensor([CLASSES.index(n) for n in mix], dtype=torch.uint8).view(1, -1, 1, 1)
    prob = torch.zeros_like(top)
    prob[:, 0], prob[:, 1] = 77, 178
    top[0, 1, 0:8, 17:32] = CLASSES.index("liver")  # network pixels of the two faint rings
    chroma = Chroma(top, prob, CLASSES, 4, ((0, 0), (0, 0)), "handmade")
    hu = np.full((1, size, size), 40, dtype=np.int16)

    def ring(y0, x0, side, inside, open_side=False, cortex=700):
        hu[0, y0 : y0 + side, x0 : x0 + side] = cortex
        hu[0, y0 + 3 : y0 + side - 3, x0 + 3 : x0 + side - 3] = inside
        if open_side:
            hu[0, y0 + side // 2 - 2 : y0 + side // 2 + 2, x0 : x0 + 3] = inside
        return (0, slice(y0 + 5, y0 + side - 5), slice(x0 + 5, x0 + side - 5))  # well inside, away from cortex

    body, canal, opened = ring(4, 4, 30, 120), ring(4, 44, 20, 30), ring(44, 4, 30, 120, open_side=True)
    large = ring(44, 44, 66, 120)
    fatty_rib = ring(80, 4, 12, 20)
    ring(4, 70, 24, 120, cortex=200)
    hu[0, 4:7, 70:73] = 700
    kidney = ring(4, 100, 24, 120, cortex=200)
    faint_cortex, kidney_cortex = (0, slice(4, 7), slice(74, 92)), (0, slice(4, 7), slice(100, 124))
    volume = Volume(hu, spacing=(2.0, 1.0, 1.0), meta={"modality": "CT"})
    chroma.enclosure = enclosure_bits(volume, chroma, torch.device("cpu"))
    labels = chroma.most_probable(hu)
    bone, soft = CLASSES.index("bone") + 1, CLASSES.index("soft_tissue") + 1
    assert (labels[body] == bone).all() and (labels[fatty_rib] == bone).all()
    assert all((labels[where] == soft).all() for where in (canal, opened, large))
    liver = CLASSES.index("liver") + 1
    assert (labels[faint_cortex] == bone).all()
    assert (labels[kidney_cortex] == liver).all() and (labels[kidney] == liver).all()
    assert chroma.class_at(0, 19, 19, 120.0)[0] == "bone" and chroma.class_at(0, 59, 19, 120.0)[0] == "soft_tissue"
    palette = load_palette("anatomical")
    rib, muscle = palette.class_ab(["bone", "soft_tissue"])
    if fused:
        lab = srgb_to_lab(compose_chroma(volume, chroma, (100.0, 400.0), 1.0, device="cpu").rgb)[..., 1:]
    else:  # the torch path (GPUs) with the same arithmetic
        lab = upsample_chroma(chroma, palette, torch.from_numpy(hu.astype(np.float32)), 0).numpy()
    # 1.5 a*b* units: 8-bit rounding and the 1e-3 floor of soft tissue's weight; the mix is 10+ units from bone.
    assert np.abs(lab[body] - rib).max() < 1.5 and np.abs(lab[fatty_rib] - rib).max() < 1.5
    plain = (210.0 - 120.0) / 100.0 * (1.0 - 1e-3) + 1e-3  # soft tissue's weight at 120 HU (`PLAIN_FADE_HU`)
    mix_ab = (0.3 * rib + 0.7 * plain * muscle) / (0.3 + 0.7 * plain)
    assert np.linalg.norm(mix_ab - rib) > 10.0
    assert all(np.abs(lab[where] - mix_ab).max() < 1.5 for where in (opened, large))
    assert np.abs(lab[canal] - (0.3 * rib + 0.7 * muscle)).max() < 1.5
    outside = (0, slice(114, 126), slice(2, 40))
    assert (labels[outside] == soft).all() and np.abs(lab[outside] - muscle).max() < 1.5
    # A plane composed alone (what the viewer recolors first) keeps the marrow of the whole slice: within one 8-bit
    # code (another CPU may vectorise a band and a whole slice differently); marrow lost would move it by far more.
    for axis, index in ((1, 19), (2, 19)):
        plane = compose_plane(volume, chroma, axis, index, (100.0, 400.0), 1.0, "cpu")
        whole = compose_chroma(volume, chroma, (100.0, 400.0), 1.0, device="cpu").rgb
        diff = np.abs(plane.astype(int) - (whole[:, index] if axis == 1 else whole[:, :, index]))
        assert diff.max() <= 1, (axis, diff.max())


def test_a_plane_composed_alone_equals_that_plane_of_the_whole_volume(ct, model):
    # An odd in-plane size, so the network's padding and pixel grid do not line up with the crop (what the viewer
    # recolors first, in any orientation, must be what the full recomposition then writes there). The same kernel on
    # the same inputs: identical here; one 8-bit code of slack on 0.1 % of voxels in case another CPU's pooling
    # vectorises a band and a whole slice differently.
    volume = Volume(ct.array[:6, 40:341, 13:300], ct.spacing, meta=ct.meta)
    chroma = predict_chroma(volume, model, device="cpu")
    assert chroma.pad != ((0, 0), (0, 0))
    whole = compose_chroma(volume, chroma, "abdomen", 0.8, device="cpu", palette="dicom").rgb
    for axis in (0, 1, 2):
        for index in (0, 1, 2, 3, 5, 150, volume.shape[axis] - 2, volume.shape[axis] - 1):
            if index >= volume.shape[axis]:
                continue
            plane = compose_plane(volume, chroma, axis, index, "abdomen", 0.8, device="cpu", palette="dicom")
            diff = np.abs(plane.astype(int) - np.take(whole, index, axis=axis))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (axis, index, diff.max())
    with pytest.raises(InputError):
        compose_plane(volume, chroma, 1, volume.shape[1], "abdomen")


def test_axial_view_matches_simpleitk_dicom_orient_for_every_axial_storage_order():
    """`AxialView` (what a canonical colorizer's slices are moved by) against SimpleITK's own reorientation to
    LPS (``DICOMOrient``) for the 16 axial storage orders: rows and columns swapped or not, each axis reversed or not.
    The moved arrays equal SimpleITK's, whose direction is then the identity, and `to_view`/`from_view` undo each
    other. A non-axial series (slices along left-right) is left as stored."""
    import itertools

    import SimpleITK as sitk

    from napari_ctcolor.engines.orientation import AxialView

    array = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    for swap, signs in itertools.product((False, True), itertools.product((1.0, -1.0), repeat=3)):
        direction = np.zeros((3, 3))
        direction[1 if swap else 0, 0], direction[0 if swap else 1, 1], direction[2, 2] = signs
        image = sitk.GetImageFromArray(array)
        image.SetDirection(direction.ravel().tolist())
        image.SetSpacing((0.7, 0.9, 3.0))
        reference = sitk.DICOMOrient(image, "LPS")
        assert np.allclose(np.reshape(reference.GetDirection(), (3, 3)), np.eye(3))
        view = AxialView.of(Volume(array, (3.0, 0.9, 0.7), (0.0, 0.0, 0.0), direction))
        spacing, (moved,) = view.arrays((3.0, 0.9, 0.7), array)
        np.testing.assert_array_equal(moved, sitk.GetArrayFromImage(reference))
        assert spacing == pytest.approx(reference.GetSpacing()[::-1])
        plane = torch.from_numpy(array)
        assert torch.equal(view.from_view(view.to_view(plane)), plane)
        assert torch.equal(view.volume_to_view(plane), torch.from_numpy(moved))  # a 3D network's input
        assert torch.equal(view.volume_from_view(view.volume_to_view(plane)), plane)
    sagittal = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # slices along left-right
    assert AxialView.of(Volume(array, (3.0, 0.9, 0.7), (0.0, 0.0, 0.0), sagittal)) == AxialView()


def test_blood_as_bright_as_the_scans_own_blood_keeps_its_name_beside_bone():
    """A pixel 45 % vertebra, 55 % aorta, as where the aorta lies against the spine. A 550 HU voxel there is bone in a
    non-contrast scan (no blood that bright: named blood up to 60 HU, blood fades from 240 HU, `blood_fade`) and where
    too little blood is named to tell (400 HU), and aorta in a CT angiography whose named blood reaches 550 HU (blood
    keeps its weight up to 650 HU); at 900 HU it is bone in all. Through `most_probable` (``ctcolor colorize
    --classes``) and `class_at` (the pointer)."""
    from napari_ctcolor.engines.colorize import blood_fade

    assert blood_fade(None) == (400.0, 600.0) and blood_fade(60.0) == (240.0, 440.0)
    assert blood_fade(550.0) == (650.0, 850.0) and blood_fade(2000.0) == (800.0, 1000.0)
    classes = (*CLASSES, "vertebrae_lumbar")
    top = torch.zeros((1, TOP_K, 4, 4), dtype=torch.uint8)
    mix = ["aorta", "vertebrae_lumbar", "soft_tissue", "fat"]
    top[:] = torch.tensor([classes.index(n) for n in mix], dtype=torch.uint8).view(1, -1, 1, 1)
    prob = torch.zeros_like(top)
    prob[:, 0], prob[:, 1] = 140, 115
    hu = np.full((1, 16, 16), 550, dtype=np.int16)
    hu[:, :, 8:] = 900
    for fade, name in (
        (blood_fade(60.0), "vertebrae_lumbar"),
        (blood_fade(None), "vertebrae_lumbar"),
        (blood_fade(550.0), "aorta"),
    ):
        chroma = Chroma(top, prob, classes, 4, ((0, 0), (0, 0)), "handmade", blood_fade_hu=fade)
        labels = chroma.most_probable(hu)
        assert (labels[:, :, :8] == classes.index(name) + 1).all(), fade
        assert (labels[:, :, 8:] == classes.index("vertebrae_lumbar") + 1).all(), fade
        assert chroma.class_at(0, 3, 3, 550.0)[0] == name and chroma.class_at(0, 3, 12, 900.0)[0] == "vertebrae_lumbar"
