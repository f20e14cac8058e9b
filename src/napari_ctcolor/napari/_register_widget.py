"""napari widget "Register & checkerboard": SYMNet registration of two CT layers, shown as a live checkerboard.

The widget is a thin front end over `napari_ctcolor.engines.register.iter_register`, the engine of ``ctcolor register``:

- Run: the engine's stages run in a napari ``thread_worker`` with a progress bar whose total is the engine's own (it
  depends on the model card's defaults: pre-alignment, refinement), plus one step for a colour warp; Cancel closes
  the engine's generator between two steps (``worker.quit()``), refinement iterations included.
- "Pre-alignment" (auto, on, off) and "Refine (demons its)" (auto or a number) are ``--affine`` and ``--refine``;
  auto is the model card's default.
- On completion it adds, or replaces on a re-run, the layers ``"<moving> warped"``, ``"checkerboard"`` (fixed vs
  warped, or vs the moving image as it was with "Checkerboard before registration"), ``"difference"`` (fixed -
  warped in HU, both clipped to the fixed layer's window: the difference of what the window shows, so lung texture
  is not noise under a soft-tissue window; it follows that window) and ``"Jacobian"`` (det J), all placed with the
  fixed layer's transforms. Difference and Jacobian are translucent overlays, clear where nothing changed (0 HU,
  det J = 1), with a colour bar; the widget states the sign conventions. ``"tile edges"`` (the tiles' outlines in
  the displayed plane) is added hidden: the user shows it from the layer list, and it stays as the user left it.
  NCC before/after, folding, time, whether the pre-alignment ran and the refinement iterations show in the widget,
  with the engine's quality warnings (also once as a napari warning).
- The result is kept, so the tile-size slider only recomputes the checkerboard; it never registers again.
- A layer ``"<name> colorized"`` (what "Colorize volume" makes) is the colorized twin of the grey layer ``"<name>"``.
  When the moving layer has one, the widget offers to warp it through the same displacement field; the checkerboard
  then compares the fixed layer's colorized twin (or its grey as RGB) with the warped colours.
- Problems the user can fix (`CTColorError`: no model file, no CUDA, 2D vs 3D layers, ...) show as one-line napari
  errors; nothing is added.
"""

from __future__ import annotations

import contextlib
import html
import os
import time
from collections.abc import Callable, Sequence
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
)
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import Colormap
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QTimer
from superqt.utils import qdebounced

from ..engines.checkerboard import checkerboard, checkerboard_mask
from ..engines.device import resolve_device
from ..engines.geometry import resample_onto, same_grid, warp
from ..engines.refine import MAX_REFINE_ITERATIONS
from ..engines.register import RegistrationResult, iter_register
from ..errors import CTColorError, InputError
from ..io import ColorVolume, Volume
from ..weights import find_weights
from ._docks import settle_heap, tab_with_siblings
from ._layers import META_KEY, layer_attributes, volume_from_layer
from ._view import follow_radiological_orientation, plane_buttons

if TYPE_CHECKING:
    import napari

TITLE = "Register & checkerboard"
CT_MODEL = "ct"
MODEL_FILE = "model file..."
DEVICES = ("auto", "cpu", "cuda")
#: "Pre-alignment" choices -> the engine's ``affine``: auto is the model card's default (on for the CT weights).
PREALIGN = {"auto": None, "on": True, "off": False}
#: The "Refine" spin box's minimum, shown as "auto": the model card's default iterations (the engine's None).
REFINE_AUTO = -1
COLOURED = " colorized"  # the suffix "Colorize volume" gives its result layer
CHECKERBOARD, DIFFERENCE, JACOBIAN, EDGES = "checkerboard", "difference", "Jacobian", "tile edges"
#: det J shown on [0, 2]: clear at 1 (volume kept), magenta where the moving image is compressed, green where stretched.
JACOBIAN_LIMITS = (0.0, 2.0)
#: Overlays drawn over the CT: transparent where nothing changed, opaque at the ends of their range.
DIFFERENCE_COLORMAP = Colormap(
    [[0.15, 0.35, 1.0, 1.0], [0.15, 0.35, 1.0, 0.0], [1.0, 0.2, 0.1, 0.0], [1.0, 0.2, 0.1, 1.0]],
    controls=[0.0, 0.5, 0.5, 1.0],
    name="ctcolor difference",  # blue: warped brighter, red: fixed brighter (the summary says so)
)
JACOBIAN_COLORMAP = Colormap(
    [[0.85, 0.1, 0.75, 1.0], [0.85, 0.1, 0.75, 0.0], [0.1, 0.7, 0.2, 0.0], [0.1, 0.7, 0.2, 1.0]],
    controls=[0.0, 0.5, 0.5, 1.0],
    name="ctcolor Jacobian",  # magenta: compressed, green: expanded (the summary says so)
)
OVERLAY_OPACITY = 0.8
#: Thin yellow lines where the checkerboard's tiles meet: once aligned, fixed and warped tiles look alike.
EDGES_OPACITY = 0.35
EDGES_COLORMAP = Colormap(
    [[1.0, 0.85, 0.1, 0.0], [1.0, 0.85, 0.1, 1.0]], controls=[0.0, 1.0], name="ctcolor tile edges"
)
#: Output roles that are never offered as inputs (a warped layer may be registered again).
DERIVED_ROLES = ("checkerboard", "difference", "jacobian", "tile edges")
TRANSFORMS = ("scale", "translate", "rotate", "affine")


@dataclass
class _Failed:
    """A job's return value when it stopped on a `CTColorError` (shown to the user, not a crash)."""

    message: str


@dataclass
class _Inputs:
    """What one run registers, read from the layers in the main thread.

    Attributes:
        fixed, moving: the grey volumes (own units, physical geometry).
        fixed_colour: the fixed layer's colorized twin, if any (any grid; resampled onto the fixed one in the worker).
        moving_colour: the moving layer's colorized twin, when it is to be warped too.
        moving_name, moving_colour_name: layer names, for the output layers' names.
        moving_limits: the moving layer's contrast limits, copied to the warped layer.
    """

    fixed: Volume
    moving: Volume
    fixed_colour: ColorVolume | None
    moving_colour: ColorVolume | None
    moving_name: str
    moving_colour_name: str | None
    moving_limits: tuple[float, float]


@dataclass
class _Output:
    """What the worker returns: the engine's result and what is derived from it off the main thread (the colours,
    the first difference)."""

    result: RegistrationResult
    fixed_colour: ColorVolume | None
    warped_colour: ColorVolume | None
    difference: np.ndarray | None = None  # `windowed_difference` under the fixed layer's window at run time


@dataclass
class _Kept:
    """A finished run, kept so that the tile slider and the colour toggle only redraw the checkerboard.

    Attributes:
        inputs: what was registered.
        output: the worker's output.
        transforms: the fixed layer's scale/translate/rotate/affine at run time (every output layer gets them).
        fixed_limits: the fixed layer's contrast limits at run time.
        two_d: the fixed layer is 2D; output layers then show the single slice.
        fixed_layer: the fixed grey layer; the difference follows its window.
    """

    inputs: _Inputs
    output: _Output
    transforms: dict[str, np.ndarray]
    fixed_limits: tuple[float, float]
    two_d: bool
    fixed_layer: Image


def warp_colour(colour: ColorVolume, grid: Volume, ddf: np.ndarray) -> ColorVolume:
    """``colour`` warped onto ``grid`` by a displacement field, with SimpleITK (linear, black outside).

    Args:
        colour: rgb uint8 (Z, Y, X, 3), any grid (the moving image's colorized twin).
        grid: the output grid, the one ``ddf`` is sampled on (the fixed image).
        ddf: (Z, Y, X, 3) mm, LPS, ITK convention: grid point p takes ``colour`` at p + ddf(p) (as
            `RegistrationResult.ddf`).
    """
    rgb = warp(colour, grid, ddf)
    return ColorVolume.on_grid_of(grid, rgb, **colour.settings, registered=True)


def grey_as_colour(volume: Volume, limits: tuple[float, float]) -> ColorVolume:
    """``volume`` windowed to ``limits`` (the layer's contrast limits) as grey sRGB, for a colour checkerboard."""
    low, high = limits
    grey = np.clip((volume.array.astype(np.float32) - low) / max(high - low, 1e-6), 0.0, 1.0)
    value = np.rint(grey * 255).astype(np.uint8)
    return ColorVolume.on_grid_of(volume, np.repeat(value[..., None], 3, axis=-1))


class RegisterWidget(Container):
    """Dock widget "Register & checkerboard".

    Args:
        napari_viewer: the viewer (napari passes it).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        self.fixed = ComboBox(
            label="Fixed", choices=self._input_layers, tooltip="grey CT layer (or its colorized twin)"
        )
        self.moving = ComboBox(label="Moving", choices=self._input_layers, tooltip="registered onto the fixed layer")
        self.model = ComboBox(label="Model", choices=[CT_MODEL, MODEL_FILE], value=CT_MODEL)
        self.model_file = FileEdit(
            label="Model file", mode="r", filter="*.pth *.safetensors", visible=False, tooltip="official SYMNet .pth"
        )
        self.prealign = ComboBox(
            label="Pre-alignment",
            choices=list(PREALIGN),
            value="auto",
            tooltip="rigid + affine pre-alignment before the network (auto: the model card's default, on for the CT "
            "weights, off for an official checkpoint)",
        )
        # Qt's spin boxes show their special value text instead of the number when the value is the minimum: -1
        # reads "auto" (the model card's default), one step below 0 (the network alone). magicgui's SpinBox is
        # superqt's QLargeIntSpinBox, which has no special value; FloatSpinBox is Qt's QDoubleSpinBox, here with no
        # decimals, so only whole iteration counts can be entered.
        self.refine = FloatSpinBox(
            label="Refine (demons its)",
            min=REFINE_AUTO,
            max=MAX_REFINE_ITERATIONS,
            step=1,
            value=REFINE_AUTO,
            tooltip="demons iterations at the fixed image's full resolution, seeded by the network's field (0: the "
            "network alone; auto: the model card's default, which refines with the CT weights and not with an "
            "official checkpoint)",
        )
        self.refine.native.setDecimals(0)
        self.refine.native.setSpecialValueText("auto")
        self.device = ComboBox(label="Device", choices=list(DEVICES), value="auto")
        self.warp_colour = CheckBox(text="Warp colorized twin too", value=True, enabled=False, visible=False)
        self.tile_mm = FloatSlider(label="Tile (mm)", min=2.0, max=100.0, step=1.0, value=20.0)
        self.before = CheckBox(
            text="Checkerboard before registration",
            value=False,
            tooltip="fixed against the moving image as it was (on the fixed grid): what the registration corrected",
        )
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress_bar = ProgressBar(value=0, min=0, max=1, visible=False)
        self.status = Label(value="")
        self.summary = Label(value="")
        for label in (self.status, self.summary):  # long text wraps instead of widening the dock over the canvas
            label.native.setWordWrap(True)
        super().__init__(
            widgets=[
                self.fixed,
                self.moving,
                self.model,
                self.model_file,
                self.prealign,
                self.refine,
                self.device,
                self.warp_colour,
                self.tile_mm,
                self.before,
                self.run_button,
                self.cancel_button,
                self.progress_bar,
                self.status,
                self.summary,
                plane_buttons(napari_viewer),
            ]
        )
        tab_with_siblings(self.native)
        settle_heap()
        self.worker = None  # the running GeneratorWorker, if any
        self._kept: _Kept | None = None
        self._closed = False
        self._turns = 0  # steps of showing a result still to run (`_in_turns`)
        self._edges_hidden_for_3d = False  # the 3D view hid the tile edges the user had shown
        # The difference follows the fixed layer's window, redrawn once a slider drag pauses (a volume's worth).
        self._window_changed = qdebounced(self._redraw_difference, timeout=200)

        self.run_button.changed.connect(self._run)
        self.cancel_button.changed.connect(self.cancel)
        self.model.changed.connect(lambda value: setattr(self.model_file, "visible", value == MODEL_FILE))
        self.moving.changed.connect(self._on_moving_chosen)
        self.tile_mm.changed.connect(self._redraw_checkerboard)
        self.warp_colour.changed.connect(self._redraw_checkerboard)
        self.before.changed.connect(self._redraw_checkerboard)
        layer_events = self._viewer.layers.events
        self._layer_events = (layer_events.inserted, layer_events.removed, layer_events.reordered)
        for event in self._layer_events:
            event.connect(self._on_layers_changed)
        self.native.destroyed.connect(self._detach)
        follow_radiological_orientation(napari_viewer)
        self._dims_events = (napari_viewer.dims.events.order, napari_viewer.dims.events.ndisplay)
        for event in self._dims_events:
            event.connect(self._redraw_edges)
        self._on_layers_changed()

    # ---------------------------------------------------------------------------------------------------------------
    # State the tests and the user see
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a registration runs, until its layers are all shown."""
        return self.worker is not None or self._turns > 0

    @property
    def result(self) -> RegistrationResult | None:
        """The last finished registration (ddf, Jacobian, metrics), on the fixed layer's grid."""
        return self._kept.output.result if self._kept is not None else None

    def run(self) -> None:
        """Start registering the moving layer to the fixed one (what the Run button does)."""
        self._run()

    def cancel(self, *_: Any) -> None:
        """Stop the running registration between two stages; the previous result, if any, stays."""
        if self.worker is not None:
            self.worker.quit()

    def _detach(self, *_: Any) -> None:
        """The dock widget is being deleted: stop listening to the viewer and stop the job (its result is dropped)."""
        self._closed = True
        for event in self._layer_events:
            event.disconnect(self._on_layers_changed)
        for event in self._dims_events:
            event.disconnect(self._redraw_edges)
        self._follow_window(None)
        self.cancel()

    # ---------------------------------------------------------------------------------------------------------------
    # Inputs
    # ---------------------------------------------------------------------------------------------------------------

    def _layers(self) -> list[Image]:
        # Iterate, never look up by name: napari hands plugins a proxy viewer whose lookups return fresh proxies.
        return [layer for layer in self._viewer.layers if isinstance(layer, Image)]

    def _named(self, name: str, rgb: bool) -> Image | None:
        return next((layer for layer in self._layers() if layer.name == name and layer.rgb == rgb), None)

    def _input_layers(self, _widget=None) -> list[tuple[str, Image]]:
        """2D/3D image layers, grey or RGB, except the checkerboard, difference and Jacobian this widget made."""
        return [
            (layer.name, layer)
            for layer in self._layers()
            if layer.ndim in (2, 3) and self._role(layer) not in DERIVED_ROLES
        ]

    @staticmethod
    def _role(layer: Image) -> str | None:
        meta = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
        return meta.get("register") if isinstance(meta, dict) else None

    def _grey_and_colour(self, layer: Image) -> tuple[Image, Image | None]:
        """(grey layer, colorized twin or None) for a chosen layer, grey or colorized.

        Raises:
            InputError: a colorized layer whose grey layer is not in the viewer (registration needs the CT's units).
        """
        if not layer.rgb:
            return layer, self._named(f"{layer.name}{COLOURED}", rgb=True)
        grey = self._named(layer.name.removesuffix(COLOURED), rgb=False) if layer.name.endswith(COLOURED) else None
        if grey is None:
            raise InputError(
                f"{layer.name}: a colorized layer is registered through its grey CT layer; open that CT as "
                f"'{layer.name.removesuffix(COLOURED)}' too, or pick a grey layer"
            )
        return grey, layer

    def _on_layers_changed(self, _event=None) -> None:
        self.fixed.reset_choices()
        self.moving.reset_choices()
        choices = [layer for _, layer in self._input_layers()]
        if self.moving.value is not None and self.moving.value is self.fixed.value and len(choices) > 1:
            # Registering a layer to itself is never what a fresh choice means: take the next layer.
            self.moving.value = next(layer for layer in choices if layer is not self.fixed.value)
        self._offer_colour()

    def _on_moving_chosen(self, layer: Image | None) -> None:
        self._offer_colour()
        if layer is not None and layer.rgb:
            self.warp_colour.value = True  # a colorized moving layer was picked: its colours are what to compare

    def _offer_colour(self) -> None:
        """Offer "warp colorized twin" only when the moving layer has one (or is one)."""
        layer = self.moving.value
        twin = None
        if layer is not None:
            try:
                twin = self._grey_and_colour(layer)[1]
            except InputError:
                twin = None
        self.warp_colour.enabled = twin is not None
        self.warp_colour.visible = twin is not None

    @staticmethod
    def _volume_of(layer: Image) -> Volume:
        data = layer.data[0] if layer.multiscale else layer.data
        return volume_from_layer(data, layer_attributes(layer))

    @staticmethod
    def _colour_of(layer: Image) -> ColorVolume:
        data = np.asarray(layer.data[0] if layer.multiscale else layer.data)[..., :3]  # RGBA: drop alpha
        geometry = volume_from_layer(data[..., 0], layer_attributes(layer))  # a view: geometry only
        rgb = data if data.ndim == 4 else data[np.newaxis]
        return ColorVolume(np.ascontiguousarray(rgb), geometry.spacing, geometry.origin, geometry.direction)

    def _model_spec(self) -> str:
        if self.model.value == MODEL_FILE:
            path = self.model_file.value
            if not (path and os.path.isfile(path)):
                raise InputError("choose a SYMNet model file (official .pth checkpoint or .safetensors)")
            return str(path)
        try:
            find_weights("symnet-ct")
        except InputError:
            raise InputError(
                f"CT weights not found (weights/symnet-ct.safetensors); choose Model '{MODEL_FILE}' and an "
                "official SYMNet .pth checkpoint"
            ) from None
        return CT_MODEL

    def _inputs(self) -> tuple[_Inputs, Image]:
        """The volumes of the chosen layers and the fixed grey layer (its transforms place the outputs)."""
        if self.fixed.value is None or self.moving.value is None:
            raise InputError(f"{TITLE}: open a fixed and a moving CT first (grey image layers)")
        fixed_layer, fixed_twin = self._grey_and_colour(self.fixed.value)
        moving_layer, moving_twin = self._grey_and_colour(self.moving.value)
        warp = moving_twin is not None and self.warp_colour.value
        inputs = _Inputs(
            fixed=self._volume_of(fixed_layer),
            moving=self._volume_of(moving_layer),
            fixed_colour=self._colour_of(fixed_twin) if warp and fixed_twin is not None else None,
            moving_colour=self._colour_of(moving_twin) if warp else None,
            moving_name=moving_layer.name,
            moving_colour_name=moving_twin.name if warp else None,
            moving_limits=tuple(float(v) for v in moving_layer.contrast_limits),
        )
        return inputs, fixed_layer

    # ---------------------------------------------------------------------------------------------------------------
    # The job
    # ---------------------------------------------------------------------------------------------------------------

    def _run(self, *_: Any) -> None:
        if self.busy:
            return  # one registration at a time
        try:
            inputs, fixed_layer = self._inputs()
            model = self._model_spec()
            device = str(resolve_device(self.device.value))
        except CTColorError as exc:
            show_error(str(exc))
            return
        affine = PREALIGN[self.prealign.value]
        iterations = round(self.refine.value)
        refine = None if iterations == REFINE_AUTO else iterations
        transforms = {key: np.array(value) for key, value in layer_attributes(fixed_layer).items() if key != "metadata"}
        fixed_limits = tuple(float(v) for v in fixed_layer.contrast_limits)
        worker = create_worker(
            self._steps,
            inputs,
            model,
            affine,
            refine,
            device,
            fixed_limits,
            _ignore_errors=True,  # errors other than ours reach napari's notifier
        )
        # The total is the engine's (it depends on the model card's defaults), known from its first step; until then
        # the bar shows 0 of 1, not a busy indicator, whose animation repaints the window continuously
        # (nor napari's progress: `_docks`).
        started = time.perf_counter()
        self.progress_bar.max, self.progress_bar.value, self.progress_bar.visible = 1, 0, True
        worker.yielded.connect(self._progress)
        worker.aborted.connect(lambda: self._say(f"{TITLE}: cancelled"))
        worker.errored.connect(lambda _: self._say(f"{TITLE}: failed"))
        worker.returned.connect(
            lambda output: self._say(
                f"{TITLE}: failed" if isinstance(output, _Failed) else f"{TITLE}: {time.perf_counter() - started:.1f} s"
            )
        )
        worker.returned.connect(  # after the timing message, so that what it says stays
            lambda output: self._returned(output, inputs, fixed_layer, transforms, fixed_limits)
        )
        worker.finished.connect(lambda: self._finished(worker))
        self.worker = worker
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = f"{TITLE}..."
        worker.start()

    @staticmethod
    def _steps(
        inputs: _Inputs,
        model: str,
        affine: bool | None,
        refine: int | None,
        device: str,
        fixed_limits: tuple[float, float],
    ):
        """The engine, then the colour warp and the difference under ``fixed_limits`` (a volume's worth of
        arithmetic, off the main thread): yields (done, total), returns an `_Output` or `_Failed`.

        ``total`` is the engine's, taken from each of its steps, plus one step for the colour warp.
        """
        extra = int(inputs.moving_colour is not None)
        total = 0
        try:
            engine = iter_register(inputs.fixed, inputs.moving, model, affine, refine, device)
            try:
                while True:
                    try:
                        done, total = next(engine)
                    except StopIteration as stop:
                        result = stop.value
                        break
                    total += extra
                    yield done, total
            finally:
                engine.close()  # Cancel closes this generator at a yield: the engine's own finally blocks run
            fixed_colour = warped_colour = None
            if inputs.moving_colour is not None:
                warped_colour = warp_colour(inputs.moving_colour, inputs.fixed, result.ddf)
                fixed_colour = inputs.fixed_colour
                if fixed_colour is not None and not same_grid(fixed_colour, inputs.fixed):
                    rgb = resample_onto(fixed_colour, inputs.fixed)
                    fixed_colour = ColorVolume.on_grid_of(inputs.fixed, rgb, **fixed_colour.settings)
                yield total, total
        except CTColorError as exc:
            return _Failed(str(exc))
        except RuntimeError as exc:
            # superqt takes a RuntimeError out of a worker for a deleted Qt object and ends the worker without its
            # errored and finished signals, which would leave the widget busy for good (torch's out-of-memory error
            # is a RuntimeError too): shown as a one-line error instead.
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            return _Failed(f"{TITLE} failed: {lines[0]}")
        difference = windowed_difference(inputs.fixed.array, result.warped.array, fixed_limits)
        return _Output(result, fixed_colour, warped_colour, difference)

    def _progress(self, step: tuple[int, int]) -> None:
        """One step of the job: the bar takes its total (the engine's) and its count."""
        done, total = step
        if not self._closed:
            self.progress_bar.max = total
            self.progress_bar.value = done

    def _say(self, text: str) -> None:
        if not self._closed:
            self.status.value = text

    def _finished(self, worker) -> None:
        if self.worker is not worker or self._closed:
            return
        self.worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        self.progress_bar.visible = False

    def _returned(
        self,
        output: _Output | _Failed,
        inputs: _Inputs,
        fixed_layer: Image,
        transforms: dict[str, np.ndarray],
        fixed_limits: tuple[float, float],
    ) -> None:
        if self._closed:
            return
        if isinstance(output, _Failed):
            show_error(output.message)
            return
        if not any(layer is fixed_layer for layer in self._viewer.layers):  # deleted during the run: no orphans
            self._say(f"{TITLE}: the fixed layer was removed; result dropped")
            return
        self._follow_window(None)
        self._kept = _Kept(inputs, output, transforms, fixed_limits, fixed_layer.ndim == 2, fixed_layer)
        self._follow_window(fixed_layer)
        warnings = output.result.metrics.get("warnings", [])
        self._show(then=lambda: warnings and show_warning(f"{TITLE}: " + "; ".join(warnings)))
        # (the layers are added first: a doubtful result is shown, and said so once)

    # ---------------------------------------------------------------------------------------------------------------
    # Output layers
    # ---------------------------------------------------------------------------------------------------------------

    def _show(self, then: Callable[[], Any] | None = None) -> None:
        """Show the kept run: warped, difference, Jacobian, checkerboard (on top), and the numbers; then ``then``.

        napari adds a layer in about 0.1 s of the main thread (its visual, its controls), so the layers are added one
        per turn of the event loop: the viewer repaints and answers the mouse in between (`_in_turns`)."""
        kept = self._kept
        inputs, output = kept.inputs, kept.output
        result = output.result
        overlay = {"opacity": OVERLAY_OPACITY, "colorbar": True, "hide": True}
        warped = f"{inputs.moving_name} warped"
        steps = [lambda: self._put(warped, result.warped.array, "warped", limits=inputs.moving_limits)]
        if output.warped_colour is not None:
            steps.append(
                lambda: self._put(
                    f"{inputs.moving_colour_name} warped", output.warped_colour.rgb, "warped colour", rgb=True
                )
            )
        steps += [
            self._redraw_difference,
            lambda: self._put(
                JACOBIAN,
                result.jacobian.array,
                "jacobian",
                limits=JACOBIAN_LIMITS,
                colormap=JACOBIAN_COLORMAP,
                **overlay,
            ),
            lambda: self._redraw_checkerboard(edges=False),
            self._redraw_edges,
            self._summarise,
        ]
        if then is not None:
            steps.append(then)
        self._in_turns(kept, steps)

    def _in_turns(self, kept: _Kept, steps: list[Callable[[], Any]]) -> None:
        """Run ``steps`` one per turn of the Qt event loop, from the next one on (the worker's last signals are
        handled first), while ``kept`` is still the run shown."""
        self._turns = len(steps)

        def turn() -> None:
            if self._closed or self._kept is not kept or not steps:
                self._turns = 0
                return
            steps.pop(0)()
            self._turns = len(steps)
            if steps:
                QTimer.singleShot(0, turn)

        QTimer.singleShot(0, turn)

    def _summarise(self) -> None:
        """Select the checkerboard and write the kept run's numbers."""
        # The checkerboard, on top, is what the user reads first (its HU in the status bar), not the hidden tile edges
        # that were appended last.
        self._viewer.layers.selection.active = next(lyr for lyr in self._layers() if lyr.name == CHECKERBOARD)
        m = self._kept.output.result.metrics
        spread = m.get("jacobian_body_p1_p99", (1.0, 1.0))
        prealigned = f" (affine {m['ncc_prealigned']:.3f})" if "ncc_prealigned" in m else ""
        warnings = "".join(f"<br>⚠ {html.escape(w)}" for w in m.get("warnings", []))
        self.summary.value = (
            f"NCC {m['ncc_before']:.3f} -> {m['ncc_after']:.3f}{prealigned}"
            f" | folding {100 * m['folding_fraction']:.3f} %"
            f" | {m['seconds']:.1f} s ({m['device']}, pre-alignment {'on' if m['affine'] else 'off'},"
            f" refine {m['refine_iterations']})"
            f"{warnings}"
            "<br>difference = fixed - warped (HU within the fixed layer's window): red where the fixed image is"
            " brighter, blue where the warped is"
            "<br>Jacobian det J: 1 unchanged, &lt; 1 compressed (magenta), &gt; 1 expanded (green), &le; 0 folded"
            f"; in the body {spread[0]:.2f}-{spread[1]:.2f} (1st-99th percentile). A rigid or affine motion alone is"
            " 1 everywhere: colour is the field's own local deformation, real or fitted to noise and contrast"
            " (vessel lumens), not the interpolation of the moved scan"
        )

    def _follow_window(self, layer: Image | None) -> None:
        """Redraw the difference when ``layer``'s (the fixed layer's) window changes; None: stop following."""
        kept = self._kept
        if kept is not None:
            with contextlib.suppress(TypeError, ValueError):  # never connected (a run that failed) or already gone
                kept.fixed_layer.events.contrast_limits.disconnect(self._window_changed)
        if layer is not None:
            layer.events.contrast_limits.connect(self._window_changed)

    def _redraw_difference(self) -> None:
        """The difference layer under the fixed layer's current window, opaque at +- half its width, clear at 0."""
        kept = self._kept
        if kept is None or self._closed:
            return
        limits = tuple(float(v) for v in kept.fixed_layer.contrast_limits)
        difference = kept.output.difference
        if difference is None or limits != kept.fixed_limits:  # the worker's was for the window at run time
            difference = windowed_difference(kept.inputs.fixed.array, kept.output.result.warped.array, limits)
        kept.output.difference = None  # shown once; a redraw follows the window
        half = 0.5 * (limits[1] - limits[0])
        self._put(
            DIFFERENCE,
            difference,
            "difference",
            limits=(-half, half),
            colormap=DIFFERENCE_COLORMAP,
            opacity=OVERLAY_OPACITY,
            colorbar=True,
            hide=True,
        )

    def _redraw_checkerboard(self, *_: Any, edges: bool = True) -> None:
        """The checkerboard of the kept result at the current tile size (colour when the warped colours exist), and
        with ``edges`` its tile outlines."""
        kept = self._kept
        if kept is None:
            return
        output, tile_mm, inputs = kept.output, float(self.tile_mm.value), kept.inputs
        before = bool(self.before.value)  # the moving image as it was, resampled onto the fixed grid by position
        if output.warped_colour is not None and self.warp_colour.value:
            fixed_colour = output.fixed_colour or grey_as_colour(inputs.fixed, kept.fixed_limits)
            other = inputs.moving_colour if before else output.warped_colour
            board = checkerboard(fixed_colour, other, tile_mm)
            self._put(CHECKERBOARD, board.rgb, "checkerboard", rgb=True)
        else:
            board = checkerboard(inputs.fixed, inputs.moving if before else output.result.warped, tile_mm)
            self._put(CHECKERBOARD, board.array, "checkerboard", limits=kept.fixed_limits)
        if edges:
            self._redraw_edges()

    def _redraw_edges(self, *_: Any) -> None:
        """The tile outlines in the plane on screen: lines along the two displayed axes, none across the slice (a
        slice on a tile boundary would otherwise light up entirely).

        The layer is added hidden (outlines sit where the eye looks for steps between tiles); its visibility is the
        user's, except that a shown layer is hidden in 3D and shown again on return to 2D.
        """
        kept = self._kept
        if kept is None or self._closed:
            return
        dims = self._viewer.dims
        shown = [axis - (dims.ndim - 3) for axis in dims.order[-2:]] if dims.ndim >= 3 else [1, 2]
        axes = [1, 2] if kept.two_d else [a for a in shown if 0 <= a < 3]
        edges = tile_edges(kept.inputs.fixed, float(self.tile_mm.value), axes)
        layer = self._put(
            EDGES, edges, "tile edges", limits=(0.0, 1.0), colormap=EDGES_COLORMAP, opacity=EDGES_OPACITY, hide=True
        )
        if dims.ndisplay == 3 and layer.visible:
            layer.visible = False
            self._edges_hidden_for_3d = True
        elif dims.ndisplay == 2 and self._edges_hidden_for_3d:
            layer.visible = True
            self._edges_hidden_for_3d = False

    def _put(
        self,
        name: str,
        data: np.ndarray,
        role: str,
        rgb: bool = False,
        limits: tuple[float, float] | None = None,
        colormap: str | Colormap = "gray",
        hide: bool = False,
        opacity: float | None = None,
        colorbar: bool = False,
    ) -> Image:
        """Show ``data`` (on the fixed grid) in the layer ``name``: its data replaced when it exists, else added.

        Args:
            name: layer name; a re-run updates the same layer, never stacks another.
            data: (Z, Y, X) or (Z, Y, X, 3) uint8 with ``rgb``.
            role: recorded in the layer metadata (the derived roles are not offered as inputs).
            limits: contrast limits of a grey layer.
            colormap: of a grey layer.
            hide: add the layer hidden (the checkerboard is what the user looks at first).
            opacity: draw the layer translucently over the CT with this opacity (an overlay whose colormap is clear
                where nothing changed); None: napari's default blending.
            colorbar: show the colormap's colour bar on a new layer.
        """
        kept = self._kept
        if kept.two_d:
            data = data[0]
        metadata = {META_KEY: {"register": role, "metrics": _plain(kept.output.result.metrics)}}
        style = {} if rgb else {"contrast_limits": limits, "colormap": colormap}
        if opacity is not None:
            style.update(blending="translucent", opacity=opacity)
        existing = next((lyr for lyr in self._layers() if lyr.name == name), None)
        if existing is not None and existing.rgb == rgb and existing.data.ndim == data.ndim:
            existing.data = data
            for key, value in kept.transforms.items():
                setattr(existing, key, value)
            if not rgb:
                existing.contrast_limits_range = _range(data, limits)
            for key, value in style.items():
                setattr(existing, key, value)
            existing.metadata = {**existing.metadata, **metadata}
            return existing
        index = None
        if existing is not None:  # same name but another kind of layer: replace it where it was
            index = list(self._viewer.layers).index(existing)
            self._viewer.layers.remove(existing)
        # Linear in-plane sampling as the CT layers (no blocky voxels); the tile edges stay one-voxel lines.
        interpolation = "nearest" if role == "tile edges" else "linear"
        layer = Image(
            data,
            name=name,
            rgb=rgb,
            visible=not hide,
            metadata=metadata,
            interpolation2d=interpolation,
            **style,
            **kept.transforms,
        )
        if not rgb:
            layer.contrast_limits_range = _range(data, limits)
            layer.contrast_limits = limits
        layer.colorbar.visible = colorbar
        if index is None:
            self._viewer.layers.append(layer)
        else:
            self._viewer.layers.insert(index, layer)
        return layer


def tile_edges(grid: Volume, tile_mm: float, axes: Sequence[int] = (1, 2)) -> np.ndarray:
    """uint8 (Z, Y, X): 1 on the first voxel of each new checkerboard tile along any of ``axes`` (array axes), else 0.

    With the two axes of the displayed plane, a slice shows the tiles' outlines as one-voxel lines.
    """
    mask = checkerboard_mask(grid.shape, grid.spacing, tile_mm)
    edges = np.zeros(mask.shape, dtype=bool)
    for axis in axes:
        ahead = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
        behind = tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))
        edges[ahead] |= mask[ahead] != mask[behind]
    return edges.view(np.uint8)


def windowed_difference(fixed: np.ndarray, warped: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
    """float32 fixed - warped (HU) with both clipped to the window ``limits``: the difference of what that window
    shows (two voxels both below or both above it differ by 0)."""
    low, high = limits
    return np.clip(fixed, low, high, dtype=np.float32) - np.clip(warped, low, high, dtype=np.float32)


def _range(data: np.ndarray, limits: tuple[float, float]) -> tuple[float, float]:
    """A contrast-limits range covering both the data and the chosen limits (so the limits are never clipped)."""
    if not data.size:
        return limits
    low, high = float(data.min()), float(data.max())
    if not (np.isfinite(low) and np.isfinite(high)):  # the engine's outputs are finite: only then the slower pass
        finite = data[np.isfinite(data)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else limits
    return min(low, limits[0]), max(high, limits[1])


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics without nested containers napari would have to copy on every metadata event."""
    return {key: value for key, value in metrics.items() if isinstance(value, str | int | float | bool)}
