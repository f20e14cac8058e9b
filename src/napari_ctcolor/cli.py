"""The `ctcolor` command line. Every subcommand is a thin wrapper over the same engine calls the napari widgets use.

Exit codes: 0 ok; 2 input error (one stderr line starting "error: ", no traceback); 1 unexpected.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence

import numpy as np

from . import __version__
from .io import InputError, Volume, read_volume
from .windowing import default_window


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


def _cmd_info(args: argparse.Namespace) -> int:
    volume = read_volume(args.path, series_uid=args.series)
    info = volume_info(volume)
    if args.json:
        print(json.dumps(info))
        return 0
    z, y, x = info["shape"]
    print(f"{args.path}")
    print(f"  modality     {info['modality']}  {info['series_description']}".rstrip())
    print(f"  shape        {z} slices x {y} x {x} ({info['dtype']})")
    print("  spacing      {:.4g} x {:.4g} x {:.4g} mm (z, y, x)".format(*info["spacing"]))
    print("  origin       {:.2f}, {:.2f}, {:.2f} mm (x, y, z LPS)".format(*info["origin"]))
    print("  direction    " + " ".join(f"{v:+.3f}" for v in info["direction"]))
    print(f"  range        {info['hu_min']} .. {info['hu_max']}")
    print("  window       centre {:g}, width {:g}".format(*info["window"]))
    if info["series_count"] > 1:
        print(f"  series       {info['series_count']} in the folder (this is the largest CT one; --series UID picks)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctcolor", description="Colorize and register CT volumes (napari-ctcolor).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    info = sub.add_parser("info", help="describe a CT: shape, spacing, origin, direction, HU range, window")
    info.add_argument("path", help="DICOM folder or file, .nii/.nii.gz, .mha/.mhd, .nrrd")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read from a folder with several series")
    info.set_defaults(run=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
    for message in dict.fromkeys(str(w.message) for w in caught if w.category is not DeprecationWarning):
        print(f"warning: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
