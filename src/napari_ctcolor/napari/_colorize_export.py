"""The colorize widget's Export: the colorized volume written as ``ctcolor colorize`` writes it (`app.export`:
NIfTI RGB, a DICOM series, de-identified unless asked, or PNG slices), and a DICOM export optionally stored into the
CT's study on its PACS."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, PushButton
from napari.layers import Image

from ..app.colorize_session import ColorizeSession
from ..app.export import FORMAT_NAMES
from ..app.session import Failed, failing_as_value
from ..errors import CTColorError, InputError
from ..io import ColorVolume
from ._layers import META_KEY

EXPORT_FORMATS = {name: fmt for fmt, name in FORMAT_NAMES.items()}  # the menu's names -> `--format` values


class ExportPanel:
    """The export part of `ColorizeWidget`: its controls (``controls``, enabled after a run) and the export.

    Args:
        session: the dock's runs (``session.current``: the run exported).
        result_layer: the current run's colour layer, or None when it left the viewer.
        busy: whether a run or a recompose is in progress (no export meanwhile).
        start: the dock's `JobRunner.start` (the export runs as one of its jobs).
        say, error: the dock's status line and its one-line errors.
    """

    def __init__(
        self,
        session: ColorizeSession,
        result_layer: Callable[[], Image | None],
        busy: Callable[[], bool],
        start: Callable[..., Any],
        say: Callable[[str], None],
        error: Callable[[str], None],
    ) -> None:
        self._session, self._result_layer, self._busy, self._start = session, result_layer, busy, start
        self._say, self._error = say, error
        self.export_format = ComboBox(label="Export as", choices=list(EXPORT_FORMATS), enabled=False)
        self.path = FileEdit(label="Export to", mode="w", enabled=False, tooltip="a .nii.gz file or a new folder")
        self.keep_identity = CheckBox(
            text="Keep patient identity (DICOM)",
            value=False,
            enabled=False,
            tooltip="off: de-identified (DICOM PS3.15 basic profile); on: the source series' patient and study, so "
            "the result can go back to the PACS",
        )
        self.send_to_pacs = CheckBox(
            text="Also send to the CT's PACS (DICOMweb)",
            value=False,
            enabled=False,
            tooltip="for a CT opened from a DICOMweb series: the DICOM export is also stored into that CT's study on "
            "its server, as a new series with the patient's identity",
        )
        self.button = PushButton(text="Export", enabled=False)
        self.button.changed.connect(lambda *_: self.export())
        self.controls = [self.export_format, self.path, self.keep_identity, self.send_to_pacs, self.button]
        self.written: list[str] = []  # the files the last export wrote

    def enable(self, meta: dict) -> None:
        """After a run: the export controls are offered; sending only for a CT read from a DICOMweb series."""
        for control in (self.export_format, self.path, self.keep_identity, self.button):
            control.enabled = True
        self.send_to_pacs.enabled = "dicomweb" in meta  # read from a DICOMweb series: its server is known
        self.send_to_pacs.value = self.send_to_pacs.value and self.send_to_pacs.enabled

    def export(self):
        """Write the colorized volume as the CLI does (`--format nifti|dicom|png`), to "Export to", in a worker (the
        viewer answers meanwhile; a 275-slice PNG export took 15 s); DICOM is de-identified unless "Keep patient
        identity" is ticked. Existing files are never replaced. With "Also send to the CT's PACS", a DICOM export is
        also stored into the CT's study on its DICOMweb server (as ``ctcolor colorize URL --format dicom --send``: the
        patient's identity kept there). Returns the worker, or None when the settings are refused (said in one line);
        the paths written are in ``written`` once it has finished."""
        from ..app.export import identity_of

        kept, layer = self._session.current, self._result_layer()
        path = self.path.value
        self.written = []
        try:
            if kept is None or layer is None:
                raise InputError("Export: colorize a CT first")
            if self._busy():
                raise InputError("Export: wait for the running job to finish")
            if not path or str(path) in ("", "."):
                raise InputError("Export: choose where to write (a .nii.gz file or a new folder)")
            fmt = EXPORT_FORMATS[self.export_format.value]
            send = bool(self.send_to_pacs.value)
            if send and fmt != "dicom":
                raise InputError("Export: sending to the PACS needs the DICOM series format")
            rgb = np.asarray(layer.data)
            color = ColorVolume.on_grid_of(
                kept.volume, rgb if rgb.ndim == 4 else rgb[np.newaxis], **layer.metadata[META_KEY]["colorize"]
            )
            path = str(path)
            if fmt == "nifti" and not path.lower().endswith((".nii", ".nii.gz")):
                path += ".nii.gz"
            try:
                identity = identity_of(kept.volume.meta, fmt == "dicom" and bool(self.keep_identity.value))
            except InputError as exc:
                raise InputError(f"Export: {exc}") from None
        except CTColorError as exc:
            self._refused(str(exc))
            return None
        steps = _export_steps(color, kept.volume.meta, path, fmt, identity, send)
        return self._start(failing_as_value, (steps,), "Export", lambda result: self._done(result, path), total=0)

    def _refused(self, message: str) -> None:
        self._error(message)
        self._say("Export: nothing written (see the message)")

    def _done(self, result, path: str) -> None:
        """The export's end, in the main thread: what was written (and sent), or why nothing was."""
        if isinstance(result, Failed):
            self._refused(result.message)
            return
        written, sent = result
        self.written = [str(p) for p in written]
        if isinstance(sent, str):  # the files are written all the same: say so
            self._error(f"Exported {len(written)} file(s) to {path}, but not sent: {sent}")
        elif sent is not None:
            self._say(f"Exported {len(written)} file(s) to {path} and sent {sent[1]} to {sent[0]}")
        else:
            self._say(f"Exported {len(written)} file(s) to {path}")


def _export_steps(color: ColorVolume, meta: dict, path: str, fmt: str, identity, send: bool):
    """The export as a job's steps: returns (files written, None | (server URL, count sent) | why not sent)."""
    from ..app.export import export_color, send_color

    yield (0, 0, "writing")
    written = export_color(color, meta, path, fmt, identity)
    if not send:
        return written, None
    yield (1, 2, "sending to the PACS")
    try:
        return written, send_color(color, meta, written, identity)
    except CTColorError as exc:
        return written, str(exc)
