"""What a radiologist does in the viewer, step by step, in a real napari viewer (Xvfb + Mesa): the window shared by
the CT layer and the colour, head-up reformats, progress inside the widgets, results that never orphan, the colour
files we write opened again, and registration layers that read over the CT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from napari.utils._proxies import ReadOnlyWrapper
from napari.utils.events import Event
from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks
from scipy import ndimage

from napari_ctcolor.app import colorize_job
from napari_ctcolor.engines.body import body_mask
from napari_ctcolor.engines.colorize.anatomy import family
from napari_ctcolor.engines.vessels import vessel_mask
from napari_ctcolor.io import ColorVolume, Volume, read_volume, write_nifti
from napari_ctcolor.io.color_read import read_color_volume
from napari_ctcolor.napari import _colorize_run, _colorize_widget
from napari_ctcolor.napari._gl import gl_renderer, software_rendering
from napari_ctcolor.napari._layers import CONTRAST_WINDOW_KEY, image_layer_data
from napari_ctcolor.napari._view import show_plane
from napari_ctcolor.napari._volume import MIN_BONE_ML
from napari_ctcolor.palettes import color_class
from napari_ctcolor.windowing import PRESETS, Window

from conftest import (
    CT_DIR,
    IDENTITY,
    LUMINANCE_BOUND,
    assert_documented,
    assert_same_colors,
    ctcolor,
    export_and_wait,
    require_shared,
)
from test_colorize_widget import (
    PLUGIN,
    TIMEOUT_MS,
    SlowColorizer,
    click_and_wait,
    lightness_error,
    open_widget,
    view_3d,
)

CUT = CT_DIR / "totalseg-body-3mm-30slices.nii.gz"
CUT_LABELS = CT_DIR / "totalseg-body-3mm-30slices-labels.nii.gz"


# ---------------------------------------------------------------------------------------------------------------------
# 1. One window for the CT layer and its colour
# ---------------------------------------------------------------------------------------------------------------------


def test_window_is_shared_with_the_ct_layer_both_ways_and_recolors_without_the_network(
    make_napari_viewer, qtbot, monkeypatch, errors
):
    require_shared(CUT)
    predictions = []
    predict = colorize_job.iter_predict_chroma

    def counting_predict(*args, **kwargs):
        predictions.append(1)
        return (yield from predict(*args, **kwargs))

    monkeypatch.setattr(colorize_job, "iter_predict_chroma", counting_predict)
    viewer = make_napari_viewer()
    ct = viewer.open(str(CUT), plugin=PLUGIN)[0]
    ct.contrast_limits = PRESETS["lung"].limits  # the user looks at the lungs before opening the widget
    widget = open_widget(viewer)
    assert widget.window.value == "lung"  # the widget starts from what the CT layer shows

    # Widget -> layer: a preset sets the CT layer's contrast limits.
    widget.window.value = "bone"
    assert tuple(ct.contrast_limits) == pytest.approx(PRESETS["bone"].limits)
    click_and_wait(qtbot, widget, widget.run_button)
    layer = viewer.layers[f"{ct.name} colorized"]
    assert layer.metadata["ctcolor"]["colorize"]["window"] == list(PRESETS["bone"])
    assert lightness_error(layer.data, ct.data, PRESETS["bone"]) <= LUMINANCE_BOUND

    # Layer -> widget -> colour: dragging the CT layer's contrast recolors with that window, network not re-run.
    # The slice on screen is recolored first, then a worker recomposes the whole volume; that full recomposition gives
    # the slice the same colours (within one 8-bit code: other float batching).
    shown: list[str] = []
    kind = type(widget.runner)
    put_plane, recomposed = kind._put_plane, kind._recomposed
    monkeypatch.setattr(kind, "_put_plane", lambda self, *a: (shown.append("plane"), put_plane(self, *a)))
    monkeypatch.setattr(kind, "_recomposed", lambda self, *a: (shown.append("volume"), recomposed(self, *a)))
    show_plane(viewer, "axial")
    k = 11
    viewer.dims.set_point(0, ct.data_to_world((k, 0, 0))[0])
    before = layer.data.copy()
    ct.contrast_limits = (-160.0, 240.0)  # the abdomen window
    assert widget.busy
    qtbot.waitUntil(lambda: bool(shown), timeout=TIMEOUT_MS)
    assert shown == ["plane"] and widget.recolored_first == (0, k)
    first = layer.data[k].copy()
    assert np.abs(first.astype(int) - before[k]).max() > 20  # recolored: bone window -> abdomen window
    others = [z for z in range(ct.data.shape[0]) if z != k]
    # A NIfTI has no DICOM window: its default is the abdomen preset, and either name means the same window.
    assert widget.window.value in ("DICOM default", "abdomen", "soft_tissue")
    assert (widget.centre_hu.value, widget.width_hu.value) == (40.0, 400.0)
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert layer.metadata["ctcolor"]["colorize"]["window"] == [40.0, 400.0]
    assert lightness_error(layer.data, ct.data, PRESETS["abdomen"]) <= LUMINANCE_BOUND
    step = np.abs(layer.data[k].astype(int) - first)
    print(
        f"\nvisible slice first vs full recomposition: max {step.max()} code(s), "
        f"share differing {(step > 0).mean():.1e}"
    )
    assert step.max() <= 1 and shown == ["plane", "volume"]
    assert np.abs(layer.data[others].astype(int) - before[others]).max() > 20  # and the rest is recolored now

    ct.contrast_limits = (-50.0, 150.0)  # no preset: custom, centre 50, width 200
    assert widget.window.value == "custom"
    assert (widget.centre_hu.value, widget.width_hu.value) == (50.0, 200.0)
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert layer.metadata["ctcolor"]["colorize"]["window"] == [50.0, 200.0]
    assert lightness_error(layer.data, ct.data, (50.0, 200.0)) <= LUMINANCE_BOUND

    # A coronal view recolors its own plane first (the row on screen across every slice); on a CT taller than
    # `MAIN_THREAD_PLANE_SLICES` in a worker of its own (made to take that path here: this cut has 30 slices).
    monkeypatch.setattr(_colorize_run, "MAIN_THREAD_PLANE_SLICES", 0)
    show_plane(viewer, "coronal")
    y = ct.data.shape[1] // 2 + 7
    viewer.dims.set_point(1, ct.data_to_world((0, y, 0))[1])
    before = layer.data.copy()
    shown.clear()
    widget.width_hu.value = 300.0  # editing the custom window moves the CT layer's limits too
    assert tuple(ct.contrast_limits) == pytest.approx((-100.0, 200.0))
    assert widget.busy and not shown  # in a worker: nothing is put before the event loop runs again
    qtbot.waitUntil(lambda: bool(shown), timeout=TIMEOUT_MS)
    assert shown == ["plane"] and widget.recolored_first == (1, y)
    rows = [r for r in range(ct.data.shape[1]) if r != y]
    assert np.abs(layer.data[:, y].astype(int) - before[:, y]).max() > 20
    np.testing.assert_array_equal(layer.data[:, rows], before[:, rows])
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert shown == ["plane", "volume"]
    assert lightness_error(layer.data, ct.data, (50.0, 300.0)) <= LUMINANCE_BOUND
    show_plane(viewer, "axial")

    # Right-drag on the canvas, through napari's mouse dispatch: 200 px right doubles the width, 100 px down raises
    # the centre by half the starting width; the colour follows. The camera does not zoom meanwhile.
    zoom = viewer.camera.zoom
    drag = dict(button=2, modifiers=[], position=viewer.cursor.position, view_direction=None, dims_displayed=[1, 2])
    mouse_press_callbacks(viewer, ReadOnlyWrapper(Event("mouse_press", pos=(300, 300), is_dragging=False, **drag)))
    assert not viewer.camera.mouse_pan
    for pos in ((350, 320), (500, 400)):
        mouse_move_callbacks(viewer, ReadOnlyWrapper(Event("mouse_move", pos=pos, is_dragging=True, **drag)))
    mouse_release_callbacks(viewer, ReadOnlyWrapper(Event("mouse_release", pos=(500, 400), is_dragging=True, **drag)))
    assert tuple(ct.contrast_limits) == pytest.approx((200.0 - 300.0, 200.0 + 300.0))  # centre 200, width 600
    assert viewer.camera.mouse_pan and viewer.camera.zoom == zoom
    assert widget.window.value == "custom" and (widget.centre_hu.value, widget.width_hu.value) == (200.0, 600.0)
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert layer.metadata["ctcolor"]["colorize"]["window"] == [200.0, 600.0]
    assert lightness_error(layer.data, ct.data, (200.0, 600.0)) <= LUMINANCE_BOUND
    assert len(predictions) == 1 and not errors

    # 3. 3D, seen from the front: lit iso surfaces of the bone (and skin, vessels), the colours as RGBA; nothing outside
    # the body; "off" restores the 2D view.
    view_3d(qtbot, widget, "bone")
    rendered = viewer.layers[f"{ct.name} 3D bone"]
    assert viewer.dims.ndisplay == 3 and rendered.rendering == "iso" and rendered.iso_threshold == 0.5
    assert rendered.interpolation3d == "linear" and rendered.data.dtype == np.float32
    assert [lyr.name for lyr in viewer.layers if lyr.visible] == [rendered.name]
    # Under Xvfb, Mesa's llvmpipe draws: a software renderer, told by its name. While the camera turns the 3D layers
    # are drawn as projections (a frame in under a second there), lit again once the camera stands still.
    assert software_rendering() == ("llvmpipe" in gl_renderer().lower())
    if software_rendering():
        assert "software OpenGL" in widget.status.value
        viewer.camera.angles = (0.0, 30.0, 90.0)
        assert rendered.rendering == "mip"
        viewer.camera.angles = (0.0, 40.0, 90.0)  # still turning: still a projection
        assert rendered.rendering == "mip"
        qtbot.waitUntil(lambda: rendered.rendering == "iso", timeout=10_000)
        viewer.camera.angles = (0.0, 0.0, 0.0)
        qtbot.waitUntil(lambda: rendered.rendering == "iso", timeout=10_000)
    s = int(rendered.scale[1] / ct.scale[1])
    hu = ct.data[:, ::s, ::s]
    np.testing.assert_allclose(rendered.data_to_world((5, 3, 4)), layer.data_to_world((5, 3 * s, 4 * s)), atol=1e-6)
    surface = rendered.data > 0.5
    assert 0.0 <= rendered.data.min() and rendered.data.max() <= 1.0
    inside = body_mask(hu, (3.0, 3.0 * s, 3.0 * s))
    assert not surface[~inside].any()  # nothing outside the body
    # The vertebrae stay: 95 % of their voxels above 200 HU lie inside the surface (98.6 % on this cut); every piece
    # of the surface has at least MIN_BONE_ML (1 ml), so the specks go: the left kidney's stone (1092 HU, 0.14 ml)
    # and the 3 mm CT's loose rib fragments (0.03-0.57 ml).
    labels = read_volume(CUT_LABELS).array[:, ::s, ::s]
    names = {
        name: int(key)
        for key, name in json.loads((CT_DIR / "totalseg-v2-label-names.json").read_text(encoding="utf-8")).items()
    }
    vertebrae = np.isin(labels, [i for name, i in names.items() if name.startswith("vertebrae")]) & (hu > 200)
    assert vertebrae.sum() > 1000 and surface[vertebrae].mean() > 0.95
    stone = (labels == names["kidney_left"]) & (hu > 600)
    assert stone.any() and not surface[stone].any()
    pieces, count = ndimage.label(surface, structure=np.ones((3, 3, 3), dtype=bool))
    volumes_ml = np.bincount(pieces.ravel())[1:] * 27.0 * s * s / 1000.0
    assert count >= 5 and volumes_ml.min() >= MIN_BONE_ML  # the spine and the ribs that are whole at 3 mm
    bones = np.isin(labels, [i for name, i in names.items() if family(color_class(name)) == "bone"])
    bone_field = rendered.data.copy()
    view_3d(qtbot, widget, "CTA")
    # A non-contrast CT: nothing is contrast-filled, and the colorizer names no enhanced blood (its blood's median
    # 37 HU). Its cancellous bone (150-800 HU, the cortex below 800 HU at 3 mm), which HU alone takes for contrast
    # blood, stays bone: no red surface, the bone surface whole, and the status line says why.
    shown = [lyr.name for lyr in viewer.layers if lyr.visible]
    assert shown == [f"{ct.name} 3D bone"] and viewer.layers[shown[0]].rendering == "iso"
    np.testing.assert_array_equal(viewer.layers[shown[0]].data, bone_field)
    assert "no vessels shown: no contrast-enhanced blood" in widget.status.value
    dense_bone = bones & (hu > 150)
    by_hu = vessel_mask(hu, inside, (3.0, 3.0 * s, 3.0 * s))[dense_bone].mean()
    print(f"\nCTA, non-contrast CT: by HU alone {by_hu:.3f} of the bone above 150 HU is red; {widget.status.value}")
    assert by_hu > 0.1
    view_3d(qtbot, widget, "soft tissue")
    skin = viewer.layers[f"{ct.name} 3D skin"]
    assert [lyr.name for lyr in viewer.layers if lyr.visible] == [f"{ct.name} 3D bone", skin.name]
    assert skin.rendering == "iso" and skin.opacity < 1.0 and (skin.data > 0.5).mean() > 0.3  # the body, see-through
    widget.view_3d.value = "off"
    assert viewer.dims.ndisplay == 2 and f"{ct.name} 3D" not in [lyr.name for lyr in viewer.layers]
    assert all(lyr.visible for lyr in viewer.layers)


def test_all_three_docks_with_a_long_legend_fit_a_1080_px_screen_as_tabs(make_napari_viewer):
    from qtpy.QtWidgets import QApplication, QDockWidget

    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.zeros((20, 64, 64), dtype=np.int16), name="CT")
    window = viewer.window._qt_window
    docks = []
    for name in ("Colorize volume", "Register & checkerboard", "Open from PACS"):
        dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        docks.append(dock)
        if name == "Colorize volume":  # a legend as long as the one that pushed the window to 1226 px: 27 classes
            rows = [
                f'<span style="background-color:#a0522d">&nbsp;&nbsp;&nbsp;&nbsp;</span> class {k}' for k in range(27)
            ]
            widget.legend.value = "<br>".join(rows)
            assert widget.legend.native.sizeHint().height() > 300  # the legend itself is tall; its box scrolls
        QApplication.processEvents()
    window.resize(1920, 1080)
    QApplication.processEvents()
    heights = [dock.minimumSizeHint().height() for dock in docks]
    print(f"\nwindow {window.height()} px (minimum {window.minimumSizeHint().height()}), docks' minimum {heights}")
    assert window.minimumSizeHint().height() <= 1080 and window.height() <= 1080
    # The three docks share one column as tabs (napari's own tabify), not stacked heights.
    tabbed = {id(d) for d in window.tabifiedDockWidgets(docks[0])}
    assert {id(docks[1]), id(docks[2])} <= tabbed and all(isinstance(d, QDockWidget) for d in docks)
    # The tabs read as the docks are named: Qt takes a lone "&" as a shortcut marker ("Register _checkerboard"), so
    # the tab text carries it escaped, and the shortcut-stripped text is the name again.
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QTabBar

    docks[0].raise_()  # a relayout rebuilds the tab texts from the docks' titles
    QApplication.processEvents()
    tabs = [bar.tabText(i).split(" (")[0] for bar in window.findChildren(QTabBar) for i in range(bar.count())]
    assert {"Colorize volume", "Register && checkerboard", "Open from PACS"} <= set(tabs), tabs
    # Their whole titles show (Qt's default cut them to "Regis..."); the bar scrolls when they are wider.
    ours = [
        bar
        for bar in window.findChildren(QTabBar)
        if any("Colorize volume" in bar.tabText(i) for i in range(bar.count()))
    ]
    assert ours and all(bar.elideMode() == Qt.TextElideMode.ElideNone and bar.usesScrollButtons() for bar in ours)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Radiological orientation, checked on the rendered canvas
# ---------------------------------------------------------------------------------------------------------------------


def _marked_volume() -> Volume:
    """A 40^3 cube, 1 mm, LPS axes: the head half (z high) adds 1000, the patient's left half (x high) 500 and the
    anterior half (y low) 250, so each view has a brighter side per axis (146, 73 and 36 grey levels of 255)."""
    z, y, x = np.meshgrid(*(np.arange(40),) * 3, indexing="ij")
    array = np.zeros((40, 40, 40), dtype=np.int16)
    array += np.where(z >= 20, 1000, 0).astype(np.int16)  # head
    array += np.where(x >= 20, 500, 0).astype(np.int16)  # patient's left
    array += np.where(y < 20, 250, 0).astype(np.int16)  # anterior
    return Volume(array, spacing=(1.0, 1.0, 1.0), meta={"modality": "CT"})


def _halves(shot: np.ndarray) -> dict[str, float]:
    grey = shot[..., :3].astype(float).mean(axis=-1)
    rows, cols = np.nonzero(grey > 5)  # the image, not the black canvas around it
    grey = grey[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = grey.shape
    return {
        "top": grey[: h // 2].mean(),
        "bottom": grey[h - h // 2 :].mean(),
        "left": grey[:, : w // 2].mean(),
        "right": grey[:, w - w // 2 :].mean(),
    }


def test_views_are_radiological_head_up_and_patient_left_on_screen_right(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    data, kwargs, _ = image_layer_data(_marked_volume(), name="marked")
    viewer.add_image(data, **{**kwargs, "contrast_limits": (0, 1750)})
    open_widget(viewer)  # installs the orientation rule

    show_plane(viewer, "axial")
    axial = _halves(viewer.screenshot(canvas_only=True, flash=False))
    assert axial["top"] > axial["bottom"] + 20  # anterior up
    assert axial["right"] > axial["left"] + 40  # the patient's left on the screen's right

    show_plane(viewer, "coronal")
    assert tuple(viewer.camera.orientation2d) == ("up", "right")
    coronal = _halves(viewer.screenshot(canvas_only=True, flash=False))
    assert coronal["top"] > coronal["bottom"] + 80  # head up
    assert coronal["right"] > coronal["left"] + 40

    show_plane(viewer, "sagittal")
    sagittal = _halves(viewer.screenshot(canvas_only=True, flash=False))
    assert sagittal["top"] > sagittal["bottom"] + 80  # head up
    assert sagittal["left"] > sagittal["right"] + 15  # anterior on the left

    # Rolling the axes by hand (napari's own button) keeps the rule: z vertical points up, y vertical down.
    viewer.dims.order = (1, 0, 2)
    assert tuple(viewer.camera.orientation2d) == ("up", "right")
    viewer.dims.order = (0, 1, 2)
    assert tuple(viewer.camera.orientation2d) == ("down", "right")


def test_a_ct_opened_without_any_dock_shows_coronal_and_sagittal_head_up(make_napari_viewer, tmp_path):
    """The orientation follows from the first CT the reader opens, not from the first dock: napari's own axis roll
    (its "transpose" and "roll" buttons change dims.order) shows a coronal view head up with no panel open."""
    path = tmp_path / "marked.nii.gz"
    write_nifti(_marked_volume(), path)
    viewer = make_napari_viewer(show=True)
    (layer,) = viewer.open(str(path), plugin="napari-ctcolor")
    layer.contrast_limits = (0, 1750)
    assert not viewer.window.dock_widgets  # no panel of ours (nor any other) is open
    viewer.dims.order = (1, 0, 2)  # coronal: z vertical
    assert tuple(viewer.camera.orientation2d) == ("up", "right")
    coronal = _halves(viewer.screenshot(canvas_only=True, flash=False))
    assert coronal["top"] > coronal["bottom"] + 80  # head up
    viewer.dims.order = (2, 0, 1)  # sagittal
    sagittal = _halves(viewer.screenshot(canvas_only=True, flash=False))
    assert sagittal["top"] > sagittal["bottom"] + 80
    viewer.dims.order = (0, 1, 2)  # axial: y vertical, anterior up
    assert tuple(viewer.camera.orientation2d) == ("down", "right")


# ---------------------------------------------------------------------------------------------------------------------
# 7-8. Progress inside the widget; no orphan result when the CT is deleted during a run
# ---------------------------------------------------------------------------------------------------------------------


def test_progress_shows_in_the_widget_and_a_deleted_ct_leaves_no_orphan(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    ct = viewer.add_image(np.full((6, 64, 64), 40, dtype=np.int16), name="CT")
    widget = open_widget(viewer, SlowColorizer())
    widget.batch_size.value = 1
    seen = []
    widget.run_button.native.click()
    widget.worker.yielded.connect(lambda _: seen.append(widget.progress_bar.value))
    shown = lambda: not widget.progress_bar.native.isHidden()  # noqa: E731 - the viewer window itself is not shown
    assert shown() and widget.progress_bar.max == 12
    qtbot.waitUntil(lambda: len(seen) >= 2, timeout=TIMEOUT_MS)
    viewer.layers.remove(ct)
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)
    assert seen == sorted(seen) and seen[0] >= 1 and not shown()
    assert len(viewer.layers) == 0 and widget.result_layer is None
    assert widget.status.value == "Colorize volume: the CT layer was removed; result dropped" and not errors


# ---------------------------------------------------------------------------------------------------------------------
# 4. What we write opens again: RGB NIfTI, RGB DICOM series, PNG folder
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_rgb(tmp_path_factory) -> np.ndarray:
    """The independent reference of the formats below: a ``ctcolor colorize`` run of the cut written as NIfTI and read
    with SimpleITK (one process for the three formats)."""
    require_shared(CUT)
    ref_path = tmp_path_factory.mktemp("reference") / "reference.nii.gz"
    assert ctcolor("colorize", str(CUT), "-o", str(ref_path), "--device", "cpu").returncode == 0
    return sitk.GetArrayFromImage(sitk.ReadImage(str(ref_path)))


@pytest.mark.parametrize("fmt,name", [("nifti", "colour.nii.gz"), ("dicom", "colour-dicom"), ("png", "colour-png")])
def test_colorized_outputs_open_again_as_rgb_with_their_geometry(
    make_napari_viewer, tmp_path, fmt, name, reference_rgb
):
    out = tmp_path / name
    done = ctcolor("colorize", str(CUT), "-o", str(out), "--format", fmt, "--device", "cpu")
    assert done.returncode == 0, done.stderr
    ct = read_volume(CUT)

    info = ctcolor("info", str(out), "--json")
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["modality"] == "RGB" and described["shape"] == list(ct.shape)
    np.testing.assert_allclose(described["spacing"], ct.spacing, rtol=1e-5)
    np.testing.assert_allclose(described["origin"], ct.origin, atol=1e-3)

    viewer = make_napari_viewer()
    layer = viewer.open(str(out), plugin=PLUGIN)[0]
    assert layer.rgb and layer.data.shape == (*ct.shape, 3)
    assert_same_colors(np.asarray(layer.data), reference_rgb)  # two ctcolor processes: the run-to-run tolerance
    grey = viewer.open(str(CUT), plugin=PLUGIN)[0]
    for index in [(0, 0, 0), (29, 100, 121), (12, 40, 77)]:
        np.testing.assert_allclose(layer.data_to_world(index), grey.data_to_world(index), atol=1e-3)


def test_png_folder_without_geometry_opens_with_its_pixel_size(tmp_path):
    from napari_ctcolor.io.export import write_png_slices

    rgb = np.random.default_rng(1).integers(0, 256, (3, 8, 10, 3), dtype=np.uint8)
    write_png_slices(ColorVolume(rgb, (2.0, 0.5, 0.8), (0.0, 0.0, 0.0), np.eye(3)), tmp_path / "png")
    (tmp_path / "png" / "geometry.json").unlink()  # e.g. slices copied out of the folder
    back = read_color_volume(tmp_path / "png")
    np.testing.assert_array_equal(back.rgb, rgb)
    np.testing.assert_allclose(back.spacing, (1.0, 0.5, 0.8), rtol=1e-3)  # in-plane from pHYs; slices 1 mm
    info = ctcolor("info", str(tmp_path / "png"))
    assert info.returncode == 0 and "none stored" in info.stdout


def test_file_save_offers_the_png_folder_writer_and_it_round_trips(make_napari_viewer, tmp_path):
    # napari ranks its own image writer first for ".png" (it writes one image file), and no plugin can outrank a
    # built-in; its Save dialog lists ours as a file type of its own. This drives that dialog's own decoding.
    from napari._qt.qt_viewer import _npe2_decode_selected_filter
    from napari.plugins._npe2 import file_extensions_string_for_layers

    from napari_ctcolor.napari._layers import rgb_layer_data

    rng = np.random.default_rng(3)
    color = ColorVolume(rng.integers(0, 256, (4, 24, 20, 3), dtype=np.uint8), (2.5, 0.7, 0.9), (-5, 10, 30), np.eye(3))
    viewer = make_napari_viewer()
    data, kwargs, _ = rgb_layer_data(color, name="colour")
    layer = viewer.add_image(data, **kwargs)
    viewer.layers.selection = {layer}
    filters, writers = file_extensions_string_for_layers([layer])
    ours = [entry for entry in filters.split(";;") if "PNG slices (folder)" in entry]
    assert ours == ["CT Color PNG slices (folder) (*.png)"]
    writer = _npe2_decode_selected_filter(filters, ours[0], writers)
    written = viewer.layers.save(str(tmp_path / "colour.png"), selected=True, _writer=writer)
    assert written == [str(tmp_path / "colour")] and len(list((tmp_path / "colour").glob("*.png"))) == 4
    back = read_color_volume(tmp_path / "colour")
    np.testing.assert_array_equal(back.rgb, color.rgb)
    np.testing.assert_allclose(back.spacing, color.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.origin, color.origin, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# 9. Reader: DICOM without a file meta header; NIfTI CT without air
# ---------------------------------------------------------------------------------------------------------------------


def test_dicom_without_file_meta_reads_as_simpleitk_reads_it(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    from conftest import write_headless

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    headless = write_headless(ds, tmp_path / "headless")  # no preamble, no file meta, no suffix
    reference = sitk.ReadImage(str(headless))
    info = ctcolor("info", str(headless), "--json")
    assert info.returncode == 0, info.stderr
    volume = read_volume(headless)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(volume.origin, reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.spacing[1:], reference.GetSpacing()[:2][::-1], rtol=1e-6)


def test_nifti_ct_cropped_to_soft_tissue_is_colorized_with_a_warning(tmp_path):
    require_shared(CUT)
    ct = read_volume(CUT)
    soft = ct.with_array(np.clip(ct.array, -100, 90).astype(np.int16))  # no air, nothing above 90 HU
    path = tmp_path / "soft.nii.gz"
    write_nifti(soft, path)
    done = ctcolor("colorize", str(path), "-o", str(tmp_path / "out.nii.gz"), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "do not span air to bone" in done.stderr and (tmp_path / "out.nii.gz").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 5. A prior and a current scan in different coordinate frames
# ---------------------------------------------------------------------------------------------------------------------


def test_scans_in_disjoint_frames_register_with_prealignment(tmp_path):
    require_shared(CUT)
    ct = read_volume(CUT)
    image = ct.to_sitk()
    shift = sitk.TranslationTransform(3, (6.0, -4.0, 3.0))  # the patient lies a little differently
    moved = sitk.Resample(image, image, shift, sitk.sitkLinear, -1024.0)
    far = Volume(
        sitk.GetArrayFromImage(moved).astype(np.int16),
        ct.spacing,
        tuple(np.add(ct.origin, (400.0, 0.0, 0.0))),  # exported in another frame: 400 mm away
        ct.direction,
        {"modality": "CT"},
    )
    moving = write_nifti(far, tmp_path / "prior.nii.gz")

    plain = tmp_path / "plain"
    refused = ctcolor("register", str(CUT), str(moving), "-o", str(plain), "--no-affine", "--device", "cpu")
    assert refused.returncode == 2 and "does not overlap" in refused.stderr and "--affine" in refused.stderr

    # The CT card's default pre-aligns (the refinement, another default, is not what this checks: --refine 0).
    done = ctcolor("register", str(CUT), str(moving), "-o", str(tmp_path / "out"), "--refine", "0", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["affine"] and metrics["refine_iterations"] == 0
    print(f"disjoint frames: NCC {metrics['ncc_before']:.3f} -> {metrics['ncc_after']:.3f}")
    assert metrics["ncc_before"] < 0.1 and metrics["ncc_after"] > 0.9


# ---------------------------------------------------------------------------------------------------------------------
# 8. Export from the widget: de-identified DICOM by default, the source's identity on request
# ---------------------------------------------------------------------------------------------------------------------


def _series_with_identity(dicom_series, folder, n_slices: int = 6):
    """The first slices of the shared series with a patient identity written in (the shared files have none)."""
    import pydicom

    folder.mkdir()
    study = pydicom.uid.generate_uid(entropy_srcs=["napari-ctcolor test study"])
    for path in sorted(dicom_series.iterdir())[:n_slices]:
        ds = pydicom.dcmread(path)
        for keyword, value in IDENTITY.items():
            setattr(ds, keyword, value)
        ds.StudyInstanceUID = study
        ds.save_as(folder / path.name)
    return folder


def test_widget_exports_like_the_cli_deidentified_unless_asked(
    make_napari_viewer, qtbot, tmp_path, dicom_series, errors
):
    import pydicom

    source = _series_with_identity(dicom_series, tmp_path / "series")
    viewer = make_napari_viewer()
    ct = viewer.open(str(source), plugin=PLUGIN)[0]
    widget = open_widget(viewer)
    assert not widget.export_button.enabled  # nothing to export before a run
    click_and_wait(qtbot, widget, widget.run_button)
    layer = widget.result_layer

    widget.export_format.value = "NIfTI RGB (.nii.gz)"
    widget.export_path.value = tmp_path / "colour"
    [nifti] = export_and_wait(qtbot, widget)
    back = read_color_volume(nifti)
    np.testing.assert_array_equal(back.rgb, layer.data)
    np.testing.assert_allclose(back.affine, read_volume(source).affine, atol=1e-4)

    widget.export_format.value = "DICOM series (folder)"
    widget.export_path.value = tmp_path / "anonymous"
    files = export_and_wait(qtbot, widget)
    assert len(files) == ct.data.shape[0] and not errors
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        leaked = [k for k, v in IDENTITY.items() if str(v) in str(ds.get(k, ""))]
        assert not leaked and "Test" not in str(ds) and "CTC-0001" not in str(ds)
    np.testing.assert_array_equal(read_color_volume(tmp_path / "anonymous").rgb, layer.data)

    widget.keep_identity.value = True
    widget.export_path.value = tmp_path / "for-pacs"
    files = export_and_wait(qtbot, widget)
    first_source = pydicom.dcmread(sorted(source.iterdir())[0])
    for path in files:
        ds = pydicom.dcmread(path)
        assert {k: str(ds.get(k)) for k in IDENTITY} == IDENTITY
        assert ds.StudyInstanceUID == first_source.StudyInstanceUID and ds.get("PatientIdentityRemoved") != "YES"

    assert export_and_wait(qtbot, widget) == []  # the same folder again: refused, nothing replaced
    assert len(errors) == 1 and "already exists" in errors[0]
    assert_documented(errors[0])
    assert "Exported" not in widget.status.value and "nothing written" in widget.status.value


def test_a_contrast_ct_read_from_nifti_opens_in_its_contrast_window_and_a_plain_one_stays(
    make_napari_viewer, qtbot, tmp_path, dicom_series, errors, monkeypatch
):
    """NIfTI carries no contrast flag: the DICOM patient's portal-venous CT written as NIfTI opens in the contrast
    window of the blood its HU show (`enhanced_blood`: its aorta followed over 40 mm), as the DICOM series does, the
    choice said in napari's status bar and named in the window menu; Run composes in it once and moves nothing. The
    non-contrast 3 mm cut opens in its default window and keeps it after Run (the network finds no enhanced blood)."""
    said: list[str] = []
    monkeypatch.setattr(_colorize_widget, "show_info", said.append)
    compose = colorize_job.iter_compose_chroma
    windows: list = []

    def counting_compose(volume, chroma, window, *args):
        windows.append(window)
        return (yield from compose(volume, chroma, window, *args))

    monkeypatch.setattr(colorize_job, "iter_compose_chroma", counting_compose)
    dicom = read_volume(dicom_series)
    nifti = tmp_path / "contrast.nii.gz"
    write_nifti(dicom, nifti)
    viewer = make_napari_viewer()
    ct = viewer.open(str(nifti), plugin=PLUGIN)[0]
    want = Window(*ct.metadata[CONTRAST_WINDOW_KEY])
    name = f"{want.centre:g}/{want.width:g}"
    assert "contrast-enhanced blood" in viewer.status and name in viewer.status
    series = viewer.open(str(dicom_series), plugin=PLUGIN)[0]
    np.testing.assert_allclose(ct.contrast_limits, series.contrast_limits, atol=1.0)
    assert tuple(ct.contrast_limits) == pytest.approx(want.limits) and want.limits[0] == -250.0
    widget = open_widget(viewer)
    widget.ct_layer.value = ct
    assert widget.window.value == f"contrast {name}"  # named, not "custom"
    click_and_wait(qtbot, widget, widget.run_button)
    qtbot.wait(200)
    assert tuple(ct.contrast_limits) == pytest.approx(want.limits) and not said  # nothing moved, nothing to say
    assert not widget.busy and len(windows) == 1 and windows[0] == pytest.approx(tuple(want))
    assert lightness_error(widget.result_layer.data, ct.data, tuple(want)) <= LUMINANCE_BOUND

    plain = viewer.open(str(CUT), plugin=PLUGIN)[0]
    assert tuple(plain.contrast_limits) == pytest.approx(PRESETS["abdomen"].limits)
    widget.ct_layer.value = plain
    click_and_wait(qtbot, widget, widget.run_button)
    assert tuple(plain.contrast_limits) == pytest.approx(PRESETS["abdomen"].limits) and not said and not errors
