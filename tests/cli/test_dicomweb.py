"""DICOMweb against a real PACS (Orthanc with its DICOMweb plugin): `ctcolor pacs find`, series URLs as inputs,
`colorize --send` back into the patient's study, and one-line errors (exit 2) for what can go wrong on a network.

The shared abdomen series has no Study/Series/SOP Instance UIDs, which a PACS needs: the fixture uploads copies that
have them (and a test patient); the shared files are never modified.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid

from napari_ctcolor.io import read_image, read_volume
from napari_ctcolor.io.dicomweb import ENV_PASSWORD, ENV_TIMEOUT, ENV_USER, download_series, find_series

from conftest import DICOM_SERIES, assert_documented, ctcolor, export_and_wait, file_hashes, require_shared
from orthanc import PASSWORD, USER, OrthancServer, free_port, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

PATIENT_ID, PATIENT_NAME = "CTCOLOR-PAT-1", "Test^Colour"
OTHER_PATIENT_ID = "CTCOLOR-PAT-2"


@dataclass
class Pacs:
    server: OrthancServer
    root: str
    study_uid: str
    ct_url: str
    mr_url: str
    other_url: str


def _upload_copy(server, files, folder, study_uid, series_uid, patient, **changes) -> None:
    """Copies of ``files`` with UIDs, ``patient`` (ID, name) and ``changes``, uploaded to ``server``."""
    folder.mkdir(parents=True)
    sop_class = changes.pop("SOPClassUID", CTImageStorage)  # the shared files have an empty SOPClassUID
    for k, source in enumerate(files):
        ds = pydicom.dcmread(source)
        ds.PatientID, ds.PatientName = patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        copy = folder / f"{k:03d}.dcm"
        ds.save_as(copy)  # pixel data stays JPEG 2000, as stored in the shared series
        server.upload(copy)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Pacs:
    shared = require_shared(DICOM_SERIES)
    files = sorted(p for p in shared.iterdir() if p.is_file())
    before = file_hashes(shared)
    folder = tmp_path_factory.mktemp("orthanc")
    with OrthancServer(folder / "server") as server:
        study, other_study = generate_uid(), generate_uid()
        ct, mr, other = generate_uid(), generate_uid(), generate_uid()
        patient = (PATIENT_ID, PATIENT_NAME)
        _upload_copy(server, files, folder / "ct", study, ct, patient, AccessionNumber="ACC-001", SeriesNumber=3)
        _upload_copy(
            server,
            files[:3],
            folder / "mr",
            study,
            mr,
            patient,
            AccessionNumber="ACC-001",
            Modality="MR",
            SOPClassUID=MRImageStorage,
            SeriesDescription="MR not CT",
            SeriesNumber=4,
        )
        _upload_copy(
            server,
            files[:2],
            folder / "other",
            other_study,
            other,
            (OTHER_PATIENT_ID, "Other^Patient"),
            AccessionNumber="ACC-002",
            StudyDate="20230115",
        )
        root = server.dicomweb
        yield Pacs(
            server,
            root,
            study,
            f"{root}/studies/{study}/series/{ct}",
            f"{root}/studies/{study}/series/{mr}",
            f"{root}/studies/{other_study}/series/{other}",
        )
    assert file_hashes(shared) == before


@pytest.fixture(autouse=True)
def credentials(monkeypatch, tmp_path):
    """The right credentials in the environment (the ctcolor subprocesses inherit it); no netrc of the developer's."""
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv(ENV_TIMEOUT, raising=False)


def _one_error_line(result, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert_documented(lines[0])
    assert "Traceback" not in result.stderr and PASSWORD not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_pacs_find_lists_series_as_a_table_and_as_json(pacs):
    result = ctcolor("pacs", "find", "--server", pacs.root, "--patient-id", PATIENT_ID, "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["SeriesInstanceUID"]: row for row in json.loads(result.stdout)}
    ct = next(row for row in rows.values() if row["url"] == pacs.ct_url)
    assert {row["url"] for row in rows.values()} >= {pacs.ct_url, pacs.mr_url}
    assert all(row["PatientID"] == PATIENT_ID for row in rows.values())
    assert ct["StudyInstanceUID"] == pacs.study_uid and ct["url"].endswith(ct["SeriesInstanceUID"])
    assert ct["NumberOfSeriesRelatedInstances"] == 20 and ct["Modality"] == "CT"
    assert ct["StudyDate"] == "20221208" and ct["SeriesDescription"] == "CT Body 3.0"

    for filters, expected in (
        (["--modality", "CT", "--patient-id", PATIENT_ID], [pacs.ct_url]),
        (["--accession", "ACC-002"], [pacs.other_url]),
        (["--study-date", "20230101-20231231"], [pacs.other_url]),
        (["--study-date", "20221208", "--modality", "mr"], [pacs.mr_url]),
        (["--patient-id", "NOBODY"], []),
    ):
        result = ctcolor("pacs", "find", "--server", pacs.root, *filters, "--json")
        assert result.returncode == 0, (filters, result.stderr)
        assert [row["url"] for row in json.loads(result.stdout)] == expected, filters

    result = ctcolor("pacs", "find", "--server", pacs.root, "--modality", "CT")
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.strip().splitlines()
    assert header.split()[:4] == ["PATIENT", "ID", "STUDY", "DATE"]
    row = next(line for line in lines if pacs.ct_url in line)
    assert row.split()[:4] == [PATIENT_ID, "20221208", "CT", "20"] and "CT Body 3.0" in row
    assert len(lines) == 2  # the two CT series, one row each

    _one_error_line(ctcolor("pacs", "find", "--server", pacs.root, "--study-date", "2022-12-08"), "--study-date")


def test_series_url_reads_exactly_as_the_folder_on_disk(pacs, dicom_series):
    from_url = ctcolor("info", pacs.ct_url, "--json")
    from_disk = ctcolor("info", str(dicom_series), "--json")
    assert from_url.returncode == 0, from_url.stderr
    assert json.loads(from_url.stdout) == json.loads(from_disk.stdout)
    text = ctcolor("info", pacs.ct_url)
    assert text.returncode == 0 and text.stdout.startswith(pacs.ct_url) and "20 slices x 512 x 512" in text.stdout

    remote, local = read_volume(pacs.ct_url), read_volume(dicom_series)
    assert remote.array.dtype == local.array.dtype
    np.testing.assert_array_equal(remote.array, local.array)
    assert remote.spacing == local.spacing and remote.origin == local.origin
    np.testing.assert_array_equal(remote.direction, local.direction)
    assert remote.meta["source"] == pacs.ct_url and "first_file" not in remote.meta
    # Retrieved as stored (transfer-syntax=*): this Orthanc cannot transcode JPEG 2000, so nothing else would work.
    assert remote.meta["transfer_syntax"] == local.meta["transfer_syntax"] == pydicom.uid.JPEG2000Lossless
    assert isinstance(read_image(pacs.ct_url), type(local))


def test_colorize_send_stores_the_series_in_the_patients_study(pacs, dicom_series, tmp_path):
    sent_out, local_out = tmp_path / "from-pacs", tmp_path / "from-disk"
    result = ctcolor("colorize", pacs.ct_url, "-o", str(sent_out), "--format", "dicom", "--send", timeout=900)
    assert result.returncode == 0, result.stderr
    assert "sent 20 instances to " in result.stdout and PASSWORD not in result.stdout + result.stderr
    local = ctcolor("colorize", str(dicom_series), "-o", str(local_out), "--format", "dicom", timeout=900)
    assert local.returncode == 0, local.stderr

    rows = [
        row
        for row in find_series(pacs.root, patient_id=PATIENT_ID, modality="OT")
        if row["StudyInstanceUID"] == pacs.study_uid
    ]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["NumberOfSeriesRelatedInstances"] == 20 and row["url"] in result.stdout
    assert "colorized" in row["SeriesDescription"] and row["PatientID"] == PATIENT_ID
    source = pydicom.dcmread(pacs.server.folder.parent / "ct" / "000.dcm", stop_before_pixels=True)
    assert row["SeriesInstanceUID"] != source.SeriesInstanceUID

    retrieved = tmp_path / "retrieved"
    retrieved.mkdir()
    download_series(row["url"], retrieved)
    sent = sorted((pydicom.dcmread(p) for p in retrieved.iterdir()), key=lambda ds: int(ds.InstanceNumber))
    assert len(sent) == 20
    for ds in sent:
        assert (ds.PatientID, str(ds.PatientName)) == (PATIENT_ID, PATIENT_NAME)
        assert ds.StudyInstanceUID == pacs.study_uid and ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert ds.Modality == "OT" and ds.PhotometricInterpretation == "RGB"
    assert read_image(row["url"]).rgb.shape == (20, 512, 512, 3)

    # The same colours as colorizing the folder on disk, slice by slice; the local copies stay de-identified.
    local_files = sorted(local_out.glob("*.dcm"))
    assert len(local_files) == 20
    for ds, path in zip(sent, local_files, strict=True):
        np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(path).pixel_array)
        assert ds.ImagePositionPatient == pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient
    for path in sorted(sent_out.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert not ds.PatientID and not ds.PatientName and ds.PatientIdentityRemoved == "YES"
        assert PASSWORD.encode() not in path.read_bytes()

    # --keep-patient-info alone keeps the identity in the local copy, from the retrieved instances; nothing is sent.
    kept_out = tmp_path / "kept"
    kept = ctcolor(
        "colorize", pacs.ct_url, "-o", str(kept_out), "--format", "dicom", "--keep-patient-info", timeout=900
    )
    assert kept.returncode == 0 and "sent" not in kept.stdout, kept.stderr
    ds = pydicom.dcmread(sorted(kept_out.glob("*.dcm"))[0], stop_before_pixels=True)
    assert (ds.PatientID, str(ds.PatientName), ds.StudyInstanceUID) == (PATIENT_ID, PATIENT_NAME, pacs.study_uid)
    assert ds.SeriesDescription == "CT Body 3.0 colorized"
    assert len(find_series(pacs.root, patient_id=PATIENT_ID, modality="OT")) == 1


def test_wrong_password_fails_in_one_line_without_the_password(pacs, monkeypatch, tmp_path):
    wrong = "Wr0ng-pass-0d5e"
    monkeypatch.setenv(ENV_PASSWORD, wrong)
    for args in (
        ["info", pacs.ct_url],
        ["pacs", "find", "--server", pacs.root],
        ["colorize", pacs.ct_url, "-o", str(tmp_path / "out"), "--format", "dicom", "--send"],
    ):
        line = _one_error_line(ctcolor(*args), "401")
        assert wrong not in line
    assert not (tmp_path / "out").exists()


def test_netrc_credentials(pacs, monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_USER)
    monkeypatch.delenv(ENV_PASSWORD)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n", encoding="utf-8")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    result = ctcolor("pacs", "find", "--server", pacs.root, "--patient-id", PATIENT_ID, "--json")
    assert result.returncode == 0, result.stderr
    assert pacs.ct_url in [row["url"] for row in json.loads(result.stdout)]
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    _one_error_line(ctcolor("pacs", "find", "--server", pacs.root), "401")


def test_unreachable_server_and_timeout_exit_2(monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    _one_error_line(ctcolor("pacs", "find", "--server", closed), closed, "cannot connect")
    _one_error_line(ctcolor("info", f"{closed}/studies/1.2.3/series/1.2.3.4"), "cannot connect")
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv(ENV_TIMEOUT, "1")
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        _one_error_line(ctcolor("pacs", "find", "--server", url, timeout=60), "did not answer within 1 s")


def test_non_ct_series_unknown_series_and_misuse_exit_2(pacs, dicom_series, tmp_path):
    before = find_series(pacs.root, patient_id=PATIENT_ID)
    out = tmp_path / "mr-colour"
    _one_error_line(ctcolor("colorize", pacs.mr_url, "-o", str(out), "--format", "dicom", "--send"), "not CT")
    assert not out.exists()
    assert find_series(pacs.root, patient_id=PATIENT_ID) == before  # nothing was stored

    missing = pacs.ct_url.rsplit("/", 1)[0] + "/1.2.3.999"
    _one_error_line(ctcolor("info", missing), "404")
    _one_error_line(ctcolor("info", f"{pacs.root}/studies/{pacs.study_uid}"), "not a DICOMweb series URL")
    _one_error_line(
        ctcolor("info", pacs.ct_url.replace("http://", f"http://{USER}:{PASSWORD}@")), "credentials into the URL"
    )
    for args in (
        [str(dicom_series), "-o", str(tmp_path / "a"), "--format", "dicom", "--send"],
        [pacs.ct_url, "-o", str(tmp_path / "b.nii.gz"), "--send"],
    ):
        _one_error_line(ctcolor("colorize", *args), "--send")
    assert not any(tmp_path.iterdir())


# --- napari: the reader, "Open from PACS" and the Colorize widget's send ---------------------------------------------


def test_napari_opens_a_series_url_and_the_pacs_widget_finds_and_opens_it(make_napari_viewer, qtbot, pacs, monkeypatch):
    from napari_ctcolor.napari import _pacs_widget
    from napari_ctcolor.napari._pacs_widget import PacsWidget

    shown: list[str] = []
    monkeypatch.setattr(_pacs_widget, "show_error", shown.append)
    local = read_volume(DICOM_SERIES)
    viewer = make_napari_viewer()
    [by_reader] = viewer.open(pacs.ct_url, plugin="napari-ctcolor")  # File > Open with a URL, or a drop
    np.testing.assert_array_equal(by_reader.data, local.array)

    _, widget = viewer.window.add_plugin_dock_widget("napari-ctcolor", "Open from PACS")
    assert isinstance(widget, PacsWidget)
    widget.server.value = pacs.root
    widget.patient_id.value = "*" + PATIENT_ID[-5:]  # a wildcard, as typed: this patient only, not PAT-2
    widget.modality.value = "any"
    widget.search_button.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=30_000)
    # The patient's CT and MR by series number (and any colour series an earlier test sent), not the other patient.
    found = [row["url"] for row in widget._rows]
    assert found[:2] == [pacs.ct_url, pacs.mr_url] and pacs.other_url not in found and not shown
    assert widget.status.value == f"{len(found)} series found"
    assert widget.results.value == f"1. CT Body 3.0  |  20 slices  |  CT  |  2022-12-08  |  {PATIENT_ID}"

    widget.modality.value = "CT"
    widget.search_button.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=30_000)
    assert widget.selected_url == pacs.ct_url
    widget.open_button.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    opened = viewer.layers[-1]
    assert opened is not by_reader and not shown
    assert widget.selected_url == pacs.ct_url  # napari's reset_choices on the new layer keeps the results
    np.testing.assert_array_equal(opened.data, local.array)
    np.testing.assert_allclose(opened.data_to_world((3, 100, 200)), by_reader.data_to_world((3, 100, 200)))
    assert tuple(opened.contrast_limits) == tuple(by_reader.contrast_limits)  # the series' DICOM window

    # A wrong password: one line in the widget and napari's notification, no layer added.
    monkeypatch.setenv(ENV_PASSWORD, "Not-The-Secret-42")
    widget.open_button.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert len(shown) == 1 and "HTTP 401" in shown[0] and "Not-The-Secret" not in shown[0], shown
    assert widget.status.value == shown[0] and len(viewer.layers) == 2


def test_colorize_widget_exports_and_sends_to_the_cts_pacs(make_napari_viewer, qtbot, pacs, tmp_path, monkeypatch):
    from napari_ctcolor.napari import _colorize_widget
    from napari_ctcolor.napari._colorize_widget import ColorizeWidget

    shown: list[str] = []
    monkeypatch.setattr(_colorize_widget, "show_error", shown.append)
    viewer = make_napari_viewer()
    [ct] = viewer.open(pacs.ct_url, plugin="napari-ctcolor")
    _, widget = viewer.window.add_plugin_dock_widget("napari-ctcolor", "Colorize volume")
    assert isinstance(widget, ColorizeWidget)
    widget.device.value = "cpu"
    widget.run_button.native.click()
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    assert widget.send_to_pacs.enabled and not shown  # the CT came from a DICOMweb series

    sent_before = find_series(pacs.root, patient_id=PATIENT_ID, modality="OT")
    widget.export_format.value = "DICOM series (folder)"
    widget.export_path.value = tmp_path / "local"
    widget.send_to_pacs.value = True
    files = export_and_wait(qtbot, widget)
    assert len(files) == 20 and not shown, shown
    # The local copy is de-identified (the box was not ticked); the sent series keeps the patient, in their study.
    assert pydicom.dcmread(files[0]).PatientIdentityRemoved == "YES"
    new = [row for row in find_series(pacs.root, patient_id=PATIENT_ID, modality="OT") if row not in sent_before]
    assert len(new) == 1 and new[0]["StudyInstanceUID"] == pacs.study_uid and new[0]["PatientID"] == PATIENT_ID
    back = read_image(new[0]["url"])
    np.testing.assert_array_equal(back.rgb, widget.result_layer.data)
    np.testing.assert_allclose(back.origin, read_volume(DICOM_SERIES).origin, atol=1e-3)
    assert "sent 20 to" in widget.status.value

    # A PNG export cannot go to the PACS: refused in one line, nothing written.
    widget.export_format.value = "PNG slices (folder)"
    widget.export_path.value = tmp_path / "png"
    assert widget.export() is None and "needs the DICOM series format" in shown[-1] and not (tmp_path / "png").exists()


def test_register_send_stores_the_warped_ct_in_the_fixed_study(pacs, tmp_path):
    """`ctcolor register FIXED_URL MOVING --send`: the warped image, on FIXED's grid, in HU and FIXED's window, joins
    FIXED's study as a new series with the patient's identity; equal to the warped.nii.gz written beside it."""
    before = find_series(pacs.root, patient_id=PATIENT_ID)
    out = tmp_path / "reg"
    # The network alone: this test is about storing the result (pre-alignment and refinement have their own tests).
    fast = ("--no-affine", "--refine", "0", "--device", "cpu")
    done = ctcolor("register", pacs.ct_url, pacs.ct_url, "-o", str(out), "--send", *fast, timeout=900)
    assert done.returncode == 0, done.stderr
    new = [row for row in find_series(pacs.root, patient_id=PATIENT_ID) if row not in before]
    assert len(new) == 1 and new[0]["url"] in done.stdout and "sent 20 instances" in done.stdout
    row = new[0]
    assert row["StudyInstanceUID"] == pacs.study_uid and row["Modality"] == "CT"
    assert row["SeriesDescription"] == "CT Body 3.0 registered"
    sent = read_volume(row["url"])
    warped = read_volume(out / "warped.nii.gz")
    np.testing.assert_array_equal(sent.array, np.rint(warped.array).astype(np.int16))  # whole HU
    fixed = read_volume(pacs.ct_url)
    np.testing.assert_allclose(sent.affine, fixed.affine, atol=1e-3)
    assert sent.meta["window"] == fixed.meta["window"]
    back = tmp_path / "back"
    back.mkdir()
    header = pydicom.dcmread(download_series(row["url"], back)[0], stop_before_pixels=True)
    assert (header.PatientID, str(header.PatientName)) == (PATIENT_ID, PATIENT_NAME)
    assert header.RescaleType == "HU" and "SYMNet" in header.DerivationDescription

    # Refused in one line, before anything is stored: a local FIXED, or a MOVING of another patient.
    local = ctcolor("register", str(out / "warped.nii.gz"), pacs.ct_url, "-o", str(tmp_path / "r2"), "--send")
    _one_error_line(local, "FIXED, which must be a DICOMweb series URL")
    other = ctcolor("register", pacs.ct_url, pacs.other_url, "-o", str(tmp_path / "r3"), "--send", timeout=300)
    _one_error_line(other, "another patient")
    unknown = ctcolor("register", pacs.ct_url, str(out / "warped.nii.gz"), "-o", str(tmp_path / "r4"), "--send")
    _one_error_line(unknown, "cannot be confirmed as FIXED's patient")
    assert len(find_series(pacs.root, patient_id=PATIENT_ID)) == len(before) + 1
