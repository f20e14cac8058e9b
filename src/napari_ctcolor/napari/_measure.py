"""Measurements drawn on the CT with napari's shapes: a line's length in mm, and a circle's or polygon's HU
statistics and area (`app.reading`), written beside each shape on the canvas and listed in the "Read & measure" dock.

The shapes live in one layer, "Measurements", placed as the CT is (its scale, translation and rotation), so that
napari draws a shape on the slice it was drawn on: napari keeps a shape's slice as a whole number of the layer's data
units and shows it only within half a unit of the slice point, so in world millimetres a shape drawn on a slice at
z = -766.5 mm vanished. Lengths and areas are taken in world millimetres (`Shapes.data_to_world`), whatever the CT's
voxel size; a region's voxels are the CT layer's own. Measurements follow every edit of a shape (drawn, moved,
resized, deleted).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Shapes

from ..app.reading import ellipse_outline, path_length_mm, region_stats
from ..errors import InputError
from ._layers import layer_attributes, shape_width

if TYPE_CHECKING:
    import napari

MEASURE_LAYER = "Measurements"
#: The dock's buttons and the shapes mode each starts.
TOOLS = {"Line": "add_line", "Circle": "add_ellipse", "Polygon": "add_polygon"}
#: A shape's outline width, as a share of the CT's largest world extent (about 1 mm across a 350 mm field of view).
EDGE_SHARE = 0.0025
EDGE_COLOR = "#4dd2ff"  # light blue: readable on grey and on the colour, apart from the yellow sagittal line


class Measurements:
    """The "Measurements" layer of ``viewer`` and what each of its shapes measures on ``ct()``'s voxels.

    Args:
        viewer: the viewer.
        ct: the grey CT layer the regions' HU come from (None: none open).
        show: receives the list of measurements, one per line, whenever a shape changes.
    """

    def __init__(self, viewer: napari.Viewer, ct: Callable[[], Image | None], show: Callable[[str], None]) -> None:
        self._viewer, self._ct, self._show = viewer, ct, show
        self.lines: list[str] = []  # what each shape measures, in the layer's order

    def layer(self, create: bool = True) -> Shapes | None:
        """The measurements' layer; made on first use (None when absent and ``create`` is False, or no CT)."""
        layer = next((lyr for lyr in self._viewer.layers if lyr.name == MEASURE_LAYER), None)
        if isinstance(layer, Shapes) or not create:
            return layer if isinstance(layer, Shapes) else None
        ct = self._ct()
        if ct is None:
            return None
        layer = Shapes(
            ndim=ct.ndim,
            **{key: value for key, value in layer_attributes(ct).items() if key != "metadata"},
            name=MEASURE_LAYER,
            edge_color=EDGE_COLOR,
            face_color="transparent",
            features={"label": np.array([], dtype=object)},
            feature_defaults={"label": ""},
            text={"string": "{label}", "color": EDGE_COLOR, "size": 10, "anchor": "upper_left"},
        )
        layer.current_edge_width = shape_width(ct, EDGE_SHARE)  # what each shape drawn next gets
        self._viewer.layers.append(layer)
        layer.events.data.connect(self._on_data)
        return layer

    def start(self, tool: str) -> None:
        """Draw with ``tool`` (a key of `TOOLS`): the measurements' layer active in that drawing mode."""
        layer = self.layer()
        if layer is None:
            self._show("Open a CT first: measurements are made on its voxels")
            return
        self._viewer.layers.selection.active = layer
        layer.mode = TOOLS[tool]

    def clear(self) -> None:
        """Remove every measurement."""
        layer = self.layer(create=False)
        if layer is not None and len(layer.data):
            layer.selected_data = set(range(len(layer.data)))
            layer.remove_selected()
        self.update()

    def _on_data(self, event) -> None:
        if getattr(event, "action", "changed") in ("added", "changed", "removed"):  # not while a shape is drawn
            self.update()

    def update(self) -> None:
        """Measure every shape again; label each on the canvas and list them in the dock."""
        layer = self.layer(create=False)
        shapes = list(zip(layer.shape_type, layer.data, strict=True)) if layer is not None else []
        self.lines = [self.measure(kind, self._world(layer, data)) for kind, data in shapes]
        if layer is not None:
            layer.features = {"label": np.array([line.split(",")[0] for line in self.lines], dtype=object)}
        listed = [f"{k + 1}. {line}" for k, line in enumerate(self.lines)]
        self._show("\n".join(listed) if listed else "No measurement: choose Line, Circle or Polygon and draw")

    @staticmethod
    def _world(layer: Shapes, data: np.ndarray) -> np.ndarray:
        return np.array([layer.data_to_world(point) for point in np.asarray(data, dtype=float)], dtype=float)

    def measure(self, kind: str, world: np.ndarray) -> str:
        """What one shape measures: a line's (or path's) length, a region's HU statistics and area."""
        if kind in ("line", "path"):
            return f"{path_length_mm(world):.1f} mm"
        ct = self._ct()
        if ct is None:
            return "no CT to measure on"
        outline = ellipse_outline(world) if kind == "ellipse" else world
        index = np.array([ct.world_to_data(point) for point in outline], dtype=float)
        hu = np.asarray(ct.data)
        if hu.ndim == 2:  # a single slice: measured as a one-slice volume
            hu, index = hu[np.newaxis], np.column_stack([np.zeros(len(index)), index])
            outline = np.column_stack([np.zeros(len(outline)), outline])
        try:
            return region_stats(hu, index, outline).text()
        except InputError as exc:
            return str(exc)
