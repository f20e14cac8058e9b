"""napari widget "Colorize volume": a grey CT layer -> an RGB layer whose luminance is exactly the windowed CT.

The widget is a thin front end over `napari_ctcolor.engines.colorize`, the same engine as ``ctcolor colorize``:

- Run: the network (`iter_predict_chroma`) and the composition (`iter_compose_chroma`) run in a napari
  ``thread_worker`` with a progress bar; Cancel stops the worker between batches (``worker.quit()``).
- The predicted colour-class probabilities (`Chroma`) are kept, so changing the palette, the chroma strength or the
  window only recomposes (also in a worker, coalescing fast slider moves); the network does not run again. Opacity
  only changes the layer.
- The window is the CT layer's: choosing a preset (or one of the windows in the CT's DICOM header) sets the layer's
  contrast limits, and changing the layer's contrast limits (napari's slider, whose range is widened to the CT's
  whole HU range) selects the matching choice or "custom" and recomposes the colour with it: the plane on screen
  (axial, coronal or sagittal) at once in the main thread (`engines.colorize.compose_plane`), then the whole volume
  in a worker. The colour layer's own contrast limits and gamma stay fixed (its luminance is the window already).
- A contrast CT opens with its enhanced blood mid-grey when its DICOM header says contrast was given
  (`_layers.opening_window`). A CT without such a header (NIfTI, NRRD, MHA) moves to that window after Run when the
  blood the network names is enhanced and the CT still shows the window it opened in (`_window_for_contrast`).
- Right-drag on the canvas sets the window (`_window_drag`). A progress bar in the widget; Axial / Coronal /
  Sagittal buttons show radiologically oriented views (`_view`).
- The widget's "Pointer" line shows the CT's HU under napari's cursor, the voxel's position in mm (LPS) and its
  slice; after Run also the colour class there and its probability. The CT stays the selected layer after Run, so
  napari's status bar shows HU too. A legend lists the classes the volume shows with their palette swatches. "Show
  colour classes" adds a Labels layer of the most probable class, named as colour classes: a visual aid, never a
  validated segmentation.
- The result is the RGB layer ``"<CT name> colorized"`` at the CT's physical position, blended translucently over
  it; running again replaces that layer.
- "3D view" shows a preset of `_volume.PRESETS_3D` (lit bone, CTA, soft tissue) without table and air, computed in
  a worker.
- Problems the user can fix (`CTColorError`: a missing weights file, no CUDA, ...) show as one-line napari errors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QWidget

from ..color import PALETTE_NAMES, Palette, load_palette
from ..engines.body import body_mask
from ..engines.colorize import Chroma, compose_plane, iter_compose_chroma, iter_predict_chroma
from ..engines.device import resolve_device
from ..engines.steps import offset_steps
from ..errors import CTColorError, InputError
from ..io import ColorVolume, Volume
from ..models.colorizer import Colorizer
from ..threads import at_most
from ..windowing import PRESETS, Window, default_window, parse_window
from ._docks import settle_heap, tab_with_siblings
from ._layers import (
    CONTRAST_WINDOW_KEY,
    META_KEY,
    layer_attributes,
    opening_window,
    placement,
    volume_from_layer,
)
from ._view import anterior_3d, follow_radiological_orientation, plane_buttons, show_plane
from ._volume import PRESETS_3D, contrast_window, layer_data, named_bone, vessel_mask

if TYPE_CHECKING:
    import napari

DICOM_DEFAULT = "DICOM default"
PALETTE_FILE = "palette file..."
#: The legend lists classes that are the most probable one in at least this share of the volume's pixels.
LEGEND_MIN_SHARE = 0.001
#: The legend scrolls beyond this height (pixels): a long one would push the viewer's window off a 1080 px screen.
LEGEND_MAX_HEIGHT = 160
CUSTOM = "custom"
WEIGHTS_FILE = "weights file..."
SHIPPED_MODELS = ("colorizer-2d", "colorizer-3d")
NO_3D = "off"
EXPORT_FORMATS = {"NIfTI RGB (.nii.gz)": "nifti", "DICOM series (folder)": "dicom", "PNG slices (folder)": "png"}
#: The 3D layer keeps at most this many voxels per in-plane axis (every n-th voxel): a translucent RGBA volume is
#: 4 bytes per voxel on the GPU, and a 3D overview needs no more.
MAX_3D_PIXELS = 256
DEVICES = ("auto", "cpu", "cuda")
#: Right-drag window/level: pixels of mouse travel that double the width or move the centre by one width.
WINDOW_DRAG_PX = 200.0
#: The colour layer's contrast limits: its RGB shown as composed.
COLOUR_LIMITS = (0.0, 255.0)

ModelSpec = str | os.PathLike | Colorizer


@dataclass
class _Failed:
    """A job's return value when it stopped on a `CTColorError` (shown to the user, not a crash)."""

    message: str


@dataclass
class _Kept:
    """What a finished run leaves so that chroma and window changes only recompose.

    Attributes:
        volume: the CT the network saw (HU, geometry).
        chroma: its predicted a*, b*.
        ct: the CT layer; the result layer overlays it.
        layer: the result RGB layer.
    """

    volume: Volume
    chroma: Chroma
    ct: Image
    layer: Image


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


def _scroll_within(widget: QWidget, max_height: int) -> None:
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


class ColorizeWidget(Container):
    """Dock widget "Colorize volume".

    Args:
        napari_viewer: the viewer (napari passes it).
        models: model choices, label -> shipped name, ``.safetensors`` file or `Colorizer` object; by default the
            shipped ``colorizer-2d`` and ``colorizer-3d``. A "weights file..." choice is always added.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, models: Mapping[str, ModelSpec] | None = None) -> None:
        self._viewer = napari_viewer
        self._models: dict[str, ModelSpec] = dict(models) if models else {name: name for name in SHIPPED_MODELS}
        self.ct_layer = ComboBox(label="CT layer", choices=self._grey_layers, tooltip="a grey image layer in HU")
        # Choices from a callable: the chosen CT's own header windows are offered beside the presets.
        self.window = ComboBox(label="Window", choices=self._window_choices, value=DICOM_DEFAULT)
        self.centre_hu = FloatSpinBox(label="Centre (HU)", min=-5000, max=5000, step=5, value=40, enabled=False)
        self.width_hu = FloatSpinBox(label="Width (HU)", min=1, max=10000, step=10, value=400, enabled=False)
        # Choices are callables: napari calls reset_choices() on layer changes, which would drop a static list's
        # later additions (add_model).
        self.model = ComboBox(label="Model", choices=lambda _: [*self._models, WEIGHTS_FILE])
        self.weights_file = FileEdit(label="Weights file", mode="r", filter="*.safetensors", visible=False)
        self.device = ComboBox(label="Device", choices=list(DEVICES), value="auto")
        self.batch_size = SpinBox(
            label="Slices per batch",
            min=0,
            max=4096,
            value=0,
            tooltip="slices the network takes at once (more: faster on a GPU, more memory); 0 = automatic",
        )
        self.palette = ComboBox(
            label="Palette",
            choices=[*PALETTE_NAMES, PALETTE_FILE],
            value="anatomical",
            tooltip="anatomical: cryosection-like; dicom: DICOM recommended display colours; or a CSV of name,R,G,B",
        )
        self.palette_file = FileEdit(label="Palette file", mode="r", filter="*.csv", visible=False)
        self.chroma = FloatSlider(label="Chroma strength", min=0.0, max=1.0, step=0.05, value=1.0)
        self.opacity = FloatSlider(label="Opacity", min=0.0, max=1.0, step=0.05, value=1.0)
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress_bar = ProgressBar(value=0, min=0, max=1, visible=False)
        self.status = Label(value="")
        self.pointer = Label(label="Pointer", value="")
        self.legend = Label(label="Legend", value="")
        for label in (self.status, self.pointer):  # long text wraps instead of widening the dock over the canvas
            label.native.setWordWrap(True)
        self.classes_button = PushButton(text="Show colour classes", enabled=False)
        self.export_format = ComboBox(label="Export as", choices=list(EXPORT_FORMATS), enabled=False)
        self.export_path = FileEdit(
            label="Export to", mode="w", enabled=False, tooltip="a .nii.gz file or a new folder"
        )
        self.keep_identity = CheckBox(
            text="Keep patient identity (DICOM)",
            value=False,
            enabled=False,
            tooltip="off: de-identified (DICOM PS3.15 basic profile); on: the source series' patient and study, so "
            "the result can go back to the PACS",
        )
        self.send_to_pacs = CheckBox(
            text="Also send to the CT's PACS (DICOMweb)",
            value=False,
            enabled=False,
            tooltip="for a CT opened from a DICOMweb series: the DICOM export is also stored into that CT's study on "
            "its server, as a new series with the patient's identity",
        )
        self.export_button = PushButton(text="Export", enabled=False)
        self.view_3d = ComboBox(
            label="3D view",
            choices=[NO_3D, *PRESETS_3D],
            value=NO_3D,
            enabled=False,
            tooltip="3D rendering without table and air: lit bone surface; CTA: bone and contrast-filled vessels; "
            "soft tissue: translucent HU transfer function; colour: the colorized volume, translucent",
        )
        super().__init__(
            widgets=[
                self.ct_layer,
                self.window,
                self.centre_hu,
                self.width_hu,
                self.model,
                self.weights_file,
                self.device,
                self.batch_size,
                self.palette,
                self.palette_file,
                self.chroma,
                self.opacity,
                self.run_button,
                self.cancel_button,
                self.progress_bar,
                self.status,
                self.pointer,
                self.legend,
                self.classes_button,
                self.export_format,
                self.export_path,
                self.keep_identity,
                self.send_to_pacs,
                self.export_button,
                self.view_3d,
                plane_buttons(napari_viewer),
            ]
        )
        _scroll_within(self.legend.native, LEGEND_MAX_HEIGHT)
        tab_with_siblings(self.native)
        settle_heap()
        self.worker = None  # the running GeneratorWorker (network run or recompose), if any
        self._kept: _Kept | None = None  # the run of the chosen CT layer (else the last run)
        self._runs: list[_Kept] = []  # every CT's last run: each colour layer follows its own CT's window
        self._recompose_pending = False
        self._filling = False  # True while the widget itself writes centre/width
        self._syncing = False  # True while the widget and the CT layer's contrast limits update each other
        self._watched: Image | None = None  # the CT layer whose contrast limits the window follows
        self._hidden_for_3d: list[Image] = []  # layers the 3D view hid, shown again when it is left
        self._body_cache: tuple | None = None  # (kept, HU, body mask, spacing) of the 3D view
        self._worker_3d = None  # the worker computing a 3D preset's surfaces
        self._closed = False
        #: The plane (axis, index) the last recompose recoloured at once, before the rest of the volume (None: none
        #: on screen).
        self.recoloured_first: tuple[int, int] | None = None

        self.run_button.changed.connect(self._run)
        self.cancel_button.changed.connect(self.cancel)
        self.window.changed.connect(self._on_window)
        self.centre_hu.changed.connect(self._on_custom_window)
        self.width_hu.changed.connect(self._on_custom_window)
        self.chroma.changed.connect(self._recompose)
        self.palette.changed.connect(self._on_palette)
        self.palette_file.changed.connect(self._on_palette)
        self.classes_button.changed.connect(self.show_classes)
        self.view_3d.changed.connect(self._on_view_3d)
        self.export_button.changed.connect(lambda *_: self.export())
        self._viewer.cursor.events.position.connect(self._on_cursor)
        self._viewer.mouse_drag_callbacks.append(self._window_drag)
        self.opacity.changed.connect(self._on_opacity)
        self.model.changed.connect(lambda value: setattr(self.weights_file, "visible", value == WEIGHTS_FILE))
        self.ct_layer.changed.connect(self._watch_ct)
        layer_events = self._viewer.layers.events
        self._layer_events = (layer_events.inserted, layer_events.removed, layer_events.reordered)
        for event in self._layer_events:
            event.connect(self._on_layers_changed)
        self.native.destroyed.connect(self._detach)
        follow_radiological_orientation(napari_viewer)
        self._watch_ct()

    # ---------------------------------------------------------------------------------------------------------------
    # State the tests and the user see
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a network run or a recompose is in progress."""
        return self.worker is not None

    @property
    def result_layer(self) -> Image | None:
        """The colorized layer of the last run, while it is still in the viewer."""
        kept = self._kept
        return kept.layer if kept is not None and self._in_viewer(kept.layer) else None

    def add_model(self, label: str, model: ModelSpec) -> None:
        """Offer another model (shipped name, ``.safetensors`` file or `Colorizer` object) and select it."""
        self._models[label] = model
        self.model.reset_choices()
        self.model.value = label

    def run(self) -> None:
        """Start colorizing the chosen CT layer (what the Run button does)."""
        self._run()

    def cancel(self, *_: Any) -> None:
        """Stop the running job between two batches; the previous result, if any, is left as it was."""
        if self.worker is not None:
            self._recompose_pending = False
            self.worker.quit()

    def _in_viewer(self, layer: Image) -> bool:
        # Identity, not `in`: napari hands plugins a proxy viewer whose lookups return fresh proxy objects; iterating
        # its layer list yields the layers themselves.
        return any(lyr is layer for lyr in self._viewer.layers)

    def _detach(self, *_: Any) -> None:
        """The dock widget is being deleted: stop listening to the viewer and stop the job (its result is dropped)."""
        self._closed = True
        for event in self._layer_events:
            event.disconnect(self._on_layers_changed)
        self._unwatch()
        for run in list(self._runs):
            self._unlink(run.ct)
        self._viewer.cursor.events.position.disconnect(self._on_cursor)
        if self._window_drag in self._viewer.mouse_drag_callbacks:
            self._viewer.mouse_drag_callbacks.remove(self._window_drag)
        self.cancel()
        if self._worker_3d is not None:
            self._worker_3d.quit()

    # ---------------------------------------------------------------------------------------------------------------
    # Inputs
    # ---------------------------------------------------------------------------------------------------------------

    def _grey_layers(self, _widget=None) -> list[tuple[str, Image]]:
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if isinstance(layer, Image) and not layer.rgb and layer.ndim in (2, 3)
        ]

    def _on_layers_changed(self, _event=None) -> None:
        self.ct_layer.reset_choices()
        for run in [run for run in self._runs if not (self._in_viewer(run.ct) and self._in_viewer(run.layer))]:
            self._unlink(run.ct)

    def _unlink(self, ct: Image) -> None:
        """Forget ``ct``'s run: its colour layer no longer follows its window."""
        if any(run.ct is ct for run in self._runs):
            self._runs = [run for run in self._runs if run.ct is not ct]  # by identity: runs hold arrays
            ct.events.contrast_limits.disconnect(self._on_linked_window)

    def _on_linked_window(self, event) -> None:
        """The window of a colorized CT other than the chosen one changed: choose that CT, whose run then recomposes
        its colour layer (as for the chosen CT), so no colour layer is left with a stale window."""
        layer = event.source
        if layer is not self._watched and not self._closed and any(run.ct is layer for run in self._runs):
            self.ct_layer.value = layer

    def _volume_of(self, layer: Image) -> Volume:
        data = layer.data[0] if layer.multiscale else layer.data
        return volume_from_layer(data, layer_attributes(layer))

    def _window_spec(self) -> str | tuple[float, float] | None:
        """The engine's window argument: None (the volume's DICOM default), a preset name, or (centre, width)."""
        choice = self.window.value
        if choice == DICOM_DEFAULT:
            return None
        if choice == CUSTOM:
            return (float(self.centre_hu.value), float(self.width_hu.value))
        header = self._header_windows().get(choice)
        return tuple(header) if header is not None else choice

    def _model_spec(self) -> ModelSpec:
        if self.model.value == WEIGHTS_FILE:
            path = self.weights_file.value
            if not (path and os.path.isfile(path)):
                raise InputError("choose a .safetensors weights file for the colorizer")
            return path
        return self._models[self.model.value]

    def _palette(self) -> Palette:
        """The chosen palette; a bad CSV file raises `InputError` naming the line."""
        if self.palette.value == PALETTE_FILE:
            path = self.palette_file.value
            if not (path and os.path.isfile(path)):
                raise InputError("choose a .csv palette file (name,R,G,B per line)")
            return load_palette(path)
        return load_palette(self.palette.value)

    def _on_palette(self, *_: Any) -> None:
        self.palette_file.visible = self.palette.value == PALETTE_FILE
        if self.palette.value != PALETTE_FILE or self.palette_file.value:
            self._recompose()

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
        layer = self.ct_layer.value
        if layer is not None:
            meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
            return meta if isinstance(meta, dict) else {}
        return self._kept.volume.meta if self._kept is not None else {}

    def _header_windows(self) -> dict[str, Window]:
        """The chosen CT's own windows by choice name: its DICOM header's windows other than the first (which is
        "DICOM default"), and the contrast window chosen for it (`CONTRAST_WINDOW_KEY`: as it opened, or after Run)."""
        meta = self._meta_of_ct()
        windows = [Window(*(float(v) for v in pair)) for pair in meta.get("windows", [])]
        named = {f"DICOM {win.centre:g}/{win.width:g}": win for win in windows[1:] if win != windows[0]}
        layer = self.ct_layer.value
        contrast = layer.metadata.get(CONTRAST_WINDOW_KEY) if layer is not None else None
        if contrast is not None:
            win = Window(*(float(v) for v in contrast))
            named[f"contrast {win.centre:g}/{win.width:g}"] = win
        return named

    def _window_choices(self, _widget=None) -> list[tuple[str, str]]:
        """(shown name, value) of the window choices: DICOM default, the CT's own windows, presets, custom."""
        header = [(name, name) for name in self._header_windows()]
        presets = [(preset_label(name), name) for name in PRESETS]
        return [(DICOM_DEFAULT, DICOM_DEFAULT), *header, *presets, (CUSTOM, CUSTOM)]

    def _dicom_default(self) -> Window | None:
        """The chosen CT's own default window (DICOM WindowCenter/Width, else the abdomen preset for CT)."""
        layer = self.ct_layer.value
        if layer is not None and isinstance(layer.data, np.ndarray):  # never load a lazy (dask, zarr) array here
            try:
                return default_window(self._volume_of(layer))
            except CTColorError:
                return None
        return default_window(self._kept.volume) if self._kept is not None else None

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

    # The window is one setting shared with the CT layer: the widget's choice sets the layer's contrast limits, and
    # the layer's contrast limits (napari's slider, another plugin) set the widget's choice; both recompose the
    # colour from the kept class probabilities, never re-running the network.

    def _watch_ct(self, *_: Any) -> None:
        """Follow the chosen CT layer's contrast limits, starting from what it shows now."""
        layer = self.ct_layer.value
        if layer is self._watched:
            return
        self._unwatch()
        self._watched = layer
        self._kept = next((run for run in self._runs if run.ct is layer), self._kept)
        with self.window.changed.blocked():
            self.window.reset_choices()  # this CT's header windows
        if layer is not None:
            widen_contrast_range(layer)
            layer.events.contrast_limits.connect(self._on_ct_contrast)
            self._on_ct_contrast()
        else:
            self._fill_window_fields()

    def _unwatch(self) -> None:
        if self._watched is not None:
            self._watched.events.contrast_limits.disconnect(self._on_ct_contrast)
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
        if self._kept is not None and self._kept.ct is layer:
            self._recompose()

    def _window_drag(self, viewer, event):
        """Right-drag on the canvas (2D): window/level of the chosen CT layer, as on a PACS workstation. Rightwards
        widens the window (x2 per `WINDOW_DRAG_PX` pixels), leftwards narrows it; downwards raises its centre (the
        image darkens, one starting width per `WINDOW_DRAG_PX`), upwards lowers it. The colour follows as for any
        window change. napari's camera, which zooms on a right-drag, is held meanwhile."""
        layer = self._watched
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
                range_low, range_high = layer.contrast_limits_range
                low, high = win.limits
                if low < range_low or high > range_high:
                    layer.contrast_limits_range = (min(low, range_low), max(high, range_high))
                layer.contrast_limits = win.limits
                yield
        finally:
            viewer.camera.mouse_pan = True

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
        low, high = win.limits
        self._syncing = True
        try:
            range_low, range_high = layer.contrast_limits_range
            if low < range_low or high > range_high:  # a window wider than the data (lung on a cropped CT)
                layer.contrast_limits_range = (min(low, range_low), max(high, range_high))
            layer.contrast_limits = (low, high)
        finally:
            self._syncing = False

    def _on_opacity(self, value: float) -> None:
        layer = self.result_layer
        if layer is not None:
            layer.opacity = float(value)

    # ---------------------------------------------------------------------------------------------------------------
    # Jobs
    # ---------------------------------------------------------------------------------------------------------------

    def _run(self, *_: Any) -> None:
        if self.busy:
            if not self.worker.is_compose:
                return  # one network run at a time
            self.worker.quit()  # a recompose of the previous result is moot now
            self._recompose_pending = False
        layer = self.ct_layer.value
        if layer is None:
            show_error("Colorize volume: open a CT first (a grey image layer)")
            return
        try:
            volume = self._volume_of(layer)
            model = self._model_spec()
            window = self._window_spec()
            parse_window(window, volume)
            palette = self._palette()
            device = str(resolve_device(self.device.value))
        except CTColorError as exc:
            show_error(str(exc))
            return
        batch_size = int(self.batch_size.value) or None
        # A CT without a header that says contrast was given, still in the window it opened in: the worker looks for
        # enhanced blood and, finding it, composes in the contrast window (`_adopt_contrast_window`).
        limits = tuple(float(v) for v in layer.contrast_limits)
        find_contrast = (
            layer.ndim == 3
            and not volume.meta.get("contrast")
            and np.allclose(limits, opening_window(volume).limits, rtol=0, atol=0.5)
        )
        self._start(
            self._colorize_steps,
            (volume, model, device, batch_size, window, float(self.chroma.value), palette, find_contrast),
            total=2 * volume.shape[0],
            desc="Colorize volume",
            on_result=lambda result: self._colorized(layer, volume, limits, result),
        )

    @staticmethod
    def _colorize_steps(volume, model, device, batch_size, window, strength, palette, find_contrast=False):
        """The network, then the composition, as one worker: yields (done, 2 Z), returns (Chroma, ColorVolume,
        (median HU of the enhanced blood, its `contrast_window`) or None). With ``find_contrast``, where the network
        names enhanced blood (`Chroma.enhanced_blood_hu`) the composition uses the contrast window."""
        z = volume.shape[0]
        try:
            chroma = yield from offset_steps(iter_predict_chroma(volume, model, device, batch_size), 0, 2 * z)
            found = None
            if find_contrast:
                blood = chroma.enhanced_blood_hu(volume.array, volume.spacing)
                if blood is not None:
                    found = (blood, contrast_window(volume.array, volume.spacing))
                    window = tuple(found[1])
            compose = iter_compose_chroma(volume, chroma, window, strength, device, palette)
            colour = yield from offset_steps(compose, z, 2 * z)
        except CTColorError as exc:
            return _Failed(str(exc))
        return chroma, colour, found

    @staticmethod
    def _compose_steps(volume, chroma, window, strength, device, palette):
        """Recompose only, on one CPU thread (the interface keeps a core while the reader drags the window, and the
        plane on screen is recoloured already): yields (done, Z), returns the ColorVolume."""
        try:
            with at_most(1):
                return (yield from iter_compose_chroma(volume, chroma, window, strength, device, palette))
        except CTColorError as exc:
            return _Failed(str(exc))

    def _recompose(self, *_: Any) -> None:
        """Recolour the plane on screen at once, then recompose the whole volume from the kept chroma with the
        current window, strength and palette in a worker; requests coalesce while one runs."""
        if self._kept is None:
            return
        if self.result_layer is None:  # the user deleted the result: nothing to update
            self._kept = None
            return
        kept = self._kept
        try:
            window = self._window_spec()
            parse_window(window, kept.volume)
            palette = self._palette()
            device = str(resolve_device(self.device.value))
        except CTColorError as exc:
            show_error(str(exc))
            return
        if not self.busy and self._shown_settings() == self._current_settings():
            return  # the colour shown was composed with these settings (the contrast window a run chose)
        self._recolour_visible_plane(kept, window, device, palette)
        if self.busy:
            self._recompose_pending = True
            if self.worker.is_compose:
                self.worker.quit()  # its result is stale; the pending recompose starts when it has stopped
            return
        self._start(
            self._compose_steps,
            (kept.volume, kept.chroma, window, float(self.chroma.value), device, palette),
            total=kept.volume.shape[0],
            desc="Recompose colours",
            on_result=lambda result: self._recomposed(kept, result),
            is_compose=True,
        )

    def visible_plane(self) -> tuple[int, int] | None:
        """(axis, index) of the kept CT's plane on screen in a 2D view of a 3D CT (axis 0 axial, 1 coronal, 2
        sagittal, in the CT's array order), else None."""
        kept, dims = self._kept, self._viewer.dims
        if kept is None or kept.ct.ndim != 3 or dims.ndisplay != 2 or dims.ndim < 3:
            return None
        first = dims.ndim - 3  # the CT's axes are the viewer's last three
        sliced = {first, first + 1, first + 2} - set(dims.order[-2:])
        if len(sliced) != 1:
            return None
        axis = sliced.pop() - first
        index = round(float(np.asarray(kept.ct.world_to_data(dims.point), dtype=float)[axis]))
        return (axis, index) if 0 <= index < kept.volume.shape[axis] else None

    def _recolour_visible_plane(self, kept: _Kept, window, device: str, palette: Palette) -> None:
        """Recolour the plane on screen at once, in the main thread (`compose_plane`: tens of milliseconds); the
        recompose worker then replaces the whole volume with the same colours."""
        plane = self.visible_plane()
        layer = self.result_layer
        if plane is None or layer is None:
            return
        axis, index = plane
        try:
            rgb = compose_plane(
                kept.volume, kept.chroma, axis, index, window, float(self.chroma.value), device, palette
            )
        except CTColorError as exc:
            show_error(str(exc))
            return
        where = [slice(None)] * 3
        where[axis] = index
        layer.data[tuple(where)] = rgb
        layer.refresh()
        self.recoloured_first = plane

    def _start(
        self,
        steps: Callable,
        args: tuple,
        total: int,
        desc: str,
        on_result: Callable[[Any], None],
        is_compose: bool = False,
    ) -> None:
        """Run a step generator function in a thread_worker with the widget's progress bar and the Cancel button
        (not napari's progress: `_docks`)."""
        worker = create_worker(steps, *args, _ignore_errors=True)  # errors other than ours reach napari's notifier
        worker.is_compose = is_compose
        started = time.perf_counter()
        self.progress_bar.max, self.progress_bar.value, self.progress_bar.visible = total, 0, True
        worker.yielded.connect(lambda step: self._progress(step[0]))
        worker.aborted.connect(lambda: self._say(f"{desc}: cancelled"))
        worker.errored.connect(lambda _: self._say(f"{desc}: failed"))
        worker.returned.connect(
            lambda result: self._say(
                f"{desc}: failed" if isinstance(result, _Failed) else f"{desc}: {time.perf_counter() - started:.1f} s"
            )
        )
        worker.returned.connect(on_result)  # after the timing message, so that what it says stays
        worker.finished.connect(lambda: self._finished(worker))
        self.worker = worker
        self.run_button.enabled = is_compose  # Run may supersede a recompose, not another run
        self.cancel_button.enabled = True
        self.status.value = f"{desc}..."
        worker.start()

    def _progress(self, done: int) -> None:
        if not self._closed:
            self.progress_bar.value = done

    def _say(self, text: str) -> None:
        if not self._closed:
            self.status.value = text

    def _finished(self, worker) -> None:
        if self.worker is not worker or self._closed:  # a recompose that a new run superseded, or no widget left
            return
        self.worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        self.progress_bar.visible = False
        if self._recompose_pending:
            self._recompose_pending = False
            self._recompose()

    def _colorized(self, ct: Image, volume: Volume, limits: tuple[float, float], result: tuple | _Failed) -> None:
        if self._closed:
            return
        if isinstance(result, _Failed):
            show_error(result.message)
            return
        if not self._in_viewer(ct):  # the CT layer was deleted during the run: no orphan result layer
            self._say("Colorize volume: the CT layer was removed; result dropped")
            return
        chroma, colour, found = result
        self._kept = _Kept(volume, chroma, ct, self._show(ct, colour))
        self._unlink(ct)
        self._runs.append(self._kept)
        ct.events.contrast_limits.connect(self._on_linked_window)
        # The CT stays the selected layer: napari's status bar then shows its HU, not the colour layer's RGB, and
        # its contrast slider is the window.
        self._viewer.layers.selection.active = ct
        self._fill_legend(colour)
        for control in (self.classes_button, self.view_3d, self.export_format, self.export_path, self.keep_identity):
            control.enabled = True
        self.export_button.enabled = True
        self.send_to_pacs.enabled = "dicomweb" in volume.meta  # read from a DICOMweb series: its server is known
        self.send_to_pacs.value = self.send_to_pacs.value and self.send_to_pacs.enabled
        if found is not None and np.allclose(ct.contrast_limits, limits, rtol=0, atol=0.5):
            self._adopt_contrast_window(ct, *found)
        # Settings changed while the network ran are applied now, from the kept chroma.
        self._recompose_pending = self._recompose_pending or self._settings(colour) != self._current_settings()

    def _adopt_contrast_window(self, ct: Image, blood: float, win: Window) -> None:
        """A CT without a header that says contrast was given (NIfTI, NRRD, MHA) opens in its default window, where
        contrast-filled vessels are white and can carry no colour. Where the network found the blood it names
        enhanced and the CT still shows the window it opened in, the worker composed the colour in the contrast
        window (`contrast_window`: the blood light grey, fat, muscle and organs in greys that carry colour); the CT
        moves to it, the menu names it, and a notification says why."""
        ct.metadata = {**ct.metadata, CONTRAST_WINDOW_KEY: tuple(win)}
        if self.ct_layer.value is ct:
            with self.window.changed.blocked():
                self.window.reset_choices()
        ct.contrast_limits = win.limits  # the widget follows; the colour was composed in it already
        show_info(
            f"{ct.name}: contrast-enhanced blood found (median {blood:.0f} HU); window {win.centre:g}/{win.width:g} "
            "so that it shows grey and takes colour, as for a contrast CT"
        )

    def _recomposed(self, kept: _Kept, result: ColorVolume | _Failed) -> None:
        if self._closed:
            return
        if isinstance(result, _Failed):
            show_error(result.message)
            return
        if self._kept is kept and self.result_layer is not None:
            self._show(kept.ct, result)
            self._fill_legend(result)

    def _settings(self, colour: ColorVolume) -> tuple:
        return self._settings_of(colour.settings)

    @staticmethod
    def _settings_of(settings: Mapping) -> tuple:
        return (tuple(settings.get("window", ())), settings.get("chroma"), settings.get("palette"))

    def _shown_settings(self) -> tuple:
        """The settings the result layer's colour was composed with (from its metadata), () when unknown."""
        layer = self.result_layer
        settings = layer.metadata.get(META_KEY, {}).get("colorize") if layer is not None else None
        return self._settings_of(settings) if isinstance(settings, Mapping) else ()

    def _current_settings(self) -> tuple:
        volume = self._kept.volume if self._kept is not None else None
        try:
            window = parse_window(self._window_spec(), volume)
        except CTColorError:
            return ()
        try:
            palette = self._palette().name
        except CTColorError:
            return ()
        return ((window.centre, window.width), float(self.chroma.value), palette)

    # ---------------------------------------------------------------------------------------------------------------
    # Output layer
    # ---------------------------------------------------------------------------------------------------------------

    def _show(self, ct: Image, colour: ColorVolume) -> Image:
        """Put ``colour`` into the layer "<CT name> colorized", replacing its data when it exists, else adding it."""
        name = f"{ct.name} colorized"
        if ct.ndim == 2:  # a 2D CT layer: one slice, placed by the CT layer's own 2D transforms
            data = colour.rgb[0]
            transforms = {k: np.asarray(v) for k, v in layer_attributes(ct).items() if k != "metadata"}
        else:  # identity for whichever of scale/translate or affine `placement` leaves out
            data = colour.rgb
            transforms = {
                "scale": np.ones(3),
                "translate": np.zeros(3),
                "rotate": np.eye(3),
                "affine": np.eye(4),
                **placement(colour),
            }
        metadata = {META_KEY: {"colorize": dict(colour.settings)}}
        existing = next((lyr for lyr in self._viewer.layers if lyr.name == name), None)
        if isinstance(existing, Image) and existing.rgb and existing.data.ndim == data.ndim:
            existing.data = data
            for key, value in transforms.items():
                setattr(existing, key, value)
            existing.metadata = {**existing.metadata, **metadata}
            return existing
        index = None
        if existing is not None:  # same name but not ours to update in place (another kind of layer)
            index = self._viewer.layers.index(existing)
            self._viewer.layers.remove(existing)
        layer = Image(
            data,
            name=name,
            rgb=True,
            blending="translucent",
            opacity=float(self.opacity.value),
            interpolation2d="linear",  # as the CT layer (`image_layer_data`): no blocky voxels, both alike
            metadata=metadata,
            **transforms,
        )
        layer.events.contrast_limits.connect(lambda _event: self._keep_full_range(layer))
        layer.events.gamma.connect(lambda _event: self._keep_full_range(layer))
        if index is None:
            self._viewer.layers.append(layer)
        else:
            self._viewer.layers.insert(index, layer)
        return layer

    def _keep_full_range(self, layer: Image) -> None:
        """The colour layer's own contrast limits and gamma stay at 0..255 and 1: its luminance is the CT's window
        already, and stretching the RGB would distort both grey and colour. The window is the CT layer's."""
        if tuple(layer.contrast_limits) != COLOUR_LIMITS or layer.gamma != 1.0:
            with layer.events.contrast_limits.blocker(), layer.events.gamma.blocker():
                layer.contrast_limits, layer.gamma = COLOUR_LIMITS, 1.0
            layer.refresh()
            self._say(f"{layer.name}: its contrast stays fixed; set the window on the CT layer or in this widget")

    # ---------------------------------------------------------------------------------------------------------------
    # What the colours stand for
    # ---------------------------------------------------------------------------------------------------------------

    def _fill_legend(self, colour: ColorVolume) -> None:
        """Swatches and names of the classes the volume shows, most common first, in the palette just composed."""
        kept = self._kept
        if kept is None:
            return
        try:
            palette = self._palette()
        except CTColorError:
            return
        if palette.name != colour.settings.get("palette"):
            return  # a newer palette choice is being composed; its result fills the legend
        rows = []
        shares = sorted(kept.chroma.class_shares().items(), key=lambda item: -item[1])
        for name, share in shares:
            rgb = palette.class_rgb(name)
            if share < LEGEND_MIN_SHARE or rgb is None:
                continue
            swatch = "#{:02x}{:02x}{:02x}".format(*rgb)
            rows.append(f'<span style="background-color:{swatch}">&nbsp;&nbsp;&nbsp;&nbsp;</span> {name}')
        self.legend.value = "<br>".join(rows)

    def legend_names(self) -> list[str]:
        """The class names the legend lists, in its order."""
        return [row.rsplit("</span> ", 1)[1] for row in self.legend.value.split("<br>") if row]

    def _on_cursor(self, _event=None) -> None:
        """The pointer moved (napari's cursor position): show what is under it."""
        if not self._closed:
            self.pointer.value = self.pointer_line(self._viewer.cursor.position)

    def pointer_line(self, world_position) -> str:
        """What the Pointer line shows for a world position: the CT's HU there, the voxel's position in mm (LPS x,
        y, z), its axial slice (napari's slider index) and, after Run, the colour class with its probability; ''
        outside the CT."""
        kept = self._kept
        ct = kept.ct if kept is not None and self._in_viewer(kept.ct) else self.ct_layer.value
        if ct is None or ct.multiscale:
            return ""
        index = np.round(np.asarray(ct.world_to_data(world_position), dtype=float)).astype(int)
        shape = ct.data.shape
        if index.size != len(shape) or not all(0 <= i < n for i, n in zip(index, shape, strict=True)):
            return ""
        hu = float(ct.data[tuple(index)])
        lps = np.asarray(ct.data_to_world(index), dtype=float)[::-1]  # world (z, y, x) -> LPS x, y, z
        position = ", ".join(f"{axis} {value:.1f}" for axis, value in zip("xyz", lps, strict=False))
        parts = [f"HU {hu:.0f}", f"LPS {position} mm"]
        if ct.ndim == 3:
            parts.append(f"slice {index[0]}/{shape[0] - 1}")
        if kept is not None and kept.ct is ct and self.result_layer is not None:
            parts.append(self.describe(index))
        return " | ".join(parts)

    def describe(self, data_position) -> str:
        """'<class> <probability> %' for a position in the result layer's data coordinates ('' outside it; no class
        where the class layer shows none)."""
        kept = self._kept
        index = np.round(np.asarray(data_position, dtype=float)).astype(int)
        if kept is None:
            return ""
        if index.size == 2:  # a 2D result layer shows the volume's only slice
            index = np.concatenate(([0], index))
        shape = kept.volume.shape
        if index.size != 3 or not all(0 <= i < n for i, n in zip(index, shape, strict=True)):
            return ""
        name, probability = kept.chroma.class_at(*(int(i) for i in index), float(kept.volume.array[tuple(index)]))
        if name == "air":  # what the class layer leaves clear: air, and the table or blankets outside the body
            return "no colour (air or outside the body)"
        return f"{name} {probability:.0%} (colour class, not a segmentation)"

    def _class_colours(self) -> DirectLabelColormap:
        """Each class label (1 + class index, `Chroma.most_probable`) in its colour under the current palette; the
        air (0) and classes the palette does not colour are clear."""
        classes = self._kept.chroma.classes
        try:
            palette = self._palette()
        except CTColorError:
            palette = load_palette("anatomical")
        colours: dict[int | None, tuple[float, ...]] = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
        for index, name in enumerate(classes, start=1):
            rgb = palette.class_rgb(name)
            colours[index] = (*(c / 255.0 for c in rgb), 1.0) if rgb is not None else (0.0, 0.0, 0.0, 0.0)
        return DirectLabelColormap(color_dict=colours)

    def show_classes(self, *_: Any) -> Labels | None:
        """Add (or refresh) the Labels layer "<CT name> colour classes": the most probable class of each voxel."""
        kept = self._kept
        if kept is None or self.result_layer is None:
            return None
        name = f"{kept.ct.name} colour classes"
        data = kept.chroma.most_probable(kept.volume.array)
        if kept.ct.ndim == 2:
            data = data[0]
        features = {"index": np.arange(len(kept.chroma.classes) + 1), "colour_class": ["", *kept.chroma.classes]}
        existing = next((lyr for lyr in self._viewer.layers if lyr.name == name), None)
        if existing is not None:
            self._viewer.layers.remove(existing)
        placement = {k: v for k, v in layer_attributes(self.result_layer).items() if k != "metadata"}
        layer = Labels(data, name=name, opacity=0.4, features=features, colormap=self._class_colours(), **placement)
        self._viewer.layers.append(layer)
        return layer

    # ---------------------------------------------------------------------------------------------------------------
    # 3D
    # ---------------------------------------------------------------------------------------------------------------

    def _on_view_3d(self, *_: Any) -> None:
        """Show (or leave) the 3D rendering of the colorized CT: its surfaces are computed in a worker (seconds on a
        chest CT), then added."""
        if self._worker_3d is not None:
            self._worker_3d.quit()  # a preset chosen before: its surfaces are moot
            self._worker_3d = None
        kept = self._kept
        choice = self.view_3d.value
        if choice == NO_3D or kept is None or self.result_layer is None or kept.ct.ndim != 3:
            self._leave_3d()
            return
        step = max(1, -(-max(kept.volume.shape[1:]) // MAX_3D_PIXELS))
        cached = self._body_cache[1:] if self._body_cache is not None and self._body_cache[0] is kept else None
        parts = PRESETS_3D[choice]
        worker = create_worker(self._steps_3d, kept.volume, kept.chroma, parts, step, cached, _ignore_errors=True)
        worker.returned.connect(lambda result: self._show_3d(kept, choice, step, result))
        worker.finished.connect(lambda: self._worker_3d is worker and setattr(self, "_worker_3d", None))
        self._worker_3d = worker
        self._say(f"3D view: computing {choice}...")
        worker.start()

    @property
    def busy_3d(self) -> bool:
        """True while a 3D preset's surfaces are being computed."""
        return self._worker_3d is not None

    @staticmethod
    def _steps_3d(volume: Volume, chroma: Chroma, parts, step: int, cached):
        """The 3D preset's data, in a worker: yields the parts done, returns ((HU, body, spacing), [each part's
        float32 field])."""
        if cached is None:
            hu = np.asarray(volume.array[:, ::step, ::step], dtype=np.float32)
            spacing = (volume.spacing[0], volume.spacing[1] * step, volume.spacing[2] * step)
            cached = (hu, body_mask(hu, spacing), spacing)
        hu, body, spacing = cached
        yield 1
        vessels = None
        if any(p.source in ("vessels", "CTA bone") for p in parts):
            vessels = vessel_mask(hu, body, spacing, named_bone=named_bone(chroma, volume.shape, step))
        fields = []
        for part in parts:
            fields.append(layer_data(part, hu, body, spacing, vessels))
            yield len(fields) + 1
        return cached, fields

    def _show_3d(self, kept: _Kept, preset: str, step: int, result: tuple) -> None:
        """Add the layers "<CT name> 3D <part>" of a `PRESETS_3D` preset computed by `_steps_3d`, seen from the
        patient's front; the 2D layers are hidden meanwhile."""
        colour = self.result_layer
        if self._closed or kept is not self._kept or colour is None or self.view_3d.value != preset:
            return  # another run, CT or preset since
        cached, fields = result
        self._body_cache = (kept, *cached)
        placement = {k: np.asarray(v) for k, v in layer_attributes(colour).items() if k != "metadata"}
        placement["scale"] = placement["scale"] * np.array([1.0, step, step])
        self._remove_3d()
        if not self._hidden_for_3d:
            self._hidden_for_3d = [lyr for lyr in self._viewer.layers if lyr.visible]
            for lyr in self._hidden_for_3d:
                lyr.visible = False
        for part, field in zip(PRESETS_3D[preset], fields, strict=True):
            layer = Image(
                field,
                name=f"{kept.ct.name} 3D {part.name}",
                rendering=part.rendering,
                colormap=part.colormap,
                contrast_limits=part.limits,
                opacity=part.opacity,
                blending="translucent",
                **({"iso_threshold": part.iso_threshold} if part.iso_threshold is not None else {}),
                **placement,
            )
            layer.interpolation3d = "linear"  # trilinear sampling: no blocky voxels
            self._viewer.layers.append(layer)
        anterior_3d(self._viewer)
        self._say(f"3D view: {preset}")

    def _remove_3d(self) -> None:
        kept = self._kept
        if kept is not None:
            prefix = f"{kept.ct.name} 3D "
            for lyr in [lyr for lyr in self._viewer.layers if lyr.name.startswith(prefix)]:
                self._viewer.layers.remove(lyr)

    def _leave_3d(self) -> None:
        self._remove_3d()
        for lyr in self._hidden_for_3d:
            if any(other is lyr for other in self._viewer.layers):
                lyr.visible = True
        if self._hidden_for_3d:
            show_plane(self._viewer, "axial")
        self._hidden_for_3d = []

    # ---------------------------------------------------------------------------------------------------------------
    # Export
    # ---------------------------------------------------------------------------------------------------------------

    def export(self) -> list[str]:
        """Write the colorized volume as the CLI does (`--format nifti|dicom|png`), to "Export to"; DICOM is
        de-identified unless "Keep patient identity" is ticked. Existing files are never replaced. With "Also send to
        the CT's PACS", a DICOM export is also stored into the CT's study on its DICOMweb server (as ``ctcolor
        colorize URL --format dicom --send``: the patient's identity kept there). Returns the paths written."""
        from ..io.dicomweb import SeriesURL, send_series, series_header
        from ..io.export import write_png_slices, write_rgb_dicom, write_rgb_nifti

        kept, layer = self._kept, self.result_layer
        path = self.export_path.value
        try:
            if kept is None or layer is None:
                raise InputError("Export: colorize a CT first")
            if not path or str(path) in ("", "."):
                raise InputError("Export: choose where to write (a .nii.gz file or a new folder)")
            fmt = EXPORT_FORMATS[self.export_format.value]
            send = bool(self.send_to_pacs.value)
            if send and fmt != "dicom":
                raise InputError("Export: sending to the PACS needs the DICOM series format")
            rgb = np.asarray(layer.data)
            colour = ColorVolume.on_grid_of(
                kept.volume, rgb if rgb.ndim == 4 else rgb[np.newaxis], **layer.metadata[META_KEY]["colorize"]
            )
            path = str(path)
            if fmt == "nifti":
                if not path.lower().endswith((".nii", ".nii.gz")):
                    path += ".nii.gz"
                written = [write_rgb_nifti(colour, path)]
            elif fmt == "png":
                written = write_png_slices(colour, path)
            else:
                keep = bool(self.keep_identity.value)
                first = kept.volume.meta.get("first_file")  # the read series' own file
                web = kept.volume.meta.get("dicomweb")
                if keep and not first and web:  # read from a DICOMweb series: its header, from the server
                    first = series_header(SeriesURL(**web))
                if keep and not first:
                    raise InputError("Export: this CT was not read from DICOM; there is no patient identity to keep")
                written = write_rgb_dicom(
                    colour, path, kept.volume.meta, keep_patient_info=keep, source_datasets=[first] if keep else None
                )
                if send:  # synchronous like the file export: a series of a few hundred slices, over the network
                    header = first if keep and not isinstance(first, str) else None  # already fetched
                    try:
                        url, count = send_series(colour, kept.volume.meta, header, files=written if keep else None)
                    except CTColorError as exc:  # the files are written all the same: say so, and return them
                        show_error(f"Exported {len(written)} file(s) to {path}, but not sent: {exc}")
                        return [str(p) for p in written]
                    self._say(f"Exported {len(written)} file(s) to {path} and sent {count} to {url}")
                    return [str(p) for p in written]
        except CTColorError as exc:
            show_error(str(exc))
            self._say("Export: nothing written (see the message)")
            return []
        self._say(f"Exported {len(written)} file(s) to {path}")
        return [str(p) for p in written]
