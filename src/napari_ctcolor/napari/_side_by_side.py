"""Prior and current side by side after a registration: the fixed CT and the warped moving one in two panes of the
viewer's canvas that scroll, zoom and window together.

napari's grid mode is this: each visible layer in a viewbox of its own, all under the viewer's one camera and one
slice point, so scrolling, zooming and panning are shared by construction. The other layers are hidden meanwhile and
shown again when the reader leaves; the two images' windows are kept equal (a window set on either is set on both),
as a PACS's linked series are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from napari.layers import Image

from ._layers import set_contrast

if TYPE_CHECKING:
    import napari


class SideBySide:
    """Two layers of ``viewer`` side by side in its grid, their windows linked.

    Args:
        viewer: the viewer.
    """

    def __init__(self, viewer: napari.Viewer) -> None:
        self._viewer = viewer
        self.pair: tuple[Image, Image] | None = None  # (left, right) while shown
        self._hidden: list = []  # layers hidden meanwhile
        self._syncing = False

    @property
    def shown(self) -> bool:
        return self.pair is not None

    def show(self, left: Image, right: Image) -> None:
        """``left`` on the left and ``right`` on the right, alone; their windows linked when both are grey."""
        self.leave()
        viewer = self._viewer
        self._hidden = [layer for layer in viewer.layers if layer.visible and layer not in (left, right)]
        for layer in self._hidden:
            layer.visible = False
        left.visible = right.visible = True
        # napari 0.9 fills the grid's viewboxes from the bottom of the layer list: the left layer goes below the right.
        order = list(viewer.layers)
        if order.index(left) > order.index(right):
            viewer.layers.move(order.index(left), order.index(right))
        viewer.grid.stride = 1
        viewer.grid.shape = (1, 2)
        viewer.grid.enabled = True
        viewer.reset_view()  # each image fitted to its half
        self.pair = (left, right)
        if not left.rgb and not right.rgb:
            set_contrast(right, left.contrast_limits)
            left.events.contrast_limits.connect(self._from_left)
            right.events.contrast_limits.connect(self._from_right)

    def leave(self) -> None:
        """Back to one pane; the layers hidden meanwhile shown again."""
        if self.pair is None:
            return
        left, right = self.pair
        for layer, callback in ((left, self._from_left), (right, self._from_right)):
            layer.events.contrast_limits.disconnect(callback)
        self.pair = None
        self._viewer.grid.enabled = False
        self._viewer.reset_view()
        alive = list(self._viewer.layers)
        for layer in self._hidden:
            if any(layer is other for other in alive):
                layer.visible = True
        self._hidden = []

    def _from_left(self, *_) -> None:
        self._copy_window(0, 1)

    def _from_right(self, *_) -> None:
        self._copy_window(1, 0)

    def _copy_window(self, source: int, target: int) -> None:
        if self._syncing or self.pair is None:
            return
        self._syncing = True
        try:
            set_contrast(self.pair[target], self.pair[source].contrast_limits)
        finally:
            self._syncing = False
