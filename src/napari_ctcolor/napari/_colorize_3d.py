"""The colorize widget's "3D view": a preset of `_volume.PRESETS_3D` (lit bone, CTA, soft tissue)
without table and air, its surfaces computed in a worker, seen from the patient's front; the 2D layers are hidden
meanwhile and shown again when the view is left.

Under a software OpenGL renderer (`_gl.software_rendering`: a virtual X server, a remote desktop without a GPU) a
lit surface costs 1-5 s per frame, so while the camera moves the 3D layers are drawn as maximum intensity
projections, a see-through skin hidden (0.3-0.6 s), and as their preset again once the camera has stood still for
`STILL_MS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox
from napari.layers import Image
from napari.qt.threading import create_worker
from qtpy.QtCore import QTimer

from ..app.colorize_job import Chroma
from ..app.colorize_session import ColorizeSession
from ..app.vessels import body_3d, cta_vessels
from ..io import Volume
from ._gl import software_rendering
from ._layers import layer_attributes
from ._view import anterior_3d, show_plane
from ._volume import PRESETS_3D, layer_data

if TYPE_CHECKING:
    from ._colorize_run import Kept

NO_3D = "off"
#: The 3D layer keeps at most this many voxels per in-plane axis (every n-th voxel): a translucent RGBA volume is
#: 4 bytes per voxel on the GPU, and a 3D overview needs no more.
MAX_3D_PIXELS = 256
#: Milliseconds the camera stands still before the 3D layers drawn as projections while it moved are lit again.
STILL_MS = 400


class View3D:
    """The 3D part of `ColorizeWidget`: its menu (``view_3d``, enabled after a run) and the 3D layers.

    Args:
        viewer: the viewer the 3D layers go into.
        session: the dock's runs (``session.current``: the run shown in 3D).
        result_layer: the current run's colour layer, or None when it left the viewer.
        say: the dock's status line.
        closed: True once the dock is closing.
    """

    def __init__(
        self,
        viewer,
        session: ColorizeSession,
        result_layer: Callable[[], Image | None],
        say: Callable[[str], None],
        closed: Callable[[], bool],
    ) -> None:
        self._viewer, self._session, self._result_layer, self._say, self._closed = (
            viewer, session, result_layer, say, closed,
        )  # fmt: skip
        self.view_3d = ComboBox(
            label="3D view",
            choices=[NO_3D, *PRESETS_3D],
            value=NO_3D,
            enabled=False,
            tooltip="3D rendering without table and air: bone: a lit bone surface; CTA: bone and contrast-filled "
            "vessels; soft tissue: the bone inside a see-through skin",
        )
        self._hidden_for_3d: list[Image] = []  # layers the 3D view hid, shown again when it is left
        self._body_cache: tuple | None = None  # (kept, HU, body mask, spacing) of the 3D view
        self._worker_3d = None  # the worker computing a 3D preset's surfaces
        self.view_3d.changed.connect(self._on_view_3d)
        self._moving: dict[str, str] = {}  # 3D layer name -> its preset's rendering, while drawn as a projection
        self._still = QTimer()
        self._still.setSingleShot(True)
        self._still.setInterval(STILL_MS)
        self._still.timeout.connect(self._settle)
        self._camera = viewer.camera.events
        self._following_camera = False

    def _on_view_3d(self, *_: Any) -> None:
        """Show (or leave) the 3D rendering of the colorized CT: its surfaces are computed in a worker (seconds on a
        chest CT), then added."""
        if self._worker_3d is not None:
            self._worker_3d.quit()  # a preset chosen before: its surfaces are moot
            self._worker_3d = None
        kept = self._session.current
        choice = self.view_3d.value
        if choice == NO_3D or kept is None or self._result_layer() is None or kept.ct.ndim != 3:
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
    def busy(self) -> bool:
        """True while a 3D preset's surfaces are being computed."""
        return self._worker_3d is not None

    @staticmethod
    def _steps_3d(volume: Volume, chroma: Chroma, parts, step: int, cached):
        """The 3D preset's data, in a worker: yields the parts done, returns ((HU, body, spacing), [(part, its
        float32 field)], a note for the status line).

        The CTA preset shows vessels only where the colorizer names contrast-enhanced blood (`no_vessels_reason`)."""
        if cached is None:
            cached = body_3d(volume, step)
        hu, body, spacing = cached
        yield 1
        vessels, note = None, ""
        if any(p.source in ("vessels", "CTA bone") for p in parts):
            vessels, reason = cta_vessels(volume, chroma, cached, step)
            if reason is not None:  # the bone surface whole: what HU took for vessels is bone
                parts = [p for p in parts if p.source != "vessels"]
                note = f"; {reason}"
        shown = []
        for part in parts:
            shown.append((part, layer_data(part, hu, body, spacing, vessels)))
            yield len(shown) + 1
        return cached, shown, note

    def _show_3d(self, kept: Kept, preset: str, step: int, result: tuple) -> None:
        """Add the layers "<CT name> 3D <part>" of a `PRESETS_3D` preset computed by `_steps_3d`, seen from the
        patient's front; the 2D layers are hidden meanwhile."""
        color = self._result_layer()
        current = self._session.current
        if self._closed() or kept is not current or color is None or self.view_3d.value != preset:
            return  # another run, CT or preset since
        cached, shown, note = result
        self._body_cache = (kept, *cached)
        placement = {k: np.asarray(v) for k, v in layer_attributes(color).items() if k != "metadata"}
        placement["scale"] = placement["scale"] * np.array([1.0, step, step])
        if not self._hidden_for_3d:
            self._hidden_for_3d = [lyr for lyr in self._viewer.layers if lyr.visible]
            for lyr in self._hidden_for_3d:
                lyr.visible = False
        names = {f"{kept.ct.name} 3D {part.name}" for part, _ in shown}
        for lyr in self._layers_3d():  # hidden, not removed (`_put_3d`)
            lyr.visible = lyr.name in names
        self._still.stop()
        self._moving = {}
        for part, field in shown:
            self._put_3d(f"{kept.ct.name} 3D {part.name}", part, field, placement)
        anterior_3d(self._viewer)
        light = software_rendering()
        self._follow_camera(light)
        self._say(f"3D view: {preset}{note}" + ("; software OpenGL: a projection while turning" if light else ""))

    def _follow_camera(self, on: bool, settle: bool = True) -> None:
        """Draw the 3D layers lighter while the camera moves (``on``), or stop doing so (and, with ``settle``, draw
        them as their preset again)."""
        if on != self._following_camera:
            for event in (self._camera.angles, self._camera.zoom, self._camera.center):
                (event.connect if on else event.disconnect)(self._on_camera)
            self._following_camera = on
        if not on and settle:
            self._settle()

    def _on_camera(self, *_: Any) -> None:
        """The camera moved: until it stands still, each opaque 3D layer is drawn as a projection and a see-through
        one (the skin) is hidden, so that a frame of a software renderer stays under a second."""
        if self._viewer.dims.ndisplay != 3:
            return
        if not self._moving:
            for lyr in self._layers_3d():
                if lyr.visible and lyr.opacity < 1.0:
                    self._moving[lyr.name] = "hidden"
                    lyr.visible = False
                elif lyr.visible and lyr.rendering != "mip":
                    self._moving[lyr.name] = lyr.rendering
                    lyr.rendering = "mip"
        self._still.start()

    def _settle(self) -> None:
        """The camera stood still: each layer drawn lighter meanwhile is drawn as its preset again."""
        self._still.stop()
        moving, self._moving = self._moving, {}
        for lyr in self._layers_3d():
            if moving.get(lyr.name) == "hidden":
                lyr.visible = True
            elif lyr.name in moving:
                lyr.rendering = moving[lyr.name]

    def _layers_3d(self) -> list[Image]:
        kept = self._session.current
        prefix = f"{kept.ct.name} 3D " if kept is not None else None
        return [lyr for lyr in self._viewer.layers if prefix is not None and lyr.name.startswith(prefix)]

    def _put_3d(self, name: str, part, field: np.ndarray, placement: dict) -> None:
        """Show ``field`` as the 3D layer ``name``: the layer of that name updated in place where it exists (its data,
        then the part's rendering), else a new one. Removing a 3D volume layer and adding another while the canvas
        stays in 3D crashed napari under Mesa's software OpenGL (a segmentation fault in glDrawElements at the next
        draw: the presets bone, CTA, soft tissue, CTA, then bone; napari 0.9.2, vispy, 2026-11-28), so a switch of
        preset reuses and hides layers, and they are removed only back in 2D (`_leave_3d`)."""
        settings = {
            "rendering": part.rendering,
            "colormap": part.colormap,
            "contrast_limits": part.limits,
            "opacity": part.opacity,
            **({"iso_threshold": part.iso_threshold} if part.iso_threshold is not None else {}),
        }
        layer = next((lyr for lyr in self._layers_3d() if lyr.name == name), None)
        if layer is not None and layer.data.shape == field.shape:
            layer.data = field
            for key, value in settings.items():
                setattr(layer, key, value)
            layer.visible = True
            return
        if layer is not None:
            self._viewer.layers.remove(layer)
        layer = Image(field, name=name, blending="translucent", **settings, **placement)
        layer.interpolation3d = "linear"  # trilinear sampling: no blocky voxels
        self._viewer.layers.append(layer)

    def close(self) -> None:
        """Stop computing a preset and following the camera (the dock is closing)."""
        if self._worker_3d is not None:
            self._worker_3d.quit()
        self._follow_camera(False, settle=False)  # the layers go with the viewer, or stay as they are drawn

    def _leave_3d(self) -> None:
        """Back to the 2D layers: the 3D ones hidden, the canvas in 2D, then the 3D layers removed (`_put_3d`)."""
        self._follow_camera(False)
        for lyr in self._layers_3d():
            lyr.visible = False
        for lyr in self._hidden_for_3d:
            if any(other is lyr for other in self._viewer.layers):
                lyr.visible = True
        if self._hidden_for_3d:
            show_plane(self._viewer, "axial")
        self._hidden_for_3d = []
        for lyr in self._layers_3d():
            self._viewer.layers.remove(lyr)
