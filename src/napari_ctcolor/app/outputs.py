"""Where a job writes: checks made before any work (an output that is an input, an existing output without
``--overwrite``, a format flag without its format), shared by every job and by ``ctcolor batch``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import InputError

#: What a CUDA out-of-memory error becomes (the single commands and each batch input).
OUT_OF_MEMORY = "the GPU ran out of memory; use a smaller --batch-size or --device cpu"


#: `ctcolor register` writes exactly these files into OUTDIR (the CLI contract).
REGISTER_OUTPUTS = (
    "warped.nii.gz",
    "ddf.nii.gz",
    "inverse_ddf.nii.gz",
    "jacobian.nii.gz",
    "checkerboard.nii.gz",
    "metrics.json",
)


def refuse_input_paths(outputs: Sequence[Path], inputs: Sequence[str]) -> None:
    """Raise InputError when an output path is one of the inputs (a file, or the folder of a DICOM series)."""
    resolved = {Path(p).resolve(): p for p in inputs}
    for path in outputs:
        if path.resolve() in resolved:
            raise InputError(f"{path}: output would overwrite the input {resolved[path.resolve()]}")


def register_outdir(args: Any, names: Sequence[str] = REGISTER_OUTPUTS) -> dict[str, Path]:
    """The output paths in OUTDIR, after refusing a non-empty OUTDIR (without --overwrite) and input paths. ``args``:
    a `RegisterTask` or ``ctcolor peer``'s parsed options (``outdir``, ``fixed``, ``moving``, ``overwrite``)."""
    outdir = Path(args.outdir)
    outputs = {name: outdir / name for name in names}
    refuse_input_paths([outdir, *outputs.values()], [args.fixed, args.moving])
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"{outdir}: exists and is not a folder; give a new or empty output folder")
    if outdir.is_dir() and any(outdir.iterdir()) and not args.overwrite:
        raise InputError(f"{outdir}: output folder is not empty; use --overwrite to replace the registration outputs")
    return outputs


def check_output(out: Path, folder: bool, inputs: Sequence[str], overwrite: bool) -> None:
    """Refuse, before any work: outputs that are or contain an input, and existing outputs without --overwrite."""
    refuse_input_paths([out], inputs)
    resolved = out.resolve()
    for given in inputs:
        if folder and resolved in Path(given).resolve().parents:
            raise InputError(f"{out}: the input {given} is inside this output folder; choose another folder")
    if not out.parent.exists():
        raise InputError(f"{out}: folder {out.parent} does not exist")
    if not out.parent.is_dir():
        raise InputError(f"{out}: {out.parent} is a file, not a folder")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists; use --overwrite to replace it")


#: Output names that look like a file of another format: ``colorize -o x.mha`` is refused, not made a PNG folder.
FILE_SUFFIXES = (
    ".mha", ".mhd", ".nrrd", ".nhdr", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".gz", ".zip", ".txt",
    ".json", ".csv", ".npy", ".npz", ".h5",
)  # fmt: skip


def check_export_flags(fmt: str, keep_patient_info: bool, send: bool, remote: bool = True) -> None:
    """`--keep-patient-info` and `--send` need `--format dicom`; `--send` also a DICOMweb series URL input
    (``remote``). Shared with `ctcolor batch colorize`, which checks them once before any input is read."""
    if keep_patient_info and fmt != "dicom":
        raise InputError("--keep-patient-info applies to --format dicom only")
    if send and (fmt != "dicom" or not remote):
        raise InputError("--send stores a --format dicom output back into the study of a DICOMweb series URL input")


class FromOptions:
    """A command's task (a dataclass) built from parsed options: the CLI's, or a batch's for one input."""

    @classmethod
    def of(cls, options: Mapping[str, Any]):
        """The task of ``options``; the options of other commands (a batch's own, say) are ignored."""
        names = {field.name for field in fields(cls)}
        return cls(**{name: value for name, value in options.items() if name in names})
