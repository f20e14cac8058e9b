"""The napari front end in a real viewer (Xvfb + Mesa): reader, writer, sample data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from napari_ctcolor.app.window import opening_window
from napari_ctcolor.errors import InputError
from napari_ctcolor.io import read_volume, write_nifti
from napari_ctcolor.napari._reader import get_reader

from conftest import CT_DIR, SHARED_DATA, require_shared, rotated_volume

PLUGIN = "napari-ctcolor"


def test_dropping_the_dicom_folder_gives_one_hu_layer_at_physical_scale(make_napari_viewer, dicom_series):
    viewer = make_napari_viewer()
    layers = viewer.open(str(dicom_series), plugin=PLUGIN)
    assert len(layers) == 1 and len(viewer.layers) == 1
    layer = viewer.layers[0]
    assert layer.data.shape == (20, 512, 512)
    np.testing.assert_allclose(layer.scale, (2.0, 0.9765625, 0.9765625))
    np.testing.assert_allclose(layer.translate, (-804.5, -437.51171875, -249.51171875))
    # Contrast-enhanced (its HU show enhanced blood): opened with its contrast-filled vessels mid-grey. The
    # reference is the TotalSegmentator segmentation of its portal and splenic veins and its inferior vena cava
    # (portal-venous phase, median 100-120 HU): light grey under the header's 40 / 300 (measured 0.71), mid-grey in
    # the window that puts its aorta (about 155 HU) at 0.6 (measured 0.53); an arterial phase's 300-400 HU would be
    # white under the header's window.
    labels = read_volume(require_shared(CT_DIR / "totalseg-abdomen-dicom-labels.nii.gz")).array
    names = json.loads((CT_DIR / "totalseg-v2-label-names.json").read_text(encoding="utf-8"))
    veins = np.isin(
        labels, [int(k) for k, v in names.items() if v in ("portal_vein_and_splenic_vein", "inferior_vena_cava")]
    )
    low, high = layer.contrast_limits
    grey = (np.median(layer.data[veins]) - low) / (high - low)
    header_grey = (np.median(layer.data[veins]) + 110.0) / 300.0
    print(
        f"\nopening window {low:g}..{high:g} HU: the veins' median at grey {grey:.2f} (header window {header_grey:.2f})"
    )
    assert veins.sum() > 1000 and 0.3 <= grey <= 0.6 and header_grey > grey + 0.15
    meta = layer.metadata["ctcolor"]
    assert meta["contrast"] == "APPLIED" and meta["window"] == (40.0, 300.0)
    assert meta["windows"] == [(40.0, 300.0), (300.0, 1500.0)]
    assert layer.name == "CT Body 3.0"
    assert layer.data.min() == -1024  # HU, not stored values


_OPEN_WITHOUT_TORCH = """
import sys
import napari
viewer = napari.Viewer(show=False)
layer = viewer.open(sys.argv[1], plugin="napari-ctcolor")[0]
print(layer.data.shape, tuple(layer.contrast_limits), "torch" in sys.modules, "monai" in sys.modules)
viewer.close()
"""


def test_opening_a_contrast_ct_in_a_viewer_does_not_import_torch(dicom_series):
    """The first open of a CT pays the imports of the reader's modules in napari's main thread: torch was 2.8 s of
    them (2 cores, 2026-11-27), and the reader needs none of it, also not for a contrast CT's opening window. A fresh
    viewer in its own process opens the contrast series: its layer in the contrast window, torch and MONAI not
    imported."""
    done = subprocess.run(
        [sys.executable, "-c", _OPEN_WITHOUT_TORCH, str(dicom_series)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    low, high = opening_window(read_volume(dicom_series)).limits
    assert done.stdout.split("\n")[-2] == f"(20, 512, 512) ({low!r}, {high!r}) False False", done.stdout
    assert low == -250.0  # the contrast window's lower edge


def test_oblique_nifti_keeps_its_geometry_in_the_layer(make_napari_viewer, tmp_path):
    vol = rotated_volume()
    path = write_nifti(vol, tmp_path / "oblique.nii.gz")
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin=PLUGIN)
    layer = viewer.layers[0]
    ref = sitk.ReadImage(str(path))
    for index_xyz in [(0, 0, 0), (5, 4, 3), (1, 2, 3)]:
        world_zyx = layer.data_to_world(index_xyz[::-1])
        np.testing.assert_allclose(world_zyx[::-1], ref.TransformIndexToPhysicalPoint(index_xyz), atol=1e-4)


def test_labels_overlay_the_ct_in_the_viewer_despite_the_flipped_direction(make_napari_viewer, dicom_series):
    labels_path = require_shared(CT_DIR / "totalseg-abdomen-dicom-labels.nii.gz")
    viewer = make_napari_viewer()
    ct = viewer.open(str(dicom_series), plugin=PLUGIN)[0]
    labels = viewer.open(str(labels_path), plugin=PLUGIN)[0]
    # The same world point must land on voxels that the resampled label map and the CT share.
    world = ct.data_to_world((10, 300, 200))
    k, j, i = np.round(labels.world_to_data(world)).astype(int)
    assert (k, j, i) == (10, 511 - 300, 200)


def test_writer_saves_an_image_layer_to_nifti_with_its_geometry(make_napari_viewer, tmp_path, dicom_series):
    viewer = make_napari_viewer()
    viewer.open(str(dicom_series), plugin=PLUGIN)
    out = tmp_path / "ct.nii.gz"
    written = viewer.layers.save(str(out), plugin=PLUGIN)
    assert written == [str(out)]
    saved, original = read_volume(out), read_volume(dicom_series)
    np.testing.assert_array_equal(saved.array, original.array)
    np.testing.assert_allclose(saved.affine, original.affine, atol=1e-4)


def test_reader_declines_files_it_does_not_read(tmp_path):
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # a folder without DICOM


def test_ct_small_sample_is_the_real_pydicom_slice(make_napari_viewer):
    from napari_ctcolor.napari._sample_data import ct_small_path

    if ct_small_path() is None:
        pytest.skip("this pydicom does not ship CT_small.dcm")
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "ct_small")
    layer = viewer.layers[0]
    assert layer.data.shape == (1, 128, 128)
    assert layer.data.min() < -800 and layer.data.max() > 1000


def test_phantom_sample_adds_ct_and_labels(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "phantom")
    assert [type(layer).__name__ for layer in viewer.layers] == ["Image", "Labels"]
    ct, labels = viewer.layers
    assert ct.data.shape == labels.data.shape
    np.testing.assert_allclose(ct.scale, labels.scale)


def test_reader_orders_permuted_axes_along_lps_and_keeps_every_voxel_in_place(make_napari_viewer):
    # The OASIS brains are stored LIA (array axes permuted against LPS): napari could not display them as stored.
    path = require_shared(SHARED_DATA / "symnet-oasis" / "image_A_full_size.nii.gz")
    viewer = make_napari_viewer()
    layer = viewer.open(str(path), plugin=PLUGIN)[0]
    image = sitk.ReadImage(str(path))  # the independent reading of the file, indices in its stored order
    for index in [(0, 0, 0), (159, 10, 200), (80, 96, 112), (3, 191, 17)]:
        point = np.array(image.TransformIndexToPhysicalPoint(index))  # LPS (x, y, z) mm
        data_index = np.round(layer.world_to_data(point[::-1])).astype(int)  # the layer's world is (z, y, x)
        assert layer.data[tuple(data_index)] == pytest.approx(image.GetPixel(index)), index


@pytest.mark.parametrize("sample", ["phantom", "ct_small"])
def test_a_sample_opened_beside_a_patient_is_in_view(make_napari_viewer, dicom_series, sample):
    from napari_ctcolor.napari._sample_data import ct_small_path

    if sample == "ct_small" and ct_small_path() is None:
        pytest.skip("this pydicom does not ship CT_small.dcm")
    viewer = make_napari_viewer()
    patient = viewer.open(str(dicom_series), plugin=PLUGIN)[0]
    viewer.dims.set_point(0, patient.extent.world[0][0])  # the patient's first slice, far from the sample's
    added = viewer.open_sample(PLUGIN, sample)
    extent = added[0].extent.world  # (2, 3): world min and max, z y x
    # The slider shows one of the sample's slices, and the camera centre is inside its displayed extent.
    shown = round(float(added[0].world_to_data(viewer.dims.point)[0]))
    assert 0 <= shown < added[0].data.shape[0], (shown, viewer.dims.point)
    for axis, centre in zip(viewer.dims.displayed, viewer.camera.center[-2:], strict=True):
        assert extent[0][axis] <= centre <= extent[1][axis], (axis, centre, extent)
    # Once the sample's layers arrived, no handler of ours stays connected (as many as a fresh viewer has).
    assert len(viewer.layers.events.inserted.callbacks) == len(make_napari_viewer().layers.events.inserted.callbacks)


def test_an_acr_nema_slice_opens_where_its_retired_header_places_it(make_napari_viewer, tmp_path):
    """A file with its plane only in the retired Image Position/Orientation (0020,0030)/(0020,0035): the layer's
    voxels at SimpleITK's physical points (1e-4 mm), the metadata saying where the geometry came from."""
    from conftest import write_acr_nema

    path = write_acr_nema(tmp_path / "acr-nema", [0.8660254, 0.5, 0, -0.5, 0.8660254, 0])
    viewer = make_napari_viewer()
    layer = viewer.open(str(path), plugin=PLUGIN)[0]
    reference = sitk.ReadImage(str(path))
    for index_xyz in [(0, 0, 0), (127, 0, 0), (40, 100, 0)]:
        world_zyx = layer.data_to_world(index_xyz[::-1])
        np.testing.assert_allclose(world_zyx[::-1], reference.TransformIndexToPhysicalPoint(index_xyz), atol=1e-4)
    assert "(0020,0030)" in layer.metadata["ctcolor"]["geometry_source"]


@pytest.mark.parametrize("contrast", ["usage", "none"])
def test_an_enhanced_ct_with_enhanced_blood_opens_in_its_contrast_window_and_offers_its_header_windows(
    make_napari_viewer, dicom_series, tmp_path, contrast
):
    """The shared series as one Enhanced CT file, its windows in the Frame VOI LUT functional group, the colorize
    widget offering both (40/300, 300/1500). Its HU show enhanced blood, so it opens in the contrast window as the
    series itself does (the same HU: within 1 HU), whether its header states contrast (a Contrast/Bolus Usage item
    alone) or not; the header's contrast is kept in the layer's metadata."""
    from conftest import write_enhanced
    from test_colorize_widget import open_widget

    path = write_enhanced(dicom_series, tmp_path / "enhanced.dcm", contrast)
    viewer = make_napari_viewer()
    layer = viewer.open(str(path), plugin=PLUGIN)[0]
    widget = open_widget(viewer)
    shown = [widget.window.native.itemText(i) for i in range(widget.window.native.count())]
    assert "DICOM 300/1500" in shown, shown
    assert "DICOM default" in shown, shown  # its first window (40/300)
    assert ("contrast" in layer.metadata["ctcolor"]) == (contrast != "none")
    series = viewer.open(str(dicom_series), plugin=PLUGIN)[0]
    np.testing.assert_allclose(layer.contrast_limits, series.contrast_limits, atol=1.0)
    assert tuple(layer.contrast_limits) != (-110.0, 190.0)


def _right_drag(viewer, start: tuple[int, int], end: tuple[int, int]) -> None:
    """A right-button drag on the canvas through napari's own mouse dispatch (what a user's mouse reaches)."""
    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils.events import Event
    from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

    drag = dict(button=2, modifiers=[], position=viewer.cursor.position, view_direction=None, dims_displayed=[1, 2])
    mouse_press_callbacks(viewer, ReadOnlyWrapper(Event("mouse_press", pos=start, is_dragging=False, **drag)))
    mouse_move_callbacks(viewer, ReadOnlyWrapper(Event("mouse_move", pos=end, is_dragging=True, **drag)))
    mouse_release_callbacks(viewer, ReadOnlyWrapper(Event("mouse_release", pos=end, is_dragging=True, **drag)))


def test_right_drag_windows_a_freshly_opened_ct_without_any_panel(make_napari_viewer):
    """Open a CT and right-drag at once, no panel open: the window changes as on a PACS (200 px right doubles the
    width, 100 px down raises the centre by half the starting width), the camera does not zoom; with a grey image
    of another plugin selected the drag still windows the CT, never that image."""
    path = require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz")
    viewer = make_napari_viewer()
    ct = viewer.open(str(path), plugin=PLUGIN)[0]
    low, high = ct.contrast_limits
    centre, width = (low + high) / 2, high - low
    zoom = viewer.camera.zoom
    _right_drag(viewer, (300, 300), (500, 400))
    np.testing.assert_allclose(ct.contrast_limits, (centre + width / 2 - width, centre + width / 2 + width))
    assert viewer.camera.zoom == zoom and viewer.camera.mouse_pan
    other = viewer.add_image(np.zeros((4, 4, 4), dtype=np.float32), name="not ours", contrast_limits=(0.0, 1.0))
    assert viewer.layers.selection.active is other
    before = tuple(ct.contrast_limits)
    _right_drag(viewer, (300, 300), (300, 200))  # 100 px up: the centre down by half the width
    assert tuple(other.contrast_limits) == (0.0, 1.0)
    np.testing.assert_allclose(ct.contrast_limits, np.array(before) - (before[1] - before[0]) / 2)


def test_a_double_click_centres_the_other_planes_on_the_point(make_napari_viewer):
    """Double-click a voxel in the axial plane: the coronal and sagittal planes then pass through it (the viewer's
    point on every axis is the clicked world position)."""
    from napari.utils._proxies import ReadOnlyWrapper
    from napari.utils.events import Event
    from napari.utils.interactions import mouse_double_click_callbacks

    from napari_ctcolor.napari._view import show_plane

    path = require_shared(CT_DIR / "totalseg-body-3mm-30slices.nii.gz")
    viewer = make_napari_viewer()
    ct = viewer.open(str(path), plugin=PLUGIN)[0]
    k, j, i = 12, 40, 70
    viewer.dims.set_point(0, ct.data_to_world((k, 0, 0))[0])
    clicked = tuple(float(v) for v in ct.data_to_world((k, j, i)))
    event = Event(
        "mouse_double_click",
        pos=(200, 200),
        position=clicked,
        button=1,
        modifiers=[],
        view_direction=None,
        dims_displayed=[1, 2],
    )
    mouse_double_click_callbacks(viewer, ReadOnlyWrapper(event))
    np.testing.assert_allclose(viewer.dims.point, clicked)
    show_plane(viewer, "coronal")
    np.testing.assert_allclose(np.round(ct.world_to_data(viewer.dims.point)), (k, j, i))
    show_plane(viewer, "sagittal")
    np.testing.assert_allclose(np.round(ct.world_to_data(viewer.dims.point)), (k, j, i))


def test_a_ct_opened_in_a_running_viewer_is_read_in_a_worker(make_napari_viewer, qtbot, dicom_series):
    """Opened from inside the viewer's event loop (the menu, a drop on the canvas), the contrast series comes back at
    once as a placeholder layer that a worker fills; meanwhile the widgets refuse the layer; then it holds the series
    as the reader gives it when it reads before returning (voxels, geometry, window, metadata), the view on its
    middle slice. The main thread's longest stall while it opens: test_responsiveness."""
    from napari.utils.notifications import notification_manager
    from qtpy.QtCore import QTimer

    from napari_ctcolor.napari._layers import READING_KEY, layer_attributes, volume_from_layer
    from napari_ctcolor.napari._reader import read_ct

    viewer = make_napari_viewer()
    want = read_ct(str(dicom_series))[0]  # outside the event loop: read before returning
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Colorize volume")  # open before the CT
    opened = []
    QTimer.singleShot(0, lambda: opened.extend(viewer.open(str(dicom_series), plugin=PLUGIN)))
    qtbot.waitUntil(lambda: len(opened) == 1, timeout=10_000)
    layer = opened[0]
    assert layer.data.shape == (1, 1, 1) and READING_KEY in layer.metadata
    with pytest.raises(InputError, match="still being read"):
        volume_from_layer(layer.data, layer_attributes(layer))
    qtbot.waitUntil(lambda: READING_KEY not in layer.metadata, timeout=60_000)
    data, kwargs, _ = want
    np.testing.assert_array_equal(layer.data, data)
    assert layer.name == kwargs["name"] and tuple(layer.contrast_limits) == kwargs["contrast_limits"]
    np.testing.assert_allclose(layer.scale, kwargs["scale"])
    np.testing.assert_allclose(layer.translate, kwargs["translate"])
    assert layer.metadata == kwargs["metadata"] and len(viewer.layers) == 1
    assert viewer.dims.current_step[0] == 10
    # Drawn as it is set (linear, as PACS viewers show CT), not only set on the layer's model: the canvas's node and
    # the layer controls' menu.
    assert layer.interpolation2d == kwargs["interpolation2d"] == "linear"
    assert viewer.window._qt_viewer.canvas.layer_to_visual[layer].node.interpolation == "linear"
    controls = viewer.window._qt_viewer.controls.widgets[layer]
    assert controls._interpolation_control.interpolation_combobox.currentText() == "linear"
    # The open colorize widget follows the filled layer: its header's windows offered, its contrast window chosen.
    shown = [widget.window.native.itemText(i) for i in range(widget.window.native.count())]
    assert widget.ct_layer.value is layer and shown[:2] == ["DICOM default", "DICOM 300/1500"]
    assert widget.window.value.startswith("contrast ")
    assert not [n for n in notification_manager.records if "Error" in type(n).__name__]


def test_a_file_that_fails_in_the_worker_leaves_no_layer_and_says_why(make_napari_viewer, qtbot, tmp_path):
    """A damaged NIfTI opened from inside the event loop: the worker's InputError becomes napari's one-line error
    notification and the placeholder goes."""
    from napari.utils.notifications import notification_manager
    from qtpy.QtCore import QTimer

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file at all" * 20)
    viewer = make_napari_viewer()
    before = len(notification_manager.records)
    QTimer.singleShot(0, lambda: viewer.open(str(broken), plugin=PLUGIN))
    qtbot.waitUntil(lambda: len(notification_manager.records) > before, timeout=30_000)
    qtbot.waitUntil(lambda: len(viewer.layers) == 0, timeout=5_000)
    message = str(notification_manager.records[-1].message)
    print(f"\n{message}")
    assert str(broken) in message and "\n" not in message
