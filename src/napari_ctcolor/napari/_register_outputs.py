"""The "Register & checkerboard" widget's output layers: the warped image (and its colorized twin), the difference,
the Jacobian, the checkerboard and its tile edges, each placed with the fixed layer's transforms and replaced in
place on a re-run; and the summary of the run's numbers. The tile slider and the toggles only redraw the
checkerboard from the session's run (`app.register_session`), in a worker. The difference shows lung and soft tissue
alike, whatever the fixed layer's window (`app.register_session.difference_of`), so a window change redraws nothing.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, FloatSlider, Label
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import Colormap
from qtpy.QtCore import QTimer

from ..app.register_session import RegisterRun, RegisterSession, finite_range, tile_edges
from ._layers import META_KEY, put_image

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
#: The summary says what share of the fixed body the moving scan does not reach (`overlap_fraction`) from this share
#: up: a moving scan a few slices shorter is above it.
UNCOVERED_SHOWN = 0.01
#: Thin yellow lines where the checkerboard's tiles meet: once aligned, fixed and warped tiles look alike.
EDGES_OPACITY = 0.35
EDGES_COLORMAP = Colormap(
    [[1.0, 0.85, 0.1, 0.0], [1.0, 0.85, 0.1, 1.0]], controls=[0.0, 1.0], name="ctcolor tile edges"
)
#: Milliseconds between two steps of showing a result (`RegisterOutputs._in_turns`): time for a repaint in between.
TURN_GAP_MS = 20


@dataclass
class Kept:
    """A finished run as the viewer places it.

    Attributes:
        run: the session's run.
        transforms: the fixed layer's scale/translate/rotate/affine at run time (every output layer gets them).
        two_d: the fixed layer is 2D; output layers then show the single slice.
    """

    run: RegisterRun
    transforms: dict[str, np.ndarray]
    two_d: bool


@dataclass
class Board:
    """One checkerboard to draw: of ``kept``'s run at ``tile_mm``, ``before`` registration or after, in ``colour`` or
    grey, with its outlines along ``axes``; ``then`` runs once it is shown."""

    kept: Kept
    tile_mm: float
    before: bool
    colour: bool
    axes: list[int]
    then: Callable[[], Any] | None = None


def _board_images(session: RegisterSession, wanted: Board) -> tuple:
    """(checkerboard, its `finite_range` (None in colour), tile edges) of ``wanted``, in a worker."""
    run = wanted.kept.run
    board = session.checkerboard(wanted.tile_mm, wanted.before, wanted.colour, run)
    span = None if wanted.colour else finite_range(board.array)
    return board, span, tile_edges(run.inputs.fixed, wanted.tile_mm, wanted.axes)


class RegisterOutputs:
    """The output layers of `RegisterWidget`, and their controls: the tile slider, "Checkerboard before registration"
    and the summary line. The run shown (`kept`) is the session's, which the slider and the toggles only redraw
    (`RegisterSession.checkerboard`).

    Args:
        viewer: the viewer the layers go into.
        session: the widget's `RegisterSession`.
        layers: the viewer's image layers (`RegisterWidget._layers`).
        warp_color: the widget's "Warp colorized twin too" box (a colour checkerboard when it is ticked).
        closed: True once the dock is closing (nothing more is added).
    """

    def __init__(
        self,
        viewer,
        session: RegisterSession,
        layers: Callable[[], list[Image]],
        warp_color: CheckBox,
        closed: Callable[[], bool],
    ):
        self._viewer, self.session, self._layers, self.warp_color = viewer, session, layers, warp_color
        self._closed = closed
        self.kept: Kept | None = None
        self.tile_mm = FloatSlider(label="Tile (mm)", min=2.0, max=100.0, step=1.0, value=20.0)
        self.before = CheckBox(
            text="Checkerboard before registration",
            value=False,
            tooltip="fixed against the moving image as it was (on the fixed grid): what the registration corrected",
        )
        self.summary = Label(value="")
        self.summary.native.setWordWrap(True)  # long text wraps instead of widening the dock over the canvas
        self.turns = 0  # steps of showing a result still to run (`_in_turns`)
        self._edges_hidden_for_3d = False  # the 3D view hid the tile edges the user had shown
        self._board_worker = self._board_pending = None  # the checkerboard being computed, the newest request waiting
        self._drawn_axes: list[int] | None = None  # the array axes of the tile outlines shown
        self.tile_mm.changed.connect(self.redraw_checkerboard)
        self.before.changed.connect(self.redraw_checkerboard)
        warp_color.changed.connect(self.redraw_checkerboard)

    def show(self, kept: Kept, then: Callable[[], Any] | None = None) -> None:
        """Keep ``kept`` and show it: warped, difference, Jacobian, checkerboard (on top), and the numbers; then
        ``then``.

        napari adds a layer in about 0.1 s of the main thread (its visual, its controls), so the layers are added one
        per turn of the event loop: the viewer repaints and answers the mouse in between (`_in_turns`)."""
        self.kept = kept
        self.session.keep(kept.run)

        def finish() -> None:  # after the checkerboard, computed in a worker, is shown
            self._summarise()
            if then is not None:
                then()

        run = kept.run
        inputs, result = run.inputs, run.result
        overlay = {"opacity": OVERLAY_OPACITY, "colorbar": True, "hide": True}
        warped = f"{inputs.moving_name} warped"
        spans = run.ranges
        steps = [
            lambda: self._put(warped, result.warped.array, "warped", limits=inputs.moving_limits, span=spans["warped"])
        ]
        if run.warped_color is not None:
            steps.append(
                lambda: self._put(f"{inputs.moving_color_name} warped", run.warped_color.rgb, "warped colour", rgb=True)
            )
        steps += [
            lambda: self._put(
                DIFFERENCE,
                run.difference,
                "difference",
                limits=run.difference_limits,
                span=spans["difference"],
                colormap=DIFFERENCE_COLORMAP,
                **overlay,
            ),
            lambda: self._put(
                JACOBIAN,
                result.jacobian.array,
                "jacobian",
                limits=JACOBIAN_LIMITS,
                span=spans["jacobian"],
                colormap=JACOBIAN_COLORMAP,
                **overlay,
            ),
            lambda: self.redraw_checkerboard(then=finish),
        ]
        self._in_turns(kept, steps)

    def _in_turns(self, kept: Kept, steps: list[Callable[[], Any]]) -> None:
        """Run ``steps`` one per turn of the Qt event loop, from the next one on (the worker's last signals are
        handled first), while ``kept`` is still the run shown.

        Each next step waits `TURN_GAP_MS`: a zero-delay timer runs before the canvas's repaint and the other timers
        are served, so two layer additions would otherwise block the viewer as one."""
        self.turns = len(steps)

        def turn() -> None:
            if self._closed() or self.kept is not kept or not steps:
                self.turns = 0
                return
            steps.pop(0)()
            self.turns = len(steps)
            if steps:
                QTimer.singleShot(TURN_GAP_MS, turn)

        QTimer.singleShot(0, turn)

    def _summarise(self) -> None:
        """Select the checkerboard and write the kept run's numbers."""
        # The checkerboard, on top, is what the user reads first (its HU in the status bar), not the hidden tile edges
        # that were appended last.
        self._viewer.layers.selection.active = next(lyr for lyr in self._layers() if lyr.name == CHECKERBOARD)
        m = self.kept.run.result.metrics
        spread = m.get("jacobian_body_p1_p99", (1.0, 1.0))
        near_one = m.get("jacobian_body_near_1_fraction", 1.0)
        prealigned = f" (affine {m['ncc_prealigned']:.3f})" if "ncc_prealigned" in m else ""
        warnings = "".join(f"<br>⚠ {html.escape(w)}" for w in m.get("warnings", []))
        if m.get("prealigned_matched"):
            refined = "the pre-alignment alone: after it the images differ only by noise"
        elif m.get("network_dropped"):
            refined = "the pre-alignment alone: the network found no deformation it left"
        else:
            refined = f"refine {m['refine_iterations']}"
        self.summary.value = (
            f"NCC {m['ncc_before']:.3f} -> {m['ncc_after']:.3f}{prealigned}"
            f" | folding {100 * m['folding_fraction']:.3f} %"
            f" | {m['seconds']:.1f} s ({m['device']}, pre-alignment {'on' if m['affine'] else 'off'}, {refined})"
            f"{warnings}"
            "<br>difference = fixed - warped (HU, both from -1000 to 400; +-400 HU opaque): red where the fixed image"
            " is brighter, blue where the warped is"
            "<br>Jacobian det J: 1 unchanged, &lt; 1 compressed (magenta), &gt; 1 expanded (green), &le; 0 folded"
            f"; in the body {spread[0]:.2f}-{spread[1]:.2f} (1st-99th percentile), {100 * near_one:.0f} % within"
            " 0.95-1.05. A rigid or affine motion alone is 1 everywhere: colour is the field's own local deformation,"
            " real or fitted to noise, contrast (vessel lumens), another slice thickness and the moved scan's"
            f" interpolation{self._coverage_line(m)}"
        )

    @staticmethod
    def _coverage_line(metrics: dict) -> str:
        """A line on the share of the fixed body the moving scan does not reach (`UNCOVERED_SHOWN` or more), where
        the warped image holds air and the difference is left clear; "" below it."""
        share = 1.0 - metrics.get("overlap_fraction", 1.0)
        if share < UNCOVERED_SHOWN:
            return ""
        return (
            f"<br>The moving image has no data on {100 * share:.0f} % of the fixed image's body (another field of"
            " view): the warped image is air there and the difference is left clear"
        )

    @property
    def busy(self) -> bool:
        """True while a result is being shown or the checkerboard is being redrawn."""
        return self.turns > 0 or self._board_worker is not None

    def redraw_checkerboard(self, *_: Any, then: Callable[[], Any] | None = None) -> None:
        """The checkerboard of the kept run at the panel's tile size, after or before registration, in grey or in
        colour, with its tile outlines in the plane on screen, computed in a worker (`RegisterSession.checkerboard`:
        a pass over the volume, and the moving image resampled onto the fixed grid the first time "before" asks for
        it, which had blocked the viewer for 1.4-3.1 s on a 512² chest CT), then put into their layers, and ``then``
        after. While one is computed only the newest request waits (a slider dragged through many values)."""
        kept = self.kept
        if kept is None or self._closed():
            return
        colour = bool(self.warp_color.value) and kept.run.warped_color is not None
        wanted = Board(kept, float(self.tile_mm.value), bool(self.before.value), colour, self._edge_axes(kept), then)
        if self._board_worker is None:
            self._draw(wanted)
            return
        if self._board_pending is not None:  # replaced: what was to follow it follows the newest
            wanted.then = wanted.then or self._board_pending.then
        self._board_pending = wanted

    def redraw_edges(self, *_: Any) -> None:
        """The view changed: the tile outlines are hidden in 3D and shown again on return to 2D (`_show_edges`), and
        follow the plane on screen (`redraw_checkerboard`, when its axes changed and the outlines are still in the
        viewer: a view changing as the viewer closes starts no work)."""
        kept, layer = self.kept, next((lyr for lyr in self._layers() if lyr.name == EDGES), None)
        if kept is None or layer is None or self._closed():
            return
        self._show_edges(layer)
        if self._edge_axes(kept) != self._drawn_axes:
            self.redraw_checkerboard()

    def _edge_axes(self, kept: Kept) -> list[int]:
        """The CT's array axes of the plane on screen (a 2D CT: its own two)."""
        dims = self._viewer.dims
        shown = [axis - (dims.ndim - 3) for axis in dims.order[-2:]] if dims.ndim >= 3 else [1, 2]
        return [1, 2] if kept.two_d else [a for a in shown if 0 <= a < 3]

    def _draw(self, wanted: Board) -> None:
        worker = create_worker(_board_images, self.session, wanted, _ignore_errors=True)
        worker.returned.connect(lambda images: self._put_board(wanted, *images))
        worker.finished.connect(self._board_done)
        self._board_worker = worker
        worker.start()

    def _put_board(self, wanted: Board, board, span: tuple[float, float] | None, edges: np.ndarray) -> None:
        """Show a computed checkerboard and its outlines, one layer per turn of the event loop (`_in_turns`), unless a
        newer request follows (which takes over what was to follow this one) or the run changed."""
        if self._closed() or self.kept is not wanted.kept:
            return
        if self._board_pending is not None:
            self._board_pending.then = self._board_pending.then or wanted.then
            return
        if wanted.colour:
            steps = [lambda: self._put(CHECKERBOARD, board.rgb, "checkerboard", rgb=True)]
        else:
            limits = wanted.kept.run.inputs.fixed_limits
            steps = [lambda: self._put(CHECKERBOARD, board.array, "checkerboard", limits=limits, span=span)]
        steps.append(lambda: self._put_edges(edges))
        self._drawn_axes = wanted.axes
        self._in_turns(wanted.kept, steps + ([wanted.then] if wanted.then is not None else []))

    def _board_done(self) -> None:
        self._board_worker = None
        pending, self._board_pending = self._board_pending, None
        if pending is not None and not self._closed():
            self._draw(pending)

    def _put_edges(self, edges: np.ndarray) -> None:
        """The tile outlines in the plane on screen: lines along the two displayed axes, none across the slice (a
        slice on a tile boundary would otherwise light up entirely).

        The layer is added hidden (outlines sit where the eye looks for steps between tiles); its visibility is the
        user's, except that a shown layer is hidden in 3D and shown again on return to 2D.
        """
        layer = self._put(
            EDGES,
            edges,
            "tile edges",
            limits=(0.0, 1.0),
            span=(0.0, 1.0),
            colormap=EDGES_COLORMAP,
            opacity=EDGES_OPACITY,
            hide=True,
        )
        self._show_edges(layer)

    def _show_edges(self, layer: Image) -> None:
        """A shown outline layer is hidden in 3D and shown again on return to 2D."""
        ndisplay = self._viewer.dims.ndisplay
        if ndisplay == 3 and layer.visible:
            layer.visible = False
            self._edges_hidden_for_3d = True
        elif ndisplay == 2 and self._edges_hidden_for_3d:
            layer.visible = True
            self._edges_hidden_for_3d = False

    def _put(
        self,
        name: str,
        data: np.ndarray,
        role: str,
        rgb: bool = False,
        limits: tuple[float, float] | None = None,
        span: tuple[float, float] | None = None,
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
            span: ``data``'s `finite_range`, found in a worker (None: none found).
            colormap: of a grey layer.
            hide: add the layer hidden (the checkerboard is what the user looks at first).
            opacity: draw the layer translucently over the CT with this opacity (an overlay whose colormap is clear
                where nothing changed); None: napari's default blending.
            colorbar: show the colormap's colour bar on a new layer.
        """
        kept = self.kept
        if kept.two_d:
            data = data[0]
        metadata = {META_KEY: {"register": role, "metrics": plain_metrics(kept.run.result.metrics)}}
        style: dict[str, Any] = {**kept.transforms}
        if not rgb:
            style.update(contrast_limits_range=value_range(span, limits), contrast_limits=limits, colormap=colormap)
        if opacity is not None:
            style.update(blending="translucent", opacity=opacity)
        # Linear in-plane sampling as the CT layers (no blocky voxels); the tile edges stay one-voxel lines.
        created = {"visible": not hide, "interpolation2d": "nearest" if role == "tile edges" else "linear"}
        layer, new = put_image(self._viewer, name, data, rgb, style, metadata, created)
        if new:
            layer.colorbar.visible = colorbar
        return layer


def value_range(span: tuple[float, float] | None, limits: tuple[float, float]) -> tuple[float, float]:
    """A contrast-limits range covering both the data's ``span`` and the chosen limits (never clipping them)."""
    low, high = span or limits
    return min(low, limits[0]), max(high, limits[1])


def plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics without nested containers napari would have to copy on every metadata event."""
    return {key: value for key, value in metrics.items() if isinstance(value, str | int | float | bool)}
