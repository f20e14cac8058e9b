"""A thick-slab maximum intensity projection of the CT on screen, as a PACS offers it for a CTA: vessels that wind in
and out of a thin slice are seen whole over the slab.

The slab runs along the axis the slider moves through (axial, coronal or sagittal), centred on each slice: a voxel
shows the maximum of the CT over the slices whose centres lie within half the slab's thickness of its own (1 + 2
floor(slab / 2 / spacing) slices), computed for the whole volume at once in a worker (``ndimage.maximum_filter1d``),
so moving through the slices costs nothing, and shown as a grey layer "<CT> slab MIP" over the CT in the CT's window
(it follows the CT's window). Written here rather than napari's own ``Image.projection_mode``: napari 0.9.2 fails to
slice a projection along an axis whose world direction is flipped (a DICOM series' z, a NIfTI's y).

The colour layer is hidden meanwhile: the per-channel maximum of colours is not the colour of the projected voxel,
so it would break the rule that luminance is the windowed CT; it is shown again when the slab goes back to 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import FloatSlider
from napari.layers import Image
from napari.qt.threading import create_worker
from scipy import ndimage
from superqt.utils import qdebounced

from ._layers import layer_attributes

if TYPE_CHECKING:
    import napari

#: The slab control's range (mm): 0 is off; clinical CTA MIPs are 5-20 mm thick, up to 40 for an overview.
SLAB_MAX_MM = 50.0
MIP_SUFFIX = " slab MIP"


def slab_slices(mm: float, spacing: float) -> int:
    """The slices a slab of ``mm`` spans at ``spacing`` mm: the centre and those within half the slab either side."""
    return 1 + 2 * int(np.floor(mm / 2 / spacing + 1e-9))


def axis_spacing(layer: Image, axis: int) -> float:
    """The world distance (mm) between neighbouring voxels of ``layer`` along its data ``axis``."""
    step = np.zeros(layer.ndim)
    step[axis] = 1.0
    return float(np.linalg.norm(np.asarray(layer.data_to_world(step)) - np.asarray(layer.data_to_world(0 * step))))


def slab_value(viewer: napari.Viewer, ct: Image, index: tuple[int, ...]) -> str:
    """ "slab MIP <HU> over <mm> mm" at the data ``index`` of ``ct`` while its slab layer is shown, else ''."""
    slab = next((lyr for lyr in viewer.layers if lyr.name == f"{ct.name}{MIP_SUFFIX}"), None)
    if slab is None or not slab.visible or slab.data.shape != ct.data.shape:
        return ""
    return f"slab MIP {float(slab.data[index]):.0f} over {slab.metadata.get('slab_mip_mm', 0):g} mm"


class SlabControl:
    """The "Slab MIP (mm)" slider for the CT that ``layers()`` returns with its colour layer (either may be None)."""

    def __init__(self, viewer: napari.Viewer, layers: Callable[[], tuple[Image | None, Image | None]]) -> None:
        self._viewer, self._layers = viewer, layers
        self._hidden: Image | None = None  # the colour layer this control hid
        self._linked: Image | None = None  # the CT whose window the slab layer follows
        self._request = self._shown = 0  # the newest slab asked for (a worker's older result is dropped), and shown
        self.slider = FloatSlider(
            label="Slab MIP (mm)",
            min=0.0,
            max=SLAB_MAX_MM,
            step=1.0,
            value=0.0,
            tooltip="maximum intensity projection over a slab this thick around each slice, along the axis the "
            "slider moves through (0: off); the colour layer is hidden meanwhile",
        )
        self._changed = qdebounced(self.apply, timeout=150)  # a slider drag computes once it pauses
        self.slider.changed.connect(self._changed)
        viewer.dims.events.order.connect(self._on_plane)

    @property
    def busy(self) -> bool:
        """A slab is being computed."""
        return self._request != self._shown

    def close(self) -> None:
        """Stop following the viewer's plane and the CT's window (the widget is closing)."""
        self._viewer.dims.events.order.disconnect(self._on_plane)
        self._link(None)

    def _on_plane(self, *_: object) -> None:
        if float(self.slider.value) > 0:
            self.apply()

    def apply(self, *_: object) -> None:
        """Compute the slab of the current plane in a worker and show it (at 0: remove it, show the colour again)."""
        ct, color = self._layers()
        mm = float(self.slider.value)
        self._request += 1
        if mm == 0 or ct is None or ct.ndim != 3 or self._viewer.dims.ndisplay != 2:
            self._shown = self._request
            self._remove()
            return
        axis = self._viewer.dims.not_displayed[-1] - (self._viewer.dims.ndim - 3)
        size = slab_slices(mm, axis_spacing(ct, axis))
        request = self._request
        worker = create_worker(ndimage.maximum_filter1d, np.asarray(ct.data), size, axis=axis, mode="nearest")
        worker.returned.connect(lambda mip: self._show(request, ct, color, mip, mm))
        worker.start()

    def _show(self, request: int, ct: Image, color: Image | None, mip: np.ndarray, mm: float) -> None:
        if request != self._request or not any(layer is ct for layer in self._viewer.layers):
            return  # another slab or plane since, or the CT is gone
        self._shown = request
        name = f"{ct.name}{MIP_SUFFIX}"
        existing = next((layer for layer in self._viewer.layers if layer.name == name), None)
        if existing is not None:
            existing.data = mip
        else:
            placement = {k: v for k, v in layer_attributes(ct).items() if k != "metadata"}
            self._viewer.add_image(
                mip, name=name, contrast_limits=ct.contrast_limits, interpolation2d=ct.interpolation2d, **placement
            )
        self._viewer.layers[name].metadata["slab_mip_mm"] = mm
        self._link(ct)
        if color is not None and color.visible:
            color.visible, self._hidden = False, color

    def _follow(self, event) -> None:
        slab = next((lyr for lyr in self._viewer.layers if lyr.name == f"{event.source.name}{MIP_SUFFIX}"), None)
        if slab is not None:
            slab.contrast_limits = event.source.contrast_limits

    def _link(self, ct: Image | None) -> None:
        if self._linked is not None:
            self._linked.events.contrast_limits.disconnect(self._follow)
        self._linked = ct
        if ct is not None:
            ct.events.contrast_limits.connect(self._follow)

    def _remove(self) -> None:
        for layer in [lyr for lyr in self._viewer.layers if lyr.name.endswith(MIP_SUFFIX)]:
            self._viewer.layers.remove(layer)
        self._link(None)
        if self._hidden is not None and any(layer is self._hidden for layer in self._viewer.layers):
            self._hidden.visible = True
        self._hidden = None
