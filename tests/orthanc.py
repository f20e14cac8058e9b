"""A real PACS for the DICOMweb tests: Debian's Orthanc with its DICOMweb plugin, on 127.0.0.1, authentication on.

`OrthancServer` starts ``Orthanc`` with a configuration written into a temporary folder (storage and index there too),
free ports, ``RegisteredUsers`` and the plugin; it waits until the REST API and the DICOMweb root answer, and stops
the process at the end. `skip_reason` says why a machine cannot run it (binary or plugin missing), for pytest.skip.
"""

from __future__ import annotations

import glob
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import requests

#: Where Debian's orthanc-dicomweb package puts the plugin (the first is a link to the second).
PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)
USER = "ctcolor-test"
PASSWORD = "S3cret-pw-7f2a91"  # distinctive, so a test can prove it appears in no output


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).exists()), None)


def dicomweb_plugin() -> str | None:
    for pattern in PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def skip_reason() -> str | None:
    if orthanc_binary() is None:
        return "the Orthanc binary is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """One Orthanc process; use as a context manager."""

    def __init__(self, folder: Path, user: str = USER, password: str = PASSWORD) -> None:
        self.folder = Path(folder)
        self.user, self.password = user, password
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log = self.folder / "orthanc.log"

    @property
    def url(self) -> str:
        """The REST root (Orthanc's own API)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root (QIDO-RS, WADO-RS, STOW-RS)."""
        return f"{self.url}/dicom-web"

    def _config(self) -> dict:
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        return {
            "Name": "ctcolor-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpServerEnabled": True,
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 8,
        }

    def start(self, timeout: float = 60.0) -> OrthancServer:
        config = self.folder / "orthanc.json"
        config.write_text(json.dumps(self._config(), indent=1), encoding="utf-8")
        self.process = subprocess.Popen(
            [orthanc_binary(), f"--logfile={self.log}", "--no-jobs", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {self._log_tail()}")
            try:
                plugins = requests.get(f"{self.url}/plugins", auth=(self.user, self.password), timeout=2)
            except requests.RequestException:
                time.sleep(0.2)
                continue
            if plugins.ok:
                if "dicom-web" not in plugins.json():
                    self.stop()
                    raise RuntimeError(f"Orthanc runs without its DICOMweb plugin: {plugins.json()}")
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout:g} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace", encoding="utf-8").splitlines()[-5:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def upload(self, path: Path) -> dict:
        """Store one DICOM file through Orthanc's REST API (POST /instances)."""
        reply = requests.post(
            f"{self.url}/instances", data=path.read_bytes(), auth=(self.user, self.password), timeout=30
        )
        reply.raise_for_status()
        return reply.json()

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
