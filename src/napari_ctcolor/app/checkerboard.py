"""The work behind ``ctcolor checkerboard``: two images read, alternated in cubes, written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..io import NIFTI_SUFFIXES, read_volume, write_nifti
from .outputs import FromOptions, check_output


@dataclass(frozen=True)
class CheckerboardTask(FromOptions):
    """One ``ctcolor checkerboard`` run: images ``a`` and ``b``, ``output`` (NIfTI), the cube side ``tile_mm``."""

    a: str
    b: str
    output: str
    tile_mm: float = 20.0
    overwrite: bool = False


def checkerboard_command(args: CheckerboardTask) -> Path:
    """``ctcolor checkerboard A B -o OUT``: alternate cubes of ``--tile-mm`` from two images on A's grid, as NIfTI.
    Returns OUT."""
    from ..engines.checkerboard import checkerboard

    out = Path(args.output)
    if not out.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputError(f"{out}: the checkerboard is written as NIfTI; name it .nii or .nii.gz")
    check_output(out, folder=False, inputs=[args.a, args.b], overwrite=args.overwrite)
    a, b = read_volume(args.a).finite(), read_volume(args.b).finite()
    write_nifti(checkerboard(a, b, tile_mm=args.tile_mm), out)
    return out
