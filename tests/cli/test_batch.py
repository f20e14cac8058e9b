"""`ctcolor batch` on a Dask LocalCluster (loopback), through `ctcolor` as a subprocess: report rows, exit codes,
outputs that are the single commands' within `batch.SAME_AS_SINGLE` (workers run one torch thread, the single command
one per core or CTCOLOR_TEST_THREADS), re-runs that skip finished inputs, `@list.txt`, register pairs, and a worker
killed mid-batch."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from napari_ctcolor.cli import main
from napari_ctcolor.cli.batch import KILL_ENV, PARTIAL_PREFIX
from napari_ctcolor.io import Volume, read_volume, write_nifti

from conftest import (
    CT_DIR,
    assert_documented,
    assert_same_colors,
    assert_same_registration,
    ct_weights_shipped,
    ctcolor,
    file_hashes,
    require_shared,
)

CT_30 = CT_DIR / "totalseg-body-3mm-30slices.nii.gz"


def _crop(path, out, z, y=slice(None), x=slice(None)):
    ct = read_volume(path)
    write_nifti(Volume(ct.array[z, y, x].copy(), ct.spacing, ct.origin, ct.direction.copy(), meta=ct.meta), out)
    return out


@pytest.fixture(scope="module")
def small_cts(tmp_path_factory):
    """Four 8-slice 64x64 crops of the shared 30-slice CT, written as NIfTI (the shared file is never touched)."""
    require_shared(CT_30)
    folder = tmp_path_factory.mktemp("cts")
    return [
        _crop(CT_30, folder / f"ct{k}.nii.gz", slice(z, z + 8), slice(y, y + 64), slice(30, 94))
        for k, (z, y) in enumerate(((0, 10), (8, 20), (16, 30), (22, 37)))
    ]


def _report(outdir):
    with (outdir / "report.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _voxels(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def _rgb(voxels: np.ndarray) -> np.ndarray:
    """NIfTI RGB24 voxels (a structured array) as uint8 (..., 3)."""
    return np.stack([voxels[c] for c in "RGB"], axis=-1)


def _batch(*args, env=None, timeout=240):
    import os
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "napari_ctcolor", "batch", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.numeric
def test_batch_colorize_reports_failures_matches_single_runs_and_skips_finished_on_rerun(small_cts, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a CT\n", encoding="utf-8")
    missing = tmp_path / "missing.nii.gz"
    inputs = [*map(str, small_cts[:2]), str(bad), *map(str, small_cts[2:]), str(missing)]
    before = file_hashes(small_cts[0].parent)
    outdir = tmp_path / "out"
    done = _batch("colorize", *inputs, "-o", str(outdir), "--workers", "2", "--device", "cpu")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    rows = _report(outdir)
    assert list(rows[0]) == ["input", "output", "status", "seconds", "error"]
    assert [r["input"] for r in rows] == inputs  # the inputs' order
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok", "ok", "error"]
    for row in rows:
        if row["status"] == "error":
            assert row["error"] and "\n" not in row["error"] and row["input"] in row["error"], row
        else:
            assert row["error"] == "" and float(row["seconds"]) > 0
    assert "no such file" in rows[5]["error"]
    outputs = [outdir / r["output"] for r in rows if r["status"] == "ok"]
    assert [p.name for p in outputs] == [f"ct{k}.nii.gz" for k in range(4)]
    assert sorted(p.name for p in outdir.iterdir()) == sorted([*(p.name for p in outputs), "report.csv"])

    for ct, output in zip(small_cts, outputs, strict=True):  # each is the single command's output
        single = tmp_path / f"single-{ct.name}"
        alone = ctcolor("colorize", str(ct), "-o", str(single), "--device", "cpu")
        assert alone.returncode == 0, alone.stderr
        (got, got_affine), (want, want_affine) = _voxels(output), _voxels(single)
        assert_same_colors(_rgb(got), _rgb(want), ct.name)
        np.testing.assert_array_equal(got_affine, want_affine)

    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    again = _batch("colorize", *inputs, "-o", str(outdir), "--workers", "1", "--device", "cpu")
    assert again.returncode == 1, again.stderr
    assert "skipping 4 finished" in again.stderr and "0 ok, 2 failed, 4 skipped" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in outputs} == stamps  # not recomputed
    assert [r["status"] for r in _report(outdir)] == [r["status"] for r in rows]
    assert file_hashes(small_cts[0].parent) == before  # inputs unchanged


def test_batch_list_file_and_a_worker_killed_mid_batch_loses_nothing(small_cts, tmp_path):
    """`@list.txt` (blank lines, comments, paths relative to the list); one worker process exits on its first task
    (the test hook), Dask reruns that task on another worker, and every output is written once, complete."""
    listing = tmp_path / "lists" / "inputs.txt"
    (listing.parent / "data").mkdir(parents=True)
    (listing.parent / "data" / small_cts[0].name).write_bytes(small_cts[0].read_bytes())
    lines = ["# four small CTs", "", f"data/{small_cts[0].name}", *(str(p) for p in small_cts[1:]), "  # done", ""]
    listing.write_text("\n".join(lines), encoding="utf-8")  # the relative entry is resolved from the list's folder
    marker = tmp_path / "killed"
    outdir = tmp_path / "out"
    done = _batch(
        "colorize", f"@{listing}", "-o", str(outdir), "--workers", "2", "--device", "cpu", env={KILL_ENV: str(marker)}
    )
    assert done.returncode == 0, done.stderr
    assert marker.exists()  # a worker did die on its first task
    rows = _report(outdir)
    assert [r["status"] for r in rows] == ["ok"] * 4, rows
    assert [r["output"] for r in rows] == [f"ct{k}.nii.gz" for k in range(4)]
    assert not list(outdir.glob(f"{PARTIAL_PREFIX}*")) and not list(outdir.glob(".*"))
    for row, ct in zip(rows, small_cts, strict=True):
        rgb, affine = _voxels(outdir / row["output"])
        assert rgb.shape == read_volume(ct).shape[::-1]


@pytest.mark.numeric
def test_batch_register_pairs_give_the_single_runs_results(tmp_path):
    require_shared(CT_30)
    if not ct_weights_shipped():
        pytest.skip("the project's CT SYMNet weights are not here")
    images = {
        name: _crop(CT_30, tmp_path / f"{name}.nii.gz", slice(z, z + 8), slice(18, 82), slice(29, 93))
        for name, z in (("f0", 4), ("m0", 6), ("f1", 14), ("m1", 12))
    }
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "fixed,moving\nf0.nii.gz,m0.nii.gz\nf1.nii.gz,m1.nii.gz\n", encoding="utf-8"
    )  # relative to the CSV
    outdir = tmp_path / "out"
    # The network alone: `SAME_AS_SINGLE` bounds it (the card's pre-alignment and refinement are not held to them).
    network_alone = ("--refine", "0", "--no-affine")
    done = _batch(
        "register", "--pairs", str(pairs), "-o", str(outdir), "--workers", "2", "--device", "cpu", *network_alone
    )
    assert done.returncode == 0, done.stderr
    rows = _report(outdir)
    assert [(r["output"], r["status"]) for r in rows] == [("f0__m0", "ok"), ("f1__m1", "ok")]
    for k in range(2):
        single = tmp_path / f"single{k}"
        fixed, moving = images[f"f{k}"], images[f"m{k}"]
        alone = ctcolor("register", str(fixed), str(moving), "-o", str(single), "--device", "cpu", *network_alone)
        assert alone.returncode == 0, alone.stderr
        batch_dir = outdir / rows[k]["output"]
        assert sorted(p.name for p in batch_dir.iterdir()) == sorted(p.name for p in single.iterdir())
        names = ("warped", "ddf", "inverse_ddf", "jacobian", "checkerboard")
        got, want = ({n: _voxels(folder / f"{n}.nii.gz") for n in names} for folder in (batch_dir, single))
        assert_same_registration({n: v[0] for n, v in got.items()}, {n: v[0] for n, v in want.items()})
        for name in names:
            np.testing.assert_array_equal(got[name][1], want[name][1], err_msg=name)  # the same affine, exactly


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_batch_usage_errors_exit_2_with_one_line(tmp_path, small_cts, capsys):
    """Each refused before any task: exit 2, one ``error:`` line, nothing written. Three cases run as a whole
    ``ctcolor`` process (its exit code and streams); the others through the same `cli.main` in this process, which
    spares a process start (4-5 s) for each."""
    a_file = tmp_path / "file"
    a_file.write_text("x", encoding="utf-8")
    empty_list = tmp_path / "empty.txt"
    empty_list.write_text("# nothing\n\n", encoding="utf-8")
    bad_pairs = tmp_path / "pairs.csv"
    bad_pairs.write_text("a,b\nx,y\n")
    cases = [
        ("colorize", "-o", str(tmp_path / "o1")),
        ("colorize", f"@{empty_list}", "-o", str(tmp_path / "o2")),
        ("colorize", str(small_cts[0]), "-o", str(a_file)),
        ("colorize", f"@{tmp_path / 'no-list.txt'}", "-o", str(tmp_path / "o3")),
        ("colorize", str(small_cts[0]), "-o", str(tmp_path / "o4"), "--chroma", "2"),
        ("colorize", str(small_cts[0]), "-o", str(tmp_path / "o5"), "--workers", "0"),
        ("colorize", str(small_cts[0]), "-o", str(tmp_path / "o11"), "--batch-size", "0"),
        ("register", "--pairs", str(bad_pairs), "-o", str(tmp_path / "o6")),
        ("register", "--pairs", str(tmp_path / "none.csv"), "-o", str(tmp_path / "o7")),
        ("register", "--pairs", str(bad_pairs), "-o", str(tmp_path / "o10"), "--refine", "banana"),
        ("colorize", str(small_cts[0]), "-o", str(tmp_path / "o8"), "--scheduler", f"tcp://127.0.0.1:{_closed_port()}"),
        # Credentials written into a URL never reach the report or the terminal: refused before anything runs.
        ("colorize", "http://alice:s3cret@127.0.0.1:9/dicom-web/studies/1.2/series/1.3", "-o", str(tmp_path / "o9")),
    ]
    whole = {0, 10, 11}  # no input (argparse's own exit), the unreachable scheduler, the URL with credentials
    for index, args in enumerate(cases):
        if index in whole:
            done = _batch(*args, timeout=60)
            code, stdout, stderr = done.returncode, done.stdout, done.stderr
        else:
            code = main(["batch", *args])
            stdout, stderr = capsys.readouterr()
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, stderr)
        assert_documented(lines[0])
        assert "s3cret" not in stderr + stdout
        if "--refine" in args:  # the single command's message, once, before any pair is read
            assert "--refine must be 'auto' or a number of iterations" in lines[0], lines
        if "--chroma" in args:  # the rule's one function (`color.check_chroma_strength`), as `ctcolor colorize` says it
            assert lines[0] == "error: chroma strength must be in [0, 1], got 2.0", lines
        if "--batch-size" in args:  # the single command's request (`ColorizeRequest.checked`), the same message
            assert lines[0] == "error: batch size must be >= 1, got 0", lines
    assert a_file.read_text(encoding="utf-8") == "x"
    assert not any((tmp_path / f"o{k}").exists() for k in range(1, 12))  # nothing written, not even the folder
