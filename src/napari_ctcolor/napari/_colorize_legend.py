"""What the colours stand for, in the colorize widget: the legend (the classes the volume shows, with their palette
swatches), the Pointer line (HU, position in mm, slice, and the colour class under napari's cursor with its
probability) and "Show colour classes" (a Labels layer of the most probable class: a visual aid, never a validated
segmentation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Label, PushButton
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QWidget

from ..app.colorize_session import ColorizeSession
from ..color import compose_rgb
from ..errors import CTColorError
from ..palettes import Palette, load_palette
from ..windowing import window
from ._layers import layer_attributes
from ._slab import slab_value

#: The legend lists classes that are the most probable one in at least this share of the volume's pixels.
LEGEND_MIN_SHARE = 0.001
#: The legend scrolls beyond this height (pixels): a long one would push the viewer's window off a 1080 px screen.
LEGEND_MAX_HEIGHT = 160
#: The pointer names a structure (liver, ribs) only when its probability in the network pixel is at least this; below
#: it says the structure's tissue (bone, soft tissue) with the summed probability of that tissue's classes: a name at
#: 9-15 % reads as a finding, and is not one.
POINTER_MIN_PROBABILITY = 0.5


def scroll_within(widget: QWidget, max_height: int) -> None:
    """Put ``widget`` (in a magicgui container's layout) into a scroll area at most ``max_height`` pixels high."""
    layout = widget.parentWidget().layout()
    index = layout.indexOf(widget)
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    scroll.setMaximumHeight(max_height)
    layout.insertWidget(index, scroll)
    scroll.setWidget(widget)


class ClassesAndPointer:
    """The legend, Pointer and colour-class part of `ColorizeWidget`: its controls (``controls``) and what they show.

    Args:
        viewer: the viewer (its cursor; the class map's layer goes into it).
        session: the dock's runs (``session.current``: the run described).
        ct_layer: the dock's CT layer menu.
        result_layer: the current run's colour layer, or None when it left the viewer.
        palette: the dock's chosen palette.
        in_viewer: whether a layer is still in the viewer.
        closed: True once the dock is closing.
    """

    def __init__(
        self,
        viewer,
        session: ColorizeSession,
        ct_layer: ComboBox,
        result_layer: Callable[[], Image | None],
        palette: Callable[[], Palette],
        in_viewer: Callable[[Image], bool],
        closed: Callable[[], bool],
    ) -> None:
        self._viewer, self._session, self._ct_layer, self._result_layer = viewer, session, ct_layer, result_layer
        self._palette, self._in_viewer, self._closed = palette, in_viewer, closed
        self.pointer = Label(label="Pointer", value="")
        self.pointer.native.setWordWrap(True)  # long text wraps instead of widening the dock over the canvas
        self.legend = Label(label="Legend", value="")
        self.classes_button = PushButton(text="Show colour classes", enabled=False)
        self.classes_button.changed.connect(self.show_classes)
        self._classes_worker = None  # the worker computing the class map
        self.controls = [self.pointer, self.legend, self.classes_button]

    def fill_legend(self, settings: dict) -> None:
        """Swatches and names of the classes the current run's volume shows, most common first, in the palette its
        colour was composed with (``settings``: a `ColorVolume`'s); each swatch as the class looks on screen: its
        colour composed at the grey its median HU takes in the window and at the chroma strength composed (a
        palette's own colour is drawn at the palette's brightness, which the window may be far from: the liver's in
        a lung window)."""
        kept = self._session.current
        if kept is None:
            return
        try:
            palette = self._palette()
        except CTColorError:
            return
        if palette.name != settings.get("palette"):
            return  # a newer palette choice is being composed; its result fills the legend
        rows = []
        figures = kept.chroma.legend_figures(kept.volume.array)  # made in the run's worker (`ColorizeSession`)
        median_hu = {name: hu for name, _, hu in figures}
        shown = [n for n, share, _ in figures if share >= LEGEND_MIN_SHARE and palette.class_rgb(n)]
        if not shown:
            self.legend.value = ""
            return
        centre, width = settings.get("window", (40.0, 400.0))
        grey = window(np.array([median_hu[name] for name in shown], dtype=np.float32), centre, width)
        swatches = compose_rgb(grey, palette.class_ab(shown).astype(np.float32), float(settings.get("chroma", 1)))
        for name, rgb in zip(shown, swatches.tolist(), strict=True):
            swatch = "#{:02x}{:02x}{:02x}".format(*rgb)
            rows.append(f'<span style="background-color:{swatch}">&nbsp;&nbsp;&nbsp;&nbsp;</span> {name}')
        self.legend.value = "<br>".join(rows)

    def legend_names(self) -> list[str]:
        """The class names the legend lists, in its order."""
        return [row.rsplit("</span> ", 1)[1] for row in self.legend.value.split("<br>") if row]

    def on_cursor(self, _event=None) -> None:
        """The pointer moved (napari's cursor position): show what is under it."""
        if not self._closed():
            self.pointer.value = self.pointer_line(self._viewer.cursor.position)

    def pointer_line(self, world_position) -> str:
        """What the Pointer line shows for a world position: the CT's HU there (and the slab MIP's while one is
        shown), the voxel's position in mm (LPS x, y, z), its axial slice (napari's slider index) and, after Run, the
        colour class with its probability; '' outside the CT."""
        kept = self._session.current
        ct = kept.ct if kept is not None and self._in_viewer(kept.ct) else self._ct_layer.value
        if ct is None or ct.multiscale:
            return ""
        index = np.round(np.asarray(ct.world_to_data(world_position), dtype=float)).astype(int)
        shape = ct.data.shape
        if index.size != len(shape) or not all(0 <= i < n for i, n in zip(index, shape, strict=True)):
            return ""
        hu = float(ct.data[tuple(index)])
        lps = np.asarray(ct.data_to_world(index), dtype=float)[::-1]  # world (z, y, x) -> LPS x, y, z
        position = ", ".join(f"{axis} {value:.1f}" for axis, value in zip("xyz", lps, strict=False))
        slab = slab_value(self._viewer, ct, tuple(index))  # what the screen shows there, beside the slice's HU
        parts = [f"HU {hu:.0f}" + (f" ({slab})" if slab else ""), f"LPS {position} mm"]
        if ct.ndim == 3:
            parts.append(f"slice {index[0]}/{shape[0] - 1}")
        if kept is not None and kept.ct is ct and self._result_layer() is not None:
            parts.append(self.describe(index))
        return " | ".join(parts)

    def describe(self, data_position) -> str:
        """'<class> <probability> %' for a position in the result layer's data coordinates ('' outside it; no class
        where the class layer shows none)."""
        kept = self._session.current
        index = np.round(np.asarray(data_position, dtype=float)).astype(int)
        if kept is None:
            return ""
        if index.size == 2:  # a 2D result layer shows the volume's only slice
            index = np.concatenate(([0], index))
        shape = kept.volume.shape
        if index.size != 3 or not all(0 <= i < n for i, n in zip(index, shape, strict=True)):
            return ""
        where = (*(int(i) for i in index), float(kept.volume.array[tuple(index)]))
        name, probability = kept.chroma.class_at(*where)
        if name == "air":  # what the class layer leaves clear: air, and the table or blankets outside the body
            return "no colour (air or outside the body)"
        if probability >= POINTER_MIN_PROBABILITY:
            return f"{name} {probability:.0%} (colour class, not a segmentation)"
        tissue, share = kept.chroma.tissue_at(*where)  # a guessed structure is not named: its tissue is
        return f"{tissue.replace('_', ' ')} {share:.0%} (tissue; no structure above {POINTER_MIN_PROBABILITY:.0%})"

    def _class_colors(self) -> DirectLabelColormap:
        """Each class label (1 + class index, `Chroma.most_probable`) in its colour under the current palette; the
        air (0) and classes the palette does not colour are clear."""
        classes = self._session.current.chroma.classes
        try:
            palette = self._palette()
        except CTColorError:
            palette = load_palette("anatomical")
        colors: dict[int | None, tuple[float, ...]] = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
        for index, name in enumerate(classes, start=1):
            rgb = palette.class_rgb(name)
            colors[index] = (*(c / 255.0 for c in rgb), 1.0) if rgb is not None else (0.0, 0.0, 0.0, 0.0)
        return DirectLabelColormap(color_dict=colors)

    def show_classes(self, *_: Any) -> Any:
        """Start making the Labels layer "<CT name> colour classes", the most probable class of each voxel, in a
        worker; returns the worker, None when there is no result to show. The class map and the layer (napari maps a
        direct colormap over the whole volume when it makes one: about 1 s for 20 slices of 512², 2.5 s for 275, on
        top of the map's 0.1 s per 20 slices on 2 cores) are made there; the main thread only adds it
        (`classes_busy` meanwhile)."""
        kept = self._session.current
        if kept is None or self._result_layer() is None:
            return None
        name = f"{kept.ct.name} colour classes"
        placement = {k: v for k, v in layer_attributes(self._result_layer()).items() if k != "metadata"}
        features = {"index": np.arange(len(kept.chroma.classes) + 1), "color_class": ["", *kept.chroma.classes]}
        style = {"name": name, "opacity": 0.4, "features": features, "colormap": self._class_colors(), **placement}

        def make() -> Labels:
            data = kept.chroma.most_probable(kept.volume.array)
            layer = Labels(data[0] if kept.ct.ndim == 2 else data, **style)
            # napari maps labels through a numba typed dict that numba compiles once per session: 1-3 s of the main
            # thread when the layer is first drawn (a 275-slice CT, 2 cores, 2026-11-27), here in the worker.
            layer.colormap.map(data.ravel()[:2])
            _warm_labels_overlay()
            return layer

        worker = create_worker(make, _ignore_errors=True)
        worker.returned.connect(lambda layer: self._show_class_layer(kept, layer))
        worker.finished.connect(lambda: self._classes_done(worker))
        self._classes_worker = worker
        self.classes_button.enabled = False
        worker.start()
        return worker

    @property
    def classes_busy(self) -> bool:
        """The colour classes are being computed."""
        return self._classes_worker is not None

    def _classes_done(self, worker: Any) -> None:
        if self._classes_worker is worker:
            self._classes_worker = None
        if not self._closed():
            self.classes_button.enabled = self._result_layer() is not None

    def _show_class_layer(self, kept: Any, layer: Labels) -> None:
        """Add (or replace) the class layer of ``kept``'s run, unless the run changed meanwhile."""
        if self._closed() or kept is not self._session.current or self._result_layer() is None:
            return
        existing = next((lyr for lyr in self._viewer.layers if lyr.name == layer.name), None)
        if existing is not None:
            self._viewer.layers.remove(existing)
        self._viewer.layers.append(layer)


def _warm_labels_overlay() -> None:
    """Build vispy's dash patterns, which napari's Labels layer needs for its polygon tool (agg lines) when its visual
    is made: 13 patterns in a Python loop, 0.22 s of the main thread the first time in a session (Sapphire Rapids, 2
    cores, 2026-11-28). vispy caches them (`functools.lru_cache`), so building them here, in the worker that makes the
    class layer, leaves the main thread only the cached copy."""
    try:
        from vispy.visuals.line.dash_atlas import DashAtlas
    except ImportError:  # a vispy that moved it: the main thread builds them, as without this
        return
    DashAtlas()
