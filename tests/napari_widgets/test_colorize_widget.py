"""The "Colorize volume" widget in a real viewer (Xvfb + Mesa), driven as a user would, and the RGB layer writers.

Runs use the shipped ``colorizer-2d`` weights (and ``colorizer-3d`` where that choice is tested); the cancel test uses a
tiny slowed-down colorizer.
"""

from __future__ import annotations

import json
import re
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_ctcolor.app import colorize_job
from napari_ctcolor.color import grey_to_lightness, srgb_to_lab
from napari_ctcolor.engines.body import body_mask
from napari_ctcolor.engines.colorize import colorize
from napari_ctcolor.engines.colorize.anatomy import family
from napari_ctcolor.io import ColorVolume, Volume, read_color_volume, read_volume, write_nifti
from napari_ctcolor.models.colorizer import Colorizer, ColorizerConfig
from napari_ctcolor.napari._colorize_widget import WEIGHTS_FILE, ColorizeWidget
from napari_ctcolor.napari._layers import image_layer_data, placement
from napari_ctcolor.napari._view import show_plane
from napari_ctcolor.palettes import load_palette
from napari_ctcolor.windowing import PRESETS, default_window, window

from conftest import CT_DIR, LUMINANCE_BOUND, assert_documented, require_shared, rotated_volume

PLUGIN = "napari-ctcolor"
TIMEOUT_MS = 60_000
CUT = CT_DIR / "totalseg-body-3mm-30slices.nii.gz"


MODEL: str | Colorizer = "colorizer-2d"


class SlowColorizer(Colorizer):
    """The tiny colorizer, 0.2 s per batch: a run long enough to cancel."""

    def __init__(self) -> None:
        super().__init__(ColorizerConfig(channels=(8, 16, 32, 64), classes=("air", "fat", "soft_tissue", "bone")))
        self.batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        time.sleep(0.2)
        return super().forward(x)


def show_classes(qtbot, viewer, widget: ColorizeWidget):
    """Click "Show colour classes" and wait for its layer (computed in a worker)."""
    widget.classes_button.native.click()
    qtbot.waitUntil(lambda: not widget.classes_busy, timeout=TIMEOUT_MS)
    name = f"{widget.session.current.ct.name} colour classes"
    return next(layer for layer in viewer.layers if layer.name == name)


def lightness_error(rgb: np.ndarray, hu: np.ndarray, win) -> float:
    return float(np.abs(srgb_to_lab(rgb)[..., 0] - grey_to_lightness(window(hu, *win))).max())


def open_widget(viewer, model=MODEL) -> ColorizeWidget:
    """The widget as the Plugins menu opens it, with the test model selected, on the CPU."""
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Colorize volume")
    assert isinstance(widget, ColorizeWidget)
    widget.add_model("test model", model)
    widget.device.value = "cpu"
    return widget


def click_and_wait(qtbot, widget: ColorizeWidget, button) -> None:
    button.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)


def view_3d(qtbot, widget: ColorizeWidget, preset: str) -> None:
    """Choose a 3D view and wait for its surfaces, computed in a worker."""
    widget.view_3d.value = preset
    qtbot.waitUntil(lambda: not widget.busy_3d, timeout=TIMEOUT_MS)


def test_run_colors_the_ct_and_settings_recompose_without_the_network(
    make_napari_viewer, qtbot, dicom_series, monkeypatch, errors
):
    predictions = []
    predict = colorize_job.iter_predict_chroma

    def counting_predict(*args, **kwargs):
        predictions.append(args[0].shape)
        return (yield from predict(*args, **kwargs))

    monkeypatch.setattr(colorize_job, "iter_predict_chroma", counting_predict)
    viewer = make_napari_viewer()
    ct = viewer.open(str(dicom_series), plugin=PLUGIN)[0]
    widget = open_widget(viewer)
    assert widget.ct_layer.value is ct
    # The series is contrast-enhanced (its header's ContrastBolusAgent): it opens in a window of its own (test_napari),
    # and both of its header's windows (40/300, the default, and 300/1500) are offered beside the presets (CTA among
    # them); the slider reaches the whole HU range.
    assert widget.window.value.startswith("contrast ") and tuple(ct.contrast_limits) != (-110.0, 190.0)
    shown = [widget.window.native.itemText(i) for i in range(widget.window.native.count())]
    assert shown[:2] == ["DICOM default", "DICOM 300/1500"] and "CTA" in shown and "cta" not in shown
    assert ct.contrast_limits_range[0] <= ct.data.min() and ct.contrast_limits_range[1] >= ct.data.max()
    widget.window.value = "DICOM 300/1500"
    assert tuple(ct.contrast_limits) == (-450.0, 1050.0)
    widget.window.value = "DICOM default"
    assert tuple(ct.contrast_limits) == (-110.0, 190.0)
    widget.window.value = "abdomen"
    assert (widget.centre_hu.value, widget.width_hu.value) == (40, 400)

    click_and_wait(qtbot, widget, widget.run_button)
    assert not errors
    layer = viewer.layers[f"{ct.name} colorized"]
    assert layer.rgb and layer.data.shape == (*ct.data.shape, 3) and layer.data.dtype == np.uint8
    np.testing.assert_allclose(layer.scale, ct.scale)
    np.testing.assert_allclose(layer.translate, ct.translate)
    assert layer.blending == "translucent" and list(viewer.layers) == [ct, layer]
    assert ct.interpolation2d == layer.interpolation2d == "linear"  # no blocky voxels when magnified
    assert lightness_error(layer.data, ct.data, PRESETS["abdomen"]) <= LUMINANCE_BOUND
    assert predictions == [ct.data.shape]
    assert viewer.layers.selection.active is ct  # napari's status bar shows the CT's HU, not the colour layer's RGB

    # The Pointer line under napari's cursor: the CT's HU at that voxel, its LPS position in mm, its slice and its
    # colour class; references from the series read again (SimpleITK-convention affine: index (i, j, k) -> LPS).
    reference = read_volume(dicom_series)
    for k, j, i in [(10, 200, 300), (3, 120, 400), (19, 256, 256)]:
        viewer.cursor.position = ct.data_to_world((k, j, i))
        fields = widget.pointer.value.split(" | ")
        assert fields[0] == f"HU {reference.array[k, j, i]:.0f}"
        x, y, z = (float(v.split(" ")[1]) for v in fields[1].removeprefix("LPS ").removesuffix(" mm").split(", "))
        np.testing.assert_allclose((x, y, z), (reference.affine @ [i, j, k, 1])[:3], atol=0.051)  # printed to 0.1 mm
        assert fields[2] == f"slice {k}/{ct.data.shape[0] - 1}"
        assert fields[3] == widget.describe((k, j, i))
    viewer.cursor.position = ct.data_to_world((0, -5, 0))  # outside the CT: nothing to say
    assert widget.pointer.value == ""

    # Chroma 0 and another window: recomposed from the kept chroma, the network does not run again.
    widget.chroma.value = 0.0
    widget.window.value = "lung"
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    grey = np.round(window(ct.data, *PRESETS["lung"]) * 255).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(layer.data[..., channel], grey)
    assert layer.metadata["ctcolor"]["colorize"]["window"] == [-600.0, 1500.0]
    # A recompose reads no model: the model menu left on "weights file..." without a file does not stop it.
    model = widget.model.value
    widget.model.value = WEIGHTS_FILE
    widget.chroma.value = 0.6
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert not errors and layer.metadata["ctcolor"]["colorize"]["chroma"] == 0.6
    assert lightness_error(layer.data[::5], ct.data[::5], PRESETS["lung"]) <= LUMINANCE_BOUND
    assert not np.array_equal(layer.data[..., 0], grey)  # coloured again
    assert len(predictions) == 1
    widget.model.value = model

    # Another palette: recomposed too, same luminance, other colours; the legend follows it.
    before = layer.data.copy()
    legend_before = widget.legend.value
    widget.palette.value = "dicom"
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert layer.metadata["ctcolor"]["colorize"]["palette"] == "dicom"
    assert lightness_error(layer.data[::5], ct.data[::5], PRESETS["lung"]) <= LUMINANCE_BOUND
    assert np.abs(layer.data.astype(int) - before).mean() > 2.0
    assert widget.legend.value != legend_before and "liver" in widget.legend_names()
    assert len(predictions) == 1

    # What a colour stands for: the class under a voxel inside the liver, and a Labels layer of the classes.
    liver = np.argwhere(ct.data[10] > 80)[0]  # a contrast-enhanced soft-tissue voxel of slice 10
    described = widget.describe((10, *liver))
    assert described.endswith(("(colour class, not a segmentation)", "(tissue; no structure above 50%)"))
    # A structure is named at 50 % or more, else its tissue with the summed share of that tissue's classes.
    chroma, seen = widget.session.current.chroma, set()
    for k, j, i in np.argwhere(ct.data[::4, ::16, ::16] > -500) * (4, 16, 16):
        name, probability = chroma.class_at(k, j, i, float(ct.data[k, j, i]))
        said = widget.describe((k, j, i))
        if name == "air":
            continue
        sure = probability >= 0.5
        seen.add(sure)
        tissue, share = chroma.tissue_at(k, j, i, float(ct.data[k, j, i]))
        assert said.startswith(f"{name} " if sure else f"{family(name).replace('_', ' ')} "), (said, name, probability)
        assert sure or (share >= probability and said.endswith("(tissue; no structure above 50%)")), said
    assert seen == {True, False}  # both kinds of voxel were met
    classes = show_classes(qtbot, viewer, widget)
    assert classes.name == f"{ct.name} colour classes" and classes.data.shape == ct.data.shape
    np.testing.assert_allclose(classes.scale, ct.scale)
    names = list(classes.features["color_class"])
    assert names[int(classes.data[10, liver[0], liver[1]])] == described.split(" ")[0]
    assert int(classes.data[0, 0, 0]) == 0  # air: no label
    # Drawn in the palette's colours (the one chosen, "dicom"), not napari's random label colours.
    palette = load_palette(widget.palette.value)
    shown = np.unique(classes.data[10])
    assert len(shown) > 3
    for label in shown[shown > 0]:
        want = np.array([*palette.class_rgb(names[label]), 255]) / 255.0
        np.testing.assert_allclose(classes.colormap.map(np.array([label]))[0], want, atol=1e-6)
    assert classes.colormap.map(np.array([0]))[0][3] == 0.0
    viewer.layers.remove(classes)

    # The 3D view leaves the patient table out: rows 215-244 of the 256 it keeps (every 2nd), behind the patient,
    # hold the table (above -400 HU) and nothing of the body; the skin surface of "soft tissue" stops at the body too.
    view_3d(qtbot, widget, "bone")
    bone = viewer.layers[f"{ct.name} 3D bone"]
    table = ct.data[:, ::2, ::2][:, 215:]
    assert bone.scale[1] == pytest.approx(2 * ct.scale[1]) and (table > -400).sum() > 1000
    assert np.all(bone.data[:, 215:] == 0) and (bone.data[:, :215] > 0.5).sum() > 1000
    view_3d(qtbot, widget, "soft tissue")
    skin = viewer.layers[f"{ct.name} 3D skin"]
    assert np.all(skin.data[:, 215:] < 0.5) and (skin.data[:, :215] > 0.5).sum() > 100000
    widget.view_3d.value = "off"
    assert viewer.dims.ndisplay == 2 and [lyr.name for lyr in viewer.layers] == [ct.name, layer.name]

    # Opacity only changes the layer; its contrast limits and gamma stay put (the window is the CT's), said so.
    widget.opacity.value = 0.4
    assert layer.opacity == pytest.approx(0.4) and not widget.busy
    layer.contrast_limits = (60.0, 120.0)
    layer.gamma = 0.5
    assert tuple(layer.contrast_limits) == (0.0, 255.0) and layer.gamma == 1.0 and not widget.busy
    assert "contrast stays fixed" in widget.status.value

    # Running again replaces the result layer instead of adding another.
    click_and_wait(qtbot, widget, widget.run_button)
    assert len(predictions) == 2
    assert [lyr.name for lyr in viewer.layers] == [ct.name, f"{ct.name} colorized"]
    assert widget.result_layer is viewer.layers[1]
    assert widget.model.value == "test model"  # layer changes reset choices; the added model stays
    assert widget.status.value.startswith("Colorize volume: ") and not errors


def test_result_overlays_an_oblique_ct_voxel_for_voxel(make_napari_viewer, qtbot, errors):
    volume = rotated_volume()  # oblique, flipped, anisotropic and only 5 x 6 pixels in plane
    data, kwargs, _ = image_layer_data(volume, name="oblique")
    viewer = make_napari_viewer()
    ct = viewer.add_image(data, **kwargs)
    widget = open_widget(viewer)
    click_and_wait(qtbot, widget, widget.run_button)
    assert not errors
    layer = viewer.layers["oblique colorized"]
    for index in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        np.testing.assert_allclose(layer.data_to_world(index), ct.data_to_world(index), atol=1e-6)
    win = default_window(volume)
    assert lightness_error(layer.data, volume.array, win) <= LUMINANCE_BOUND


def test_cancel_stops_a_slow_run_and_adds_no_layer(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    viewer.add_image(np.full((20, 64, 64), 40, dtype=np.int16), name="CT")
    slow = SlowColorizer()
    widget = open_widget(viewer, slow)
    widget.batch_size.value = 1
    widget.run_button.native.click()
    aborted = []
    widget.worker.aborted.connect(lambda: aborted.append(True))
    assert widget.busy and widget.cancel_button.enabled and not widget.run_button.enabled
    qtbot.waitUntil(lambda: slow.batches >= 1, timeout=TIMEOUT_MS)
    click_and_wait(qtbot, widget, widget.cancel_button)
    assert aborted and slow.batches < 20  # stopped between batches, long before the 20 slices
    assert [lyr.name for lyr in viewer.layers] == ["CT"] and widget.result_layer is None
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert widget.status.value == "Colorize volume: cancelled" and not errors


def test_problems_are_one_line_errors_and_the_viewer_carries_on(make_napari_viewer, qtbot, tmp_path, errors):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((3, 32, 32), dtype=np.int16), name="CT")
    widget = open_widget(viewer)

    widget.model.value = WEIGHTS_FILE
    widget.weights_file.value = tmp_path / "missing.safetensors"
    widget.run_button.native.click()  # refused before any worker starts
    assert not widget.busy and errors == ["choose a .safetensors weights file for the colorizer"]

    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    widget.weights_file.value = damaged
    click_and_wait(qtbot, widget, widget.run_button)  # fails inside the worker
    assert len(errors) == 2 and str(damaged) in errors[1] and "\n" not in errors[1]
    assert_documented(errors[1])
    assert [lyr.name for lyr in viewer.layers] == ["CT"] and widget.run_button.enabled

    if not torch.cuda.is_available():
        widget.model.value = "test model"
        widget.device.value = "cuda"
        widget.run_button.native.click()
        assert "no CUDA GPU" in errors[-1] and not widget.busy
        assert_documented(errors[-1])


def test_writer_saves_rgb_layers_as_nifti_rgb24_and_png_slices(make_napari_viewer, tmp_path):
    volume = rotated_volume()  # oblique, flipped, anisotropic: the affine path of the layer transforms
    rgb = np.random.default_rng(0).integers(0, 256, (*volume.shape, 3), dtype=np.uint8)
    viewer = make_napari_viewer()
    layer = viewer.add_image(rgb, rgb=True, **placement(ColorVolume.on_grid_of(volume, rgb)))

    written = layer.save(str(tmp_path / "colour.nii.gz"), plugin=PLUGIN)
    assert written == [str(tmp_path / "colour.nii.gz")]
    img, grey = nib.load(written[0]), nib.load(write_nifti(volume, tmp_path / "grey.nii.gz"))
    assert int(img.header["datatype"]) == 128
    np.testing.assert_allclose(img.affine, grey.affine, atol=1e-5)
    voxels = np.asarray(img.dataobj)
    np.testing.assert_array_equal(np.stack([voxels[c] for c in "RGB"], axis=-1).transpose(2, 1, 0, 3), rgb)

    written = layer.save(str(tmp_path / "stack.png"), plugin=PLUGIN)
    assert written == [str(tmp_path / "stack")]
    names = sorted(p.name for p in (tmp_path / "stack").iterdir())
    assert names == ["geometry.json", *(f"slice_{k:04d}.png" for k in range(4))]
    back = read_color_volume(tmp_path / "stack")  # the folder opens again as the same colour volume, in place
    np.testing.assert_array_equal(back.rgb, rgb)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)


def _cut_layer(viewer, z: slice = slice(12, 18)):
    """A few slices of the shared 3 mm CT (HU) as an image layer at their physical place: (layer, Volume)."""
    ct = read_volume(require_shared(CUT))
    origin = ct.affine[:3, :3] @ [0, 0, z.start] + ct.affine[:3, 3]
    volume = Volume(ct.array[z], ct.spacing, origin, ct.direction, dict(ct.meta))
    data, kwargs, _ = image_layer_data(volume, name="cut")
    return viewer.add_image(data, **kwargs), volume


def test_custom_window_entry_colors_with_exactly_that_centre_and_width(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    ct, volume = _cut_layer(viewer)
    widget = open_widget(viewer)
    assert not widget.centre_hu.enabled and not widget.width_hu.enabled
    widget.window.value = "custom"
    assert widget.centre_hu.enabled and widget.width_hu.enabled
    custom = (-35.0, 730.0)  # no preset has this centre or width
    widget.centre_hu.value, widget.width_hu.value = custom
    assert widget.window.value == "custom"
    assert tuple(ct.contrast_limits) == pytest.approx((-400.0, 330.0))  # the entry is shown on the CT layer too

    click_and_wait(qtbot, widget, widget.run_button)
    assert not errors
    layer = viewer.layers["cut colorized"]
    assert layer.metadata["ctcolor"]["colorize"]["window"] == list(custom)
    error = lightness_error(layer.data, volume.array, custom)
    # The check tells windows apart: the nearest preset, and the custom centre with another width, are far off.
    off = [lightness_error(layer.data, volume.array, win) for win in (PRESETS["abdomen"], (-35.0, 650.0))]
    print(f"\ncustom window: L* error {error:.3f}, against abdomen / width 650 instead: {off[0]:.2f} / {off[1]:.2f}")
    assert error <= LUMINANCE_BOUND  # measured 0.23
    assert min(off) > 3.0  # measured 35.7 (abdomen) and 6.0 (width 650)

    # Editing the entry after the run recomposes with exactly the new window.
    widget.width_hu.value = 250.0
    assert tuple(ct.contrast_limits) == pytest.approx((-160.0, 90.0))
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert layer.metadata["ctcolor"]["colorize"]["window"] == [-35.0, 250.0]
    assert lightness_error(layer.data, volume.array, (-35.0, 250.0)) <= LUMINANCE_BOUND
    assert widget.window.value == "custom" and not errors


def test_colorizer_3d_gives_other_colors_than_colorizer_2d_at_the_same_luminance(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    ct, volume = _cut_layer(viewer)
    widget = open_widget(viewer)  # colorizer-2d
    widget.window.value = "abdomen"
    click_and_wait(qtbot, widget, widget.run_button)
    layer = viewer.layers["cut colorized"]
    two_d = srgb_to_lab(layer.data)
    assert layer.metadata["ctcolor"]["colorize"]["model"] == "colorizer-2d"

    widget.model.value = "colorizer-3d"
    click_and_wait(qtbot, widget, widget.run_button)
    assert not errors and viewer.layers["cut colorized"] is layer  # replaced in place
    assert layer.metadata["ctcolor"]["colorize"]["model"] == "colorizer-3d"
    three_d = srgb_to_lab(layer.data)
    assert lightness_error(layer.data, volume.array, PRESETS["abdomen"]) <= LUMINANCE_BOUND
    colored = np.hypot(two_d[..., 1], two_d[..., 2]) > 10.0
    moved = np.hypot(*(three_d[..., c] - two_d[..., c] for c in (1, 2)))[colored]
    print(
        f"\n3d vs 2d: L* max diff {np.abs(three_d[..., 0] - two_d[..., 0]).max():.3f}, coloured share "
        f"{colored.mean():.3f}, a*b* distance mean {moved.mean():.2f}, median {np.median(moved):.2f}"
    )
    np.testing.assert_allclose(three_d[..., 0], two_d[..., 0], atol=2 * LUMINANCE_BOUND)  # measured at most 0.40
    assert moved.mean() > 2.5  # measured 5.2 on the coloured 61 % of the voxels (median 1.7)


def test_a_2d_slice_layer_gives_a_2d_rgb_result_in_place(make_napari_viewer, qtbot, errors):
    ct = read_volume(require_shared(CUT))
    hu = ct.array[15]
    viewer = make_napari_viewer()
    image = viewer.add_image(hu, scale=ct.spacing[1:], translate=(12.5, -40.0), name="slice")
    widget = open_widget(viewer)
    assert widget.ct_layer.value is image
    widget.window.value = "abdomen"
    click_and_wait(qtbot, widget, widget.run_button)
    assert not errors
    layer = viewer.layers["slice colorized"]
    assert layer.rgb and layer.ndim == 2 and layer.data.shape == (*hu.shape, 3) and layer.data.dtype == np.uint8
    for index in [(0, 0), (100, 121), (40, 77)]:
        np.testing.assert_allclose(layer.data_to_world(index), image.data_to_world(index), atol=1e-9)
    assert lightness_error(layer.data, hu, PRESETS["abdomen"]) <= LUMINANCE_BOUND
    # Independent path: the engine on the lone slice as a one-slice volume. (The network's context of a lone slice is
    # that slice three times, but a stack of three copies is not the same input: it has an extent through the plane,
    # which the anatomy step's island rule weighs.)
    reference = colorize(Volume(hu[None], (1.0, *ct.spacing[1:])), "colorizer-2d", "abdomen", device="cpu").rgb[0]
    diff = np.abs(layer.data.astype(int) - reference)
    print(f"\n2D layer vs engine on the lone slice: max {diff.max()}, share differing {(diff > 0).mean():.2e}")
    # Measured 0 in float32 on an AMD EPYC. Against the earlier three-slice reference, whose batch rounded the
    # network's floats differently, 4 of the 36,966 values differed by up to 4 codes in float32 on an Intel Xeon: the
    # composition keeps the 4 most probable classes, and a near-tie for the fourth can change hands with the rounding.
    assert (diff > 1).mean() <= 1e-3 and diff.max() <= 8

    classes = show_classes(qtbot, viewer, widget)  # the colour classes of a 2D result are 2D too, on its pixels
    assert classes.data.shape == hu.shape
    np.testing.assert_allclose(classes.scale, image.scale)
    body = body_mask(hu[None].astype(np.float32), ct.spacing)[0]
    y, x = np.argwhere((hu > 80) & body)[0]
    described = widget.describe((y, x))
    named = list(classes.features["color_class"])[int(classes.data[y, x])]
    assert described.split(" ")[0] == (named if "(colour class" in described else family(named).split("_")[0])
    y, x = np.argwhere((hu > 80) & ~body)[0]  # the table: no colour, no class, and the pointer says so
    assert classes.data[y, x] == 0 and widget.describe((y, x)) == "no colour (air or outside the body)"
    assert np.abs(layer.data[y, x].astype(int) - layer.data[y, x, 0]).max() == 0  # grey


def test_each_color_layer_keeps_following_its_own_ct_window(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    first, first_volume = _cut_layer(viewer, slice(12, 16))
    data, kwargs, _ = image_layer_data(first_volume, name="second cut")
    second = viewer.add_image(data[::-1].copy(), **kwargs)  # another CT: the slices in the other order
    widget = open_widget(viewer)
    widget.ct_layer.value = first
    click_and_wait(qtbot, widget, widget.run_button)
    widget.ct_layer.value = second
    click_and_wait(qtbot, widget, widget.run_button)
    first_color, second_color = viewer.layers["cut colorized"], viewer.layers["second cut colorized"]
    assert first_color.metadata["ctcolor"]["colorize"]["window"] == [40.0, 400.0]

    # Windowing the first CT still recolors the first colour layer (with the first CT's network output), and leaves
    # the second alone.
    second_before = second_color.data.copy()
    first.contrast_limits = PRESETS["lung"].limits
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert first_color.metadata["ctcolor"]["colorize"]["window"] == list(PRESETS["lung"])
    assert lightness_error(first_color.data, first.data, PRESETS["lung"]) <= LUMINANCE_BOUND
    np.testing.assert_array_equal(second_color.data, second_before)
    assert widget.ct_layer.value is first and widget.window.value == "lung"
    second.contrast_limits = PRESETS["bone"].limits  # and the second follows its own
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert second_color.metadata["ctcolor"]["colorize"]["window"] == list(PRESETS["bone"])
    assert lightness_error(second_color.data, second.data, PRESETS["bone"]) <= LUMINANCE_BOUND
    assert first_color.metadata["ctcolor"]["colorize"]["window"] == list(PRESETS["lung"]) and not errors

    # A run's CT and colour removed: the panel shows the run of the CT it now chooses (the first, whose legend is
    # its own); with that one removed too, no legend, status line or class button is left describing nothing the
    # viewer holds.
    assert widget.session.current.ct is second and widget.legend_names() and widget.status.value
    viewer.layers.remove(second_color)
    viewer.layers.remove(second)
    assert widget.ct_layer.value is first and widget.session.current is widget.session.run_of(first)
    assert widget.legend_names() and widget.classes_button.enabled
    viewer.layers.remove(first_color)
    assert widget.session.current is None and widget.legend_names() == [] and widget.status.value == ""
    assert not widget.classes_button.enabled


def test_the_window_menu_lists_each_header_window_once(make_napari_viewer):
    """A chest CT whose header repeats its first window (-450/2000 twice) shows it once, as "DICOM default"; a
    second, different window is listed by its values; a CT without a header window has a "default" named by its
    preset."""
    viewer = make_napari_viewer()
    meta = {"modality": "CT", "window": (-450.0, 2000.0), "windows": [(-450.0, 2000.0), (-450.0, 2000.0)]}
    viewer.add_image(np.zeros((4, 16, 16), np.int16), name="chest", metadata={"ctcolor": meta})
    widget = open_widget(viewer)
    shown = [widget.window.native.itemText(i) for i in range(widget.window.native.count())]
    assert shown[0] == "DICOM default" and not any(name.startswith("DICOM -450") for name in shown)
    meta = {**meta, "windows": [*meta["windows"], (40.0, 400.0)]}
    viewer.add_image(np.zeros((4, 16, 16), np.int16), name="abdomen", metadata={"ctcolor": meta})
    widget.ct_layer.value = viewer.layers["abdomen"]
    shown = [widget.window.native.itemText(i) for i in range(widget.window.native.count())]
    assert "DICOM 40/400" in shown and sum(name.startswith("DICOM") for name in shown) == 2
    # A NIfTI CT has no header window: its default is the abdomen preset, and the menu calls it so, not "DICOM".
    viewer.add_image(np.zeros((4, 16, 16), np.int16), name="nifti", metadata={"ctcolor": {"modality": "CT"}})
    widget.ct_layer.value = viewer.layers["nifti"]
    shown = [widget.window.native.itemText(i) for i in range(widget.window.native.count())]
    assert shown[0] == "default (abdomen)" and not any(name.startswith("DICOM") for name in shown)
    widget.window.value = "lung"
    widget.window.native.setCurrentIndex(0)  # as the user picks it
    assert (widget.centre_hu.value, widget.width_hu.value) == (40, 400)


def test_slab_mip_projects_the_ct_and_hides_its_colour_meanwhile(make_napari_viewer, qtbot, errors):
    """ "Slab MIP (mm)" on the 3 mm cut: a layer over the CT whose every voxel is the maximum of the CT over the slices
    within half the slab of its own (10.5 mm: 3 slices), along the axis the slider moves through (axial, then
    coronal), in the CT's window and following it; the colour layer hidden meanwhile and shown again at 0."""
    viewer = make_napari_viewer()
    ct = viewer.open(str(require_shared(CUT)), plugin=PLUGIN)[0]
    widget = open_widget(viewer)
    click_and_wait(qtbot, widget, widget.run_button)
    color = widget.result_layer
    assert color is not None and color.visible and not errors
    widget.slab.slider.value = 10.5
    qtbot.waitUntil(lambda: f"{ct.name} slab MIP" in viewer.layers and not widget.slab.busy, timeout=TIMEOUT_MS)
    mip = viewer.layers[f"{ct.name} slab MIP"]
    hu = ct.data.astype(np.int32)
    padded = np.concatenate((hu[:1], hu, hu[-1:]))  # the edge slices repeat (a slab cut by the volume's end)
    np.testing.assert_array_equal(mip.data, np.maximum(np.maximum(padded[:-2], padded[1:-1]), padded[2:]))
    assert not color.visible and tuple(mip.contrast_limits) == tuple(ct.contrast_limits)
    np.testing.assert_allclose(mip.data_to_world((3, 4, 5)), ct.data_to_world((3, 4, 5)))
    # The Pointer gives the slice's HU and, beside it, the slab's value that the screen shows there.
    where = (12, 50, 60)
    line = widget.classes.pointer_line(ct.data_to_world(where))
    assert line.startswith(f"HU {ct.data[where]:.0f} (slab MIP {mip.data[where]:.0f} over 10.5 mm) | "), line
    ct.contrast_limits = (-200.0, 300.0)
    assert tuple(mip.contrast_limits) == (-200.0, 300.0)
    show_plane(viewer, "coronal")  # along y now
    qtbot.waitUntil(lambda: not widget.slab.busy, timeout=TIMEOUT_MS)
    padded = np.concatenate((hu[:, :1], hu, hu[:, -1:]), axis=1)
    np.testing.assert_array_equal(mip.data, np.maximum(np.maximum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:]))
    widget.slab.slider.value = 0.0
    qtbot.waitUntil(lambda: f"{ct.name} slab MIP" not in viewer.layers, timeout=TIMEOUT_MS)
    assert color.visible and not errors


def legend_swatches(widget: ColorizeWidget) -> dict[str, np.ndarray]:
    """The legend's swatch of each class, as sRGB."""
    rows = re.findall(r"background-color:#([0-9a-f]{6})\">(?:&nbsp;)+</span> ([^<]+)", widget.legend.value)
    return {name: np.array([int(code[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.uint8) for code, name in rows}


def test_legend_swatches_look_as_their_classes_do_on_screen(make_napari_viewer, qtbot, errors, monkeypatch):
    """The 3 mm cut colorized in the abdomen window, then in the lung window: each swatch of a class on at least 2 %
    of the body is within 8 L* of the median lightness of the voxels named that class in the colour layer (the
    anatomical palette's own colours, drawn at its brightness as before, are up to 66 L* off on this cut: the
    liver's 28 against 55 in the abdomen window and 94 in the lung window), and the swatches follow the window.
    The classes' median HU are counted once, in the run's worker: on 275 slices of 512² that took 0.3 s of the
    viewer's main thread after the run and again after each window change."""
    from napari_ctcolor.engines.colorize import Chroma

    counted, class_hu = [], Chroma.class_hu

    def counting(self, hu):
        counted.append(threading.current_thread() is threading.main_thread())
        return class_hu(self, hu)

    monkeypatch.setattr(Chroma, "class_hu", counting)
    viewer = make_napari_viewer()
    viewer.open(str(require_shared(CUT)), plugin=PLUGIN)
    widget = open_widget(viewer)
    click_and_wait(qtbot, widget, widget.run_button)
    classes = show_classes(qtbot, viewer, widget)
    names = list(classes.features["color_class"])
    checked = {}
    for preset in ("abdomen", "lung"):
        widget.window.value = preset
        qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
        lightness = srgb_to_lab(widget.result_layer.data)[..., 0]
        swatches = legend_swatches(widget)
        body = classes.data > 0
        for name, rgb in swatches.items():
            named = classes.data == names.index(name)
            if named.sum() < 0.02 * body.sum():
                continue
            on_screen = float(np.median(lightness[named]))
            swatch = float(srgb_to_lab(rgb[None])[0, 0])
            checked[(preset, name)] = (round(swatch, 1), round(on_screen, 1))
            assert abs(swatch - on_screen) <= 8.0, (preset, name, swatch, on_screen)
    print(checked)
    assert len(checked) >= 6 and not errors
    assert counted == [False]  # once, in the worker
    fat = [checked[(p, "fat")][0] for p in ("abdomen", "lung") if (p, "fat") in checked]
    assert len(fat) == 2 and fat[1] > fat[0] + 20  # fat (-100 HU) is much lighter in the lung window


def test_cta_view_shows_the_enhanced_vessels_of_a_contrast_ct_red(make_napari_viewer, qtbot, dicom_series, errors):
    """The CTA 3D view of the contrast series (portal-venous: the blood the colorizer names has a median of 102 HU)
    keeps its red vessel surface, which the non-contrast CT's CTA view leaves out (test_viewer_workflow). A
    portal-venous aorta lies near the surface's 150 HU (median 151 HU in its TotalSegmentator label), so the red
    covers a part of it: 8.9 % of its voxels above 150 HU, 24 % above 180 HU (2026-11-27)."""
    from napari_ctcolor.engines.geometry import resample_onto

    viewer = make_napari_viewer()
    ct = viewer.open(str(dicom_series), plugin=PLUGIN)[0]
    widget = open_widget(viewer)
    click_and_wait(qtbot, widget, widget.run_button)
    view_3d(qtbot, widget, "CTA")
    assert [lyr.name for lyr in viewer.layers if lyr.visible] == [f"{ct.name} 3D bone", f"{ct.name} 3D vessels"]
    assert "no vessels shown" not in widget.status.value and not errors
    red_layer = viewer.layers[f"{ct.name} 3D vessels"]
    s = int(round(red_layer.scale[1] / ct.scale[1]))
    volume = read_volume(dicom_series)
    labels = resample_onto(
        read_volume(require_shared(CT_DIR / "totalseg-abdomen-dicom-labels.nii.gz")), volume, interpolator="nearest"
    )
    names = json.loads((CT_DIR / "totalseg-v2-label-names.json").read_text(encoding="utf-8"))
    aorta = (labels == next(int(k) for k, v in names.items() if v == "aorta"))[:, ::s, ::s]
    aorta &= volume.array[:, ::s, ::s] > 180
    red = red_layer.data > 0.5
    print(f"\nCTA, contrast CT: red on {red[aorta].mean():.3f} of the aorta above 180 HU")
    assert aorta.sum() > 200 and red[aorta].mean() > 0.1
