"""The `ctcolor` command line. Every subcommand is a thin wrapper over the same engine calls the napari widgets use.

Exit codes: 0 ok; 2 input error (one stderr line starting "error: ", no traceback); 1 unexpected.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .batch import run_batch
from .commands import OUT_OF_MEMORY, check_output, colorize_command, register_command, register_outdir
from .errors import InputError
from .io import NIFTI_SUFFIXES, ColorVolume, Volume, read_image, read_volume, write_nifti, write_vector_nifti
from .io.dicomweb import ENV_PASSWORD, ENV_TIMEOUT, ENV_USER
from .io.write import atomic_path
from .windowing import default_window

#: ``ctcolor peer`` choices (`napari_ctcolor.peers.PEER_COMMANDS`; listed here so --help needs no torch import).
PEER_NAMES = ("official-symnet", "ants-syn", "elastix-bspline", "demons", "greedy", "convexadam")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints the usage too; keep it to one line
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def volume_info(volume: Volume) -> dict:
    """The `ctcolor info --json` record of a volume (keys fixed by the CLI contract, a few more after them)."""
    array = volume.array
    finite = array if array.dtype.kind in "iu" else array[np.isfinite(array)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (float("nan"), float("nan"))
    as_number = int if array.dtype.kind in "iu" else float
    return {
        "shape": list(volume.shape),
        "spacing": list(volume.spacing),
        "origin": list(volume.origin),
        "direction": volume.direction.flatten().tolist(),
        "modality": volume.meta.get("modality", "OT"),
        "hu_min": as_number(lo),
        "hu_max": as_number(hi),
        "window": list(default_window(volume)),
        "series_count": int(volume.meta.get("series_count", 1)),
        "series_description": volume.meta.get("series_description", ""),
        "dtype": str(array.dtype),
        "format": volume.meta.get("format", ""),
        **{k: volume.meta[k] for k in ("irregular_spacing", "missing_slices") if k in volume.meta},
    }


def colour_info(colour: ColorVolume) -> dict:
    """The `ctcolor info --json` record of an RGB volume (what `ctcolor colorize` writes)."""
    return {
        "shape": list(colour.rgb.shape[:3]),
        "spacing": list(colour.spacing),
        "origin": list(colour.origin),
        "direction": colour.direction.flatten().tolist(),
        "modality": "RGB",
        "dtype": "uint8 RGB",
        "format": colour.settings.get("format", ""),
        "geometry_known": colour.settings.get("geometry") != "none",
    }


def _cmd_info(args: argparse.Namespace) -> int:
    image = read_image(args.path, series_uid=args.series)
    colour = isinstance(image, ColorVolume)
    info = colour_info(image) if colour else volume_info(image)
    if args.json:
        print(json.dumps(info))
        return 0
    z, y, x = info["shape"]
    print(f"{args.path}")
    if colour:
        print("  colour       RGB, 8 bits per channel (a colorized rendering, not CT numbers)")
        print(f"  shape        {z} slices x {y} x {x}")
    else:
        print(f"  modality     {info['modality']}  {info['series_description']}".rstrip())
        print(f"  shape        {z} slices x {y} x {x} ({info['dtype']})")
    print("  spacing      {:.4g} x {:.4g} x {:.4g} mm (z, y, x)".format(*info["spacing"]))
    print("  origin       {:.2f}, {:.2f}, {:.2f} mm (x, y, z LPS)".format(*info["origin"]))
    print("  direction    " + " ".join(f"{v:+.3f}" for v in info["direction"]))
    if colour:
        if not info["geometry_known"]:
            print("  geometry     none stored (PNG slices without geometry.json): 1 mm slices at the origin")
        return 0
    print(f"  range        {info['hu_min']} .. {info['hu_max']}")
    print("  window       centre {:g}, width {:g}".format(*info["window"]))
    if info["series_count"] > 1:
        print(f"  series       {info['series_count']} in the folder (this is the largest CT one; --series UID picks)")
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    register_command(args)
    return 0


def _cmd_peer(args: argparse.Namespace) -> int:
    """A registration peer as a whole process: the official SYMNet recipe or a classical method (`peers`)."""
    import nibabel as nib

    from . import peers
    from .engines.geometry import resample_onto, same_grid, warp

    names = ("warped.nii.gz", "flow.nii.gz" if args.name == "official-symnet" else "ddf.nii.gz", "metrics.json")
    outputs = register_outdir(args, names)
    outdir = outputs["metrics.json"].parent
    if args.name == "official-symnet":
        if not args.model:
            raise InputError("official-symnet needs --model, the official SYMNet .pth checkpoint")
        start = time.perf_counter()
        warped, f_ba, affine = peers.official_symnet(args.fixed, args.moving, args.model)
        seconds = time.perf_counter() - start
        outdir.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(warped, affine), str(outdir / "warped.nii.gz"))
        nib.save(nib.Nifti1Image(f_ba, affine), str(outdir / "flow.nii.gz"))
    else:
        fixed, moving = read_volume(args.fixed).finite(), read_volume(args.moving).finite()
        on_grid = moving if same_grid(fixed, moving) else None
        if on_grid is None:
            low = float(np.nanmin(moving.array))
            on_grid = Volume(
                resample_onto(moving, fixed, None, "linear", default=low),
                fixed.spacing,
                fixed.origin,
                fixed.direction.copy(),
                meta=moving.meta,
            )
        start = time.perf_counter()
        result = peers.run_peer(peers.PEER_COMMANDS[args.name], fixed, on_grid)
        seconds = time.perf_counter() - start
        # Peers return index-axis mm; the direction turns them into LPS (the ddf convention of `ctcolor register`).
        ddf = np.ascontiguousarray(result.ddf_mm @ fixed.direction.T, dtype=np.float32)
        warped = Volume(warp(moving, fixed, ddf), fixed.spacing, fixed.origin, fixed.direction.copy())
        outdir.mkdir(parents=True, exist_ok=True)
        write_nifti(warped, outdir / "warped.nii.gz")
        write_vector_nifti(ddf, fixed, outdir / "ddf.nii.gz")
    metrics = {
        "peer": args.name,
        "seconds": round(seconds, 3),
        "fixed": Path(args.fixed).name,
        "moving": Path(args.moving).name,
    }
    with atomic_path(outdir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def _cmd_checkerboard(args: argparse.Namespace) -> int:
    from .engines.checkerboard import checkerboard

    out = Path(args.output)
    if not out.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputError(f"{out}: the checkerboard is written as NIfTI; name it .nii or .nii.gz")
    check_output(out, folder=False, inputs=[args.a, args.b], overwrite=args.overwrite)
    a, b = read_volume(args.a).finite(), read_volume(args.b).finite()
    write_nifti(checkerboard(a, b, tile_mm=args.tile_mm), out)
    return 0


def _cmd_colorize(args: argparse.Namespace) -> int:
    colorize_command(args)
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    return run_batch(args)  # dask itself is imported only when a batch runs


def _cmd_pacs_find(args: argparse.Namespace) -> int:
    from .io.dicomweb import find_series

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


def _cmd_train(args: argparse.Namespace) -> int:
    if args.what == "symnet":
        from .training.symnet import run
    else:
        from .training.colorizer import run
    path = run(Path(args.config), Path(args.weights_dir), args.device, args.resume, args.eval_only)
    print(f"updated the metrics in {path}" if args.eval_only else f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def _cmd_warmup(args: argparse.Namespace) -> int:
    from .engines.warmup import warm_kernels

    seconds = warm_kernels()
    print("kernels ready: " + ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items()))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import SECTIONS, markdown_section, markdown_table, run_bench

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
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        with atomic_path(Path(args.markdown)) as tmp:
            tmp.write_text(markdown_section(report))
    return 0


def _add_register_options(reg: argparse.ArgumentParser) -> None:
    """The options of `ctcolor register` that `ctcolor batch register` shares."""
    reg.add_argument(
        "--model", default="ct", metavar="ct|FILE", help="'ct' (the project's CT weights) or a SYMNet .pth checkpoint"
    )
    reg.add_argument(
        "--affine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="rigid + affine pre-alignment (SimpleITK, mutual information) before SYMNet (default: the model card's; "
        "on for the CT weights, off for an official checkpoint)",
    )
    reg.add_argument(
        "--refine",
        default="auto",
        metavar="auto|0|N",
        help="demons iterations at the fixed image's full resolution, seeded by the network's field (0: the network "
        "alone; auto: the model card's default, which refines with the CT weights and not with an official "
        "checkpoint)",
    )
    reg.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default: auto")
    reg.add_argument(
        "--send",
        action="store_true",
        help="with FIXED a DICOMweb series URL: also store the warped image as a DICOM series into FIXED's study "
        "(STOW-RS), keeping the patient's identity there",
    )


def _add_colorize_options(col: argparse.ArgumentParser) -> None:
    """The options of `ctcolor colorize` that `ctcolor batch colorize` shares."""
    col.add_argument("--window", metavar="NAME|CENTRE,WIDTH", help="display window (default: the DICOM window)")
    col.add_argument(
        "--model", default="colorizer-2d", metavar="NAME|FILE", help="colorizer-2d, colorizer-3d or a .safetensors file"
    )
    col.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default: auto")
    col.add_argument("--batch-size", type=int, metavar="N", help="slices per network batch")
    col.add_argument("--chroma", type=float, default=1.0, metavar="0..1", help="colour strength (0: grey CT)")
    col.add_argument(
        "--palette",
        default="anatomical",
        metavar="anatomical|dicom|FILE.csv",
        help="colours of the structures: anatomical (cryosection-like, default), dicom (DICOM recommended display "
        "colours), or a CSV of name,R,G,B",
    )
    col.add_argument("--format", choices=("nifti", "png", "dicom"), help="default: from OUT's name")
    col.add_argument("--keep-patient-info", action="store_true", help="DICOM export keeps patient identifiers")
    col.add_argument("--allow-non-ct", action="store_true", help="colorize a non-CT image anyway")
    col.add_argument(
        "--send",
        action="store_true",
        help="with a DICOMweb series URL and --format dicom: also store the series into the source study (STOW-RS), "
        "keeping the patient's identity there",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctcolor", description="Colorize and register CT volumes (napari-ctcolor).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="describe a CT: shape, spacing, origin, direction, HU range, window")
    info.add_argument("path", help="DICOM folder or file, .nii/.nii.gz, .mha/.mhd, .nrrd, DICOMweb series URL")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read from a folder with several series")
    info.set_defaults(run=_cmd_info)

    reg = sub.add_parser(
        "register",
        help="register MOVING to FIXED with SYMNet: warped image, displacement fields, Jacobian, checkerboard",
        description="Writes OUTDIR/warped.nii.gz (MOVING in FIXED's space, original units), ddf.nii.gz and "
        "inverse_ddf.nii.gz (NIfTI vector images, mm, LPS, ITK convention: FIXED point p maps to MOVING point "
        "p + ddf(p)), jacobian.nii.gz, checkerboard.nii.gz (FIXED vs warped, 20 mm tiles) and metrics.json.",
    )
    reg.add_argument("fixed", help="the reference image (its grid is the outputs' grid)")
    reg.add_argument("moving", help="the image to deform onto FIXED")
    reg.add_argument("-o", "--output", dest="outdir", required=True, metavar="OUTDIR", help="new or empty folder")
    _add_register_options(reg)
    reg.add_argument("--overwrite", action="store_true", help="replace the outputs in a non-empty OUTDIR")
    reg.set_defaults(run=_cmd_register)

    peer = sub.add_parser(
        "peer",
        help="run a registration peer as its own process: the official SYMNet recipe, ANTs SyN, elastix, demons, "
        "Greedy, ConvexAdam",
        description="official-symnet: the official SYMNet inference recipe (nibabel arrays as stored, min-max, plain "
        "fp32, four sequential integrations), writing OUTDIR/warped.nii.gz (min-max units) and flow.nii.gz (F_BA, "
        "voxels). The others: OUTDIR/warped.nii.gz and ddf.nii.gz (mm, LPS, as register's). "
        "All write metrics.json with the seconds. For benchmarks: `ctcolor bench` times these and register alike.",
    )
    peer.add_argument("name", choices=sorted(PEER_NAMES), help="which peer")
    peer.add_argument("fixed", help="the reference image")
    peer.add_argument("moving", help="the image to deform onto FIXED")
    peer.add_argument("-o", "--output", dest="outdir", required=True, metavar="OUTDIR", help="new or empty folder")
    peer.add_argument("--model", metavar="FILE", help="official-symnet: the official SYMNet .pth checkpoint")
    peer.add_argument("--overwrite", action="store_true", help="replace the outputs in a non-empty OUTDIR")
    peer.set_defaults(run=_cmd_peer)

    board = sub.add_parser("checkerboard", help="alternate cubes of two images (B resampled onto A's grid)")
    board.add_argument("a", help="first image; its grid is the output's")
    board.add_argument("b", help="second image, resampled onto A's grid in physical space when needed")
    board.add_argument("-o", "--output", required=True, metavar="OUT", help=".nii or .nii.gz")
    board.add_argument("--tile-mm", type=float, default=20.0, help="cube side in mm (default: 20)")
    board.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    board.set_defaults(run=_cmd_checkerboard)

    col = sub.add_parser(
        "colorize",
        help="colorize a CT: CNN colour with the windowed CT as exact luminance",
        description="OUT *.nii/*.nii.gz: NIfTI-1 RGB24 with the input's affine; a folder: one PNG per slice; "
        "--format dicom: an RGB DICOM series (Secondary Capture), de-identified unless --keep-patient-info.",
    )
    col.add_argument("path", help="CT: DICOM folder or file, .nii/.nii.gz, .mha/.mhd, .nrrd, DICOMweb series URL")
    col.add_argument("-o", "--output", required=True, metavar="OUT", help=".nii/.nii.gz file or a folder")
    _add_colorize_options(col)
    col.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read from a folder with several series")
    col.add_argument(
        "--classes",
        metavar="LABELS.nii.gz",
        help="also write each voxel's most probable colour class as a label map on the CT's grid (uint8: 0 air, k "
        "the k-th class; names and palette colours in LABELS.json beside it)",
    )
    col.add_argument("--overwrite", action="store_true", help="replace an existing output")
    col.set_defaults(run=_cmd_colorize)

    batch = sub.add_parser(
        "batch",
        help="colorize many CTs or register many pairs on Dask (a local cluster or a given scheduler)",
        description="Each input runs exactly what the single command runs, on Dask workers; OUTDIR/report.csv says "
        "per input: input, output, status (ok or error), seconds, error. A re-run skips the inputs a previous report "
        "lists as ok whose output exists. Exit 0 when all are ok, 1 when some failed.",
    )
    batch_sub = batch.add_subparsers(dest="batch_command", required=True, parser_class=_Parser)
    bcol = batch_sub.add_parser("colorize", help="colorize each INPUT into OUTDIR (NIfTI RGB24 by default)")
    bcol.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="CT path, DICOMweb series URL, or @LIST.txt (one per line; blank lines and # comments ignored; "
        "relative paths are from the list's folder)",
    )
    breg = batch_sub.add_parser("register", help="register each fixed,moving pair of a CSV, one subfolder each")
    breg.add_argument(
        "--pairs", required=True, metavar="PAIRS.csv", help="CSV with columns fixed,moving (paths relative to it)"
    )
    for parser_, options in ((bcol, _add_colorize_options), (breg, _add_register_options)):
        parser_.add_argument("-o", "--output", dest="outdir", required=True, metavar="OUTDIR", help="output folder")
        parser_.add_argument(
            "--workers", type=int, metavar="N", help="local worker processes, one thread each (default: cores, <= 4)"
        )
        parser_.add_argument(
            "--scheduler", metavar="tcp://HOST:PORT", help="run on this Dask cluster instead of a local one"
        )
        options(parser_)
        parser_.add_argument(
            "--overwrite", action="store_true", help="redo every input, replacing its output (default: skip finished)"
        )
        parser_.set_defaults(run=_cmd_batch)

    pacs = sub.add_parser(
        "pacs",
        help="find series on a PACS over DICOMweb (their URLs work wherever a PATH does)",
        description=f"Credentials: {ENV_USER} and {ENV_PASSWORD}, or a netrc entry for the server's host; "
        f"{ENV_TIMEOUT} sets the seconds to wait (default 60).",
    )
    pacs_sub = pacs.add_subparsers(dest="pacs_command", required=True, parser_class=_Parser)
    find = pacs_sub.add_parser("find", help="list series (QIDO-RS): patient ID, study date, description, slices")
    find.add_argument("--server", required=True, metavar="URL", help="DICOMweb root, e.g. http://host:8042/dicom-web")
    find.add_argument("--patient-id", metavar="ID", help="PatientID (wildcards * and ? as the server supports)")
    find.add_argument("--accession", metavar="N", help="AccessionNumber")
    find.add_argument("--study-date", metavar="YYYYMMDD[-YYYYMMDD]", help="study date or range")
    find.add_argument("--modality", metavar="CT", help="series modality")
    find.add_argument("--json", action="store_true", help="print a JSON list (UIDs and url of each series)")
    find.set_defaults(run=_cmd_pacs_find)

    train = sub.add_parser("train", help="train shipped weights from a config (colorizer or symnet)")
    train.add_argument("what", choices=("colorizer", "symnet"), help="what to train")
    train.add_argument("--config", required=True, help="YAML config, e.g. configs/colorizer_2d.yaml or symnet_ct.yaml")
    train.add_argument("--device", default="cpu", help="cpu (reproducible) or cuda")
    train.add_argument("--weights-dir", default="weights", help="where the weights and card go (default: weights)")
    train.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    train.add_argument("--eval-only", action="store_true", help="only evaluate the existing weights, update the card")
    train.set_defaults(run=_cmd_train)

    warm = sub.add_parser(
        "warmup",
        help="compile the engines' kernels once (the first colorize after an install otherwise spends ~15 s on it)",
    )
    warm.set_defaults(run=_cmd_warmup)

    bench = sub.add_parser(
        "bench",
        help="measure colorize and register speed and memory, with the peers in the same run",
        description="Prints a markdown table (median (min..max) over repeats) with the machine and commit.",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny volumes, few repeats, every section (about 2.5 minutes on 2 cores)",
    )
    bench.add_argument("--json", metavar="OUT", help="write the machine description and all rows as JSON")
    bench.add_argument("--markdown", metavar="OUT", help="write a dated BENCHMARKS.md-style section")
    bench.add_argument(
        "--only",
        metavar="SECTIONS",
        help="comma-separated: colorize, series, memory, register, register-ct, register-speed, batch (default: all)",
    )
    bench.set_defaults(run=_cmd_bench)
    return parser


def _reuse_freed_memory() -> None:
    """Let glibc keep freed memory for reuse in this process instead of handing every large block back to the OS.

    glibc serves blocks over 32 MB with mmap and unmaps them when freed, so each field-sized temporary of a
    registration (83 MB on the OASIS pair) is page-faulted in afresh: `ctcolor register` spent 11.8 s of system time
    in 27 s of wall time. Serving them from the heap and trimming it only above 1 GiB free cuts the run to 20 s; peak
    resident memory rises from 2.6 to 3.9 GB (`BYTES_PER_VOXEL` accounts for it). A no-op where mallopt is absent.
    """
    from .memory import libc_function

    mallopt = libc_function("mallopt")
    if mallopt is None:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 1 << 30)


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--window -600,1500`` as ``--window=-600,1500``: argparse takes a value that starts with "-" and is not a
    plain number for an option, and the lung window's centre is negative."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--window" and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"--window={arg}"
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
    # Only for registration (its field-sized temporaries), only in the ctcolor process itself, not a caller's
    # (tests, scripts) that shares its allocator; not for `ctcolor peer`, which reproduces other tools' recipes as
    # they run, with the default allocator; and not for colorize, whose peak memory it would raise.
    if argv is None and args.command == "register":
        _reuse_freed_memory()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    # pydicom logs every oddity of a damaged file; our own InputError says what matters, in one line.
    logging.getLogger("pydicom").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    # Warnings are held back and shown only when the command succeeds: an error exit prints exactly one line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = args.run(args)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # permissions, a full disk: the user can fix these too
            print(f"error: {exc}".splitlines()[0], file=sys.stderr)
            return 2
        except RuntimeError as exc:
            if "out of memory" not in str(exc):
                raise
            print(f"error: {OUT_OF_MEMORY}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
    for message in dict.fromkeys(str(w.message) for w in caught if w.category is not DeprecationWarning):
        print(f"warning: {message}", file=sys.stderr)
    if argv is None:
        # The ctcolor process is about to exit: the interpreter's teardown would walk torch's and MONAI's hundreds of
        # thousands of objects with the cycle collector (0.8 s). Frozen, they are left for the OS to reclaim. Every
        # output is written and closed by now; atexit handlers and stream flushes still run.
        gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(main())
