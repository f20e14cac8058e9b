"""napari reader: DICOM folders and files, NIfTI, MHA/MHD, NRRD and DICOMweb series URLs -> one image layer in HU at
its physical place; the colour images we write (RGB NIfTI, RGB DICOM series, PNG slice folders) -> one RGB layer at
their physical place.

In a running viewer (Qt's event loop running: a file opened from the menu, dropped on the canvas, or opened from
napari's console) a CT is read in a worker: the reader returns at once with a one-voxel placeholder layer, which
the worker's result fills (its voxels, geometry, window and metadata); the viewer keeps answering meanwhile, and the
widgets refuse the layer until then (`READING_KEY`). Elsewhere (a script before ``napari.run()``, a test) the reader
reads before it returns, as napari's own readers do, so that the returned layer holds the CT.
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

import numpy as np

from ..errors import CTColorError
from ..io import ITK_SUFFIXES, NIFTI_SUFFIXES, ColorVolume, Volume, is_color, read_image
from ..io.color_read import PNG_GEOMETRY
from ..io.dicomweb import is_series_url
from ._layers import CONTRAST_WINDOW_KEY, READING_KEY, image_layer_data, rgb_layer_data, stem
from ._view import follow_radiological_orientation
from ._window_drag import install_mouse_controls

_DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def _looks_like_dicom(path: Path) -> bool:
    """A DICOM suffix, the "DICM" magic after the preamble, or the start of an old archive's file without either: an
    implicit VR little endian data set whose first element is in group 0008 (identifying) with a short length."""
    if path.suffix.lower() in _DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group, _, length = struct.unpack("<HHI", head[:8])
    return group == 0x0008 and length < 1024


def _folder_has_dicom(folder: Path, max_files: int = 64) -> bool:
    """Cheap check on the first files only: a folder napari offers us may be huge."""
    seen = 0
    for root, _, files in os.walk(folder):
        for name in files:
            if _looks_like_dicom(Path(root) / name):
                return True
            seen += 1
            if seen >= max_files:
                return False
    return False


def get_reader(path):
    """Return `read_ct` when ``path`` is something we read, else None (napari then tries other readers)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if is_series_url(path):  # ROOT/studies/<uid>/series/<uid>: read over DICOMweb
        return read_ct
    path = Path(path)
    if path.is_dir():
        return read_ct if (path / PNG_GEOMETRY).is_file() or _folder_has_dicom(path) else None
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES) or _looks_like_dicom(path):
        return read_ct
    return None


def axis_ordered(volume: Volume) -> Volume:
    """``volume`` with its array axes (Z, Y, X) running along LPS z, y, x, each in either sense.

    napari slices world axes: when the array axes are stored permuted (a sagittal or coronal acquisition, or the
    neurite-OASIS brains, stored LIA), the displayed plane takes its rows and columns from other axes and vispy's
    transform is singular. Such volumes are reordered with SimpleITK's ``DICOMOrient`` (an exact transpose and
    reversal of axes, no interpolation); every voxel keeps its physical position. Other volumes are returned as is.
    """
    if np.array_equal(np.argmax(np.abs(volume.direction), axis=0), [0, 1, 2]):
        return volume
    import SimpleITK as sitk

    return Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), "LPS"), meta=dict(volume.meta))


def read_ct(path):
    """Read one CT (or other scalar image, or one of our colour images) into a layer: in a worker where the viewer's
    event loop runs (module docstring), else before returning. Errors reach napari as one-line InputError messages
    (from the worker: as a napari error notification, the placeholder removed)."""
    if isinstance(path, list):
        path = path[0]
    import napari

    viewer = napari.current_viewer()
    install_mouse_controls(viewer)  # right-drag window/level and double-click, from the first image
    if viewer is not None:
        follow_radiological_orientation(viewer)  # coronal and sagittal head up before any dock is opened
    if viewer is None or not _event_loop_running() or is_series_url(path) or is_color(path):
        data = _layer_data(read_image(path))
        if viewer is not None:
            _say_opening_window(viewer, data[1])
        return [data]
    return [_read_in_worker(viewer, path)]


def _layer_data(image: Volume | ColorVolume) -> tuple:
    if isinstance(image, ColorVolume):
        return rgb_layer_data(image)
    return image_layer_data(axis_ordered(image))


def _event_loop_running() -> bool:
    """Whether this is Qt's main thread inside its running event loop (an interactive viewer)."""
    from qtpy.QtCore import QCoreApplication, QThread

    app = QCoreApplication.instance()
    thread = QThread.currentThread()
    return app is not None and thread is app.thread() and thread.loopLevel() > 0


def _read_in_worker(viewer, path) -> tuple:
    """A placeholder layer named as the CT will be, filled by a worker that reads ``path``."""
    from napari.qt.threading import create_worker
    from napari.utils.notifications import show_error

    token = uuid.uuid4().hex

    def placeholder():
        return next((lyr for lyr in viewer.layers if lyr.metadata.get(READING_KEY) == token), None)

    def fill(result: tuple) -> None:
        layer = placeholder()
        if layer is not None:  # not closed meanwhile
            _fill_layer(viewer, layer, result)

    def failed(exc: Exception) -> None:
        layer = placeholder()
        if layer is not None:
            viewer.layers.remove(layer)
        if not isinstance(exc, CTColorError):
            raise exc  # a bug: napari's error reporter shows its traceback
        show_error(str(exc))

    worker = create_worker(lambda: _layer_data(read_image(path)), _ignore_errors=True)
    worker.returned.connect(fill)
    worker.errored.connect(failed)
    worker.start()
    empty = np.full((1, 1, 1), -1024, dtype=np.int16)
    return empty, {"name": stem(str(path)) or "CT", "colormap": "gray", "metadata": {READING_KEY: token}}, "image"


def _fill_layer(viewer, layer, result: tuple) -> None:
    """Give the placeholder ``layer`` the read CT ``result`` (a LayerDataTuple of `image_layer_data`): its geometry,
    voxels, window, name and metadata; the view reset when it is the viewer's only layer, as napari resets it for a
    first layer."""
    data, kwargs, _ = result
    with layer.events.blocker_all():
        for key in ("scale", "translate", "affine"):
            if key in kwargs:
                setattr(layer, key, kwargs[key])
        layer.metadata = kwargs["metadata"]
    layer.data = data
    layer.interpolation2d = kwargs["interpolation2d"]  # its event reaches the drawn node and the layer's control
    layer.name = kwargs["name"]
    layer.reset_contrast_limits_range()
    layer.contrast_limits = kwargs["contrast_limits"]
    if len(viewer.layers) == 1:
        viewer.reset_view()
        viewer.dims.current_step = tuple(n // 2 for n in viewer.dims.nsteps)
    _say_opening_window(viewer, kwargs)


def _say_opening_window(viewer, kwargs: dict) -> None:
    """Say in napari's status bar when a CT opened in its contrast window (`app.window.opening_window`), and where
    its header's window is."""
    contrast = kwargs["metadata"].get(CONTRAST_WINDOW_KEY)
    if contrast is not None:
        viewer.status = (
            f"{kwargs['name']}: contrast-enhanced blood, opened in the contrast window {contrast[0]:g}/{contrast[1]:g} "
            "(its header's window: Colorize volume, Window)"
        )
