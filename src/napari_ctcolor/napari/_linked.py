"""Linked planes: the two planes the viewer does not show (of axial, coronal, sagittal), each in a view of its own
beside the main canvas, with a crosshair through one shared point and each plane's line in the others.

napari draws one camera per canvas: its grid mode tiles layers under that one camera, in one plane, so it cannot show
three planes. What napari supports for more planes is more viewers: a `ViewerModel` shown by a `QtViewer` in a dock
(napari's "multiple viewer widget" example). Each pane holds its own copies of the viewer's image layers, sharing
their arrays (no voxel is copied); what a reader changes on a layer (its window, colormap, opacity, visibility, data)
is carried across, and a window set in a pane comes back to the viewer. The point is shared: scrolling any view
moves the others' lines, and a click (without dragging) in any view moves every plane to the voxel clicked.
Line colours are 3D Slicer's: axial red, coronal green, sagittal yellow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from napari.components import ViewerModel
from napari.layers import Image, Shapes
from napari.qt import QtViewer
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QSplitter

from ._layers import layer_attributes, set_contrast, shape_width
from ._view import PLANES, orient, plane_order

if TYPE_CHECKING:
    import napari

CROSSHAIR = "Crosshair"
#: The crosshair's width, as a share of the CT's largest extent (about 0.9 mm across a 350 mm field of view).
LINE_SHARE = 0.0025
PLANE_COLOURS = {"axial": "#ff4040", "coronal": "#40d040", "sagittal": "#ffd21f"}
#: Image attributes a pane's copy follows (and the viewer's layer follows back, for the window).
FOLLOWED = ("contrast_limits", "colormap", "gamma", "opacity", "visible")
#: A press and release closer than this many screen pixels is a click (it moves the crosshair), farther a pan.
CLICK_PX = 3.0
DOCK_NAME = "Linked planes"
#: The panes' smallest width and height in screen pixels: a plane smaller than this is not read.
PANE_PX = 320
#: Milliseconds between two steps of opening the panes: time for Qt to paint (a new pane's first paint sets up its
#: OpenGL) before the next step, so that the two never add up to one stall.
TURN_GAP_MS = 30


def plane_shown(viewer: Any) -> str:
    """The plane a 2D view shows: the one its slider axis cuts (z: axial, y: coronal, x: sagittal)."""
    ndim = viewer.dims.ndim
    return PLANES[viewer.dims.order[-3] - (ndim - 3)] if ndim >= 3 else "axial"


def crosshair_lines(viewer: Any, point: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """The two lines through ``point`` in ``viewer``'s displayed plane, across its layers' extent, each coloured as
    the plane it stands for (the horizontal line is the plane cut along the vertical axis, and the reverse)."""
    ndim = viewer.dims.ndim
    extent = np.asarray(viewer.layers.extent.world, dtype=float)[:, -3:]
    point = np.asarray(point, dtype=float)[-3:]
    vertical, horizontal = (axis - (ndim - 3) for axis in viewer.dims.order[-2:])
    lines, colours = [], []
    for fixed, varying in ((vertical, horizontal), (horizontal, vertical)):
        ends = np.repeat(point[None], 2, axis=0)
        ends[:, varying] = extent[:, varying]
        lines.append(ends)
        colours.append(PLANE_COLOURS[PLANES[fixed]])
    return lines, colours


class LinkedPlanes:
    """Two panes with the planes ``viewer`` does not show, and the crosshair in all three.

    Args:
        viewer: the main viewer.
        say: receives a line for the dock's status.
    """

    def __init__(self, viewer: napari.Viewer, say=lambda text: None) -> None:
        self._viewer, self._say = viewer, say
        self.panes: list[ViewerModel] = []
        self._qt: list[QtViewer] = []
        self._dock = None
        self._splitter: QSplitter | None = None  # the dock's widget, holding the panes
        self._syncing = False
        self._links: list[tuple[Any, Any]] = []  # (emitter, callback) to disconnect on close
        self._copy_links: list[tuple[Any, Any]] = []  # the same for the layer copies, renewed with them
        self._copied: list[int] = []  # ids of the viewer's layers the panes show
        self._crosshairs = False  # every view has its crosshair (the last step of opening)

    @property
    def open(self) -> bool:
        """The panes' dock is open (its panes may still be opening)."""
        return self._dock is not None

    @property
    def ready(self) -> bool:
        """Every pane is open and placed, and every view has its crosshair."""
        return self.open and self._crosshairs

    def show(self) -> None:
        """Open the panes (a dock beside the canvas) and the crosshair, a step per turn of the event loop (the viewer
        repaints in between): the dock with the first pane, as napari docks a second viewer; its plane; the second
        pane; its plane; then each view's crosshair (a session's first shapes layer sets up napari's shapes visual)."""
        if self.open:
            return
        if self._viewer.dims.ndim < 3:
            self._say("Linked planes need a 3D CT")
            return
        viewer = self._viewer
        self._splitter = QSplitter(Qt.Orientation.Vertical)
        first = self._new_pane()
        self._dock = viewer.window.add_dock_widget(self._splitter, name=DOCK_NAME, area="right", tabify=False)
        # napari keeps the displayed axes' point at the extent's corner: the crosshair starts at the middle.
        middle = np.asarray(viewer.layers.extent.world, dtype=float).mean(axis=0)
        viewer.dims.set_point(viewer.dims.displayed, middle[list(viewer.dims.displayed)])
        viewer.mouse_drag_callbacks.append(self._click)
        self._link(viewer.dims.events.point, lambda *_: self._follow_point(viewer))
        self._link(viewer.dims.events.order, lambda *_: self._place_planes())
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            self._link(event, lambda *_: self._copy_layers())
        self._say("Linked planes: opening...")
        QTimer.singleShot(TURN_GAP_MS, lambda: self._place_pane(*first))

    def _new_pane(self) -> tuple[ViewerModel, list[int]]:
        """A pane with copies of the viewer's image layers, in the dock; (its model, the layers copied)."""
        model = ViewerModel(title="linked plane")
        qt_viewer = QtViewer(model)
        qt_viewer.setMinimumSize(PANE_PX, PANE_PX)
        self._splitter.addWidget(qt_viewer)
        model.mouse_drag_callbacks.append(self._click)
        self._qt.append(qt_viewer)
        for source in self._sources():
            model.layers.append(self._copy(source))
        return model, [id(source) for source in self._sources()]

    def _add_pane(self) -> None:
        if self.open:  # not closed meanwhile
            model, copied = self._new_pane()
            QTimer.singleShot(TURN_GAP_MS, lambda: self._place_pane(model, copied))

    def _place_pane(self, model: ViewerModel, copied: list[int]) -> None:
        """A new pane joins the others, on its plane and the shared point (the turn after its canvas was made); then
        the next pane, or the crosshairs."""
        if not self.open:
            return
        self.panes.append(model)
        self._link(model.dims.events.point, lambda *_: self._follow_point(model))
        if copied == [id(source) for source in self._sources()]:
            self._copied = copied
        else:  # layers came or went since its copies were made: every pane's copies made again
            self._copied = []
            self._copy_layers()
        self._place_planes(only=model)
        if len(self.panes) < len(PLANES) - 1:
            QTimer.singleShot(TURN_GAP_MS, self._add_pane)
            return
        QTimer.singleShot(0, self._fit)  # once Qt has given the panes their size
        QTimer.singleShot(TURN_GAP_MS, lambda: self._add_crosshairs([self._viewer, *self.panes]))

    def _add_crosshairs(self, views: list) -> None:
        """The crosshair of the first of ``views``; the others' at the next turns."""
        if not self.open:
            return
        self._draw_crosshair(views[0], np.asarray(views[0].dims.point, dtype=float), create=True)
        if len(views) > 1:
            QTimer.singleShot(TURN_GAP_MS, lambda: self._add_crosshairs(views[1:]))
            return
        self._crosshairs = True
        self._say("Linked planes: click in any view to move the crosshair; scroll to move its plane")

    def _fit(self) -> None:
        for pane in self.panes:
            pane.reset_view()

    def close(self) -> None:
        """Close the panes and take the crosshair away."""
        if not self.open:
            return
        for emitter, callback in self._links + self._copy_links:
            emitter.disconnect(callback)
        self._links, self._copy_links, self._copied = [], [], []
        if self._click in self._viewer.mouse_drag_callbacks:
            self._viewer.mouse_drag_callbacks.remove(self._click)
        self._remove_crosshair(self._viewer)
        dock, self._dock = self._dock, None
        try:
            self._viewer.window.remove_dock_widget(dock)
        except (RuntimeError, AttributeError):  # the viewer's window is closing (or closed) with its docks
            return
        for qt_viewer in self._qt:
            qt_viewer.close()
        self.panes, self._qt, self._splitter, self._crosshairs = [], [], None, False

    def _link(self, emitter, callback, links: list | None = None) -> None:
        emitter.connect(callback)
        (self._links if links is None else links).append((emitter, callback))

    # -- layers -------------------------------------------------------------------------------------------------------

    def _sources(self) -> list[Image]:
        return [layer for layer in self._viewer.layers if isinstance(layer, Image) and layer.ndim >= 3]

    def _copy_layers(self) -> None:
        """Each pane shows copies of the viewer's image layers (same arrays, same placement), in the same order."""
        sources = self._sources()
        if [id(source) for source in sources] == self._copied:
            return  # another kind of layer (a shape) came or went
        for emitter, callback in self._copy_links:
            emitter.disconnect(callback)
        self._copy_links, self._copied = [], [id(source) for source in sources]
        for pane in self.panes:
            pane.layers.clear()
            for source in sources:
                pane.layers.append(self._copy(source))
        self._place_planes()

    def _copy(self, source: Image) -> Image:
        copy = Image(
            source.data,
            name=source.name,
            rgb=source.rgb,
            blending=source.blending,
            interpolation2d=source.interpolation2d,
            affine=source.affine,
            scale=source.scale,
            translate=source.translate,
            rotate=source.rotate,
            **{
                key: getattr(source, key)
                for key in FOLLOWED
                if not (source.rgb and key in ("contrast_limits", "gamma"))
            },
        )
        links = self._copy_links
        for key in FOLLOWED:
            self._link(getattr(source.events, key), lambda *_, k=key, c=copy, s=source: self._carry(s, c, k), links)
        self._link(source.events.data, lambda *_, c=copy, s=source: setattr(c, "data", s.data), links)
        self._link(
            copy.events.contrast_limits,
            lambda *_, c=copy, s=source: self._carry(c, s, "contrast_limits", fan_out=True),
            links,
        )
        return copy

    def _carry(self, origin: Image, target: Image, key: str, fan_out: bool = False) -> None:
        """``origin``'s ``key`` set on ``target``; with ``fan_out`` (a pane's window carried to the viewer's layer),
        the viewer's layer then carries it to every other pane."""
        if self._syncing or (origin.rgb and key in ("contrast_limits", "gamma")):
            return
        self._syncing = not fan_out
        try:
            if key == "contrast_limits":
                set_contrast(target, origin.contrast_limits)
            else:
                setattr(target, key, getattr(origin, key))
        finally:
            self._syncing = False

    # -- planes and the shared point ----------------------------------------------------------------------------------

    def _place_planes(self, only: ViewerModel | None = None) -> None:
        """The panes (or ``only`` that one) show the two planes the viewer does not, head up, fitted, on the viewer's
        point."""
        others = [plane for plane in PLANES if plane != plane_shown(self._viewer)]
        for pane, plane in zip(self.panes, others, strict=False):  # while the panes open, fewer panes than planes
            if pane.dims.ndim < 3 or (only is not None and pane is not only):
                continue
            pane.dims.ndisplay = 2
            pane.dims.order = plane_order(pane.dims.ndim, plane)
            orient(pane)
            pane.reset_view()
            pane.title = f"linked {plane}"
        self._follow_point(self._viewer)

    def _follow_point(self, origin: Any) -> None:
        """Every view on ``origin``'s point; the crosshair redrawn in each."""
        if self._syncing:
            return
        self._syncing = True
        try:
            point = tuple(origin.dims.point)
            for view in (self._viewer, *self.panes):
                if view is not origin and view.dims.ndim == len(point) and tuple(view.dims.point) != point:
                    view.dims.point = point
            for view in (self._viewer, *self.panes):  # once open, a crosshair a rebuild took is made again
                self._draw_crosshair(view, np.asarray(view.dims.point, dtype=float), create=self._crosshairs)
        finally:
            self._syncing = False

    def _draw_crosshair(self, view: Any, point: np.ndarray, create: bool = False) -> None:
        """``view``'s crosshair through ``point``: its layer updated, or made (``create``)."""
        if view.dims.ndim < 3 or view.dims.ndisplay != 2 or not len(self._sources()):
            return
        lines, colours = crosshair_lines(view, point)
        layer = next((lyr for lyr in view.layers if lyr.name == CROSSHAIR), None)
        if isinstance(layer, Shapes):
            layer.data = [np.array([layer.world_to_data(end) for end in line]) for line in lines]
            layer.edge_color = colours
            return
        if not create:
            return
        active = view.layers.selection.active
        # Placed as the first image is (`_measure` says why: napari shows a shape within half a data unit of the slice).
        first = self._sources()[0]
        placed = {key: value for key, value in layer_attributes(first).items() if key != "metadata"}
        layer = Shapes(ndim=view.dims.ndim, name=CROSSHAIR, opacity=0.7, **placed)
        ends = [np.array([layer.world_to_data(end) for end in line]) for line in lines]
        layer.add_lines(ends, edge_width=shape_width(first, LINE_SHARE), edge_color=colours)
        view.layers.append(layer)
        if active is not None:
            view.layers.selection.active = active  # the reader's layer stays the one windowed and measured

    @staticmethod
    def _remove_crosshair(view: Any) -> None:
        for layer in [lyr for lyr in view.layers if lyr.name == CROSSHAIR]:
            view.layers.remove(layer)

    def _click(self, view: Any, event):
        """A left click without a drag (in a 2D view, panning) moves every plane to the point clicked."""
        active = view.layers.selection.active
        if event.button != 1 or view.dims.ndisplay != 2 or getattr(active, "mode", "pan_zoom") != "pan_zoom":
            return
        start = np.asarray(event.pos, dtype=float)
        yield
        moved = False
        while event.type == "mouse_move":
            moved = moved or float(np.linalg.norm(np.asarray(event.pos, dtype=float) - start)) > CLICK_PX
            yield
        if not moved and event.position is not None:
            view.dims.point = tuple(float(v) for v in event.position)
