"""What each ``ctcolor`` subcommand runs: a call into the application layer (`napari_ctcolor.app`), training or
the bench, and the lines it prints. Each returns the exit code."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError
from ..io import ColorVolume, read_image
from ..io.write import atomic_path


def cmd_info(args: argparse.Namespace) -> int:
    from ..app.info import color_info, volume_info

    image = read_image(args.path, series_uid=args.series)
    color = isinstance(image, ColorVolume)
    info = color_info(image) if color else volume_info(image)
    if args.json:
        print(json.dumps(info))
        return 0
    z, y, x = info["shape"]
    print(f"{args.path}")
    if color:
        print("  colour       RGB, 8 bits per channel (a colorized rendering, not CT numbers)")
        print(f"  shape        {z} slices x {y} x {x}")
    else:
        print(f"  modality     {info['modality']}  {info['series_description']}".rstrip())
        print(f"  shape        {z} slices x {y} x {x} ({info['dtype']})")
    print("  spacing      {:.4g} x {:.4g} x {:.4g} mm (z, y, x)".format(*info["spacing"]))
    print("  origin       {:.2f}, {:.2f}, {:.2f} mm (x, y, z LPS)".format(*info["origin"]))
    print("  direction    " + " ".join(f"{v:+.3f}" for v in info["direction"]))
    if not info.get("position_known", True):
        print("  position     unknown: the header gives none, the origin above is a placeholder (0, 0, 0)")
    if info.get("geometry_source"):
        print(f"  geometry     from the {info['geometry_source']}")
    if color:
        if not info["geometry_known"]:
            print("  geometry     none stored (PNG slices without geometry.json): 1 mm slices at the origin")
        return 0
    print(f"  range        {info['hu_min']} .. {info['hu_max']}")
    print("  window       centre {:g}, width {:g}".format(*info["window"]))
    for centre, width in info.get("windows", [])[1:]:
        print(f"               centre {centre:g}, width {width:g} (also offered by the header)")
    if info.get("contrast"):
        print(f"  contrast     {info['contrast']} (the header says contrast was given)")
    if info["series_count"] > 1:
        print(f"  series       {info['series_count']} in the folder (this is the largest CT one; --series UID picks)")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from ..app.register import RegisterTask, register_command

    register_command(RegisterTask.of(vars(args)), say=print)
    return 0


def cmd_peer(args: argparse.Namespace) -> int:
    """A registration peer as a whole process: the official SYMNet recipe or a classical method (`peers`)."""
    from ..app.peer import PeerTask, peer_command

    peer_command(PeerTask.of(vars(args)))
    return 0


def cmd_checkerboard(args: argparse.Namespace) -> int:
    from ..app.checkerboard import CheckerboardTask, checkerboard_command

    checkerboard_command(CheckerboardTask.of(vars(args)))
    return 0


def cmd_colorize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..app.colorize import ColorizeTask, colorize_command

    bars: list[tqdm] = []  # made at the first step: a refused setting prints its one error line and nothing else

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="colorize", unit="slice", file=sys.stderr, disable=None))
        bars[0].update(done - bars[0].n)

    try:
        colorize_command(ColorizeTask.of(vars(args)), progress=progress, say=tqdm.write)
    finally:
        for bar in bars:
            bar.close()
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    return run_batch(args)  # dask itself is imported only when a batch runs


def cmd_pacs_find(args: argparse.Namespace) -> int:
    from ..io.dicomweb import find_series

    rows = find_series(args.server, args.patient_id, args.accession, args.study_date, args.modality)
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no matching series", file=sys.stderr)
        return 0
    header = ("PATIENT ID", "STUDY DATE", "MODALITY", "SLICES", "DESCRIPTION", "URL")
    table = [
        tuple(
            "" if v is None else str(v)
            for v in (
                r["PatientID"],
                r["StudyDate"],
                r["Modality"],
                r["NumberOfSeriesRelatedInstances"],
                r["SeriesDescription"],
                r["url"],
            )
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *table)) for i in range(len(header) - 1)]
    for row in (header, *table):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..app.training import train

    path = train(args.what, Path(args.config), Path(args.weights_dir), args.device, args.resume, args.eval_only)
    print(f"updated the metrics in {path}" if args.eval_only else f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def cmd_train_compare(args: argparse.Namespace) -> int:
    from ..app.training import compare_recipes

    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps {args.steps}: at least one step")
    if args.lr_share is not None and not 0 < args.lr_share <= 1:
        raise InputError(f"--lr-share {args.lr_share}: a share of the recipe's rate, above 0 and at most 1")
    table = compare_recipes(
        Path(args.base),
        [Path(v) for v in args.variants],
        Path(args.out),
        seeds=args.seeds,
        finetune=args.finetune,
        steps=args.steps,
        lr_share=args.lr_share,
        weights_dir=Path(args.weights_dir),
        data_cache=Path(args.data_cache) if args.data_cache else None,
        device=args.device,
        exams=args.exams.split(",") if args.exams else None,
        pairs=args.pairs,
        jobs=args.jobs,
        log=lambda message: print(message, file=sys.stderr),
    )
    print(table)
    print(f"all rows: {Path(args.out) / 'compare.md'}")
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    from ..app.warmup import warm_kernels

    seconds = warm_kernels()
    print("kernels ready: " + ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.common import markdown_table
    from ..bench.runs import SECTIONS, markdown_section, run_bench

    outputs = [Path(p) for p in (args.json, args.markdown) if p]
    for out in outputs:
        if not out.parent.exists():
            raise InputError(f"{out}: folder {out.parent} does not exist")
    only = args.only.split(",") if args.only else SECTIONS
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        raise InputError(f"--only: unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    report = run_bench(
        quick=args.quick, log=lambda message: print(f"bench: {message}", file=sys.stderr, flush=True), only=only
    )
    print(markdown_table(report["rows"]))
    if args.json:
        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        with atomic_path(Path(args.markdown)) as tmp:
            tmp.write_text(markdown_section(report), encoding="utf-8")
    return 0
