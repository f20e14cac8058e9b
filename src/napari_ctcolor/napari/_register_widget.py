"""napari widget "Register & checkerboard": SYMNet registration of two CT layers, shown as a live checkerboard.

The widget is a thin front end over `app.register_job.iter_register_job`, the job of ``ctcolor register``:

- Run: the engine's stages run in a napari ``thread_worker`` with a progress bar whose total is the engine's own (it
  depends on the model card's defaults: pre-alignment, refinement), plus one step for a colour warp; Cancel closes
  the engine's generator between two steps (``worker.quit()``), refinement iterations included.
- "Pre-alignment" (auto, on, off) and "Refine (demons its)" (auto or a number) are ``--affine`` and ``--refine``;
  auto is the model card's default.
- On completion it adds, or replaces on a re-run, the layers ``"<moving> warped"``, ``"checkerboard"`` (fixed vs
  warped, or vs the moving image as it was with "Checkerboard before registration"), ``"difference"`` (fixed -
  warped in HU, both clipped to -1000..400 HU: lung and soft tissue alike, whatever the fixed layer's window;
  `app.register_session.difference_of`) and ``"Jacobian"`` (det J), all placed with the
  fixed layer's transforms. Difference and Jacobian are translucent overlays, clear where nothing changed (0 HU,
  det J = 1), with a colour bar; the widget states the sign conventions. ``"tile edges"`` (the tiles' outlines in
  the displayed plane) is added hidden: the user shows it from the layer list, and it stays as the user left it.
  NCC before/after, folding, time, whether the pre-alignment ran and the refinement iterations show in the widget,
  with the engine's quality warnings (also once as a napari warning).
- The result is kept (``session``, `app.register_session.RegisterSession`: the job and the run, without Qt), so the
  tile-size slider only recomputes the checkerboard; it never registers again.
- A layer ``"<name> colorized"`` (what "Colorize volume" makes) is the colorized twin of the grey layer ``"<name>"``.
  When the moving layer has one, the widget offers to warp it through the same displacement field; the checkerboard
  then compares the fixed layer's colorized twin (or its grey as RGB) with the warped colours.
- Problems the user can fix (`CTColorError`: no model file, no CUDA, 2D vs 3D layers, ...) show as one-line napari
  errors; nothing is added.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
)
from napari.layers import Image
from napari.utils.notifications import show_error, show_warning

from ..app.register_job import MAX_REFINE_ITERATIONS, RegisterRequest, RegistrationResult
from ..app.register_session import RegisterInputs, RegisterSession
from ..app.session import Failed
from ..errors import CTColorError, InputError
from ..io import ColorVolume, Volume
from ..weights import find_weights
from ._docks import attach_to_viewer, settle_heap, tab_with_siblings
from ._jobs import JobRunner
from ._layers import META_KEY, layer_attributes, volume_from_layer
from ._register_outputs import Kept, RegisterOutputs
from ._side_by_side import SideBySide
from ._view import plane_buttons

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
#: Output roles that are never offered as inputs (a warped layer may be registered again).
DERIVED_ROLES = ("checkerboard", "difference", "jacobian", "tile edges")
TRANSFORMS = ("scale", "translate", "rotate", "affine")


def _refine_box() -> FloatSpinBox:
    """The "Refine (demons its)" box: a whole number of iterations, or "auto" (`REFINE_AUTO`).

    Qt's spin boxes show their special value text instead of the number when the value is the minimum: -1 reads
    "auto" (the model card's default), one step below 0 (the network alone). magicgui's SpinBox is superqt's
    QLargeIntSpinBox, which has no special value; FloatSpinBox is Qt's QDoubleSpinBox, here with no decimals, so only
    whole iteration counts can be entered."""
    box = FloatSpinBox(
        label="Refine (demons its)",
        min=REFINE_AUTO,
        max=MAX_REFINE_ITERATIONS,
        step=1,
        value=REFINE_AUTO,
        tooltip="demons iterations at the fixed image's full resolution, seeded by the network's field (0: the "
        "network alone; auto: the model card's default, which refines with the CT weights and not with an "
        "official checkpoint)",
    )
    box.native.setDecimals(0)
    box.native.setSpecialValueText("auto")
    return box


class RegisterWidget(Container):
    """Dock widget "Register & checkerboard": the inputs and the job here, the output layers in `RegisterOutputs`.

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
        self.refine = _refine_box()
        self.device = ComboBox(label="Device", choices=list(DEVICES), value="auto")
        self.warp_color = CheckBox(text="Warp colorized twin too", value=True, enabled=False, visible=False)
        self.side_by_side = CheckBox(
            text="Fixed and warped side by side",
            value=False,
            enabled=False,
            tooltip="the fixed image and the warped moving one in two panes that scroll, zoom and window together "
            "(in colour when the colorized twin was warped)",
        )
        self.panes = SideBySide(napari_viewer)
        self._fixed_layer: Image | None = None  # the fixed layer of the run shown
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress_bar = ProgressBar(value=0, min=0, max=1, visible=False)
        self.status = Label(value="")
        self.status.native.setWordWrap(True)  # long text wraps instead of widening the dock over the canvas
        self._closed = False
        self.session = RegisterSession()
        self.outputs = RegisterOutputs(napari_viewer, self.session, self._layers, self.warp_color, lambda: self._closed)
        self.tile_mm, self.before, self.summary = self.outputs.tile_mm, self.outputs.before, self.outputs.summary
        super().__init__(
            widgets=[
                self.fixed,
                self.moving,
                self.model,
                self.model_file,
                self.prealign,
                self.refine,
                self.device,
                self.warp_color,
                self.tile_mm,
                self.before,
                self.run_button,
                self.cancel_button,
                self.progress_bar,
                self.status,
                self.summary,
                self.side_by_side,
                plane_buttons(napari_viewer),
            ]
        )
        tab_with_siblings(self.native)
        settle_heap()
        self.jobs = JobRunner(self.progress_bar, self.status, self.run_button, self.cancel_button)
        self._stop = threading.Event()  # the running job's Cancel (a new one per run)

        self.run_button.changed.connect(self._run)
        self.cancel_button.changed.connect(self.cancel)
        self.model.changed.connect(lambda value: setattr(self.model_file, "visible", value == MODEL_FILE))
        self.moving.changed.connect(self._on_moving_chosen)
        self.side_by_side.changed.connect(self._on_side_by_side)
        self._stop_following_layers = attach_to_viewer(
            self.native, napari_viewer, self._on_layers_changed, self._detach
        )
        self._dims_events = (napari_viewer.dims.events.order, napari_viewer.dims.events.ndisplay)
        for event in self._dims_events:
            event.connect(self.outputs.redraw_edges)
        self._on_layers_changed()

    # ---------------------------------------------------------------------------------------------------------------
    # State the tests and the user see
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a registration runs, until its layers are all shown, and while the checkerboard is redrawn."""
        return self.jobs.busy or self.outputs.busy

    @property
    def worker(self):
        """The running GeneratorWorker, if any."""
        return self.jobs.worker

    @property
    def result(self) -> RegistrationResult | None:
        """The last finished registration (ddf, Jacobian, metrics), on the fixed layer's grid."""
        return self.session.run.result if self.session.run is not None else None

    def run(self) -> None:
        """Start registering the moving layer to the fixed one (what the Run button does)."""
        self._run()

    def cancel(self, *_: Any) -> None:
        """Stop the running registration within a poll of its engine (every stage and each SimpleITK call of the
        refinement run in a thread of their own while it polls: `steps.in_thread`); the previous result, if any,
        stays."""
        self._stop.set()
        self.jobs.cancel()

    def _detach(self, *_: Any) -> None:
        """The dock widget is being deleted: stop listening to the viewer and stop the job (its result is dropped)."""
        self._closed = self.jobs.closed = True
        self._stop_following_layers()
        self.panes.leave()
        for event in self._dims_events:
            event.disconnect(self.outputs.redraw_edges)
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

    def _grey_and_color(self, layer: Image) -> tuple[Image, Image | None]:
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
        self._offer_color()

    def _on_moving_chosen(self, layer: Image | None) -> None:
        self._offer_color()
        if layer is not None and layer.rgb:
            self.warp_color.value = True  # a colorized moving layer was picked: its colours are what to compare

    def _offer_color(self) -> None:
        """Offer "warp colorized twin" only when the moving layer has one (or is one)."""
        layer = self.moving.value
        twin = None
        if layer is not None:
            try:
                twin = self._grey_and_color(layer)[1]
            except InputError:
                twin = None
        self.warp_color.enabled = twin is not None
        self.warp_color.visible = twin is not None

    @staticmethod
    def _volume_of(layer: Image) -> Volume:
        data = layer.data[0] if layer.multiscale else layer.data
        return volume_from_layer(data, layer_attributes(layer))

    @staticmethod
    def _color_of(layer: Image) -> ColorVolume:
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

    def _inputs(self) -> tuple[RegisterInputs, Image]:
        """The volumes of the chosen layers and the fixed grey layer (its transforms place the outputs)."""
        if self.fixed.value is None or self.moving.value is None:
            raise InputError(f"{TITLE}: open a fixed and a moving CT first (grey image layers)")
        fixed_layer, fixed_twin = self._grey_and_color(self.fixed.value)
        moving_layer, moving_twin = self._grey_and_color(self.moving.value)
        warp = moving_twin is not None and self.warp_color.value
        inputs = RegisterInputs(
            fixed=self._volume_of(fixed_layer),
            moving=self._volume_of(moving_layer),
            fixed_color=self._color_of(fixed_twin) if warp and fixed_twin is not None else None,
            moving_color=self._color_of(moving_twin) if warp else None,
            moving_name=moving_layer.name,
            moving_color_name=moving_twin.name if warp else None,
            fixed_limits=tuple(float(v) for v in fixed_layer.contrast_limits),
            moving_limits=tuple(float(v) for v in moving_layer.contrast_limits),
        )
        return inputs, fixed_layer

    # ---------------------------------------------------------------------------------------------------------------
    # The job
    # ---------------------------------------------------------------------------------------------------------------

    def _run(self, *_: Any) -> None:
        if self.busy:
            return  # one registration at a time
        iterations = round(self.refine.value)
        try:
            inputs, fixed_layer = self._inputs()
            request = RegisterRequest.checked(
                model=self._model_spec(),
                affine=PREALIGN[self.prealign.value],
                refine=None if iterations == REFINE_AUTO else iterations,
                device=self.device.value,
            )
        except CTColorError as exc:
            show_error(str(exc))
            return
        transforms = {key: np.array(value) for key, value in layer_attributes(fixed_layer).items() if key != "metadata"}
        self._stop = threading.Event()  # set by Cancel; the engine polls it inside SimpleITK's iterations
        # The total is the engine's (it depends on the model card's defaults), known from its first step; until then
        # the bar shows 0 of 1, not a busy indicator, whose animation repaints the window continuously.
        self.jobs.start(
            RegisterSession.job,
            (inputs, request, self._stop.is_set, TITLE),
            TITLE,
            lambda run: self._returned(run, fixed_layer, transforms),
        )

    def _say(self, text: str) -> None:
        self.jobs.say(text)

    def _on_side_by_side(self, on: bool) -> None:
        """The fixed image on the left and the warped moving one on the right (both in colour when the twin was
        warped and "Warp colorized twin too" is ticked), or back to one pane."""
        kept, fixed = self.outputs.kept, self._fixed_layer
        if not on or kept is None or fixed is None or not any(layer is fixed for layer in self._viewer.layers):
            self.panes.leave()
            return
        inputs = kept.run.inputs
        left, right = fixed, self._named(f"{inputs.moving_name} warped", rgb=False)
        fixed_color = self._grey_and_color(fixed)[1]
        warped_color = self._named(f"{inputs.moving_color_name} warped", rgb=True) if inputs.moving_color_name else None
        if self.warp_color.value and fixed_color is not None and warped_color is not None:
            left, right = fixed_color, warped_color
        if right is None:
            self._say(f"{TITLE}: the warped layer was removed; run again to compare side by side")
            self.side_by_side.value = False
            return
        self.panes.show(left, right)
        self._say(f"Side by side: {left.name} (left), {right.name} (right)")

    def _returned(self, run, fixed_layer: Image, transforms: dict[str, np.ndarray]) -> None:
        """The job's end in the main thread: a `RegisterRun` shown, a `Failed` said, None (cancelled) dropped."""
        if self._closed or run is None:  # closed, or cancelled inside SimpleITK (`RegisterSession.steps`)
            return
        if isinstance(run, Failed):
            show_error(run.message)
            return
        if not any(layer is fixed_layer for layer in self._viewer.layers):  # deleted during the run: no orphans
            self._say(f"{TITLE}: the fixed layer was removed; result dropped")
            return
        warnings = run.result.metrics.get("warnings", [])
        self.side_by_side.value = False
        self._fixed_layer = fixed_layer

        def shown() -> None:
            self.side_by_side.enabled = True
            if warnings:
                show_warning(f"{TITLE}: " + "; ".join(warnings))

        self.outputs.show(Kept(run, transforms, fixed_layer.ndim == 2), then=shown)
        # (the layers are added first: a doubtful result is shown, and said so once)
