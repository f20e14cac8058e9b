"""`ctcolor bench`: colorize and register throughput, peak memory, and peers measured in the same run.

Importable without Qt. Every timed figure is a median over repeats with its min and max; comparisons (ours vs the
seed thesis's network, SYMNet vs SimpleITK demons) run in the same process so their ratio is meaningful on a noisy
shared machine. Rows are plain dicts (JSON-ready); a row that could not be measured has ``median`` None and a
``note`` starting "not measured" or "not installed".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from .colour import (
    BATCH_INPUTS,
    BATCH_WORKERS,
    PIPELINE_SLICES,
    SIZES,
    bench_batch,
    bench_colorize,
    bench_pipeline,
    bench_rss,
    bench_series,
)
from .common import machine_info, machine_line, make_row, markdown_table
from .register import bench_register, bench_register_ct, bench_register_device, bench_register_speed

#: ``ctcolor bench --only`` section names.
SECTIONS = (
    "colorize",
    "pipeline",
    "series",
    "memory",
    "register",
    "register-ct",
    "register-speed",
    "register-device",
    "batch",
)


def run_bench(
    quick: bool = False, log: Callable[[str], None] | None = None, only: Sequence[str] = SECTIONS
) -> dict[str, Any]:
    """The benchmarks of the sections in ``only`` (all by default); ``quick`` is a smoke run (tiny volumes, 1 warm-up
    + 2 repeats, no full-size registration or RSS subprocess). Returns ``{"machine": ..., "quick": ..., "seconds":
    ..., "sections": [...], "rows": [...]}``.
    """
    log = log or (lambda _message: None)
    start = time.perf_counter()
    info = machine_info()
    rows: list[dict] = []
    if "colorize" in only:
        log("colorize" + " (quick)" * quick)
        # quick: 512² alone (the 3D network's four slices take seconds a call at any size)
        rows += bench_colorize(slices=4, repeats=1, sizes=SIZES[:1]) if quick else bench_colorize(slices=60, repeats=5)
    if "pipeline" in only:
        log("pipeline (network alone, in process and whole processes, per device" + ", quick: 20 slices" * quick + ")")
        rows += bench_pipeline(quick=quick, repeats=1 if quick else 3)
    if "series" in only:
        log("series (a whole ctcolor colorize process on a real DICOM folder" + ", quick: 20 slices" * quick + ")")
        rows += bench_series(quick=quick, repeats=1 if quick else 3)
    if "memory" in only:
        if quick:
            note = "not measured: --quick"
            rows.append(make_row("memory", "colorizer-2d peak RSS - baseline", "cpu", "512x512x600", "MB", note=note))
        else:
            log("peak RSS, 512x512x600 (subprocess)")
            rows += bench_rss()
    if "register" in only:
        log("register (OASIS pair" + ", quick: 64^3 crop)" * quick + ")" * (not quick))
        rows += bench_register(quick=quick, repeats=1 if quick else 3)
    if "register-ct" in only:
        log("register CT (deformations of the shared CTs, whole processes" + ", quick: one pair" * quick + ")")
        rows += bench_register_ct(quick=quick)
    if "register-speed" in only:
        log(
            "register speed (ours in process and as a process against every peer" + ", quick: a small cut" * quick + ")"
        )
        rows += bench_register_speed(quick=quick)
    if "register-device" in only:
        log("register on each device (whole processes" + ", quick: the 30-slice cut, 20 slices of 128²" * quick + ")")
        rows += bench_register_device(quick=quick)
    if "batch" in only:
        log(f"batch ({BATCH_INPUTS} series, {BATCH_WORKERS}-worker LocalCluster vs sequential processes)")
        rows += bench_batch(quick=quick, repeats=1 if quick else 3)
    seconds = round(time.perf_counter() - start, 1)
    return {"machine": info, "quick": quick, "seconds": seconds, "sections": list(only), "rows": rows}


#: What each section measures, for the markdown section (only the sections that ran are described).
_DESCRIPTIONS = (
    (
        ("colorize", "memory"),
        "Colorize: end to end (HU in memory -> network -> sRGB uint8), phantom CT at 0.78 mm (512²) and 1.56 mm "
        "(256²) pixels, window abdomen, chroma 1; the peer is the seed thesis's network alone (random weights) at full "
        "resolution.",
    ),
    (
        ("pipeline",),
        "Pipeline: the shared 20-slice contrast abdomen DICOM series (512²) repeated forwards and backwards to "
        f"{PIPELINE_SLICES} slices; the network's forward passes timed inside one colorize call (hooks that wait "
        "for the device), the whole colorize call in process (HU in memory -> sRGB uint8, window abdomen), and whole "
        "`ctcolor colorize` processes of that volume as .nii.gz and of the DICOM series, on each device.",
    ),
    (
        ("series",),
        "Series: a whole `ctcolor colorize FOLDER -o out.nii.gz` process (start-up, DICOM reading, network, "
        "composition, gzip NIfTI writing) on the shared 2 mm Philips chest CT resampled to 1 mm and written as an "
        "uncompressed DICOM series of 282 slices of 512²; peak RSS of that process (its VmHWM).",
    ),
    (
        ("register",),
        "Register: the OASIS pair with the official SYMNet checkpoint; every method is a whole process in "
        "this run (`ctcolor register`, `ctcolor peer official-symnet`, the official inference recipe reimplemented, "
        "and `ctcolor peer` for ANTs SyN: SyNOnly, Mattes, 100/70/50 iterations; elastix: default B-spline map, 20 mm "
        "grid, 256 iterations; SimpleITK fast symmetric demons, 50 iterations), wall seconds including start-up, "
        "reading and writing.",
    ),
    (
        ("register-ct",),
        "Register CT: Dice (mean over structures of >= 100 voxels) after registering held-out synthetic deformations "
        "(<= 15 mm; seed never used in training) of the shared labelled CTs on their native grids (the 3 mm CT is in "
        "the training set with other deformations, the DICOM series never is), and two breathing-like deformations (<="
        " 20 mm, the lung bases most) of each unlabelled chest CT (in-plane pixels averaged 2x2) with lungs, bone and "
        "airways from HU as labels: one smooth across the chest (the spine moves too), one that slides along the chest"
        " wall (the lungs, mediastinum and abdomen move; the spine, ribs and body wall stay); each pair also with the "
        "moving scan in another contrast phase (labelled: arteries -150 HU, veins and liver brighter, kidneys and "
        "spleen darker; chest: enhancing soft tissue +80 HU; 20 HU noise). `ctcolor register` with its defaults and "
        "with `--refine 0`, and `ctcolor peer` for each peer, every one a whole process in this run (start-up, reading"
        " and writing NIfTI included); the moving labels are warped through each written ddf.nii.gz by SimpleITK "
        "(nearest).",
    ),
    (
        ("register-device",),
        "Register device: a whole `ctcolor register` process (CT weights, defaults) per pair and device in this run: "
        "the 3 mm CT against a smooth 15 mm deformation of itself, and the 20-slice contrast series repeated to 141 "
        "slices of 512² against itself turned 4 degrees about the long axis and moved 7 mm; NCC and each engine "
        "stage's share in the note.",
    ),
    (
        ("batch",),
        "Batch: `ctcolor batch colorize` of 8 series (copies of the shared 30-slice CT) on a 2-worker LocalCluster "
        "against 8 sequential `ctcolor colorize` processes, each a whole process in this run, wall seconds including "
        "start-up, reading and writing.",
    ),
)


def markdown_section(report: dict[str, Any]) -> str:
    """A BENCHMARKS.md-style dated section for a `run_bench` report."""
    info = report["machine"]
    kind = "quick smoke run" if report["quick"] else "full run"
    if list(report.get("sections", SECTIONS)) != list(SECTIONS):
        kind += ", sections " + ", ".join(report["sections"])
    gpu = "GPU" if info["gpu"] != "none" else "CPU"
    return (
        f"## {info['date']}, {gpu} (`ctcolor bench`{' --quick' if report['quick'] else ''}, {kind}, "
        f"{report['seconds']} s)\n\n"
        f"{machine_line(info)}\n\n"
        f"{' '.join(text for names, text in _DESCRIPTIONS if set(names) & set(report.get('sections', SECTIONS)))}\n\n"
        f"{markdown_table(report['rows'])}\n"
    )
