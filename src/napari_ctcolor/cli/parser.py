"""The ``ctcolor`` argument parser: every subcommand, its options and help. Parsing only: each subcommand's work is
in `subcommands` (and below it, the application layer)."""

from __future__ import annotations

import argparse

from .. import __version__
from ..app.export import FORMATS
from ..io.dicomweb import ENV_PASSWORD, ENV_TIMEOUT, ENV_USER
from . import subcommands as run

#: ``ctcolor peer`` choices (`napari_ctcolor.peers.PEER_COMMANDS`; listed here so --help needs no torch import).
PEER_NAMES = ("official-symnet", "ants-syn", "elastix-bspline", "demons", "greedy", "convexadam")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's default prints the usage too; keep it to one line
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


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
    col.add_argument(
        "--window",
        metavar="NAME|CENTRE,WIDTH|auto",
        help="display window (default: the DICOM window); auto: the window napari opens the CT in, or the contrast "
        "window where the colorizer finds contrast-enhanced blood",
    )
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
    col.add_argument("--format", choices=FORMATS, help="default: from OUT's name")
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

    _add_single_commands(sub)
    _add_batch(sub)
    _add_tools(sub)
    return parser


def _add_single_commands(sub) -> None:
    """``info``, ``register``, ``peer``, ``checkerboard``, ``colorize``: one input or pair each."""
    info = sub.add_parser("info", help="describe a CT: shape, spacing, origin, direction, HU range, window")
    info.add_argument("path", help="DICOM folder or file, .nii/.nii.gz, .mha/.mhd, .nrrd, DICOMweb series URL")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read from a folder with several series")
    info.set_defaults(run=run.cmd_info)

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
    reg.set_defaults(run=run.cmd_register)

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
    peer.set_defaults(run=run.cmd_peer)

    board = sub.add_parser("checkerboard", help="alternate cubes of two images (B resampled onto A's grid)")
    board.add_argument("a", help="first image; its grid is the output's")
    board.add_argument("b", help="second image, resampled onto A's grid in physical space when needed")
    board.add_argument("-o", "--output", required=True, metavar="OUT", help=".nii or .nii.gz")
    board.add_argument("--tile-mm", type=float, default=20.0, help="cube side in mm (default: 20)")
    board.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    board.set_defaults(run=run.cmd_checkerboard)

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
    col.set_defaults(run=run.cmd_colorize)


def _add_batch(sub) -> None:
    """``batch colorize`` and ``batch register``: many inputs on Dask, with the single commands' options."""
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
        parser_.set_defaults(run=run.cmd_batch)


def _add_train(sub) -> None:
    """``train colorizer``, ``train symnet`` and ``train compare``."""
    train = sub.add_parser("train", help="train shipped weights from a config, or compare recipes with paired seeds")
    train_sub = train.add_subparsers(
        dest="what", required=True, metavar="colorizer|symnet|compare", parser_class=_Parser
    )
    for what, example in (("colorizer", "configs/colorizer_2d.yaml"), ("symnet", "configs/symnet_ct.yaml")):
        one = train_sub.add_parser(what, help=f"train the {what} of a config and write its weights and model card")
        one.add_argument("--config", required=True, help=f"YAML config, e.g. {example}")
        one.add_argument("--device", default="cpu", help="cpu (reproducible) or cuda")
        one.add_argument("--weights-dir", default="weights", help="where the weights and card go (default: weights)")
        one.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
        one.add_argument("--eval-only", action="store_true", help="only evaluate the existing weights, update the card")
        one.set_defaults(run=run.cmd_train)
    compare = train_sub.add_parser(
        "compare",
        help="train a colorizer or SYMNet recipe and its variants with the same seeds; print the paired differences",
        description="Each VARIANT file holds only the keys it changes in BASE. Every arm trains with the same seeds; "
        "the table gives, per measure, the mean of each arm, the per-seed difference (paired) with its spread, and "
        "the unpaired spread. Runs already in OUT (made with the same settings) are not repeated.",
    )
    compare.add_argument("base", metavar="BASE", help="the recipe, e.g. configs/colorizer_2d_heldout_dicom.yaml")
    compare.add_argument("variants", metavar="VARIANT", nargs="+", help="YAML with the keys a variant changes")
    compare.add_argument("-o", "--out", required=True, metavar="DIR", help="folder for runs, compare.json, compare.md")
    compare.add_argument("--seeds", type=int, default=3, help="seeds per arm: the recipe's seed, +1, ... (default 3)")
    compare.add_argument(
        "--finetune",
        action="store_true",
        help="start every arm from BASE's own weights (weights/ or weights/validation/) at a tenth of its rate",
    )
    compare.add_argument("--steps", type=int, help="steps per run (default: 300 with --finetune, else the recipe's)")
    compare.add_argument(
        "--lr-share", type=float, metavar="S", help="with --finetune: the share of the recipe's rate (default 0.1)"
    )
    compare.add_argument("--weights-dir", default="weights", help="where BASE's weights are (default: weights)")
    compare.add_argument(
        "--data-cache", metavar="DIR", help="prepared training data (default: ~/.cache/napari-ctcolor/training-data)"
    )
    compare.add_argument("--device", default="cpu", help="cpu or cuda")
    compare.add_argument(
        "--jobs", type=int, default=1, help="runs at once, each in its own process (default 1; a GPU server: 6)"
    )
    compare.add_argument(
        "--exams", metavar="NAMES", help="comma-separated exams to measure, e.g. arterial_300,pool_450 (default: all)"
    )
    compare.add_argument(
        "--pairs",
        type=int,
        metavar="N",
        help="SYMNet recipes: held-out deformations measured per case (default: the recipe's val_pairs_per_case)",
    )
    compare.set_defaults(run=run.cmd_train_compare)


def _add_tools(sub) -> None:
    """``pacs find``, ``train``, ``warmup``, ``bench``."""
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
    find.set_defaults(run=run.cmd_pacs_find)

    _add_train(sub)

    warm = sub.add_parser(
        "warmup",
        help="compile the engines' kernels once (otherwise the first colorize after an install compiles them)",
    )
    warm.set_defaults(run=run.cmd_warmup)

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
        help="comma-separated: colorize, pipeline, series, memory, register, register-ct, register-speed, "
        "register-device, batch (default: all)",
    )
    bench.set_defaults(run=run.cmd_bench)
