"""Dock widget "Open from PACS": search a DICOMweb server (QIDO-RS) and open a series as a layer (WADO-RS).

The search and the retrieval run in napari ``thread_worker``s, so a slow or unreachable server never freezes the
viewer; errors reach the user as the same one-line messages the CLI prints. The opened layer is exactly what
`viewer.open(URL, plugin="napari-ctcolor")` gives (the plugin's reader accepts series URLs), and it remembers its
server, so the "Colorize volume" widget can send its DICOM export back into the same study.

Credentials are never typed here: they come from ``CTCOLOR_DICOMWEB_USER`` / ``CTCOLOR_DICOMWEB_PASSWORD`` or the
netrc entry of the server's host, as for the CLI (`io.dicomweb`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from magicgui.widgets import ComboBox, Container, Label, LineEdit, ProgressBar, PushButton
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error

from ..app.session import Failed
from ..errors import CTColorError
from ..io.dicomweb import find_series
from ._docks import tab_with_siblings
from ._reader import read_ct

if TYPE_CHECKING:
    import napari

#: The server field starts from this environment variable when set (e.g. the department's DICOMweb root).
ENV_SERVER = "CTCOLOR_DICOMWEB_SERVER"
NO_RESULTS = "(search first)"


def series_label(row: dict) -> str:
    """One line per series for the results list: description, slices, modality, date, patient (what tells series
    apart comes first: the list is narrow)."""
    date = str(row.get("StudyDate") or "")
    date = f"{date[:4]}-{date[4:6]}-{date[6:]}" if len(date) == 8 else date or "no date"
    slices = row.get("NumberOfSeriesRelatedInstances")
    parts = [
        str(row.get("SeriesDescription") or "(no description)"),
        f"{slices} slices" if slices is not None else "? slices",
        str(row.get("Modality") or "?"),
        date,
        str(row.get("PatientID") or "?"),
    ]
    return "  |  ".join(parts)


class PacsWidget(Container):
    """Dock widget "Open from PACS": server, patient ID / accession / study date search, pick a series, open it."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        self._rows: list[dict] = []
        self.server = LineEdit(
            label="Server",
            value=os.environ.get(ENV_SERVER, ""),
            tooltip="DICOMweb root, e.g. http://pacs:8042/dicom-web (credentials: CTCOLOR_DICOMWEB_USER and "
            "CTCOLOR_DICOMWEB_PASSWORD, or netrc)",
        )
        self.patient_id = LineEdit(label="Patient ID", tooltip="exact, or with * and ? wildcards")
        self.accession = LineEdit(label="Accession")
        self.study_date = LineEdit(label="Study date", tooltip="YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
        self.modality = ComboBox(label="Modality", choices=["CT", "any"], value="CT")
        self.search_button = PushButton(text="Search")
        # Choices from a callable: napari calls reset_choices() whenever layers change, which would put a static
        # list back to its first value.
        self._series_labels: list[str] = []
        self.results = ComboBox(label="Series", choices=lambda _: self._series_labels or [NO_RESULTS], enabled=False)
        self.open_button = PushButton(text="Open", enabled=False)
        self.progress_bar = ProgressBar(value=0, min=0, max=0, visible=False)  # busy indicator: no known total
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        super().__init__(
            widgets=[
                self.server,
                self.patient_id,
                self.accession,
                self.study_date,
                self.modality,
                self.search_button,
                self.results,
                self.open_button,
                self.progress_bar,
                self.status,
            ]
        )
        tab_with_siblings(self.native)
        self.search_button.changed.connect(lambda *_: self.search())
        self.open_button.changed.connect(lambda *_: self.open_selected())
        self._worker = None

    @property
    def busy(self) -> bool:
        return self._worker is not None

    @property
    def selected_url(self) -> str | None:
        index = self.results.choices.index(self.results.value) if self.results.value in self.results.choices else -1
        return self._rows[index]["url"] if 0 <= index < len(self._rows) else None

    def search(self):
        """Search the server (QIDO-RS) in a worker; the results list shows one line per series."""
        filters = {
            "patient_id": self.patient_id.value.strip() or None,
            "accession": self.accession.value.strip() or None,
            "study_date": self.study_date.value.strip() or None,
            "modality": None if self.modality.value == "any" else self.modality.value,
        }
        return self._start(find_series, (self.server.value.strip(),), filters, self._show_results, "Searching")

    def open_selected(self):
        """Retrieve the chosen series (WADO-RS, as stored) in a worker and add it as a layer."""
        url = self.selected_url
        if url is None:
            show_error("Open from PACS: search and pick a series first")
            return None
        return self._start(read_ct, (url,), {}, self._add_layers, "Retrieving the series")

    def _start(self, function, args, kwargs, on_done, doing: str):
        if self.busy:
            return None

        def job():
            try:
                return function(*args, **kwargs)
            except CTColorError as exc:  # the user's to fix (server, login, series): shown, not a crash
                return Failed(str(exc))

        worker = create_worker(job)
        worker.returned.connect(
            lambda result: self._failed(result.message) if isinstance(result, Failed) else on_done(result)
        )
        worker.finished.connect(self._finished)
        self._worker = worker
        for button in (self.search_button, self.open_button):
            button.enabled = False
        self.progress_bar.visible = True
        self.status.value = f"{doing}..."
        worker.start()
        return worker

    def _show_results(self, rows: list[dict]) -> None:
        self._rows = rows
        labels = [series_label(row) for row in rows]
        # Equal labels (two series alike) still need distinct choices: number them.
        self._series_labels = [f"{k + 1}. {label}" for k, label in enumerate(labels)]
        self.results.reset_choices()
        self.results.value = self.results.choices[0]
        self.results.tooltip = "\n".join(self._series_labels)
        self.results.enabled = bool(rows)
        self.status.value = f"{len(rows)} series found" if rows else "No series matches"

    def _add_layers(self, layer_data: list) -> None:
        from napari.layers import Layer

        added = [self._viewer.add_layer(Layer.create(*datum)) for datum in layer_data]
        self._viewer.fit_to_view(layers=added)
        self.status.value = f"Opened {added[0].name}" if added else "Nothing to open"

    def _failed(self, message: str) -> None:
        self.status.value = message
        show_error(message)

    def _finished(self) -> None:
        self._worker = None
        self.progress_bar.visible = False
        self.search_button.enabled = True
        self.open_button.enabled = bool(self._rows)
