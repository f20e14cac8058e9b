"""Radiological display in napari: head up in coronal and sagittal views, and one-click axial/coronal/sagittal.

Our layers put world axes (z, y, x) along LPS: z towards the head, y towards the back, x towards the patient's left.
napari draws the first displayed axis downwards, so with its defaults an axial view is already radiological
(anterior up, patient's left on screen right) but coronal and sagittal views show the feet at the top. The fix is
napari's own 2D camera orientation, chosen from which world axis is vertical: z points up, every other axis down;
the horizontal axis always runs rightwards (x: the patient's left on the right; y in a sagittal view: anterior on
the left). Only the camera changes, never the data or the layers' transforms, so coordinates and other layers are
unaffected.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from magicgui.widgets import Container, PushButton

if TYPE_CHECKING:
    import napari

PLANES = ("axial", "coronal", "sagittal")


def plane_order(ndim: int, plane: str) -> tuple[int, ...]:
    """dims.order that shows ``plane``: the slider axis, then (vertical, horizontal) displayed axes."""
    z, y, x = ndim - 3, ndim - 2, ndim - 1
    last = {"axial": (z, y, x), "coronal": (y, z, x), "sagittal": (x, z, y)}[plane]
    return (*range(ndim - 3), *last)


def orient(viewer: napari.Viewer) -> None:
    """Set the 2D camera so that the world z axis (LPS superior) points up when it is displayed vertically."""
    dims = viewer.dims
    if dims.ndim < 3 or dims.ndisplay != 2:
        return
    vertical = dims.order[-2]
    wanted = ("up" if vertical == dims.ndim - 3 else "down", "right")
    if tuple(viewer.camera.orientation2d) != wanted:  # napari's orientation enums compare equal to their strings
        viewer.camera.orientation2d = wanted


#: ids of the viewers `follow_radiological_orientation` already follows (removed as each viewer is collected).
_FOLLOWED: set[int] = set()


def follow_radiological_orientation(viewer: napari.Viewer) -> None:
    """Keep `orient` applied whenever the displayed axes or the number of dimensions change, from the first CT the
    reader opens or the first dock, whichever comes first: the orientation must not depend on which panel is open.
    Connects once per viewer."""
    if id(viewer) not in _FOLLOWED:
        _FOLLOWED.add(id(viewer))
        weakref.finalize(viewer, _FOLLOWED.discard, id(viewer))

        def reorient(*_: object) -> None:
            orient(viewer)

        for event in (viewer.dims.events.order, viewer.dims.events.ndisplay, viewer.dims.events.ndim):
            event.connect(reorient)
    orient(viewer)


def show_plane(viewer: napari.Viewer, plane: str) -> None:
    """Show an axial, coronal or sagittal 2D view of the 3D layers, radiologically oriented, fitted to the window."""
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    ndim = viewer.dims.ndim
    if ndim < 3:
        return
    viewer.dims.ndisplay = 2
    viewer.dims.order = plane_order(ndim, plane)
    orient(viewer)
    viewer.reset_view()


def plane_buttons(viewer: napari.Viewer) -> Container:
    """A row of "Axial", "Coronal", "Sagittal" buttons for a dock widget."""
    buttons = []
    for plane in PLANES:
        button = PushButton(text=plane.capitalize(), tooltip=f"{plane} view, radiological orientation")
        button.changed.connect(lambda *_, p=plane: show_plane(viewer, p))
        buttons.append(button)
    return Container(widgets=buttons, layout="horizontal", labels=False, label="View")


def anterior_3d(viewer: napari.Viewer) -> None:
    """A 3D view from the patient's front: head up, the patient's left on the screen's right."""
    ndim = viewer.dims.ndim
    viewer.dims.ndisplay = 3
    # Depth along y (anterior -> posterior, away from the viewer), z vertical, x horizontal.
    viewer.dims.order = (*range(ndim - 3), ndim - 2, ndim - 3, ndim - 1)
    viewer.camera.orientation = ("away", "up", "right")
    viewer.camera.angles = (0.0, 0.0, 0.0)
    viewer.reset_view()


def show_layers_when_added(count: int) -> None:
    """Bring the next ``count`` layers added to the current viewer into view: camera fitted to them, slider at their
    middle.

    napari fits the camera only to a viewer's first layer, so a sample opened beside a patient lands wherever the
    patient's camera and slice happen to be, usually off-screen or on a slice outside the sample. Sample commands get
    no viewer, so this waits for the layers to arrive in `napari.current_viewer()`; with no viewer, or an empty one
    (napari fits that itself), it does nothing.
    """
    from napari import current_viewer

    viewer = current_viewer()
    if viewer is None or not len(viewer.layers):
        return
    added = []

    def on_inserted(event) -> None:
        added.append(event.value)
        if len(added) < count:
            return
        viewer.layers.events.inserted.disconnect(on_inserted)
        viewer.fit_to_view(layers=added)
        extent = added[0].extent.world  # (2, ndim) world min/max of the first layer
        middle = (extent[0] + extent[1]) / 2
        offset = viewer.dims.ndim - middle.size  # layer axes are the viewer's last ones
        axes = [offset + axis for axis in range(middle.size) if offset + axis not in viewer.dims.displayed]
        if axes:
            viewer.dims.set_point(axes, [middle[axis - offset] for axis in axes])

    viewer.layers.events.inserted.connect(on_inserted)
