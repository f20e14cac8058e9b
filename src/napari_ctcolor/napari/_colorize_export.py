"""The colorize widget's Export: the colorized volume written as ``ctcolor colorize`` writes it (`app.export`:
NIfTI RGB, a DICOM series, de-identified unless asked, or PNG slices), and a DICOM export optionally stored into the
CT's study on its PACS."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, PushButton

from ..app.export import FORMAT_NAMES
from ..errors import CTColorError, InputError
from ..io import ColorVolume
from ._layers import META_KEY

EXPORT_FORMATS = {name: fmt for fmt, name in FORMAT_NAMES.items()}  # the menu's names -> `--format` values


class ExportPanel:
    """The export part of `ColorizeWidget`: its controls (``controls``, enabled after a run) and the export.

    Args:
        owner: the widget, whose session (``session.current``: the finished run), result layer and status line
            (``_say``, ``_error``) the export reads and writes.
    """

    def __init__(self, owner) -> None:
        self._owner = owner
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

    def enable(self, meta: dict) -> None:
        """After a run: the export controls are offered; sending only for a CT read from a DICOMweb series."""
        for control in (self.export_format, self.path, self.keep_identity, self.button):
            control.enabled = True
        self.send_to_pacs.enabled = "dicomweb" in meta  # read from a DICOMweb series: its server is known
        self.send_to_pacs.value = self.send_to_pacs.value and self.send_to_pacs.enabled

    def export(self) -> list[str]:
        """Write the colorized volume as the CLI does (`--format nifti|dicom|png`), to "Export to"; DICOM is
        de-identified unless "Keep patient identity" is ticked. Existing files are never replaced. With "Also send to
        the CT's PACS", a DICOM export is also stored into the CT's study on its DICOMweb server (as ``ctcolor
        colorize URL --format dicom --send``: the patient's identity kept there). Returns the paths written."""
        from ..app.export import export_color, identity_of, send_color

        owner = self._owner
        kept, layer = owner.session.current, owner.result_layer
        path = self.path.value
        try:
            if kept is None or layer is None:
                raise InputError("Export: colorize a CT first")
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
            meta = kept.volume.meta
            try:
                identity = identity_of(meta, fmt == "dicom" and bool(self.keep_identity.value))
            except InputError as exc:
                raise InputError(f"Export: {exc}") from None
            written = export_color(color, meta, path, fmt, identity)
            if send:  # synchronous like the file export: a series of a few hundred slices, over the network
                try:
                    url, count = send_color(color, meta, written, identity)
                except CTColorError as exc:  # the files are written all the same: say so, and return them
                    owner._error(f"Exported {len(written)} file(s) to {path}, but not sent: {exc}")
                    return [str(p) for p in written]
                owner._say(f"Exported {len(written)} file(s) to {path} and sent {count} to {url}")
                return [str(p) for p in written]
        except CTColorError as exc:
            owner._error(str(exc))
            owner._say("Export: nothing written (see the message)")
            return []
        owner._say(f"Exported {len(written)} file(s) to {path}")
        return [str(p) for p in written]
