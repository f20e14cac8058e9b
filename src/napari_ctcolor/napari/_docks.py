"""What the plugin's dock widgets share.

- One column of the viewer window, as tabs: stacked, their heights add up and push the viewer's slice slider and
  status bar off a 1080 px screen (`tab_with_siblings`).
- A main thread kept free (`settle_heap`).
- Following the viewer: its layer list, the dock's deletion, radiological orientation (`attach_to_viewer`).
- Progress in each widget's own bar and status line, not through napari's `progress`: while a napari progress runs,
  its activity button animates a GIF, and in a window that holds an OpenGL canvas each frame recomposes the window.
  Under Mesa's software renderer (a virtual X server, a remote desktop without a GPU) that took a core: the same
  registration of the 3 mm CT to a rotated copy of itself took 11.6-12.0 s in the widget with napari's progress,
  9.3 s without, 8.9 s in a bare process (2-core AMD EPYC, 2026-11-26).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QDockWidget, QMainWindow, QTabBar, QWidget

from ._view import follow_radiological_orientation

_OURS: weakref.WeakSet[QWidget] = weakref.WeakSet()  # the Qt widgets of this plugin's dock widgets
_SETTLED = False


def settle_heap() -> None:
    """Move the objects alive once the plugin is loaded (torch, napari, Qt: 600 000 of them) out of the reach of
    Python's cyclic garbage collector (`gc.freeze`), once per process.

    napari runs a full `gc.collect` in the main thread for each layer it removes; with torch loaded that took 0.3 s a
    layer on 2 cores, so leaving a 3D view or replacing a result froze the viewer for a second. Frozen objects are
    never collected, so garbage is collected first; what stays is modules, classes and the viewer, alive for the
    process anyway. New objects are collected as before.
    """
    global _SETTLED
    if not _SETTLED:
        _SETTLED = True
        gc.collect()
        gc.freeze()


def tab_with_siblings(native: QWidget) -> None:
    """Once ``native`` sits in its dock, tab that dock with this plugin's other docks in the same window area.

    napari docks a plugin widget after constructing it, so this waits for the event loop to come back; a widget
    that is not docked (used on its own) is left alone.
    """
    _OURS.add(native)
    QTimer.singleShot(0, lambda: _tab(native))


def _dock_of(widget: QWidget) -> QDockWidget | None:
    """The dock holding ``widget``; None when it is not docked or its Qt object is gone (a closed viewer's)."""
    try:
        parent = widget.parentWidget()
    except RuntimeError:
        _OURS.discard(widget)
        return None
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parentWidget()
    return parent


def _tab(native: QWidget) -> None:
    dock = _dock_of(native)
    window = dock.parentWidget() if dock is not None else None
    if not isinstance(window, QMainWindow):
        return
    # Qt reads "&" in a tab's or a menu action's text as a shortcut marker (the tab showed "Register _checkerboard");
    # the tab bar and the Window menu take their text from the dock's title, so "&" is escaped there, once.
    title = dock.windowTitle()
    if "&" in title.replace("&&", ""):
        dock.setWindowTitle(title.replace("&", "&&"))
    area = window.dockWidgetArea(dock)
    siblings = [
        other
        for other in (_dock_of(widget) for widget in list(_OURS) if widget is not native)
        if other is not None
        and other is not dock
        and other.parentWidget() is window
        and window.dockWidgetArea(other) == area
        and not other.isFloating()
    ]
    if siblings:
        window.tabifyDockWidget(siblings[-1], dock)
        dock.show()
        dock.raise_()
        QTimer.singleShot(0, lambda: _unelided_tabs(window))  # Qt makes the tab bar on its next layout


def _unelided_tabs(window: QMainWindow) -> None:
    """The tab bars that hold this plugin's docks show their whole titles ("Register & checkerboard (napari-ctcolor)"
    was cut to "Regis...") and scroll when the titles are wider than the column."""
    titles = {dock.windowTitle() for dock in (_dock_of(widget) for widget in list(_OURS)) if dock is not None}
    for bar in window.findChildren(QTabBar):
        if any(bar.tabText(i) in titles for i in range(bar.count())):
            bar.setElideMode(Qt.TextElideMode.ElideNone)
            bar.setUsesScrollButtons(True)


def attach_to_viewer(native: QWidget, viewer: Any, on_layers: Callable, on_closed: Callable) -> Callable[[], None]:
    """Wire a dock widget to its viewer: ``on_layers`` whenever a layer is added, removed or moved, ``on_closed`` when
    the dock's Qt widget ``native`` is deleted, and radiologically oriented views. Returns the function that stops
    ``on_layers`` (for ``on_closed`` to call)."""
    events = viewer.layers.events
    layer_events = (events.inserted, events.removed, events.reordered)
    for event in layer_events:
        event.connect(on_layers)
    native.destroyed.connect(on_closed)
    follow_radiological_orientation(viewer)

    def detach() -> None:
        for event in layer_events:
            event.disconnect(on_layers)

    return detach
