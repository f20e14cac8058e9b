"""napari widget "Colorize volume": a grey CT layer -> an RGB layer whose luminance is exactly the windowed CT.

The widget is a thin front end over the application's colorize job (`app.colorize_job`), the same job as ``ctcolor
colorize``:

- Run: the job (the network, then the composition) runs in a napari ``thread_worker`` with a progress bar; Cancel
  stops the worker between batches (``worker.quit()``).
- The predicted colour-class probabilities (`Chroma`) are kept, so changing the palette, the chroma strength or the
  window only recomposes (also in a worker, coalescing fast slider moves); the network does not run again. Opacity
  only changes the layer.
- The window is the CT layer's: choosing a preset (or one of the windows in the CT's DICOM header) sets the layer's
  contrast limits, and changing the layer's contrast limits (napari's slider, whose range is widened to the CT's
  whole HU range) selects the matching choice or "custom" and recomposes the colour with it: the plane on screen
  (axial, coronal or sagittal) at once in the main thread (`app.colorize_job.compose_plane`), then the whole volume
  in a worker. The colour layer's own contrast limits and gamma stay fixed (its luminance is the window already).
- A contrast CT opens with its enhanced blood mid-grey when its DICOM header says contrast was given
  (`app.window.opening_window`). A CT without such a header (NIfTI, NRRD, MHA) moves to that window after Run when the
  blood the network names is enhanced and the CT still shows the window it opened in (`_adopt_contrast_window`).
- Right-drag on the canvas sets the window (`_window_drag.window_drag`). A progress bar in the widget; Axial / Coronal /
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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, FileEdit, FloatSlider, Label, ProgressBar, PushButton, SpinBox
from napari.layers import Image
from napari.utils.notifications import show_error, show_info

from ..app.colorize_job import ModelSpec
from ..app.colorize_session import ColorizeSession
from ..errors import InputError
from ..io import ColorVolume, Volume
from ..palettes import PALETTE_NAMES, Palette, load_palette
from ._colorize_3d import View3D
from ._colorize_export import ExportPanel
from ._colorize_legend import LEGEND_MAX_HEIGHT, ClassesAndPointer, scroll_within
from ._colorize_run import RunAndRecompose
from ._colorize_window import WindowControl
from ._docks import attach_to_viewer, settle_heap, tab_with_siblings
from ._jobs import JobRunner
from ._layers import layer_attributes, volume_from_layer
from ._slab import SlabControl
from ._view import plane_buttons
from ._window_drag import install_mouse_controls

if TYPE_CHECKING:
    import napari

PALETTE_FILE = "palette file..."
WEIGHTS_FILE = "weights file..."
SHIPPED_MODELS = ("colorizer-2d", "colorizer-3d")
DEVICES = ("auto", "cpu", "cuda")


class ColorizeWidget(Container):
    """Dock widget "Colorize volume". Its parts, one job each, are objects it holds, each in its own module: the window
    (``windows``, `_colorize_window.WindowControl`), Run and recompose (``runner``, `_colorize_run.RunAndRecompose`),
    the legend and Pointer (``classes``, `_colorize_legend.ClassesAndPointer`), the 3D view (``view3d``,
    `_colorize_3d.View3D`) and the export (``exporter``, `_colorize_export.ExportPanel`); this class builds the dock
    from their controls, holds the state they share (``session``, `app.colorize_session.ColorizeSession`: the runs
    and the jobs, without Qt) and reads the inputs.

    Args:
        napari_viewer: the viewer (napari passes it).
        models: model choices, label -> shipped name, ``.safetensors`` file or `Colorizer` object; by default the
            shipped ``colorizer-2d`` and ``colorizer-3d``. A "weights file..." choice is always added.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, models: Mapping[str, ModelSpec] | None = None) -> None:
        self._viewer = napari_viewer
        self._models: dict[str, ModelSpec] = dict(models) if models else {name: name for name in SHIPPED_MODELS}
        #: The runs (each CT's last: each colour layer follows its own CT's window; the chosen CT's is the current
        #: one) and the jobs, without Qt.
        self.session = ColorizeSession()
        self._closed = False
        self.ct_layer = ComboBox(label="CT layer", choices=self._grey_layers, tooltip="a grey image layer in HU")
        self.slab = SlabControl(napari_viewer, lambda: (self.ct_layer.value, self.result_layer))
        run_controls = self._run_controls()
        self.jobs = JobRunner(self.progress_bar, self.status, self.run_button, self.cancel_button)
        closed, result_layer = (lambda: self._closed), (lambda: self.result_layer)
        self.windows = WindowControl(
            self.ct_layer, self.session, self._recompose, self.show_current_run, self._volume_of, closed
        )
        self.window, self.centre_hu, self.width_hu = self.windows.controls
        self.classes = ClassesAndPointer(
            napari_viewer, self.session, self.ct_layer, result_layer, self._palette, self._in_viewer, closed
        )
        self.pointer, self.legend, self.classes_button = self.classes.controls
        self.view3d = View3D(napari_viewer, self.session, result_layer, self.jobs.say, closed)
        self.view_3d = self.view3d.view_3d
        self.exporter = ExportPanel(
            self.session, result_layer, lambda: self.busy, self.jobs.start, self.jobs.say, self._error
        )
        export = self.exporter
        self.export_format, self.export_path, self.export_button = export.export_format, export.path, export.button
        self.keep_identity, self.send_to_pacs = export.keep_identity, export.send_to_pacs
        self.runner = RunAndRecompose(
            napari_viewer,
            self.session,
            self.jobs,
            self.ct_layer,
            self.windows,
            self._settings,
            self._volume_of,
            result_layer,
            lambda: float(self.opacity.value),
            self._kept,
            self.classes.fill_legend,
            self._in_viewer,
            closed,
            self._error,
            self._info,
        )
        self.run_button.changed.connect(self.runner.run)
        super().__init__(
            widgets=[
                self.ct_layer,
                *self.windows.controls,
                self.slab.slider,
                *run_controls,
                *self.classes.controls,
                *self.exporter.controls,
                self.view_3d,
                plane_buttons(napari_viewer),
            ]
        )
        scroll_within(self.legend.native, LEGEND_MAX_HEIGHT)
        tab_with_siblings(self.native)
        settle_heap()
        self._viewer.cursor.events.position.connect(self.classes.on_cursor)
        install_mouse_controls(napari_viewer)
        self.ct_layer.changed.connect(self.windows.watch_ct)
        self._stop_following_layers = attach_to_viewer(
            self.native, napari_viewer, self._on_layers_changed, self._detach
        )
        self.windows.watch_ct()

    def _run_controls(self) -> list:
        """Create the model, device, palette, strength and opacity controls, Run, Cancel, the progress bar and the
        status line; returns them in their order in the dock."""
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
        self.status.native.setWordWrap(True)  # long text wraps instead of widening the dock over the canvas
        self.cancel_button.changed.connect(self.cancel)
        self.chroma.changed.connect(self._recompose)
        self.palette.changed.connect(self._on_palette)
        self.palette_file.changed.connect(self._on_palette)
        self.opacity.changed.connect(self._on_opacity)
        self.model.changed.connect(lambda value: setattr(self.weights_file, "visible", value == WEIGHTS_FILE))
        return [
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
        ]

    # ---------------------------------------------------------------------------------------------------------------
    # State the tests and the user see
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a network run or a recompose (its plane on screen included) is in progress."""
        return self.jobs.busy or self.runner.plane_busy

    @property
    def worker(self):
        """The running GeneratorWorker (network run or recompose), if any."""
        return self.jobs.worker

    def cancel(self, *_: Any) -> None:
        """Stop the running job between two batches; the previous result, if any, is left as it was."""
        if self.jobs.busy:
            self.runner.cancel_pending()
            self.jobs.cancel()

    @property
    def recolored_first(self) -> tuple[int, int] | None:
        """The plane (axis, index) the last recompose recolored at once, before the rest of the volume (None: none on
        screen)."""
        return self.runner.recolored_first

    @recolored_first.setter
    def recolored_first(self, value: tuple[int, int] | None) -> None:
        self.runner.recolored_first = value

    def _recompose(self, *_: Any, plane: bool = True) -> None:
        """Recompose the kept run with the panel's settings (`RunAndRecompose.recompose`)."""
        self.runner.recompose(plane=plane)

    def _error(self, message: str) -> None:
        """A problem the user can fix, as a one-line napari error (every part of the dock shows them here)."""
        show_error(message)

    def _info(self, message: str) -> None:
        show_info(message)

    def _kept(self, volume: Volume, color: ColorVolume) -> None:
        """A run is shown (`RunAndRecompose`): its legend, and the colour classes, 3D view and export offered."""
        self.classes.fill_legend(color.settings)
        self.classes_button.enabled = self.view_3d.enabled = True
        self.exporter.enable(volume.meta)

    def _detach(self, *_: Any) -> None:
        """The dock widget is being deleted: stop listening to the viewer and stop the job (its result is dropped)."""
        self._closed = self.jobs.closed = True
        self._stop_following_layers()
        self.windows.unwatch()
        for run in list(self.session.runs):
            self.windows.unlink(run.ct)
        self._viewer.cursor.events.position.disconnect(self.classes.on_cursor)
        self.slab.close()
        self.cancel()
        self.view3d.close()

    # ---------------------------------------------------------------------------------------------------------------
    # Inputs
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def result_layer(self) -> Image | None:
        """The colorized layer of the last run, while it is still in the viewer."""
        kept = self.session.current
        return kept.shown if kept is not None and self._in_viewer(kept.shown) else None

    @property
    def busy_3d(self) -> bool:
        """True while a 3D preset's surfaces are being computed."""
        return self.view3d.busy

    @property
    def classes_busy(self) -> bool:
        """True while the colour classes' layer is being made (`ClassesAndPointer.show_classes`)."""
        return self.classes.classes_busy

    def describe(self, data_position) -> str:
        """The colour class at a position of the result layer's data (`ClassesAndPointer.describe`)."""
        return self.classes.describe(data_position)

    def legend_names(self) -> list[str]:
        """The classes the legend lists."""
        return self.classes.legend_names()

    def export(self):
        """What the Export button does (`ExportPanel.export`): the export's worker (None when refused); the paths
        written are in ``exporter.written`` once it has finished."""
        return self.exporter.export()

    def add_model(self, label: str, model: ModelSpec) -> None:
        """Offer another model (shipped name, ``.safetensors`` file or `Colorizer` object) and select it."""
        self._models[label] = model
        self.model.reset_choices()
        self.model.value = label

    def run(self) -> None:
        """Start colorizing the chosen CT layer (what the Run button does)."""
        self.runner.run()

    def _in_viewer(self, layer: Image) -> bool:
        # Identity, not `in`: napari hands plugins a proxy viewer whose lookups return fresh proxy objects; iterating
        # its layer list yields the layers themselves.
        return any(lyr is layer for lyr in self._viewer.layers)

    def _grey_layers(self, _widget=None) -> list[tuple[str, Image]]:
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if isinstance(layer, Image) and not layer.rgb and layer.ndim in (2, 3)
        ]

    def _on_layers_changed(self, _event=None) -> None:
        self.ct_layer.reset_choices()
        had_current = self.session.current is not None
        for run in [run for run in self.session.runs if not (self._in_viewer(run.ct) and self._in_viewer(run.shown))]:
            self.windows.unlink(run.ct)
        if had_current and self.session.current is None:  # the shown run's CT or colour was removed
            self.show_current_run()

    def show_current_run(self) -> None:
        """The legend and the colour-class button of the current run (`ColorizeSession.current`: the chosen CT's,
        else the last one); with none (its CT or colour left the viewer), an empty legend and status line."""
        settings = self.runner.shown_settings()
        if self.session.current is None or settings is None:
            self.classes.legend.value = ""
            self.status.value = ""
            self.classes_button.enabled = False
            return
        self.classes.fill_legend(settings)
        self.classes_button.enabled = not self.classes.classes_busy

    def _volume_of(self, layer: Image) -> Volume:
        data = layer.data[0] if layer.multiscale else layer.data
        return volume_from_layer(data, layer_attributes(layer))

    def _settings(self, run: bool) -> dict:
        """The panel's settings as `ColorizeRequest.checked`'s keywords; with ``run`` the model too (a recompose
        reads only what the composition needs, so a model menu left on "weights file..." without a file does not stop
        a window change)."""
        settings = {
            "window": self.windows.spec(),
            "palette": self._palette(),
            "strength": float(self.chroma.value),
            "device": self.device.value,
            "batch_size": int(self.batch_size.value) or None,
        }
        return {**settings, "model": self._model_spec()} if run else settings

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

    def _on_opacity(self, value: float) -> None:
        layer = self.result_layer
        if layer is not None:
            layer.opacity = float(value)
