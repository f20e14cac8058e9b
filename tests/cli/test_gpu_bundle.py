"""The offline GPU bundle (`make gpu-bundle`, tools/gpu_bundle.py and its run.sh), as a GPU server's user meets it:
built for this Python within its budget, installed with no package index reachable, and run end to end with tiny
settings (``run.sh --smoke``: the numba kernels compiled by `ctcolor warmup`, the GPU tests skip on a CPU, the bench
rows and the report are written)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from napari_ctcolor.bench.colour import STAGES

from conftest import DICOM_SERIES, REPO, require_shared

BUDGET_MIB = 60


def test_the_bundle_fits_its_budget_installs_offline_and_writes_the_report(tmp_path):
    """One test, built once: pytest-xdist's work stealing may hand two tests of one module fixture to two workers,
    each of which would build its own bundle (3 minutes of compression and derivation on a cold cache)."""
    bundle = _build(tmp_path)
    _check_contents(bundle)
    _check_run(bundle, tmp_path)


def _build(tmp_path: Path) -> Path:
    require_shared(DICOM_SERIES)
    out = tmp_path / "gpu-bundle"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    built = subprocess.run(
        [sys.executable, "tools/gpu_bundle.py", "--python", python, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    assert f"for CPython {python}" in built.stdout
    return out


def _check_contents(bundle: Path) -> None:
    """What a server lacks, within the budget."""
    size = sum(path.stat().st_size for path in bundle.rglob("*") if path.is_file()) / 2**20
    assert size <= BUDGET_MIB, size
    names = sorted(path.name for path in (bundle / "wheels").iterdir())
    assert not any(name.lower().startswith(("torch-", "numpy-", "scipy-", "nvidia")) for name in names)  # the server's
    assert any(name.startswith("monai-") for name in names) and any(name.startswith("pydicom-") for name in names)
    assert any(name.startswith("simpleitk-") and name.endswith(".tar.xz") for name in names)  # too large as a wheel
    package = next((bundle / "wheels").glob("napari_ctcolor-*.whl"))
    with zipfile.ZipFile(package) as wheel:
        inside = set(wheel.namelist())
    for model in ("colorizer-2d", "colorizer-3d", "symnet-ct"):
        assert {f"napari_ctcolor/_weights/{model}.safetensors", f"napari_ctcolor/_weights/{model}.json"} <= inside
    assert (bundle / "shared" / "data" / "ct" / "totalseg-abdomen-dicom").is_dir()
    assert not any(name.startswith(("dask-", "distributed-")) for name in names)  # `ctcolor batch` only
    with tarfile.open(bundle / "shared" / "prepared.tar.xz") as tar:  # the colour sweeps' chest CTs, prepared
        assert {name.split("-")[1] for name in tar.getnames()} == {"popi", "lung2"}
    listed = (bundle / "gpu-tests.txt").read_text(encoding="utf-8").split()
    assert "tests/engines/test_cuda.py" in listed and all((bundle / "project" / name).is_file() for name in listed)


def _check_run(bundle: Path, tmp_path: Path) -> None:
    """``run.sh --smoke``: installed with no index reachable, the kernels compiled by its warmup, the sweep, the bench
    rows and the report; a sweep that does not exist and one whose data the bundle lacks are refused."""
    out = tmp_path / "out"
    # No index reachable: pip is told not to use one, and any proxy it might try leads nowhere.
    env = {**os.environ, "PYTHON": sys.executable, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    env.update(http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    run = subprocess.run(
        ["bash", str(bundle / "run.sh"), "--smoke", "--sweep", "symnet-rigid", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    steps = (out / "logs" / "steps.log").read_text(encoding="utf-8")
    assert f"napari-ctcolor from {bundle / '.site'}" in steps  # the bundle's package, not this checkout's
    # `ctcolor warmup` (as `make setup` runs it) on the fresh install's empty numba cache compiled the kernels of the
    # colorize path and of registration, and every kernel the bench and the sweep then ran: nothing was compiled
    # after it, and a second warmup finds them all in the cache.
    warmed = (out / "logs" / "warmup.log").read_text(encoding="utf-8")
    assert warmed.startswith("kernels ready: colorize"), warmed
    cache = sorted(bundle.joinpath(".site").rglob("*.nb[ic]"))
    for module in ("fused", "anatomy", "_field_kernels", "_demons_kernels"):
        assert any(path.name.startswith(module + ".") for path in cache), (module, cache)
    warmup_end = (out / "logs" / "warmup.log").stat().st_mtime
    assert [path.name for path in cache if path.stat().st_mtime > warmup_end] == []
    again = subprocess.run(
        [sys.executable, "-m", "napari_ctcolor", "warmup"], capture_output=True, text=True, timeout=300,
        env={**env, "PYTHONPATH": str(bundle / ".site")},
    )  # fmt: skip
    assert again.returncode == 0 and sorted(bundle.joinpath(".site").rglob("*.nb[ic]")) == cache
    # The sweep, two training steps of each arm from the shipped weights: each model with its card, the paired table.
    sweep = json.loads((out / "sweep" / "symnet_ct" / "compare.json").read_text(encoding="utf-8"))
    assert sweep["finetune"]["from"].endswith("symnet-ct.safetensors") and sweep["seeds"] == [20261122]
    for arm in ("base", "symnet-rigid"):
        card = json.loads((out / "sweep" / "symnet_ct" / arm / "seed-20261122.json").read_text(encoding="utf-8"))
        assert (
            card["training"]["steps"] == 2
            and (out / "sweep" / "symnet_ct" / arm / "seed-20261122.safetensors").is_file()
        )
    assert sweep["arms"]["symnet-rigid"]["deformation"]["rigid"] == 0.2
    assert sweep["arms"]["base"]["deformation"].get("rigid") is None
    assert all(0 <= value <= 1 for value in sweep["start"].values())  # the shipped weights' measures
    measured = {row["measure"] for row in sweep["rows"]}
    assert measured == {f"totalseg-body-3mm-30slices {m}" for m in ("dice", "folding", "turned near_1")}
    rows = json.loads((out / "rows.json").read_text(encoding="utf-8"))["rows"]
    measured = {(row["section"], row["item"], row["device"]) for row in rows if row["median"] is not None}
    devices = {"cpu", "cuda"} if "cuda" in {row["device"] for row in rows} else {"cpu"}
    for device in devices:
        assert ("pipeline", "colorize() in process", device) in measured
    # Where colorize's time goes (quick: the 20-slice series): each stage of one call, the call in process with the
    # share of it outside the network (both from this run), and whole processes.
    cpu = {row["item"]: row for row in rows if row["section"] == "pipeline" and row["device"] == "cpu"}
    share = float(cpu["colorize() in process"]["note"].split("outside the network: ")[1].split("%")[0])
    assert all(cpu[stage]["median"] > 0 for stage in STAGES) and 0 < share < 100
    shares = [float(cpu[stage]["note"].removesuffix("% of the call")) for stage in STAGES[1:]]
    assert 0 < sum(shares) < 100 and abs(sum(shares) - share) <= 3, (shares, share)  # each rounded to 1 %
    for item in (
        "ctcolor colorize .nii.gz -> .nii.gz (whole process)",
        "ctcolor colorize DICOM folder -> .nii.gz (whole process)",
    ):
        assert cpu[item]["median"] > 0 and cpu[item]["note"] == "start-up, reading, writing", cpu[item]
        assert cpu[item]["size"] == "512x512x20"
    for device in devices:  # both pairs registered on each device
        assert sum(key == ("register device", "ctcolor register (whole process)", device) for key in measured) == 1
    assert len([row for row in rows if row["section"] == "register device"]) == 2 * len(devices)
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "tests (-m gpu):" in report and " 0 failed" in report and "| pipeline |" in report
    assert "## Sweep symnet-rigid: symnet_ct" in report and "sweep symnet-rigid: exit 0" in report
    summary = run.stdout.strip().splitlines()
    assert summary[-1].endswith("done") and any("report:" in line for line in summary[-20:])
    # A sweep that does not exist is refused before anything is trained.
    refused = subprocess.run(
        ["bash", str(bundle / "run.sh"), "--smoke", "--sweep", "no-such", "--out", str(tmp_path / "o2")],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert refused.returncode == 2 and "no-such" in refused.stderr
    # The colour sweep trains on chest CTs the bundle carries only as prepared cases: without them, it is refused
    # after the install, before any test, bench or training, naming the CTs.
    (bundle / "shared" / "prepared.tar.xz").unlink()
    shutil.rmtree(bundle / "shared" / "data" / "prepared")
    lacking = subprocess.run(
        ["bash", str(bundle / "run.sh"), "--smoke", "--sweep", "colour-aorta", "--out", str(tmp_path / "o3")],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert lacking.returncode == 2 and "not in this bundle" in lacking.stderr
    assert "chest-popi-2mm.nii.gz" in lacking.stderr and "colorizer-2d" not in lacking.stderr
    assert not (tmp_path / "o3" / "tests.xml").exists() and not (tmp_path / "o3" / "sweep").exists()
