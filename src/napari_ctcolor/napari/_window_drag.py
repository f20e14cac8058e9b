"""Window/level by right-drag on the canvas, as on a PACS workstation, from the first image a CT opens in; and a
double-click that centres the other planes on the point clicked.

The napari reader installs both on the viewer it opens a CT into (`install_mouse_controls`, once per viewer), so a
reader can window a freshly opened CT before any panel is open; the colorize panel installs them too. The drag windows
the active layer when it is one of the plugin's grey images (a CT, or a registration output), else the topmost visible
one: a colour layer on top (a Run's result) leaves the drag to the CT under it, whose colour follows its window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image

from ..windowing import Window
from ._layers import META_KEY, set_contrast

if TYPE_CHECKING:
    import napari

#: Right-drag window/level: pixels of drag that double the width (rightwards) or move the centre by one starting
#: width (downwards).
WINDOW_DRAG_PX = 200.0


def _ours(layer) -> bool:
    """A grey image layer the plugin made (read or derived)."""
    return (
        isinstance(layer, Image) and not layer.rgb and isinstance(layer.metadata, dict) and META_KEY in layer.metadata
    )


def drag_target(viewer: napari.Viewer) -> Image | None:
    """The layer a right-drag windows: the active layer if it is one of the plugin's grey images, else the topmost
    visible one, else None."""
    active = viewer.layers.selection.active
    if _ours(active):
        return active
    return next((layer for layer in reversed(viewer.layers) if layer.visible and _ours(layer)), None)


def window_drag(viewer: napari.Viewer, event):
    """Right-drag (2D): rightwards widens the window (x2 per `WINDOW_DRAG_PX` pixels), leftwards narrows it; downwards
    raises its centre (the image darkens, one starting width per `WINDOW_DRAG_PX`), upwards lowers it. napari's camera,
    which pans and zooms with the mouse, is held meanwhile."""
    layer = drag_target(viewer)
    if event.button != 2 or layer is None or viewer.dims.ndisplay != 2:
        return
    low, high = (float(v) for v in layer.contrast_limits)
    centre, width = (low + high) / 2, high - low
    start = np.asarray(event.pos, dtype=float)
    viewer.camera.mouse_pan = False
    try:
        yield
        while event.type == "mouse_move":
            dx, dy = np.asarray(event.pos, dtype=float) - start
            win = Window(centre + dy * width / WINDOW_DRAG_PX, max(1.0, width * 2.0 ** (dx / WINDOW_DRAG_PX)))
            set_contrast(layer, win.limits)
            yield
    finally:
        viewer.camera.mouse_pan = True


def centre_on_click(viewer: napari.Viewer, event) -> None:
    """Double-click (2D): every axis of the viewer's point moves to the position clicked, so the axial, coronal and
    sagittal planes (the panels' plane buttons) all pass through it, as a PACS's linked cursor does."""
    if viewer.dims.ndisplay == 2 and event.position is not None:
        viewer.dims.point = tuple(float(v) for v in event.position)


def install_mouse_controls(viewer: napari.Viewer | None) -> None:
    """Add `window_drag` and `centre_on_click` to ``viewer``'s mouse callbacks once (None: no viewer)."""
    if viewer is not None and window_drag not in viewer.mouse_drag_callbacks:
        viewer.mouse_drag_callbacks.append(window_drag)
        viewer.mouse_double_click_callbacks.append(centre_on_click)
