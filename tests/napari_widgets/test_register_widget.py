"""The "Register & checkerboard" widget in a real viewer (Xvfb + Mesa), driven as a user would.

The shared 30-slice CT is registered to a copy of itself deformed by a known smooth displacement, with the widget's
default model, the project's CT weights (the official brain-MRI checkpoint as model file where they are absent: its
gain on CT is modest, but NCC and label Dice must still improve).
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from napari_ctcolor.app import register_job
from napari_ctcolor.app.register_session import tile_edges
from napari_ctcolor.engines.checkerboard import checkerboard_mask
from napari_ctcolor.engines.register import global_ncc, load_registration_model
from napari_ctcolor.io import Volume, read_volume, write_nifti
from napari_ctcolor.napari import _register_outputs, _register_widget
from napari_ctcolor.napari._layers import image_layer_data, layer_attributes
from napari_ctcolor.napari._register_widget import MODEL_FILE, TITLE, RegisterWidget
from napari_ctcolor.windowing import window

from conftest import CT_DIR, SHARED_DATA, assert_documented, ct_weights_shipped, require_shared

PLUGIN = "napari-ctcolor"
TIMEOUT_MS = 90_000
CT = CT_DIR / "totalseg-body-3mm-30slices.nii.gz"
CT_LABELS = CT_DIR / "totalseg-body-3mm-30slices-labels.nii.gz"
CHECKPOINT = SHARED_DATA / "symnet-oasis" / "SYMNet_neurite_oasis_smo30_update_80000.pth"
AIR_HU = -1100.0  # the shared CT's minimum
OUTPUTS = ("checkerboard", "difference", "Jacobian")  # and "tile edges", checked on its own


@dataclass
class Pair:
    """The shared CT (fixed) and its deformed copy (moving) with both label maps."""

    moving_path: Path
    fixed: Volume
    moving: Volume
    fixed_labels: Volume
    moving_labels: Volume


def _field_image(ddf: np.ndarray, grid: Volume) -> sitk.Image:
    """A (Z, Y, X, 3) mm LPS field as the vector image `sitk.DisplacementFieldTransform` takes (over)."""
    image = sitk.GetImageFromArray(ddf.astype(np.float64), isVector=True)
    image.CopyInformation(grid.to_sitk())
    return image


def _resampled(volume: Volume, grid: Volume, ddf: np.ndarray, default: float, nearest: bool = False) -> Volume:
    """``volume`` on ``grid``, sampled at p + ddf(p) (SimpleITK)."""
    transform = sitk.DisplacementFieldTransform(_field_image(ddf, grid))
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(volume.to_sitk(), grid.to_sitk(), transform, interpolator, default)
    return Volume.from_sitk(out, meta=dict(volume.meta))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the labels present in ``a`` (0 is background)."""
    labels = [v for v in np.unique(a) if v != 0]
    return float(np.mean([2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in labels]))


def _colorized(hu: np.ndarray) -> np.ndarray:
    """A stand-in "colorized" rendering, (Z, Y, X, 3) uint8: three windows of the CT, one per channel."""
    channels = [window(hu, 40, 400), window(hu, -600, 1500), window(hu, 400, 1800)]
    return np.rint(np.stack(channels, axis=-1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    require_shared(CT)
    if not ct_weights_shipped():  # the widget then needs the official checkpoint
        require_shared(CHECKPOINT)
    fixed, fixed_labels = read_volume(CT), read_volume(require_shared(CT_LABELS))
    # A smooth deformation of up to 5 mm per axis with wavelengths around 150 mm: moving(p) = fixed(p + d(p)).
    index = np.indices(fixed.shape)[::-1].reshape(3, -1)
    points = (fixed.affine[:3, :3] @ index + fixed.affine[:3, 3:]).T.reshape(*fixed.shape, 3)
    rng = np.random.default_rng(5)
    d = np.zeros((*fixed.shape, 3))
    for c in range(3):
        k = rng.normal(size=3) * 2 * np.pi / 150.0
        d[..., c] = 5.0 * np.sin(points @ k + rng.uniform(0, 2 * np.pi))
    moving = _resampled(fixed, fixed, d, AIR_HU)
    moving_labels = _resampled(fixed_labels, fixed, d, 0, nearest=True)
    moving_path = write_nifti(moving, tmp_path_factory.mktemp("pair") / "deformed.nii.gz")
    return Pair(moving_path, fixed, moving, fixed_labels, moving_labels)


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    """Messages the widget shows with napari's show_error."""
    shown: list[str] = []
    monkeypatch.setattr(_register_widget, "show_error", shown.append)
    return shown


@pytest.fixture
def engine_calls(monkeypatch) -> list[tuple]:
    """Counts registrations: every call of the engine the widget makes."""
    calls: list[tuple] = []
    engine = register_job.iter_register

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return engine(*args, **kwargs)

    monkeypatch.setattr(register_job, "iter_register", counting)
    return calls


def open_widget(viewer, fixed, moving, prealign: str = "off", refine: int | None = 0) -> RegisterWidget:
    """The widget as the Plugins menu opens it, on the CPU, with the CT weights (else the official checkpoint).

    It opens on the model card's defaults ("auto" both); the tests of other things than the pre-alignment and the
    refinement run the network alone (``prealign="off"``, ``refine=0``), which is quicker. ``refine=None`` keeps auto.
    """
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Register & checkerboard")
    assert isinstance(widget, RegisterWidget)
    assert widget.prealign.value == "auto" and widget.refine.value == -1 and widget.refine.native.text() == "auto"
    widget.fixed.value, widget.moving.value = fixed, moving
    if not ct_weights_shipped():
        widget.model.value = MODEL_FILE
        widget.model_file.value = CHECKPOINT
    widget.device.value = "cpu"
    widget.prealign.value = prealign
    if refine is not None:
        widget.refine.value = refine
        assert widget.refine.native.text() == str(refine)
    return widget


def click_and_wait(qtbot, widget: RegisterWidget, button) -> None:
    button.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)


def layer(viewer, name: str):
    """The layer called ``name``; exactly one may exist (re-runs replace, never stack)."""
    found = [lyr for lyr in viewer.layers if lyr.name == name]
    assert len(found) == 1, [lyr.name for lyr in viewer.layers]
    return found[0]


def assert_on_fixed_grid(out, fixed) -> None:
    assert out.data.shape[:3] == fixed.data.shape
    for key, value in layer_attributes(fixed).items():
        if key != "metadata":
            np.testing.assert_allclose(layer_attributes(out)[key], value, atol=1e-9, err_msg=key)


def test_registration_shows_warped_checkerboard_difference_jacobian_and_the_slider_only_redraws(
    make_napari_viewer, qtbot, pair, engine_calls, errors, monkeypatch
):
    viewer = make_napari_viewer()
    fixed = viewer.open(str(CT), plugin=PLUGIN)[0]
    moving = viewer.open(str(pair.moving_path), plugin=PLUGIN)[0]
    widget = open_widget(viewer, fixed, moving)
    assert not widget.warp_color.enabled  # no colorized twin yet

    started = time.perf_counter()
    click_and_wait(qtbot, widget, widget.run_button)
    seconds = time.perf_counter() - started
    assert not errors and engine_calls == [fixed.data.shape]
    assert widget.progress_bar.value == widget.progress_bar.max > 1 and widget.progress_bar.native.isHidden()
    warped = layer(viewer, f"{moving.name} warped")
    board, difference, jacobian = (layer(viewer, name) for name in OUTPUTS)
    for out in (warped, board, difference, jacobian):
        assert_on_fixed_grid(out, fixed)
    assert [lyr.name for lyr in viewer.layers][-2:] == ["checkerboard", "tile edges"]  # on top, where one looks
    assert viewer.layers.selection.active is board  # its HU in the status bar, not the hidden outlines'
    # Tile outlines in the displayed plane only: lines, never a whole slice; they follow the view. They start
    # hidden (they sit where the eye looks for steps), and stay as the user leaves them whatever the view buttons do.
    edges = layer(viewer, "tile edges")
    assert_on_fixed_grid(edges, fixed)
    assert not edges.visible
    np.testing.assert_array_equal(edges.data, tile_edges(pair.fixed, 20.0, (1, 2)))
    assert 0 < edges.data.mean() < 0.3 and edges.data.reshape(edges.data.shape[0], -1).mean(axis=1).max() < 0.3
    view_buttons = {button.text: button for button in widget[-1]}
    view_buttons["Coronal"].native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)  # the outlines are redrawn in a worker
    np.testing.assert_array_equal(edges.data, tile_edges(pair.fixed, 20.0, (0, 2)))
    for shown in (True, False):  # the user shows the outlines, then hides them again
        edges.visible = shown
        for plane in ("Sagittal", "Axial", "Coronal", "Axial"):
            view_buttons[plane].native.click()
            qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
            assert edges.visible is shown, plane
    np.testing.assert_array_equal(edges.data, tile_edges(pair.fixed, 20.0, (1, 2)))
    np.testing.assert_allclose(warped.contrast_limits, moving.contrast_limits)
    result = widget.result
    np.testing.assert_array_equal(warped.data, result.warped.array)
    # The difference in HU with both sides clipped to -1000..400 HU, opaque at +-400 HU, whatever the fixed layer's
    # window: the lungs' misalignment shows under a soft-tissue window, and a window change redraws nothing.
    expected = np.clip(fixed.data, -1000, 400) - np.clip(result.warped.array, -1000, 400)
    expected[~result.covered] = 0.0  # where the map leads beyond the moving scan (its first and last slices)
    np.testing.assert_allclose(difference.data, expected, atol=1e-3)
    assert tuple(difference.contrast_limits) == (-400.0, 400.0)
    lungs = (fixed.data < -600) & (result.warped.array < -600)
    assert lungs.sum() > 1000 and np.abs(difference.data[lungs]).mean() > 10  # lung texture, not clipped away
    shown = difference.data
    fixed.contrast_limits = (-1350.0, 150.0)  # the lung window
    qtbot.wait(400)
    assert difference.data is shown and tuple(difference.contrast_limits) == (-400.0, 400.0)
    low, high = difference.contrast_limits
    np.testing.assert_array_equal(jacobian.data, result.jacobian.array)
    assert low == -high and tuple(jacobian.contrast_limits) == (0.0, 2.0)
    # Each contrast slider spans the data and the window together (the data's extremes are found in the run's and
    # the checkerboard's workers, not in the viewer's thread): float32 extremes, compared within 1e-4.
    for out in (warped, board, difference, jacobian):
        lo, hi = out.contrast_limits
        spans = (min(float(out.data.min()), lo), max(float(out.data.max()), hi))
        np.testing.assert_allclose(out.contrast_limits_range, spans, rtol=0, atol=1e-4, err_msg=out.name)
    # Overlays over the CT: translucent, clear where nothing changed, opaque at the range's ends, with a colour bar;
    # the widget states the sign conventions.
    for overlay, clear in ((difference, 0.0), (jacobian, 1.0)):
        assert overlay.blending == "translucent" and overlay.colorbar.visible and not overlay.visible
        lo, hi = overlay.contrast_limits
        alpha = overlay.colormap.map(np.array([0.0, (clear - lo) / (hi - lo), 1.0]))[:, 3]
        assert alpha[1] < 0.05 and alpha[0] == alpha[2] == 1.0
    assert "fixed - warped" in widget.summary.value and "compressed" in widget.summary.value

    # Numbers: NCC rises; they are shown in the widget with the folding and the time.
    m = result.metrics
    assert m["ncc_after"] > m["ncc_before"] and m["refine_iterations"] == 0 and not m["affine"]
    assert "pre-alignment off, refine 0" in widget.summary.value
    assert m["warnings"] == [] and "⚠" not in widget.summary.value  # a sound registration shows no warning
    assert m["folding_fraction"] <= 5e-4  # the target, at most 0.05 % of the voxels
    assert f"NCC {m['ncc_before']:.3f} -> {m['ncc_after']:.3f}" in widget.summary.value
    assert "folding" in widget.summary.value and f"{m['seconds']:.1f} s" in widget.summary.value
    near_one = np.mean((result.jacobian.array >= 0.95) & (result.jacobian.array <= 1.05), where=fixed.data > -500)
    assert m["jacobian_body_near_1_fraction"] == pytest.approx(near_one, abs=0.01)  # body: > -500 HU, as measured
    assert f"{100 * m['jacobian_body_near_1_fraction']:.0f} % within 0.95-1.05" in widget.summary.value
    assert "no data" not in widget.summary.value  # one field of view
    # The moving labels warped through the widget's displacement field (SimpleITK, nearest) overlap better.
    warped_labels = _resampled(pair.moving_labels, pair.fixed, result.ddf, 0, nearest=True)
    dice_before = _dice(pair.fixed_labels.array, pair.moving_labels.array)
    dice_after = _dice(pair.fixed_labels.array, warped_labels.array)
    print(
        f"\nwidget, deformed CT: NCC {m['ncc_before']:.4f} -> {m['ncc_after']:.4f}, label Dice {dice_before:.4f} -> "
        f"{dice_after:.4f}, folding {m['folding_fraction']:.2e}, engine {m['seconds']:.2f} s, click to layers "
        f"{seconds:.2f} s"
    )
    assert dice_after > dice_before + (0.15 if m["model"] == "ct" else 0.0)  # measured with the CT weights: +0.24

    # The checkerboard alternates 20 mm tiles of fixed and warped; the slider redraws it without registering again.
    mask = checkerboard_mask(fixed.data.shape, pair.fixed.spacing, 20.0)
    np.testing.assert_array_equal(board.data, np.where(mask, fixed.data, result.warped.array))
    drawn = board.data.copy()
    # A slider dragged through many values: each redraw is computed in a worker, and while one is, only the newest
    # value waits; the checkerboard ends at the last value.
    computed = []
    draw = _register_outputs._board_images
    monkeypatch.setattr(_register_outputs, "_board_images", lambda *a: (computed.append(a[1].tile_mm), draw(*a))[1])
    for tile in (10.0, 14.0, 18.0, 22.0, 26.0, 35.0):
        widget.tile_mm.value = tile
    assert widget.busy
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert computed == [10.0, 35.0] and layer(viewer, "checkerboard") is board
    mask = checkerboard_mask(fixed.data.shape, pair.fixed.spacing, 35.0)
    np.testing.assert_array_equal(board.data, np.where(mask, fixed.data, result.warped.array))
    assert not np.array_equal(board.data, drawn)
    # "Before registration": the same tiles from the moving image as it was (same grid here), then back.
    widget.before.value = True
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    np.testing.assert_array_equal(board.data, np.where(mask, fixed.data, moving.data))
    widget.before.value = False
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    np.testing.assert_array_equal(board.data, np.where(mask, fixed.data, result.warped.array))
    assert len(engine_calls) == 1

    # Colorized twins: the widget offers to warp the moving one; running again replaces every layer, and the
    # checkerboard compares the colours.
    transforms = {k: v for k, v in layer_attributes(fixed).items() if k != "metadata"}
    fixed_rgb, moving_rgb = _colorized(pair.fixed.array), _colorized(pair.moving.array)
    viewer.add_image(fixed_rgb, rgb=True, name=f"{fixed.name} colorized", **transforms)
    viewer.add_image(moving_rgb, rgb=True, name=f"{moving.name} colorized", **transforms)
    assert widget.fixed.value is fixed and widget.moving.value is moving  # layer changes keep the choices
    assert widget.warp_color.enabled and widget.warp_color.value
    names = [lyr.name for lyr in viewer.layers]
    engine_total = widget.progress_bar.max
    click_and_wait(qtbot, widget, widget.run_button)
    assert not errors and len(engine_calls) == 2
    assert widget.progress_bar.value == widget.progress_bar.max == engine_total + 1  # the colour warp: one step more
    assert sorted(lyr.name for lyr in viewer.layers) == sorted([*names, f"{moving.name} colorized warped"])
    assert layer(viewer, f"{moving.name} warped") is warped and layer(viewer, "Jacobian") is jacobian
    board = layer(viewer, "checkerboard")
    assert board.rgb and board.data.shape == (*fixed.data.shape, 3)
    assert_on_fixed_grid(board, fixed)
    warped_rgb = layer(viewer, f"{moving.name} colorized warped").data
    mask = checkerboard_mask(fixed.data.shape, pair.fixed.spacing, 35.0)
    np.testing.assert_array_equal(board.data, np.where(mask[..., None], fixed_rgb, warped_rgb))
    ncc = [global_ncc(torch.from_numpy(fixed_rgb), torch.from_numpy(rgb)) for rgb in (moving_rgb, warped_rgb)]
    print(f"colour NCC, fixed twin vs moving twin {ncc[0]:.4f}, vs warped twin {ncc[1]:.4f}")
    assert ncc[1] > ncc[0]

    # Unticking the colour warp redraws the grey checkerboard from the kept result, again without registering.
    widget.warp_color.value = False
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    board = layer(viewer, "checkerboard")
    assert not board.rgb and len(engine_calls) == 2
    np.testing.assert_array_equal(board.data, np.where(mask, fixed.data, widget.result.warped.array))

    # Fixed and warped side by side: napari's grid, two viewboxes under the viewer's one camera (one zoom, one slice),
    # fixed on the left, every other layer hidden meanwhile; a window set on either is both's.
    warped = layer(viewer, f"{moving.name} warped")
    visible_before = [lyr.name for lyr in viewer.layers if lyr.visible]
    assert widget.side_by_side.enabled
    widget.side_by_side.value = True
    layers = list(viewer.layers)
    assert viewer.grid.enabled and {lyr.name for lyr in layers if lyr.visible} == {fixed.name, warped.name}
    assert viewer.grid.position(layers.index(fixed), layers) == (0, 0)
    assert viewer.grid.position(layers.index(warped), layers) == (0, 1)
    fixed.contrast_limits = (-160.0, 240.0)
    assert tuple(warped.contrast_limits) == (-160.0, 240.0)
    warped.contrast_limits = (-1350.0, 150.0)
    assert tuple(fixed.contrast_limits) == (-1350.0, 150.0)
    widget.warp_color.value = True  # in colour: the colorized twins side by side
    widget.side_by_side.value = False
    widget.side_by_side.value = True
    assert {lyr.name for lyr in viewer.layers if lyr.visible} == {
        f"{fixed.name} colorized",
        f"{moving.name} colorized warped",
    }
    widget.side_by_side.value = False
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert not viewer.grid.enabled and [lyr.name for lyr in viewer.layers if lyr.visible] == visible_before


def test_unshipped_ct_model_and_bad_choices_are_one_line_errors_and_add_no_layers(
    make_napari_viewer, pair, engine_calls, errors
):
    viewer = make_napari_viewer()
    fixed = viewer.open(str(CT), plugin=PLUGIN)[0]
    moving = viewer.open(str(pair.moving_path), plugin=PLUGIN)[0]
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Register & checkerboard")
    assert widget.model.value == "ct" and widget.fixed.value is fixed and widget.moving.value is moving
    names = [lyr.name for lyr in viewer.layers]

    expected = []
    if not ct_weights_shipped():  # refused before any worker starts
        widget.run_button.native.click()
        expected.append("CT weights not found (weights/symnet-ct.safetensors); choose Model 'model file...'")
    widget.model.value = MODEL_FILE
    widget.model_file.value = Path("missing.pth")
    widget.run_button.native.click()
    expected.append("choose a SYMNet model file")
    if not torch.cuda.is_available():
        widget.model_file.value = CHECKPOINT
        widget.device.value = "cuda"
        widget.run_button.native.click()
        expected.append("no CUDA GPU")

    assert len(errors) == len(expected) and all("\n" not in e for e in errors)
    assert all(e in shown for e, shown in zip(expected, errors, strict=True)), errors
    assert not widget.busy and engine_calls == [] and widget.result is None
    assert [lyr.name for lyr in viewer.layers] == names and widget.run_button.enabled


def test_auto_settings_take_the_cards_defaults_and_a_doubtful_registration_says_so(
    make_napari_viewer, qtbot, pair, monkeypatch, errors
):
    if not ct_weights_shipped():
        pytest.skip("the CT weights' card defaults (pre-alignment on, refinement) are what this checks")
    shown: list[str] = []
    monkeypatch.setattr(_register_widget, "show_warning", shown.append)
    totals: list[int] = []
    engine = register_job.iter_register

    def recording_engine(*args, **kwargs):  # the engine's own (done, total) steps, as the widget receives them
        steps = engine(*args, **kwargs)
        while True:
            try:
                done, total, *stage = next(steps)
            except StopIteration as stop:
                return stop.value
            totals.append(total)
            yield (done, total, *stage)

    monkeypatch.setattr(register_job, "iter_register", recording_engine)
    # An 8-slice crop of the CT, the same crop smoothly deformed (up to 8 mm) with a second scan's noise (15 HU; a
    # shift alone is registered by the pre-alignment alone, `stages.NETWORK_GAIN_MIN`), and noise on the same grid.
    from napari_ctcolor.training.symnet import deform_pair

    ct = pair.fixed
    crop = np.ascontiguousarray(ct.array[4:12, 18:82, 29:93])
    fixed_volume = Volume(crop, ct.spacing, ct.origin, ct.direction.copy(), {"modality": "CT"})
    spec = {"max_mm": 8.0, "control_mm": [30.0, 40.0], "noise_hu": [15.0, 15.0], "gain": [1, 1], "offset_hu": [0, 0]}
    deformed = deform_pair(crop.astype(np.float32), None, ct.spacing, np.random.default_rng(1), spec).moving[0, 0]
    shifted = fixed_volume.with_array(deformed.numpy().round().astype(np.int16))
    noise = fixed_volume.with_array(np.random.default_rng(0).integers(-1000, 1000, crop.shape).astype(np.int16))
    viewer = make_napari_viewer()
    layers = []
    for volume, name in ((fixed_volume, "crop"), (shifted, "shifted"), (noise, "noise")):
        data, kwargs, _ = image_layer_data(volume, name=name)
        layers.append(viewer.add_image(data, **kwargs))
    fixed, moving, unrelated = layers
    widget = open_widget(viewer, fixed, moving, prealign="auto", refine=None)

    # auto, auto: the CT card's pre-alignment and refinement; the bar's total is the engine's, refinement included;
    # the status line names each stage as it runs.
    said: list[str] = []
    shown_progress = widget.jobs.progress

    def progress_seen(step):  # the status line as each step left it
        shown_progress(step)
        said.append(widget.status.value)

    monkeypatch.setattr(widget.jobs, "progress", progress_seen)
    click_and_wait(qtbot, widget, widget.run_button)
    m, card = widget.result.metrics, load_registration_model("ct")
    iterations = card.refine.auto_iterations(crop.shape)
    assert card.prealign and iterations > 0  # the CT card's defaults
    assert not errors and m["affine"] and m["refine_iterations"] == iterations and m["warnings"] == []
    assert f"pre-alignment on, refine {iterations}" in widget.summary.value
    assert "⚠" not in widget.summary.value and not shown
    assert widget.progress_bar.value == widget.progress_bar.max == totals[-1] > 9  # 8 stages and refinement steps
    stages = [text.removeprefix(f"{TITLE}: ").removesuffix("...") for text in said if text.endswith("...")]
    named = ["pre-alignment", "resampling", "network", "refinement", "inversion", "warping", "metrics", "outputs"]
    assert [name for name in dict.fromkeys(stages) if name in named] == named, said

    # The crop shifted by 2 voxels with a second scan's noise: after the pre-alignment the images differ only by that
    # noise, and the summary says the pre-alignment alone is the registration, without the network (issue 82).
    second_scan = np.random.default_rng(1).normal(0.0, 15.0, crop.shape)
    data, kwargs, _ = image_layer_data(fixed_volume.with_array((np.roll(crop, 2, axis=2) + second_scan).round()))
    widget.moving.value = viewer.add_image(data, **{**kwargs, "name": "shifted 2 voxels"})
    click_and_wait(qtbot, widget, widget.run_button)
    m = widget.result.metrics
    assert not errors and m["prealigned_matched"] and m["jacobian_body_near_1_fraction"] == 1.0
    assert m["stage_seconds"]["forward"] < 0.01 and "refine" not in m["stage_seconds"]
    assert "the pre-alignment alone: after it the images differ only by noise" in widget.summary.value

    # Noise against the CT, the network alone: the registration finishes, its layers are added, and its warnings
    # show under the numbers and once as a napari warning.
    widget.moving.value = unrelated
    widget.prealign.value, widget.refine.value = "off", 0
    click_and_wait(qtbot, widget, widget.run_button)
    m = widget.result.metrics
    assert not errors and not m["affine"] and m["refine_iterations"] == 0
    assert "pre-alignment off, refine 0" in widget.summary.value
    assert m["warnings"] and any("local NCC" in w for w in m["warnings"]), m["warnings"]
    for warning in m["warnings"]:
        assert f"⚠ {html.escape(warning)}" in widget.summary.value
    assert len(shown) == 1 and all(warning in shown[0] for warning in m["warnings"])
    assert layer(viewer, "noise warped").data.shape == crop.shape

    # The same scan opened twice, auto settings: the identity without pre-alignment, network or refinement, and a
    # warning that the moving image may be the wrong series.
    data, kwargs, _ = image_layer_data(fixed_volume, name="crop again")
    widget.moving.value = viewer.add_image(data, **kwargs)
    widget.prealign.value, widget.refine.value = "auto", -1
    click_and_wait(qtbot, widget, widget.run_button)
    m = widget.result.metrics
    assert not errors and m["copies"] and not m["affine"] and m["refine_iterations"] == 0
    assert "pre-alignment off, refine 0" in widget.summary.value and "one scan twice" in widget.summary.value
    np.testing.assert_array_equal(layer(viewer, "crop again warped").data, crop)
    assert len(shown) == 2 and "one scan twice" in shown[1]

    # The same voxels placed two voxels further along x (another header): the pre-alignment alone registers them.
    origin = np.asarray(fixed_volume.origin) + fixed_volume.direction[:, 0] * 2 * fixed_volume.spacing[2]
    moved = Volume(crop, fixed_volume.spacing, tuple(origin), fixed_volume.direction.copy(), {"modality": "CT"})
    data, kwargs, _ = image_layer_data(moved, name="crop moved")
    widget.moving.value = viewer.add_image(data, **kwargs)
    click_and_wait(qtbot, widget, widget.run_button)
    m = widget.result.metrics
    assert not errors and m["prealigned_matched"] and m["affine"] and "refine" not in m["stage_seconds"]
    assert "the pre-alignment alone: after it the images differ only by noise" in widget.summary.value


def test_cancel_stops_inside_the_refinement_and_adds_no_layer(make_napari_viewer, qtbot, pair, monkeypatch, errors):
    steps: list[tuple[int, int]] = []
    engine = register_job.iter_register

    def slow(*args, **kwargs):
        # The engine's progress callback runs at the end of each stage and after every few demons iterations: 0.5 s
        # more per step gives time to click Cancel.
        return engine(*args, **kwargs, progress=lambda done, total: (steps.append((done, total)), time.sleep(0.5)))

    monkeypatch.setattr(register_job, "iter_register", slow)
    viewer = make_napari_viewer()
    fixed = viewer.open(str(CT), plugin=PLUGIN)[0]
    moving = viewer.open(str(pair.moving_path), plugin=PLUGIN)[0]
    widget = open_widget(viewer, fixed, moving, refine=1000)  # hundreds of refinement steps
    widget.run_button.native.click()
    aborted = []
    widget.worker.aborted.connect(lambda: aborted.append(True))
    assert widget.busy and widget.cancel_button.enabled and not widget.run_button.enabled
    # Four stages (model, resample, forward, integrate), then the refinement's steps.
    qtbot.waitUntil(lambda: len(steps) >= 6, timeout=TIMEOUT_MS)
    widget.cancel_button.native.click()
    # Said at once, before the worker reaches its next step; a second press is not offered.
    assert widget.status.value == "Register & checkerboard: cancelling (at the end of the current step)..."
    assert widget.busy and not widget.cancel_button.enabled
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    done, total = steps[-1]
    assert aborted and 6 <= done < total - 100, steps  # stopped inside the refinement, long before its end
    assert widget.progress_bar.max == total  # the engine's total, with the refinement's steps
    assert [lyr.name for lyr in viewer.layers] == [fixed.name, moving.name] and widget.result is None
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert widget.status.value == "Register & checkerboard: cancelled" and not errors


def test_an_unexpected_runtime_error_is_one_line_and_frees_the_widget(make_napari_viewer, qtbot, monkeypatch, errors):
    # superqt ends a worker that raised a RuntimeError without its finished signal: the widget must not stay busy.
    def broken(*args, **kwargs):
        yield 1, 7
        raise RuntimeError("input image smaller than kernel size\nmore detail")

    monkeypatch.setattr(register_job, "iter_register", broken)
    viewer = make_napari_viewer()
    volume = np.zeros((8, 16, 16), np.float32)
    widget = open_widget(viewer, viewer.add_image(volume, name="a"), viewer.add_image(volume, name="b"))
    click_and_wait(qtbot, widget, widget.run_button)
    assert errors == ["Register & checkerboard failed: input image smaller than kernel size"]
    assert widget.run_button.enabled and widget.result is None and len(viewer.layers) == 2


def _moved(volume: Volume, transform: sitk.Transform, default: float, nearest: bool = False) -> Volume:
    """``volume`` on its own grid sampled at transform(p), then exported 400 mm away: a prior scan in another frame."""
    image = volume.to_sitk()
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = Volume.from_sitk(sitk.Resample(image, image, transform, interpolator, default))
    origin = tuple(np.add(out.origin, (400.0, 0.0, 0.0)))
    return Volume(out.array, out.spacing, origin, out.direction, {"modality": "CT"})


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    return global_ncc(torch.from_numpy(np.asarray(a, dtype=np.float32)), torch.from_numpy(np.asarray(b, np.float32)))


def test_prealignment_registers_a_prior_scan_in_a_disjoint_frame(make_napari_viewer, qtbot, pair, errors):
    # The deformed CT, also turned 5 degrees and shifted 12 mm as a patient lies differently, in a frame 400 mm away.
    rigid = sitk.Euler3DTransform()
    image = pair.fixed.to_sitk()
    rigid.SetCenter(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    rigid.SetRotation(0.0, 0.0, np.deg2rad(5.0))
    rigid.SetTranslation((12.0, -8.0, 6.0))
    prior, prior_labels = _moved(pair.moving, rigid, AIR_HU), _moved(pair.moving_labels, rigid, 0, nearest=True)
    viewer = make_napari_viewer()
    fixed = viewer.open(str(CT), plugin=PLUGIN)[0]
    data, kwargs, _ = image_layer_data(prior, name="prior")
    moving = viewer.add_image(data, **kwargs)
    widget = open_widget(viewer, fixed, moving, prealign="off")

    click_and_wait(qtbot, widget, widget.run_button)  # without pre-alignment the frames do not even overlap
    assert len(errors) == 1 and "does not overlap" in errors[0] and "\n" not in errors[0]
    assert_documented(errors[0])
    assert [lyr.name for lyr in viewer.layers] == [fixed.name, "prior"] and widget.result is None

    widget.prealign.value = "on"
    click_and_wait(qtbot, widget, widget.run_button)
    assert len(errors) == 1 and widget.progress_bar.max == 8  # the pre-alignment is one stage more
    assert "pre-alignment on, refine 0" in widget.summary.value
    warped = layer(viewer, "prior warped")
    assert_on_fixed_grid(warped, fixed)
    result = widget.result
    m = result.metrics
    assert f"NCC {m['ncc_before']:.3f} -> {m['ncc_after']:.3f} (affine {m['ncc_prealigned']:.3f})" in (
        widget.summary.value
    )
    # Independent measures: NCC of the warped layer itself, and the prior's labels warped through the widget's field
    # (SimpleITK, nearest; the field maps fixed points to the prior's own frame) against the same arrays compared
    # voxel for voxel, the best a user could do without a registration (their frames do not overlap).
    ncc_voxelwise, ncc_after = _ncc(fixed.data, prior.array), _ncc(fixed.data, warped.data)
    warped_labels = _resampled(prior_labels, pair.fixed, result.ddf, 0, nearest=True)
    dice_voxelwise = _dice(pair.fixed_labels.array, prior_labels.array)
    dice_after = _dice(pair.fixed_labels.array, warped_labels.array)
    print(
        f"\naffine, disjoint frames: metrics NCC {m['ncc_before']:.4f} -> {m['ncc_prealigned']:.4f} -> "
        f"{m['ncc_after']:.4f}; voxelwise NCC {ncc_voxelwise:.4f} -> warped {ncc_after:.4f}; label Dice voxelwise "
        f"{dice_voxelwise:.4f} -> {dice_after:.4f}; folding {m['folding_fraction']:.2e}"
    )
    # Measured (CT weights / official checkpoint): metrics NCC 0.000 -> 0.893 -> 0.978 / 0.973, warped NCC 0.704 ->
    # 0.978 / 0.973 (+0.27 both), label Dice 0.211 -> 0.658 / 0.630 (+0.45 / +0.42). Thresholds keep a margin.
    assert m["ncc_before"] < 0.1 and m["ncc_prealigned"] > 0.8 and m["ncc_after"] > m["ncc_prealigned"]
    assert ncc_after == pytest.approx(m["ncc_after"], abs=0.005)  # the same images: measured equal to 1e-4
    assert ncc_after > ncc_voxelwise + 0.15
    assert dice_after > dice_voxelwise + 0.3
    assert m["folding_fraction"] <= 5e-4


def test_a_moving_scan_with_a_shorter_field_of_view_shows_no_change_where_it_has_no_data(
    make_napari_viewer, qtbot, pair, errors
):
    """The deformed CT without its last 8 slices (24 mm): the warped image holds air there, which is no data, not a
    change; the difference is left clear there and the summary says how much of the body the moving scan misses."""
    cut = Volume(pair.moving.array[:-8], pair.moving.spacing, pair.moving.origin, pair.moving.direction)
    viewer = make_napari_viewer()
    fixed = viewer.open(str(CT), plugin=PLUGIN)[0]
    data, kwargs, _ = image_layer_data(cut, name="shorter")
    moving = viewer.add_image(data, **kwargs)
    widget = open_widget(viewer, fixed, moving)
    click_and_wait(qtbot, widget, widget.run_button)
    assert not errors, errors
    result, difference = widget.result, layer(viewer, "difference")
    # Independent reference: each fixed voxel centre p mapped to p + ddf(p), in the shorter scan's voxel indices, lies
    # within its first and last voxel centres (what linear sampling reads without the zeros outside).
    index = np.indices(pair.fixed.shape)[::-1].reshape(3, -1)
    points = pair.fixed.affine[:3, :3] @ index + pair.fixed.affine[:3, 3:] + result.ddf.reshape(-1, 3).T
    inside = np.linalg.solve(cut.affine[:3, :3], points - cut.affine[:3, 3:])
    limits = np.array(cut.shape[::-1])[:, None] - 1
    reference = np.all((inside >= -1e-4) & (inside <= limits + 1e-4), axis=0).reshape(pair.fixed.shape)
    assert np.mean(result.covered != reference) < 1e-3  # float32 against float64 on the boundary
    body = fixed.data > -500
    # None beyond the cut; inside it all but the body at the image's sides, which the deformation moves out of it.
    assert not result.covered[-6:].any() and np.mean(result.covered[4:-12][body[4:-12]]) > 0.98
    assert np.all(difference.data[~result.covered] == 0.0)
    changed = np.abs(np.clip(fixed.data, -1000, 400) - np.clip(result.warped.array, -1000, 400)) > 100
    assert (changed & body & ~result.covered).sum() > 10000  # what the band had shown: fixed tissue against air
    m = result.metrics
    missed = 1.0 - m["overlap_fraction"]
    assert 0.15 < missed < 0.35 and np.mean(~result.covered[body]) == pytest.approx(missed, abs=0.03)
    assert f"no data on {100 * missed:.0f} % of the fixed image's body" in widget.summary.value


def _in_plane(image: np.ndarray, d: np.ndarray, spacing: float, default: float, nearest: bool = False) -> np.ndarray:
    """A 2D slice (Y, X) sampled at p + d(p), ``d`` (Y, X, 2) in mm along (x, y) (SimpleITK)."""
    grid = sitk.GetImageFromArray(image)
    grid.SetSpacing((spacing, spacing))
    field = sitk.GetImageFromArray(d.astype(np.float64), isVector=True)
    field.CopyInformation(grid)
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    transform = sitk.DisplacementFieldTransform(field)
    return sitk.GetArrayFromImage(sitk.Resample(grid, grid, transform, interpolator, default))


def test_two_2d_layers_register_in_plane_and_every_output_is_2d(make_napari_viewer, qtbot, pair, errors):
    k, spacing = 15, pair.fixed.spacing[1]
    fixed_hu, fixed_labels = pair.fixed.array[k], pair.fixed_labels.array[k]
    # A smooth in-plane deformation of up to 5 mm per axis, wavelengths around 150 mm.
    yx = np.indices(fixed_hu.shape).transpose(1, 2, 0)[..., ::-1] * spacing  # (x, y) mm
    rng = np.random.default_rng(7)
    d = np.stack([5.0 * np.sin(yx @ (rng.normal(size=2) * 2 * np.pi / 150.0) + rng.uniform(0, 6.3)) for _ in "xy"], -1)
    moving_hu = _in_plane(fixed_hu, d, spacing, AIR_HU)
    moving_labels = _in_plane(fixed_labels, d, spacing, 0, nearest=True)
    viewer = make_napari_viewer()
    placement = {"scale": (spacing, spacing), "translate": (-20.0, 35.0)}
    fixed = viewer.add_image(fixed_hu, name="fixed slice", **placement)
    moving = viewer.add_image(moving_hu, name="moving slice", **placement)
    widget = open_widget(viewer, fixed, moving)

    widget.prealign.value = "on"  # a 2D pair cannot be pre-aligned: one line, nothing added
    click_and_wait(qtbot, widget, widget.run_button)
    assert len(errors) == 1 and "pre-alignment works on 3D volumes" in errors[0] and "\n" not in errors[0]
    assert_documented(errors[0])
    assert len(viewer.layers) == 2 and widget.result is None
    widget.prealign.value = "off"
    click_and_wait(qtbot, widget, widget.run_button)
    assert len(errors) == 1
    result = widget.result
    m = result.metrics
    assert m["two_d"] and result.ddf.shape == (1, *fixed_hu.shape, 3) and np.all(result.ddf[..., 2] == 0.0)
    outputs = [layer(viewer, name) for name in ("moving slice warped", *OUTPUTS, "tile edges")]
    for out in outputs:
        assert out.ndim == 2 and out.data.shape == fixed_hu.shape, (out.name, out.data.shape)
        np.testing.assert_allclose(out.scale, fixed.scale)
        np.testing.assert_allclose(out.translate, fixed.translate)
    warped, board = outputs[0], outputs[1]
    np.testing.assert_array_equal(warped.data, result.warped.array[0])
    mask = checkerboard_mask(result.warped.shape, result.warped.spacing, 20.0)[0]
    np.testing.assert_array_equal(board.data, np.where(mask, fixed_hu, warped.data))

    # The labels follow the widget's field (mm along x, y -> pixels through the fixed grid's own axes).
    step = np.linalg.inv(result.warped.affine[:3, :3]) @ result.ddf[0].reshape(-1, 3).T  # (i, j, k) pixels
    rows, cols = np.indices(fixed_hu.shape).reshape(2, -1)
    sampled = ndimage.map_coordinates(moving_labels, [rows + step[1], cols + step[0]], order=0, cval=0)
    warped_labels = sampled.reshape(fixed_hu.shape)
    ncc_before, ncc_after = _ncc(fixed_hu, moving_hu), _ncc(fixed_hu, warped.data)
    dice_before, dice_after = _dice(fixed_labels, moving_labels), _dice(fixed_labels, warped_labels)
    print(
        f"\n2D pair: metrics NCC {m['ncc_before']:.4f} -> {m['ncc_after']:.4f}; NCC {ncc_before:.4f} -> "
        f"{ncc_after:.4f}; label Dice {dice_before:.4f} -> {dice_after:.4f}; folding {m['folding_fraction']:.2e}"
    )
    # Measured (CT weights / official checkpoint): NCC 0.939 -> 0.991 / 0.986 (+0.052 / +0.047), label Dice 0.574 ->
    # 0.834 / 0.746 (+0.26 / +0.17). Thresholds at about half the measured gains.
    assert m["ncc_after"] == pytest.approx(ncc_after, abs=0.005)
    assert ncc_after > ncc_before + 0.025
    assert dice_after > dice_before + (0.13 if m["model"] == "ct" else 0.08)
    assert m["folding_fraction"] <= 5e-4


@pytest.mark.slow  # the full OASIS pair: ~40 s on 2 CPU cores
@pytest.mark.numeric
def test_widget_with_the_official_checkpoint_reproduces_the_official_warped_image(make_napari_viewer, qtbot, errors):
    oasis = SHARED_DATA / "symnet-oasis"
    reference_path = require_shared(oasis / "reference-warped-B-to-A.nii.gz")
    for name in ("image_A_full_size.nii.gz", "image_B_full_size.nii.gz", CHECKPOINT.name):
        require_shared(oasis / name)
    viewer = make_napari_viewer()
    fixed = viewer.open(str(oasis / "image_A_full_size.nii.gz"), plugin=PLUGIN)[0]
    moving = viewer.open(str(oasis / "image_B_full_size.nii.gz"), plugin=PLUGIN)[0]
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Register & checkerboard")
    widget.fixed.value, widget.moving.value = fixed, moving
    widget.model.value = MODEL_FILE
    widget.model_file.value = CHECKPOINT
    widget.device.value = "cpu"
    click_and_wait(qtbot, widget, widget.run_button)
    assert not errors
    warped = layer(viewer, f"{moving.name} warped").data
    low, high = float(moving.data.min()), float(moving.data.max())
    # The reader stores these LIA volumes with their axes along LPS (SimpleITK's DICOMOrient): the reference too.
    reference = sitk.GetArrayFromImage(sitk.DICOMOrient(read_volume(reference_path).to_sitk(), "LPS"))
    diff = np.abs((warped - low) / (high - low) - reference)
    print(f"\nwidget vs official reference: max {diff.max():.2e}")
    assert diff.max() <= 1e-3
