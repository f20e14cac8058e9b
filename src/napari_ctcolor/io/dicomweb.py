"""DICOMweb: find series (QIDO-RS), read a series by its URL (WADO-RS), store a colorized series (STOW-RS).

A series URL is the DICOMweb root followed by ``/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``, e.g.
``http://127.0.0.1:8042/dicom-web/studies/1.2.3/series/1.2.3.4``; `io.read_volume` accepts one wherever it accepts a
path. The instances are retrieved in the transfer syntax the server stores (``transfer-syntax=*``, so a JPEG 2000
series comes through a server that cannot transcode), written into a temporary folder and read by the same code as a
DICOM folder on disk (`read_dicom_folder`): same voxels, same geometry.

Credentials (HTTP basic authentication) come from the environment, ``CTCOLOR_DICOMWEB_USER`` and
``CTCOLOR_DICOMWEB_PASSWORD``, or else from a netrc file (``$NETRC`` or ``~/.netrc``, the entry of the server's host).
They are never printed, logged or written into any output. ``CTCOLOR_DICOMWEB_TIMEOUT`` sets the seconds to wait for
the server (default 60). Every failure (wrong password, unreachable server, timeout, unknown series) is an
`InputError` with one line that names the server or the series.

Example (an Orthanc with its DICOMweb plugin)::

    rows = find_series("http://127.0.0.1:8042/dicom-web", patient_id="12345", modality="CT")
    ct = read_volume(rows[0]["url"])
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import netrc
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import InputError

if TYPE_CHECKING:  # imported lazily: `ctcolor info file.nii` needs neither requests nor dicomweb-client
    from dicomweb_client import DICOMwebClient
    from pydicom.dataset import Dataset

    from .volume import ColorVolume, Volume

__all__ = [
    "ENV_PASSWORD",
    "ENV_TIMEOUT",
    "ENV_USER",
    "SeriesURL",
    "connect",
    "download_series",
    "find_series",
    "is_series_url",
    "parse_series_url",
    "read_series",
    "read_series_image",
    "send_series",
    "series_header",
    "store_series",
]

log = logging.getLogger(__name__)

ENV_USER = "CTCOLOR_DICOMWEB_USER"
ENV_PASSWORD = "CTCOLOR_DICOMWEB_PASSWORD"
ENV_TIMEOUT = "CTCOLOR_DICOMWEB_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0
#: WADO-RS media type asking for the instances as stored: no transcoding on the server.
AS_STORED = (("application/dicom", "*"),)
#: Instances per STOW-RS request (a 512 x 512 RGB slice is 0.8 MB).
STORE_BATCH = 32

_UID = r"[0-9]+(?:\.[0-9]+)*"
_SERIES_PATH = re.compile(rf"^(?P<root>.*?)/studies/(?P<study>{_UID})/series/(?P<series>{_UID})/?$")
_DATE = re.compile(r"^(\d{8})?(-)?(\d{8})?$")
_QIDO_FIELDS = (
    "PatientID",
    "StudyDate",
    "AccessionNumber",
    "StudyDescription",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "NumberOfSeriesRelatedInstances",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)


@dataclass(frozen=True)
class SeriesURL:
    """A DICOMweb series address: the service root and the two UIDs."""

    root: str
    study_uid: str
    series_uid: str

    def __str__(self) -> str:
        return f"{self.root}/studies/{self.study_uid}/series/{self.series_uid}"


def is_series_url(path: object) -> bool:
    """Whether ``path`` is an http(s) address (to be read over DICOMweb) rather than a file or folder."""
    return isinstance(path, str) and path[:8].lower().startswith(("http://", "https://"))


def _check_root(root: str) -> str:
    """``root`` without a trailing slash; refuse credentials written into the URL (they would reach messages)."""
    try:
        parts = urlsplit(root.strip())
        parts.port  # noqa: B018 - reading it raises ValueError for a malformed port
    except ValueError:
        raise InputError(f"{_display(root)}: not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InputError(f"{_display(root)}: not an http(s) DICOMweb address")
    if parts.username or parts.password:
        raise InputError(
            f"{_display(root)}: do not put credentials into the URL; set {ENV_USER} and {ENV_PASSWORD} or use netrc"
        )
    if parts.query or parts.fragment:
        raise InputError(f"{_display(root)}: a DICOMweb address has no query (?...) or fragment (#...)")
    return urlunsplit((parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", ""))


def _display(url: str) -> str:
    """``url`` fit for a message: no user information, printable characters only."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        url = "<malformed URL>"
    return "".join(c for c in url if c.isprintable())[:300]


def parse_series_url(url: str) -> SeriesURL:
    """Split ``URL/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>`` into root and UIDs.

    Raises:
        InputError: when ``url`` is not such an address.
    """
    match = _SERIES_PATH.match(url.strip())
    if match is None:
        raise InputError(
            f"{_display(url)}: not a DICOMweb series URL (expected ROOT/studies/<StudyInstanceUID>/series/"
            "<SeriesInstanceUID>; 'ctcolor pacs find' lists them)"
        )
    return SeriesURL(_check_root(match["root"]), match["study"], match["series"])


def _credentials(host: str) -> tuple[str, str] | None:
    """(user, password) from the environment, else from the netrc entry of ``host``; None when neither has any."""
    user, password = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    if user is not None or password is not None:
        if not user or password is None:
            raise InputError(f"set both {ENV_USER} and {ENV_PASSWORD} (or neither, to use netrc)")
        return user, password
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    if not path.is_file():
        return None
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError, UnicodeError):
        # The parser's message can quote the file's tokens (a password among them): name the file only.
        raise InputError(f"{path}: cannot parse this netrc file") from None
    if entry is None:
        return None
    login, _account, secret = entry
    return (login, secret or "") if login else None


def _timeout() -> float:
    text = os.environ.get(ENV_TIMEOUT)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise InputError(f"{ENV_TIMEOUT} should be a positive number of seconds, got {text[:20]!r}")
    return seconds


@functools.cache
def _wildcard_session_class() -> type:
    """A `requests.Session` that sends the DICOM wildcards ``*`` and ``?`` in query values as written.

    requests percent-encodes them (``%2A``, ``%3F``); both are legal as they are in a URL's query (RFC 3986), and some
    servers match only the literal characters: Orthanc 1.10 with its DICOMweb plugin finds nothing for
    ``PatientID=DEMO%2A`` and the patient for ``PatientID=DEMO*``.
    """
    import requests

    class WildcardSession(requests.Session):
        def prepare_request(self, request):
            prepared = super().prepare_request(request)
            base, mark, query = (prepared.url or "").partition("?")
            if mark:
                prepared.url = f"{base}?{query.replace('%2A', '*').replace('%3F', '?')}"
            return prepared

    return WildcardSession


def connect(root: str) -> DICOMwebClient:
    """A `dicomweb_client.DICOMwebClient` for the service at ``root``, authenticated when credentials are set.

    Basic authentication goes on the `requests.Session` handed to the client, so no header or URL carries it into
    dicomweb-client's logs. Retries are off: a server that does not answer fails once, within the timeout.
    """
    from dicomweb_client import DICOMwebClient

    root = _check_root(root)
    session = _wildcard_session_class()()
    auth = _credentials(urlsplit(root).hostname or "")
    if auth is not None:
        session.auth = auth
    # trust_env stays on: HTTPS_PROXY/NO_PROXY and REQUESTS_CA_BUNDLE (a hospital's own CA) apply as usual.
    try:
        client = DICOMwebClient(root, session=session, timeout=_timeout())
    except ValueError:
        raise InputError(f"{_display(root)}: not a valid DICOMweb address") from None
    client.set_http_retry_params(retry=False)
    return client


@contextlib.contextmanager
def _server_errors(where: str, action: str) -> Iterator[None]:
    """Turn what requests and dicomweb-client raise into one-line InputErrors naming ``where``.

    requests' own messages name the URL it fetched (and, for some proxies, more): they are never shown.
    """
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        reason = (exc.response.reason or "") if exc.response is not None else ""
        reason = "".join(c for c in str(reason) if c.isprintable())[:60]
        if status == 401:
            hint = f"wrong or missing credentials ({ENV_USER}/{ENV_PASSWORD} or netrc)"
            raise InputError(f"{where}: the server refused the login (HTTP 401) while {action}; {hint}") from None
        if status == 403:
            raise InputError(f"{where}: access denied (HTTP 403) while {action}") from None
        if status == 404:
            raise InputError(f"{where}: not found on the server (HTTP 404) while {action}") from None
        raise InputError(f"{where}: the server answered HTTP {status} {reason} while {action}") from None
    except requests.Timeout:
        raise InputError(f"{where}: the server did not answer within {_timeout():g} s while {action}") from None
    except requests.ConnectionError:
        raise InputError(
            f"{where}: cannot connect to the server (unreachable, refused or reset) while {action}"
        ) from None
    except requests.RequestException as exc:
        raise InputError(f"{where}: DICOMweb request failed ({type(exc).__name__}) while {action}") from None


def _value(row: dict, keyword: str) -> Any:
    """The first value of ``keyword`` in a DICOM JSON object (QIDO-RS result), or None."""
    from pydicom.datadict import tag_for_keyword

    element = row.get(f"{tag_for_keyword(keyword):08X}") or {}
    values = element.get("Value") or [None]
    value = values[0]
    if isinstance(value, dict):  # person names: {"Alphabetic": ...}
        value = value.get("Alphabetic")
    return value


def _study_date(text: str) -> str:
    match = _DATE.match(text)
    if not text or match is None or (match[2] is None and match[3] is not None) or not (match[1] or match[3]):
        raise InputError(f"--study-date {text!r}: expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    for day in (match[1], match[3]):
        if day:
            try:
                datetime.datetime.strptime(day, "%Y%m%d")
            except ValueError:
                raise InputError(f"--study-date {text!r}: {day} is not a date") from None
    return text


def find_series(
    root: str,
    patient_id: str | None = None,
    accession: str | None = None,
    study_date: str | None = None,
    modality: str | None = None,
) -> list[dict]:
    """Series matching the filters (QIDO-RS ``/series``), sorted by patient, study date, study and series number.

    Args:
        root: the DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
        patient_id: PatientID (the server's matching: exact, or with ``*`` and ``?`` wildcards).
        accession: AccessionNumber.
        study_date: ``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD`` (either end may be left open).
        modality: e.g. ``CT``.

    Returns:
        One dict per series: PatientID, StudyDate, AccessionNumber, StudyDescription, Modality, SeriesNumber,
        SeriesDescription, NumberOfSeriesRelatedInstances (slices), StudyInstanceUID, SeriesInstanceUID and ``url``
        (the series URL that `read_volume` and the CLI accept).
    """
    root = _check_root(root)
    filters = {
        key: value
        for key, value in (
            ("PatientID", patient_id),
            ("AccessionNumber", accession),
            ("StudyDate", _study_date(study_date) if study_date is not None else None),
            ("Modality", modality.upper() if modality else None),
        )
        if value
    }
    client = connect(root)
    with _server_errors(_display(root), "searching for series (QIDO-RS)"):
        found = client.search_for_series(fields=list(_QIDO_FIELDS), search_filters=filters, get_remaining=True)
    rows = []
    for item in found:
        row = {keyword: _value(item, keyword) for keyword in _QIDO_FIELDS}
        if not row["StudyInstanceUID"] or not row["SeriesInstanceUID"]:
            continue
        for keyword in ("SeriesNumber", "NumberOfSeriesRelatedInstances"):
            with contextlib.suppress(TypeError, ValueError):
                row[keyword] = int(row[keyword]) if row[keyword] is not None else None
        row["url"] = str(SeriesURL(root, row["StudyInstanceUID"], row["SeriesInstanceUID"]))
        rows.append(row)
    return sorted(
        rows,
        key=lambda r: (
            str(r["PatientID"] or ""),
            str(r["StudyDate"] or ""),
            r["StudyInstanceUID"],
            r["SeriesNumber"] if isinstance(r["SeriesNumber"], int) else 1 << 30,
            r["SeriesInstanceUID"],
        ),
    )


def download_series(url: str | SeriesURL, folder: Path) -> list[Path]:
    """Retrieve every instance of a series (WADO-RS, as stored) into ``folder``, one file per instance.

    Instances are written as they arrive (the multipart response is streamed), so memory holds one at a time.
    """
    from pydicom.errors import InvalidDicomError

    series = parse_series_url(url) if isinstance(url, str) else url
    client = connect(series.root)
    paths: list[Path] = []
    with _server_errors(str(series), "retrieving the series (WADO-RS)"):
        instances = client.iter_series(series.study_uid, series.series_uid, media_types=AS_STORED)
        try:
            for k, ds in enumerate(instances):
                path = Path(folder) / f"instance_{k:05d}.dcm"
                ds.save_as(path)
                paths.append(path)
        except (ValueError, TypeError, EOFError, InvalidDicomError) as exc:  # a part pydicom cannot parse
            raise InputError(f"{series}: the server sent a damaged instance ({type(exc).__name__})") from None
    if not paths:
        raise InputError(f"{series}: the server returned no instances for this series")
    return paths


@contextlib.contextmanager
def _retrieved(url: str, series_uid: str | None) -> Iterator[tuple[SeriesURL, str]]:
    """The series' instances in a temporary folder for the block; InputErrors inside name the URL, not the folder."""
    series = parse_series_url(url)
    if series_uid is not None and series_uid != series.series_uid:
        raise InputError(f"{series}: --series {series_uid} is not the series of this URL")
    with tempfile.TemporaryDirectory(prefix="ctcolor-dicomweb-") as tmp:
        download_series(series, Path(tmp))
        try:
            yield series, tmp
        except InputError as exc:
            raise InputError(str(exc).replace(tmp, str(series))) from None


def read_series(url: str, series_uid: str | None = None, with_source: bool = False) -> Volume | tuple[Volume, Dataset]:
    """Read a DICOMweb series as a Volume (HU for CT), exactly as `read_dicom_folder` reads the same files on disk.

    Args:
        url: ``ROOT/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``.
        series_uid: must be the URL's series when given (the folder readers' ``--series``).
        with_source: also return the header of the series' first slice (pixels dropped): the patient and study
            attributes that an export back into the study keeps (`write_rgb_dicom` with ``keep_patient_info``).

    Returns:
        The Volume; ``meta["source"]`` is the URL. With ``with_source``: (volume, header).

    Raises:
        InputError: one line naming the URL (server errors, authentication, unreadable series).
    """
    with _retrieved(url, series_uid) as (series, tmp):
        return _series_volume(series, tmp, with_source)


def _series_volume(series: SeriesURL, folder: str, with_source: bool = False) -> Volume | tuple[Volume, Dataset]:
    """The retrieved series in ``folder`` read as a DICOM folder on disk, its ``meta`` naming the URL (not the
    temporary folder) and the server."""
    import pydicom

    from .dicom import read_dicom_folder

    volume = read_dicom_folder(folder, series.series_uid)
    first = volume.meta.pop("first_file", None)
    header = pydicom.dcmread(first, stop_before_pixels=True) if with_source and first else None
    volume.meta["source"] = str(series)
    volume.meta["dicomweb"] = {"root": series.root, "study_uid": series.study_uid, "series_uid": series.series_uid}
    return (volume, header) if with_source else volume


def read_series_image(url: str, series_uid: str | None = None) -> Volume | ColorVolume:
    """`read_series`, or a `ColorVolume` for an RGB series (what ``ctcolor colorize --send`` stores)."""
    from .color_read import is_color, read_color_volume

    with _retrieved(url, series_uid) as (series, tmp):  # retrieved once, whichever it is
        if is_color(tmp):
            color = read_color_volume(tmp)
            color.settings["source"] = str(series)
            return color
        return _series_volume(series, tmp)


def series_header(url: str | SeriesURL) -> Dataset:
    """The header of a series' first instance, from its WADO-RS metadata (no pixels are retrieved): the patient and
    study attributes that `send_series` keeps, for a series read earlier whose files are gone (the napari widget).

    Raises:
        InputError: one line naming the URL (server errors, authentication, an empty series).
    """
    from pydicom import Dataset

    series = parse_series_url(url) if isinstance(url, str) else url
    client = connect(series.root)
    with _server_errors(str(series), "retrieving the series' metadata (WADO-RS)"):
        instances = client.retrieve_series_metadata(series.study_uid, series.series_uid)
    if not instances:
        raise InputError(f"{series}: the server returned no instances for this series")
    try:  # bulk data (pixels) are only referenced in metadata: leave them empty
        return Dataset.from_json(instances[0], bulk_data_uri_handler=lambda *_: b"")
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{series}: the server sent damaged metadata ({type(exc).__name__})") from None


def store_series(root: str, study_uid: str, files: Sequence[Path]) -> str:
    """Store DICOM files into the study ``study_uid`` with STOW-RS; return the stored series' URL.

    The files must all belong to one series of that study (as `write_rgb_dicom` writes them with
    ``keep_patient_info``). They are sent in batches of `STORE_BATCH` instances.

    Raises:
        InputError: the server refused the request or any instance in it.
    """
    import pydicom

    root = _check_root(root)
    if not files:
        raise InputError(f"{_display(root)}: nothing to store")
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).get("SeriesInstanceUID", "")) for p in files}
    if len(uids) != 1:
        raise InputError(f"{_display(root)}: the files to store belong to {len(uids)} series, not one")
    series_uid = uids.pop()
    where = f"{_display(root)}/studies/{study_uid}"
    client = connect(root)
    failed = 0
    for start in range(0, len(files), STORE_BATCH):
        batch = [pydicom.dcmread(p) for p in files[start : start + STORE_BATCH]]
        # A refusal after the first request leaves the earlier instances stored (STOW-RS has no transaction): say so.
        stored = f"; {start} instances of series {series_uid} are stored" if start else ""
        action = f"storing the series (STOW-RS){stored}"
        with _server_errors(where, action):
            reply = client.store_instances(batch, study_instance_uid=study_uid)
        failed += len(reply.get("FailedSOPSequence", []) or []) if reply is not None else 0
    if failed:
        raise InputError(
            f"{where}: the server refused {failed} of {len(files)} instances of series {series_uid} (STOW-RS); "
            "the others may be stored"
        )
    log.info("stored %d instances in %s", len(files), where)
    return str(SeriesURL(root, study_uid, series_uid))


def send_series(
    image: ColorVolume | Volume,
    source_meta: dict,
    source: Dataset | None = None,
    files: Sequence[Path] | None = None,
    describe: dict | None = None,
) -> tuple[str, int]:
    """Store a result into the study of the DICOMweb series it was made from (STOW-RS): a colorized CT, or a
    registered CT (a grey `Volume` in HU on that series' grid).

    The stored series keeps the patient and study of ``source`` (the first slice's header, `read_series` with
    ``with_source``): a new SeriesInstanceUID, the source's StudyInstanceUID and FrameOfReferenceUID, and a
    SeriesDescription saying what it is ("... colorized": Modality "OT", `write_rgb_dicom`; "... registered": the
    source's modality and window, `write_grey_dicom`), always with the patient's identity kept.

    Args:
        image: the `ColorVolume` or grey `Volume`.
        source_meta: the ``meta`` of the Volume read from the series (from `read_series`: names the server and
            study).
        source: the source series' first header; by default fetched from the server (`series_header`).
        files: already written files of this series that keep the patient's identity (sent as they are); by
            default the series is written into a temporary folder first.
        describe: for a grey image, what `write_grey_dicom` takes besides the geometry: ``source_meta`` (modality,
            description and window of the image's own source), ``derivation`` and ``suffix``.

    Returns:
        (the stored series' URL, the number of instances).
    """
    from .export import write_grey_dicom, write_rgb_dicom
    from .volume import ColorVolume

    web = source_meta.get("dicomweb")
    if not web:
        raise InputError("a result can be sent only to the DICOMweb server its CT was read from (a series URL)")
    if source is None:
        source = series_header(SeriesURL(web["root"], web["study_uid"], web["series_uid"]))
    if str(source.get("StudyInstanceUID", "")) != web["study_uid"]:
        raise InputError(f"{source_meta.get('source')}: the retrieved instances belong to another study than the URL")
    if files is not None:
        return store_series(web["root"], web["study_uid"], list(files)), len(files)
    with tempfile.TemporaryDirectory(prefix="ctcolor-stow-") as tmp:
        folder = Path(tmp) / "series"
        if isinstance(image, ColorVolume):
            written = write_rgb_dicom(image, folder, source_meta, keep_patient_info=True, source_datasets=[source])
        else:
            options = {"source_meta": source_meta, **(describe or {})}
            written = write_grey_dicom(image, folder, keep_patient_info=True, source_datasets=[source], **options)
        return store_series(web["root"], web["study_uid"], written), len(written)
