"""The "Read & measure" dock in a real viewer (Xvfb + Mesa), driven as a reader would: measurements drawn with its
tools, the corner overlay, linked planes with a crosshair. References are independent: analytic lengths and areas,
numpy over the voxels whose centres lie inside, SimpleITK's and pydicom's reading of the series."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from napari.utils._proxies import ReadOnlyWrapper
from napari.utils.events import Event
from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

from napari_ctcolor.io import Volume, write_nifti
from napari_ctcolor.napari._linked import CROSSHAIR, DOCK_NAME, PLANE_COLOURS
from napari_ctcolor.napari._measure import MEASURE_LAYER
from napari_ctcolor.napari._reading_widget import ReadingWidget

from conftest import DICOM_SERIES, require_shared

PLUGIN = "napari-ctcolor"
SPACING = (2.5, 0.8, 0.8)  # z, y, x mm (array order): anisotropic, as CT is
ORIGIN = (-25.0, -30.0, 100.0)
DISC = (44, 20, 15.0)  # row, column, radius mm: 100 HU on every slice
DISC_HU = 100.0


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A 24 x 64 x 64 CT with known HU: noise at 0 HU, a 100 HU disc, and a block whose HU is ten times its column."""
    shape = (24, 64, 64)
    rng = np.random.default_rng(3)
    hu = rng.normal(0.0, 20.0, size=shape)
    rows, cols = np.indices(shape[1:])
    disc = np.hypot((rows - DISC[0]) * SPACING[1], (cols - DISC[1]) * SPACING[2]) <= DISC[2]
    hu[:, disc] = DISC_HU
    hu[:, 2:30, 40:62] = 10.0 * cols[2:30, 40:62]
    volume = Volume(hu.astype(np.float32), spacing=SPACING, origin=ORIGIN, meta={})
    return write_nifti(volume, tmp_path_factory.mktemp("reading") / "phantom.nii.gz"), hu


def open_dock(viewer, path) -> tuple:
    ct = viewer.open(str(path), plugin=PLUGIN)[0]
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Read & measure")
    assert isinstance(widget, ReadingWidget)
    return ct, widget


def world(ct, k: float, j: float, i: float) -> np.ndarray:
    """The world point (z, y, x mm) of voxel index (k, j, i) of ``ct``'s layer."""
    return np.asarray(ct.data_to_world((k, j, i)), dtype=float)


def draw(widget, tool: str, corners_world) -> None:
    """Press the tool's button and draw the shape the mouse would (its points in the layer's data coordinates)."""
    widget.tools[tool].native.click()
    layer = widget.measure.layer()
    assert widget._viewer.layers.selection.active.name == MEASURE_LAYER
    assert layer.mode == {"Line": "add_line", "Circle": "add_ellipse", "Polygon": "add_polygon"}[tool]
    data = np.array([layer.world_to_data(p) for p in corners_world])
    {"Line": layer.add_lines, "Circle": layer.add_ellipses, "Polygon": layer.add_polygons}[tool](data)


def test_line_circle_and_polygon_measure_mm_and_the_hu_of_the_voxels_inside(make_napari_viewer, qtbot, phantom):
    path, hu = phantom
    viewer = make_napari_viewer()
    ct, widget = open_dock(viewer, path)
    k = 12
    viewer.dims.set_point(0, world(ct, k, 0, 0)[0])
    # A line across 30 columns and 40 rows of 0.8 mm: 0.8 * 50 = 40 mm (3-4-5), whatever the layer's units.
    draw(widget, "Line", [world(ct, k, 10, 10), world(ct, k, 50, 40)])
    assert widget.measure.lines[-1] == "40.0 mm"
    # A circle of radius 8 mm inside the 100 HU disc: every voxel 100 HU; the area is the circle's.
    centre = world(ct, k, *DISC[:2])
    draw(widget, "Circle", [centre + [0, -8, -8], centre + [0, -8, 8], centre + [0, 8, 8], centre + [0, 8, -8]])
    line = widget.measure.lines[-1]
    rows, cols = np.indices(hu.shape[1:])
    inside = np.hypot((rows - DISC[0]) * 0.8, (cols - DISC[1]) * 0.8) < 8.0
    voxels = int(line.split("(")[1].split()[0])
    assert abs(voxels - inside.sum()) <= 0.03 * inside.sum()  # a 128-gon's edge against the true circle
    assert line.startswith("mean 100.0 HU, SD 0.0, min 100, max 100")
    assert f"area {np.pi * 64 / 100:.2f} cm²" in line
    # A polygon (a square) over the gradient block, its edges between voxel centres: rows 11-20, columns 41-50 exactly.
    square = [world(ct, k, 10.5, 40.5), world(ct, k, 10.5, 50.5), world(ct, k, 20.5, 50.5), world(ct, k, 20.5, 40.5)]
    draw(widget, "Polygon", square)
    block = hu[k, 11:21, 41:51]
    stats = widget.measure.lines[-1]
    expected = (
        f"mean {block.mean():.1f} HU, SD {block.std(ddof=1):.1f}, min {block.min():.0f}, max {block.max():.0f}, "
        f"area {(10 * 0.8) ** 2 / 100:.2f} cm² (100 voxels)"
    )
    assert stats == expected
    # Listed in the dock, and each shape labelled on the canvas.
    layer = widget.measure.layer()
    assert widget.measurements_text.value.splitlines() == [f"{n + 1}. {s}" for n, s in enumerate(widget.measure.lines)]
    assert list(layer.features["label"]) == ["40.0 mm", "mean 100.0 HU", f"mean {block.mean():.1f} HU"]
    # Moving a shape measures it again: the square one column left holds columns 40-49.
    layer.data = [*layer.data[:2], layer.data[2] - [0, 0, 1]]
    assert widget.measure.lines[2].startswith(f"mean {hu[k, 11:21, 40:50].mean():.1f} HU")
    # Drawn in the coronal view, along z over 10 slices of 2.5 mm: 25 mm.
    widget[3][1].native.click()  # the view row's "Coronal"
    assert viewer.dims.order[-3] == 1
    draw(widget, "Line", [world(ct, 4, 30, 20), world(ct, 14, 30, 20)])
    assert widget.measure.lines[-1] == "25.0 mm"
    # A region beside the CT (columns 70-80 of 64, in this coronal plane) says so; Clear removes everything.
    draw(widget, "Polygon", [world(ct, 4, 30, 70), world(ct, 4, 30, 80), world(ct, 8, 30, 80)])
    assert widget.measure.lines[-1] == "the region holds no voxel of the CT: draw it larger or over the image"
    widget.clear_button.native.click()
    assert len(layer.data) == 0 and widget.measure.lines == []
    assert "No measurement" in widget.measurements_text.value
    assert [lyr.name for lyr in viewer.layers] == [ct.name, MEASURE_LAYER]


def test_the_corner_names_patient_series_slice_and_window_and_follows_them(make_napari_viewer, qtbot):
    series = require_shared(DICOM_SERIES)
    viewer = make_napari_viewer()
    ct, widget = open_dock(viewer, series)
    qtbot.waitUntil(lambda: "ctcolor_reading" not in ct.metadata, timeout=60_000)
    widget.ct.reset_choices()
    widget.ct.value = ct
    overlay = viewer.canvas.overlays.text
    files = sorted(series.iterdir())
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    reader = sitk.ImageSeriesReader()
    image = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(series)))
    count = image.GetSize()[2]
    for k in (0, count // 2, count - 1):
        z = image.TransformIndexToPhysicalPoint((0, 0, k))[2]
        viewer.dims.set_point(0, z)
        low, high = ct.contrast_limits
        lines = overlay.text.splitlines()
        assert overlay.visible and str(header.SeriesDescription) in lines
        assert f"Axial {k + 1}/{count}  z {z:.1f} mm" in lines
        assert lines[-1] == f"W {high - low:.0f}  L {(low + high) / 2:.0f}"
    assert str(header.StudyDate)[:4] in lines[0]
    ct.contrast_limits = (-160.0, 240.0)
    assert overlay.text.splitlines()[-1] == "W 400  L 40"
    widget[3][1].native.click()  # "Coronal": the row under the point, as SimpleITK places it
    z, y, x = viewer.dims.point
    row = round(image.TransformPhysicalPointToContinuousIndex((x, y, z))[1])
    assert f"Coronal {row + 1}/{image.GetSize()[1]}  y {y:.1f} mm" in overlay.text.splitlines()
    widget.corner.value = False
    assert not overlay.visible


def _click(view, position, pos=(200, 200)) -> None:
    """A left click without a drag, through napari's mouse dispatch."""
    common = dict(button=1, modifiers=[], position=position, view_direction=None, dims_displayed=[1, 2])
    mouse_press_callbacks(view, ReadOnlyWrapper(Event("mouse_press", pos=pos, is_dragging=False, **common)))
    mouse_release_callbacks(view, ReadOnlyWrapper(Event("mouse_release", pos=pos, is_dragging=False, **common)))


def test_linked_planes_show_the_other_planes_with_one_crosshair_and_one_window(make_napari_viewer, qtbot, phantom):
    path, _ = phantom
    viewer = make_napari_viewer(show=True)
    ct, widget = open_dock(viewer, path)
    widget.linked.value = True
    planes = widget.planes
    assert planes.open and "opening" in widget.status.value  # one pane per turn of the event loop
    qtbot.waitUntil(lambda: planes.ready, timeout=30_000)
    assert "click in any view" in widget.status.value
    coronal, sagittal = planes.panes
    assert [pane.dims.order[-3] for pane in planes.panes] == [1, 2]  # coronal (slider y), sagittal (slider x)
    for pane in planes.panes:
        copy = next(lyr for lyr in pane.layers if lyr.name == ct.name)
        assert copy.data is ct.data  # no voxel copied
        np.testing.assert_allclose(copy.scale, ct.scale)
        np.testing.assert_allclose(copy.translate, ct.translate)
        assert pane.dims.point == viewer.dims.point
    # A click in the coronal pane moves every plane to the voxel clicked: the axial slice and the sagittal plane.
    target = world(ct, 5, 20, 44)
    _click(coronal, tuple(target))
    np.testing.assert_allclose(viewer.dims.point, target, atol=1e-6)
    np.testing.assert_allclose(sagittal.dims.point, target, atol=1e-6)
    # Each view's crosshair passes through the point, its lines coloured as the planes they stand for.
    for view in (viewer, *planes.panes):
        cross = next(lyr for lyr in view.layers if lyr.name == CROSSHAIR)
        ends = [np.array([cross.data_to_world(p) for p in line]) for line in cross.data]
        vertical, horizontal = view.dims.order[-2:]
        for line in ends:
            np.testing.assert_allclose(line[:, view.dims.order[-3]], target[view.dims.order[-3]], atol=1e-6)
        assert np.allclose(ends[0][:, vertical], target[vertical]) and np.allclose(
            ends[1][:, horizontal], target[horizontal]
        )
    axial_cross = next(lyr for lyr in viewer.layers if lyr.name == CROSSHAIR)
    colours = {tuple(np.round(c[:3], 2)) for c in axial_cross.edge_color}
    expected = {
        tuple(np.round(np.frombuffer(bytes.fromhex(PLANE_COLOURS[p][1:]), np.uint8) / 255, 2))
        for p in ("coronal", "sagittal")
    }
    assert colours == expected
    # The crosshair is drawn: the pane's screenshot holds the axial plane's red line.
    qtbot.wait(300)
    shot = planes._qt[0].screenshot(flash=False)
    red = (shot[..., 0] > 200) & (shot[..., 1] < 110) & (shot[..., 2] < 110)
    assert red.sum() >= 0.1 * shot.shape[1]  # a line across the pane
    # Scrolling the main view moves the panes' lines; a window set anywhere is everyone's.
    viewer.dims.set_point(0, world(ct, 9, 0, 0)[0])
    assert coronal.dims.point[0] == viewer.dims.point[0]
    ct.contrast_limits = (-160.0, 240.0)
    copies = [next(lyr for lyr in pane.layers if lyr.name == ct.name) for pane in planes.panes]
    assert all(tuple(copy.contrast_limits) == (-160.0, 240.0) for copy in copies)
    copies[1].contrast_limits = (-1350.0, 150.0)
    assert tuple(ct.contrast_limits) == (-1350.0, 150.0) and tuple(copies[0].contrast_limits) == (-1350.0, 150.0)
    # A drag pans: the point stays.
    point = viewer.dims.point
    common = dict(button=1, modifiers=[], position=tuple(target), view_direction=None, dims_displayed=[1, 2])
    mouse_press_callbacks(sagittal, ReadOnlyWrapper(Event("mouse_press", pos=(100, 100), is_dragging=False, **common)))
    mouse_move_callbacks(sagittal, ReadOnlyWrapper(Event("mouse_move", pos=(160, 130), is_dragging=True, **common)))
    mouse_release_callbacks(
        sagittal,
        ReadOnlyWrapper(Event("mouse_release", pos=(160, 130), is_dragging=True, **{**common, "position": (0, 0, 0)})),
    )
    assert viewer.dims.point == point
    # Unticked: the panes and the crosshair are gone; the dock closed.
    widget.linked.value = False
    assert not planes.open and not any(lyr.name == CROSSHAIR for lyr in viewer.layers)
    assert DOCK_NAME not in viewer.window.dock_widgets
