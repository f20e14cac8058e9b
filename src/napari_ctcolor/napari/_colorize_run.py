"""The colorize widget's Run and recompose.

Run: the session's colorize job (`app.colorize_session.ColorizeSession.run_steps`: the network, then the composition)
in one worker with the widget's progress bar; Cancel stops it between batches. The session keeps the predicted
colour-class probabilities (`Chroma`), so a change of palette, chroma strength or window only recomposes: the plane on
screen at once in the main thread (`ColorizeSession.plane`), then the whole volume in a worker on one CPU thread
(`ColorizeSession.recompose_steps`), coalescing fast slider moves. The result is
the RGB layer "<CT name> colorized" at the CT's physical position, blended translucently over it; running again
replaces it. A CT without a header that says contrast was given moves to the contrast window after Run when the
blood the network names is enhanced and the CT still shows the window it opened in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox
from napari.layers import Image
from napari.qt.threading import create_worker

from ..app.colorize_job import ColorizeOutcome, ColorizeRequest
from ..app.colorize_session import ColorizeRun, ColorizeSession
from ..app.session import Failed
from ..errors import CTColorError
from ..io import ColorVolume, Volume
from ..windowing import Window
from ._colorize_window import WindowControl
from ._jobs import JobRunner
from ._layers import CONTRAST_WINDOW_KEY, META_KEY, layer_attributes, placement, put_image

#: A coronal or sagittal plane of a CT of more slices than this is recoloured in a worker, not the main thread
#: (`RunAndRecompose._recolor_visible_plane`): about 1 ms per slice on 2 cores.
MAIN_THREAD_PLANE_SLICES = 48
#: The colour layer's contrast limits: its RGB shown as composed.
COLOUR_LIMITS = (0.0, 255.0)


class RunAndRecompose:
    """Run and recompose for `ColorizeWidget`: the colorize job in a worker, the kept run's recompositions (the plane on
    screen first), and the result layer.

    Args:
        viewer: the viewer the colour layer goes into.
        session: the dock's runs (`ColorizeSession`: the runs, the jobs).
        jobs: the dock's `JobRunner` (progress bar, status line, Cancel).
        ct_layer: the dock's CT layer menu.
        windows: the dock's window part (each run's colour follows its CT's window).
        settings: the panel's settings as `ColorizeRequest.checked`'s keywords; ``settings(True)`` with the model,
            for a run.
        volume_of: a grey layer's voxels and geometry as a Volume.
        result_layer: the current run's colour layer, or None when it left the viewer.
        opacity: the colour layer's opacity when it is created.
        kept: called with (volume, colour) once a run is shown (the dock's legend, 3D view and export).
        legend: fills the legend for a colour's settings.
        in_viewer: whether a layer is still in the viewer.
        closed: True once the dock is closing.
        error, info: the dock's one-line errors and notifications.
    """

    def __init__(
        self,
        viewer,
        session: ColorizeSession,
        jobs: JobRunner,
        ct_layer: ComboBox,
        windows: WindowControl,
        settings: Callable[[bool], dict],
        volume_of: Callable[[Image], Volume],
        result_layer: Callable[[], Image | None],
        opacity: Callable[[], float],
        kept: Callable[[Volume, ColorVolume], Any],
        legend: Callable[[dict], Any],
        in_viewer: Callable[[Image], bool],
        closed: Callable[[], bool],
        error: Callable[[str], None],
        info: Callable[[str], None],
    ) -> None:
        self._viewer, self._session, self._jobs = viewer, session, jobs
        self._ct_layer, self._windows, self._settings, self._volume_of = ct_layer, windows, settings, volume_of
        self._result_layer, self._opacity, self._kept, self._legend = result_layer, opacity, kept, legend
        self._in_viewer, self._closed, self._error, self._info = in_viewer, closed, error, info
        self._recompose_pending = False
        self._plane_worker = self._plane_pending = None  # the plane on screen being recoloured, the newest waiting
        #: The plane (axis, index) the last recompose recolored at once, before the rest of the volume (None: none
        #: on screen).
        self.recolored_first: tuple[int, int] | None = None

    def cancel_pending(self) -> None:
        """Drop a recompose waiting for the running job (Cancel)."""
        self._recompose_pending = False

    @property
    def plane_busy(self) -> bool:
        """True while the plane on screen is recoloured in a worker."""
        return self._plane_worker is not None

    def _start(self, steps, args: tuple, total: int, desc: str, on_result, is_compose: bool = False) -> None:
        """Run a step generator function as the widget's job (`JobRunner`); Run may supersede a recompose, not another
        run. A recompose requested meanwhile starts when it ends."""
        worker = self._jobs.start(
            steps, args, desc, on_result, total=total, run_stays_enabled=is_compose, then=self._after_job
        )
        worker.is_compose = is_compose

    def _after_job(self) -> None:
        if self._recompose_pending:
            self._recompose_pending = False
            self.recompose()

    def _request(self, volume: Volume | None, find_contrast: bool | None = None) -> ColorizeRequest:
        """The panel's settings as the colorize job's request, checked (`ColorizeRequest.checked`): for a run (with
        ``find_contrast``) its model and batch size too; for a recompose (None) only what the composition reads, so
        that a model menu left on "weights file..." without a file does not stop a window change."""
        run = {} if find_contrast is None else {"find_contrast": find_contrast}
        return ColorizeRequest.checked(volume, **self._settings(find_contrast is not None), **run)

    def run(self, *_: Any) -> None:
        if self._jobs.busy:
            if not self._jobs.worker.is_compose:
                return  # one network run at a time
            self._jobs.worker.quit()  # a recompose of the previous result is moot now
            self._recompose_pending = False
        layer = self._ct_layer.value
        if layer is None:
            self._error("Colorize volume: open a CT first (a grey image layer)")
            return
        # A CT without a header that says contrast was given, still in the window it opened in: the job looks for
        # enhanced blood and, finding it, composes in the contrast window (`_adopt_contrast_window`).
        limits = tuple(float(v) for v in layer.contrast_limits)
        try:
            volume = self._volume_of(layer)
            request = self._request(volume, ColorizeSession.finds_contrast(volume, limits))
        except CTColorError as exc:
            self._error(str(exc))
            return
        self._start(
            ColorizeSession.run_steps,
            (volume, request),
            total=2 * volume.shape[0],
            desc="Colorize volume",
            on_result=lambda result: self._colorized(layer, volume, limits, result),
        )

    def recompose(self, *_: Any, plane: bool = True) -> None:
        """Recolour the plane on screen first (with ``plane``: `_recolor_visible_plane`), then recompose the whole
        volume from the kept chroma with the current window, strength and palette in a worker; requests coalesce while
        one runs."""
        session = self._session
        if session.current is None:
            return
        if self._result_layer() is None:  # the user deleted the result: nothing to update
            session.current = None
            return
        kept = session.current
        try:
            request = self._request(kept.volume)
        except CTColorError as exc:
            self._error(str(exc))
            return
        if not self._jobs.busy and ColorizeSession.composed_with(request, self.shown_settings()):
            return  # the colour shown was composed with these settings (the contrast window a run chose)
        if plane and self._recolor_visible_plane(kept, request):
            return  # the whole volume follows once the plane is on screen (`_plane_done`)
        if self._jobs.busy:
            self._recompose_pending = True
            if self._jobs.worker.is_compose:
                self._jobs.worker.quit()  # its result is stale; the pending recompose starts when it has stopped
            return
        self._start(
            ColorizeSession.recompose_steps,
            (kept, request),
            total=kept.volume.shape[0],
            desc="Recompose colours",
            on_result=lambda result: self._recomposed(kept, result),
            is_compose=True,
        )

    def visible_plane(self) -> tuple[int, int] | None:
        """(axis, index) of the kept CT's plane on screen in a 2D view of a 3D CT (axis 0 axial, 1 coronal, 2
        sagittal, in the CT's array order), else None."""
        kept, dims = self._session.current, self._viewer.dims
        if kept is None or kept.ct.ndim != 3 or dims.ndisplay != 2 or dims.ndim < 3:
            return None
        first = dims.ndim - 3  # the CT's axes are the viewer's last three
        sliced = {first, first + 1, first + 2} - set(dims.order[-2:])
        if len(sliced) != 1:
            return None
        axis = sliced.pop() - first
        index = round(float(np.asarray(kept.ct.world_to_data(dims.point), dtype=float)[axis]))
        return (axis, index) if 0 <= index < kept.volume.shape[axis] else None

    def _recolor_visible_plane(self, kept: ColorizeRun, request: ColorizeRequest) -> bool:
        """Recolour the plane on screen before the rest of the volume (`ColorizeSession.plane`). An axial plane, or
        another of a CT of at most `MAIN_THREAD_PLANE_SLICES` slices, is composed at once in the main thread (10-40
        ms for 512²); a coronal or sagittal plane of a taller CT costs about 1 ms per slice (107-142 ms for 141
        slices of 512², 2026-11-26, 2-core AMD EPYC), which blocked every step of a window drag, so it is composed in
        a worker of its own and the main thread only puts its RGB into the layer; while one is composed, only the
        newest request waits. True when the whole volume is to follow from that worker (`_plane_done`); False when no
        plane is on screen (a 3D view, a 2D layer) or it is already shown."""
        plane = self.visible_plane()
        if plane is None or self._result_layer() is None:
            return False
        wanted = (kept, plane, request)
        if plane[0] == 0 or kept.volume.shape[0] <= MAIN_THREAD_PLANE_SLICES:
            try:
                rgb = ColorizeSession.plane(kept, *plane, request)
            except CTColorError as exc:
                self._error(str(exc))
                return False
            self._put_plane(wanted, rgb)
            return False
        if self._plane_worker is not None:
            self._plane_pending = wanted
        else:
            self._compose_plane(wanted)
        return True

    def _compose_plane(self, wanted: tuple) -> None:
        """Compose ``wanted`` (kept, (axis, index), request) in a worker of its own."""
        kept, (axis, index), request = wanted
        worker = create_worker(ColorizeSession.plane, kept, axis, index, request, _ignore_errors=True)
        worker.returned.connect(lambda rgb: self._put_plane(wanted, rgb))
        worker.errored.connect(lambda exc: self._error(str(exc)) if isinstance(exc, CTColorError) else None)
        worker.finished.connect(self._plane_done)
        self._plane_worker = worker
        worker.start()

    def _put_plane(self, request: tuple, rgb: np.ndarray) -> None:
        """Show a composed plane, unless a newer request follows or the run changed."""
        kept, plane = request[:2]
        layer = self._result_layer()
        current = self._session.current
        if self._closed() or self._plane_pending is not None or kept is not current or layer is None:
            return
        where = [slice(None)] * 3
        where[plane[0]] = plane[1]
        layer.data[tuple(where)] = rgb
        layer.refresh()
        self.recolored_first = plane

    def _plane_done(self) -> None:
        """The plane worker ended: the newest waiting plane next, else the whole volume."""
        self._plane_worker = None
        pending, self._plane_pending = self._plane_pending, None
        if self._closed():
            return
        if pending is not None:
            self._compose_plane(pending)
        else:
            self.recompose(plane=False)

    def _colorized(
        self, ct: Image, volume: Volume, limits: tuple[float, float], result: ColorizeOutcome | Failed
    ) -> None:
        if self._closed():
            return
        if isinstance(result, Failed):
            self._error(result.message)
            return
        if not self._in_viewer(ct):  # the CT layer was deleted during the run: no orphan result layer
            self._jobs.say("Colorize volume: the CT layer was removed; result dropped")
            return
        color = result.color
        self._windows.unlink(ct)
        self._session.keep(volume, result, ct, self._show(ct, color))
        ct.events.contrast_limits.connect(self._windows.on_linked_window)
        # The CT stays the selected layer: napari's status bar then shows its HU, not the colour layer's RGB, and
        # its contrast slider is the window.
        self._viewer.layers.selection.active = ct
        self._kept(volume, color)
        found = ColorizeSession.contrast_to_adopt(result, limits, tuple(float(v) for v in ct.contrast_limits))
        if found is not None:
            self._adopt_contrast_window(ct, *found)
        # Settings changed while the network ran are applied now, from the kept chroma.
        self._recompose_pending = self._recompose_pending or not self._panel_composed(color)

    def _adopt_contrast_window(self, ct: Image, blood: float, win: Window) -> None:
        """A CT without a header that says contrast was given (NIfTI, NRRD, MHA) opens in its default window, where
        contrast-filled vessels are white and can carry no colour. Where the network found the blood it names
        enhanced and the CT still shows the window it opened in, the worker composed the colour in the contrast
        window (`contrast_window`: the blood light grey, fat, muscle and organs in greys that carry colour); the CT
        moves to it, the menu names it, and a notification says why."""
        ct.metadata = {**ct.metadata, CONTRAST_WINDOW_KEY: tuple(win)}
        if self._ct_layer.value is ct:
            self._windows.offer_new_choices()
        ct.contrast_limits = win.limits  # the widget follows; the colour was composed in it already
        self._info(
            f"{ct.name}: contrast-enhanced blood found (median {blood:.0f} HU); window {win.centre:g}/{win.width:g} "
            "so that it shows grey and takes colour, as for a contrast CT"
        )

    def _recomposed(self, kept: ColorizeRun, result: ColorVolume | Failed) -> None:
        if self._closed():
            return
        if isinstance(result, Failed):
            self._error(result.message)
            return
        if self._session.current is kept and self._result_layer() is not None:
            self._show(kept.ct, result)
            self._legend(result.settings)

    def shown_settings(self) -> dict | None:
        """The settings the result layer's colour was composed with (from its metadata), None when unknown."""
        layer = self._result_layer()
        return layer.metadata.get(META_KEY, {}).get("colorize") if layer is not None else None

    def _panel_composed(self, color: ColorVolume) -> bool:
        """True when ``color`` was composed with the panel's settings (False while one of them cannot be used)."""
        current = self._session.current
        try:
            request = self._request(current.volume if current is not None else None)
        except CTColorError:
            return False
        return ColorizeSession.composed_with(request, color.settings)

    def _show(self, ct: Image, color: ColorVolume) -> Image:
        """Put ``colour`` into the layer "<CT name> colorized", replacing its data when it exists, else adding it."""
        name = f"{ct.name} colorized"
        if ct.ndim == 2:  # a 2D CT layer: one slice, placed by the CT layer's own 2D transforms
            data = color.rgb[0]
            transforms = {k: np.asarray(v) for k, v in layer_attributes(ct).items() if k != "metadata"}
        else:  # identity for whichever of scale/translate or affine `placement` leaves out
            data = color.rgb
            transforms = {
                "scale": np.ones(3),
                "translate": np.zeros(3),
                "rotate": np.eye(3),
                "affine": np.eye(4),
                **placement(color),
            }
        metadata = {META_KEY: {"colorize": dict(color.settings)}}
        created = {
            "blending": "translucent",
            "opacity": self._opacity(),
            "interpolation2d": "linear",  # as the CT layer (`image_layer_data`): no blocky voxels, both alike
        }
        layer, new = put_image(self._viewer, name, data, True, transforms, metadata, created)
        if new:
            layer.events.contrast_limits.connect(lambda _event: self._keep_full_range(layer))
            layer.events.gamma.connect(lambda _event: self._keep_full_range(layer))
        return layer

    def _keep_full_range(self, layer: Image) -> None:
        """The colour layer's own contrast limits and gamma stay at 0..255 and 1: its luminance is the CT's window
        already, and stretching the RGB would distort both grey and colour. The window is the CT layer's."""
        if tuple(layer.contrast_limits) != COLOUR_LIMITS or layer.gamma != 1.0:
            with layer.events.contrast_limits.blocker(), layer.events.gamma.blocker():
                layer.contrast_limits, layer.gamma = COLOUR_LIMITS, 1.0
            layer.refresh()
            self._jobs.say(f"{layer.name}: its contrast stays fixed; set the window on the CT layer or in this widget")
