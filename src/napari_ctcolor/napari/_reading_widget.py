"""Dock widget "Read & measure": what a reader reaches for on a PACS beside the image: the patient, series, slice
and window in the canvas's corner; linked axial, coronal and sagittal planes with a crosshair (`_linked`); and
measurements drawn with napari's shapes, a line's length and a region's HU statistics (`_measure`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, Label, PushButton
from napari.layers import Image

from ..app.reading import corner_text
from ..windowing import Window
from ._docks import attach_to_viewer, tab_with_siblings
from ._layers import META_KEY, READING_KEY
from ._linked import LinkedPlanes
from ._measure import TOOLS, Measurements
from ._view import plane_buttons

if TYPE_CHECKING:
    import napari

CORNER_FONT_PT = 9


class ReadingWidget(Container):
    """Dock widget "Read & measure".

    Args:
        napari_viewer: the viewer (napari passes it).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        self.ct = ComboBox(label="CT", choices=self._ct_layers, tooltip="the CT whose HU are measured and described")
        self.corner = CheckBox(text="Patient, series, slice and window in the corner", value=True)
        self.linked = CheckBox(
            text="Linked planes",
            value=False,
            tooltip="the two other planes beside the image, with a crosshair: click in any view to move it",
        )
        self.tools = {name: PushButton(text=name, tooltip=f"draw a {name.lower()} on the image") for name in TOOLS}
        self.clear_button = PushButton(text="Clear", tooltip="remove every measurement")
        self.measurements_text = Label(value="")
        self.measurements_text.native.setWordWrap(True)
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        tool_row = Container(
            widgets=[*self.tools.values(), self.clear_button], layout="horizontal", labels=False, label="Measure"
        )
        super().__init__(
            widgets=[
                self.ct,
                self.corner,
                self.linked,
                plane_buttons(napari_viewer),
                tool_row,
                self.measurements_text,
                self.status,
            ]
        )
        tab_with_siblings(self.native)
        self.measure = Measurements(napari_viewer, self._ct_layer, self._list_measurements)
        self.planes = LinkedPlanes(napari_viewer, self._say)
        for name, button in self.tools.items():
            button.changed.connect(lambda *_, n=name: self.measure.start(n))
        self.clear_button.changed.connect(lambda *_: self.measure.clear())
        self.linked.changed.connect(lambda on: self.planes.show() if on else self.planes.close())
        self.corner.changed.connect(lambda *_: self.update_corner())
        self.ct.changed.connect(self._on_ct_chosen)
        self._events = [
            napari_viewer.dims.events.point,
            napari_viewer.dims.events.order,
            napari_viewer.dims.events.ndisplay,
        ]
        for event in self._events:
            event.connect(self.update_corner)
        self._watched: Image | None = None  # the CT whose window the corner follows
        self._stop_following_layers = attach_to_viewer(
            self.native, napari_viewer, self._on_layers_changed, self._detach
        )
        self._on_layers_changed()

    # -- layers -------------------------------------------------------------------------------------------------------

    def _ct_layers(self, _widget=None) -> list[tuple[str, Image]]:
        """The grey CT layers the plugin opened or made, topmost first (the default is the one on top)."""
        return [
            (layer.name, layer)
            for layer in reversed(self._viewer.layers)
            if isinstance(layer, Image)
            and not layer.rgb
            and isinstance(layer.metadata, dict)
            and META_KEY in layer.metadata
            and READING_KEY not in layer.metadata
        ]

    def _ct_layer(self) -> Image | None:
        value = self.ct.value
        return value if isinstance(value, Image) and any(value is layer for layer in self._viewer.layers) else None

    def _on_layers_changed(self, _event: Any = None) -> None:
        self.ct.reset_choices()
        self._on_ct_chosen()

    def _on_ct_chosen(self, *_: Any) -> None:
        layer = self._ct_layer()
        if layer is not self._watched:
            if self._watched is not None:
                self._watched.events.contrast_limits.disconnect(self.update_corner)
            self._watched = layer
            if layer is not None:
                layer.events.contrast_limits.connect(self.update_corner)
        self.update_corner()
        self.measure.update()

    # -- the corner ---------------------------------------------------------------------------------------------------

    def update_corner(self, *_: Any) -> None:
        """The corner's text for the chosen CT, the slice shown and its window (hidden when unticked or no CT)."""
        overlay = self._viewer.canvas.overlays.text
        layer = self._ct_layer()
        if not self.corner.value or layer is None:
            overlay.visible = False
            return
        overlay.text = self.corner_text(layer)
        overlay.position = "top_left"
        overlay.font_size = CORNER_FONT_PT
        overlay.color = "white"
        overlay.visible = True

    def corner_text(self, layer: Image) -> str:
        """What the corner says of ``layer`` in the viewer's present view."""
        low, high = (float(v) for v in layer.contrast_limits)
        window = Window((low + high) / 2, high - low)
        meta = layer.metadata.get(META_KEY) or {}
        dims = self._viewer.dims
        if layer.ndim < 3 or dims.ndisplay != 2:
            return corner_text(meta, None, 0, 0, 0.0, window)
        world_axis = dims.order[-3]
        axis = world_axis - (dims.ndim - 3)
        index = np.asarray(layer.world_to_data(dims.point), dtype=float)[axis - 3]
        count = layer.data.shape[axis - 3]
        return corner_text(meta, axis, int(round(index)), count, float(dims.point[world_axis]), window)

    # -- status -------------------------------------------------------------------------------------------------------

    def _list_measurements(self, text: str) -> None:
        self.measurements_text.value = text

    def _say(self, text: str) -> None:
        self.status.value = text

    def _detach(self, *_: Any) -> None:
        """The dock is being deleted: panes closed, corner hidden, the viewer no longer followed."""
        self._stop_following_layers()
        for event in self._events:
            event.disconnect(self.update_corner)
        if self._watched is not None:
            self._watched.events.contrast_limits.disconnect(self.update_corner)
        self.planes.close()
        try:
            self._viewer.canvas.overlays.text.visible = False
        except Exception as exc:  # noqa: BLE001 - the viewer is closing: its canvas's Qt object is already gone
            if "deleted" not in str(exc) and "deleted" not in str(exc.__cause__):
                raise
