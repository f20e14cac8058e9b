"""The colorize widget's window: one setting shared with the CT layer.

The widget's choice (a preset, one of the windows in the CT's DICOM header, the contrast window chosen for it, or
custom centre/width) sets the CT layer's contrast limits; the layer's contrast limits (napari's slider, a right-drag
on the canvas, another plugin) set the widget's choice. Both recompose the colour from the kept class probabilities
(`_colorize_run`), never re-running the network. A colorized CT other than the chosen one keeps following its own
window: changing it chooses that CT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, FloatSpinBox
from napari.layers import Image

from ..app.colorize_session import ColorizeSession
from ..errors import CTColorError
from ..io import Volume
from ..windowing import DEFAULT_PRESET, PRESETS, Window, default_window
from ._layers import CONTRAST_WINDOW_KEY, META_KEY, set_contrast

DICOM_DEFAULT = "DICOM default"
CUSTOM = "custom"


def preset_label(name: str) -> str:
    """How a window preset is shown to the user: "CTA" for ``cta``, words for the others (``soft_tissue``)."""
    return "CTA" if name == "cta" else name.replace("_", " ")


def widen_contrast_range(layer: Image) -> None:
    """Let a grey layer's contrast slider reach the whole of its data (napari limits it to the opening window when a
    layer is given contrast limits), so a window can be dragged wider than the one it opened with."""
    if not isinstance(layer.data, np.ndarray) or layer.data.size == 0:  # never load a lazy (dask, zarr) array here
        return
    low, high = float(np.nanmin(layer.data)), float(np.nanmax(layer.data))
    range_low, range_high = layer.contrast_limits_range
    if low < range_low or high > range_high:
        layer.contrast_limits_range = (min(low, range_low), max(high, range_high))


class WindowControl:
    """The window part of `ColorizeWidget`: the window menu and the custom centre/width fields (``controls``), kept in
    step with the chosen CT layer's contrast limits, and each colorized CT's colour layer with its CT's window.

    Args:
        ct_layer: the dock's CT layer menu (the chosen CT).
        session: the dock's runs (each CT's; the current one).
        recompose: recomposes the current run with the dock's settings.
        show_current_run: shows the current run's legend (after another CT was chosen).
        volume_of: a grey layer's voxels and geometry as a Volume.
        closed: True once the dock is closing.
    """

    def __init__(
        self,
        ct_layer: ComboBox,
        session: ColorizeSession,
        recompose: Callable[[], Any],
        show_current_run: Callable[[], Any],
        volume_of: Callable[[Image], Volume],
        closed: Callable[[], bool],
    ) -> None:
        self._ct_layer, self._session, self._recompose = ct_layer, session, recompose
        self._show_current_run, self._volume_of, self._closed = show_current_run, volume_of, closed
        # Choices from a callable: the chosen CT's own header windows are offered beside the presets.
        self.window = ComboBox(label="Window", choices=self._window_choices, value=DICOM_DEFAULT)
        self.centre_hu = FloatSpinBox(label="Centre (HU)", min=-5000, max=5000, step=5, value=40, enabled=False)
        self.width_hu = FloatSpinBox(label="Width (HU)", min=1, max=10000, step=10, value=400, enabled=False)
        self._filling = False  # True while the widget itself writes centre/width
        self._syncing = False  # True while the widget and the CT layer's contrast limits update each other
        self._watched: Image | None = None  # the CT layer whose contrast limits the window follows
        self.window.changed.connect(self._on_window)
        self.centre_hu.changed.connect(self._on_custom_window)
        self.width_hu.changed.connect(self._on_custom_window)
        self.controls = [self.window, self.centre_hu, self.width_hu]

    def spec(self) -> str | tuple[float, float] | None:
        """The engine's window argument: None (the volume's DICOM default), a preset name, or (centre, width)."""
        choice = self.window.value
        if choice == DICOM_DEFAULT:
            return None
        if choice == CUSTOM:
            return (float(self.centre_hu.value), float(self.width_hu.value))
        header = self._header_windows().get(choice)
        return tuple(header) if header is not None else choice

    def _shown_window(self) -> Window | None:
        """The window the current choice means for the chosen CT (else the kept one), for the centre/width fields."""
        choice = self.window.value
        if choice in PRESETS:
            return PRESETS[choice]
        if choice == DICOM_DEFAULT:
            return self._dicom_default()
        return self._header_windows().get(choice)

    def _meta_of_ct(self) -> dict:
        """The chosen CT layer's reader metadata (else the kept run's)."""
        layer = self._ct_layer.value
        if layer is not None:
            meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
            return meta if isinstance(meta, dict) else {}
        return self._session.current.volume.meta if self._session.current is not None else {}

    def _header_windows(self) -> dict[str, Window]:
        """The chosen CT's own windows by choice name: its DICOM header's windows other than the first (which is
        "DICOM default"), and the contrast window chosen for it (`CONTRAST_WINDOW_KEY`: as it opened, or after Run)."""
        meta = self._meta_of_ct()
        windows = [Window(*(float(v) for v in pair)) for pair in meta.get("windows", [])]
        named = {f"DICOM {win.centre:g}/{win.width:g}": win for win in windows[1:] if win != windows[0]}
        layer = self._ct_layer.value
        contrast = layer.metadata.get(CONTRAST_WINDOW_KEY) if layer is not None else None
        if contrast is not None:
            win = Window(*(float(v) for v in contrast))
            named[f"contrast {win.centre:g}/{win.width:g}"] = win
        return named

    def _window_choices(self, _widget=None) -> list[tuple[str, str]]:
        """(shown name, value) of the window choices: DICOM default, the CT's own windows, presets, custom."""
        header = [(name, name) for name in self._header_windows()]
        presets = [(preset_label(name), name) for name in PRESETS]
        return [(self._default_label(), DICOM_DEFAULT), *header, *presets, (CUSTOM, CUSTOM)]

    def _default_label(self) -> str:
        """What the default window is called: "DICOM default" where the CT's header gives one; a NIfTI, MHA or NRRD
        has none, and its default is a preset (`windowing.default_window`), named as such."""
        meta = self._meta_of_ct()
        if "window" in meta:
            return DICOM_DEFAULT
        if meta.get("modality", "CT") == "CT":
            return f"default ({preset_label(DEFAULT_PRESET)})"
        return "default (1-99 % of the values)"

    def _dicom_default(self) -> Window | None:
        """The chosen CT's own default window (DICOM WindowCenter/Width, else the abdomen preset for CT)."""
        layer = self._ct_layer.value
        if layer is not None and isinstance(layer.data, np.ndarray):  # never load a lazy (dask, zarr) array here
            try:
                return default_window(self._volume_of(layer))
            except CTColorError:
                return None
        return default_window(self._session.current.volume) if self._session.current is not None else None

    def _fill_window_fields(self, *_: Any) -> None:
        """Show the chosen window's centre/width (editable for "custom", which then starts from them)."""
        custom = self.window.value == CUSTOM
        self.centre_hu.enabled = self.width_hu.enabled = custom
        shown = None if custom else self._shown_window()
        if shown is not None:
            self._filling = True
            try:
                self.centre_hu.value, self.width_hu.value = shown.centre, shown.width
            finally:
                self._filling = False

    def _on_window(self, _choice: str) -> None:
        self._fill_window_fields()
        self._push_window()
        self._recompose()

    def _on_custom_window(self, _value=None) -> None:
        if self.window.value == CUSTOM and not self._filling:
            self._push_window()
            self._recompose()

    def watch_ct(self, *_: Any) -> None:
        """Follow the chosen CT layer's contrast limits, starting from what it shows now."""
        layer = self._ct_layer.value
        if layer is self._watched:
            return
        self.unwatch()
        self._watched = layer
        before = self._session.current
        if self._session.choose(layer) is not before:
            self._show_current_run()  # another CT's run: its legend
        self._rebuild_window_choices()  # this CT's header windows
        if layer is not None:
            widen_contrast_range(layer)
            layer.events.contrast_limits.connect(self._on_ct_contrast)
            layer.events.data.connect(self._on_ct_data)
            self._on_ct_contrast()
        else:
            self._fill_window_fields()

    def _on_ct_data(self, *_: Any) -> None:
        """The CT layer's voxels were replaced (the reader's worker filled its placeholder): its header's windows and
        HU range, again."""
        layer = self._watched
        if layer is None:
            return
        self._rebuild_window_choices()
        widen_contrast_range(layer)
        self._on_ct_contrast()

    def offer_new_choices(self) -> None:
        """The chosen CT gained a window of its own (the contrast window a run chose): the menu offers it, the choice
        shown left as it is."""
        with self.window.changed.blocked():
            self.window.reset_choices()

    def _rebuild_window_choices(self) -> None:
        """The window menu for the chosen CT, in its order (magicgui keeps the choices that stay and appends new ones
        after them: a CT's header windows would come after "custom")."""
        with self.window.changed.blocked():
            self.window.choices = [(DICOM_DEFAULT, DICOM_DEFAULT)]
            self.window.reset_choices()

    def unwatch(self) -> None:
        if self._watched is not None:
            self._watched.events.contrast_limits.disconnect(self._on_ct_contrast)
            self._watched.events.data.disconnect(self._on_ct_data)
            self._watched = None

    def _choice_for(self, win: Window) -> str:
        """The window choice that means ``win`` for the chosen CT: the current one when it still fits, else the DICOM
        default, a preset, or custom."""

        def same(other: Window | None) -> bool:
            return other is not None and np.allclose(other, win, rtol=0, atol=1e-3 * max(win.width, 1.0))

        current, default = self.window.value, self._dicom_default()  # the default once: a slider drag calls this often
        named = {**self._header_windows(), **PRESETS}
        if current in named and same(named[current]) or current == DICOM_DEFAULT and same(default):
            return current
        if same(default):
            return DICOM_DEFAULT
        return next((name for name, preset in named.items() if same(preset)), CUSTOM)

    def _on_ct_contrast(self, *_: Any) -> None:
        """The CT layer's contrast limits changed: show that window in the widget and recompose the colour."""
        layer = self._watched
        if self._syncing or layer is None:
            return
        low, high = (float(v) for v in layer.contrast_limits)
        win = Window((low + high) / 2, max(high - low, 1e-6))
        choice = self._choice_for(win)
        with self.window.changed.blocked():
            self.window.value = choice
        if choice == CUSTOM:
            self._filling = True
            try:
                self.centre_hu.value, self.width_hu.value = win.centre, win.width
            finally:
                self._filling = False
        self._fill_window_fields()
        if self._session.current is not None and self._session.current.ct is layer:
            self._recompose()

    def _push_window(self) -> None:
        """Show the widget's window on the CT layer (its contrast limits)."""
        layer = self._watched
        if self._syncing or layer is None:
            return
        if self.window.value == CUSTOM:
            win = Window(float(self.centre_hu.value), float(self.width_hu.value))
        else:
            win = self._shown_window()
        if win is None:
            return
        self._syncing = True
        try:
            set_contrast(layer, win.limits)  # a window wider than the data (lung on a cropped CT) widens the slider
        finally:
            self._syncing = False

    def unlink(self, ct: Image) -> None:
        """Forget ``ct``'s run: its colour layer no longer follows its window."""
        if self._session.forget(ct):
            ct.events.contrast_limits.disconnect(self.on_linked_window)

    def on_linked_window(self, event) -> None:
        """The window of a colorized CT other than the chosen one changed: choose that CT, whose run then recomposes
        its colour layer (as for the chosen CT), so no colour layer is left with a stale window."""
        layer = event.source
        if layer is not self._watched and not self._closed() and self._session.run_of(layer) is not None:
            self._ct_layer.value = layer
