"""The work behind one `ctcolor colorize` or `ctcolor register` call: check the outputs, read, run the engine,
write, send. `cli` (one input) and `batch` (many, on Dask workers) both run exactly these functions, so this module
sits below both and imports neither.

Each function takes the parsed options as an `argparse.Namespace` (the attributes are the CLI's option names) and
raises `InputError` for anything the user can fix.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import NIFTI_SUFFIXES, Volume, write_nifti, write_vector_nifti
from .io.dicomweb import is_series_url, read_series, send_series
from .io.prefetch import read_volume_soon, read_volumes_soon
from .io.write import atomic_path, new_folder

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


def register_outdir(args: argparse.Namespace, names: Sequence[str] = REGISTER_OUTPUTS) -> dict[str, Path]:
    """The output paths in OUTDIR, after refusing a non-empty OUTDIR (without --overwrite) and input paths."""
    outdir = Path(args.outdir)
    outputs = {name: outdir / name for name in names}
    refuse_input_paths([outdir, *outputs.values()], [args.fixed, args.moving])
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"{outdir}: exists and is not a folder; give a new or empty output folder")
    if outdir.is_dir() and any(outdir.iterdir()) and not args.overwrite:
        raise InputError(f"{outdir}: output folder is not empty; use --overwrite to replace the registration outputs")
    return outputs


def _prealign_pair(volumes: list[Volume]):
    """The reader child's job for ``ctcolor register``: `prealign` of (fixed, moving), without torch."""
    from .engines.prealign import prealign

    return prealign(*volumes)


def register_command(args: argparse.Namespace) -> dict:
    """Everything one `ctcolor register` run does with its parsed options (``fixed``, ``moving``, ``outdir``,
    ``model``, ``affine``, ``refine``, ``device``, ``overwrite``): refuse bad options and outputs, read, register,
    write OUTDIR.

    ``affine`` is True, False or None (the model card's default); ``refine`` is the CLI's text (``auto`` or an
    iteration count, `parse_refine`) or an already parsed count or None.

    Returns the metrics written to metrics.json. `ctcolor batch register` runs exactly this for each pair. Each of
    the registration's quality warnings (``metrics["warnings"]``, also in metrics.json) is issued as a Python
    warning once the outputs are written: `cli.main` prints it as a ``warning: ...`` line on stderr (exit code 0),
    a batch as a warning of that input.
    """
    send = getattr(args, "send", False)
    if send and not is_series_url(args.fixed):
        raise InputError("--send stores the warped image into the study of FIXED, which must be a DICOMweb series URL")
    outputs = register_outdir(args)
    # Child processes read the two inputs side by side, and the second pre-aligns them where the pre-alignment will
    # run (SimpleITK only), while this one imports the engine (torch: 1-1.5 s on 2 cores). The CT weights' card turns
    # it on unless --no-affine; any other model's card is read with torch, too late for this, so its pre-alignment
    # runs in the engine.
    early = args.affine or (args.affine is None and str(args.model) == "ct")
    reads, prealigned = read_volumes_soon([args.fixed, args.moving], then=_prealign_pair if early else None)
    try:
        from .engines.checkerboard import checkerboard
        from .engines.refine import parse_refine
        from .engines.register import register  # torch is imported only by the commands that need it

        # A bad --refine stops here: the reader is a daemonic child, ended at exit, and nothing has been written.
        refine = parse_refine(args.refine) if isinstance(args.refine, str) else args.refine
        start = time.perf_counter()
        fixed, moving = (read().finite() for read in reads)  # the checkerboard below reads fixed too
        read_seconds = time.perf_counter() - start  # what reading added after the import: the wait for the child
        source = same_patient_header(args.fixed, args.moving, moving.meta) if send else None
        result = register(
            fixed,
            moving,
            model=args.model,
            affine=args.affine,
            refine=refine,
            device=args.device,
            prealignment=prealigned.result,
        )
    finally:
        prealigned.cancel()  # unused (a card without pre-alignment, an error before it): the child ends now

    start = time.perf_counter()
    outdir = outputs["metrics.json"].parent
    outdir.parent.mkdir(parents=True, exist_ok=True)
    with new_folder(outdir) as target:  # a new OUTDIR appears only with every output in it
        jobs = [
            partial(write_vector_nifti, result.ddf, fixed, target / "ddf.nii.gz"),
            partial(write_vector_nifti, result.inverse_ddf, fixed, target / "inverse_ddf.nii.gz"),
            partial(write_nifti, result.warped, target / "warped.nii.gz"),
            partial(write_nifti, result.jacobian, target / "jacobian.nii.gz"),
            partial(write_nifti, checkerboard(fixed, result.warped, tile_mm=20.0), target / "checkerboard.nii.gz"),
        ]
        # The two fields dominate (83 MB each on OASIS, ~0.2 s each with igzip, which releases the GIL): threads
        # overlap.
        with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
            for future in [pool.submit(job) for job in jobs]:
                future.result()
        metrics = {
            **result.metrics,
            "read_seconds": round(read_seconds, 3),
            "write_seconds": round(time.perf_counter() - start, 3),
            # File names only: full paths often carry patient names or record numbers.
            "fixed": Path(args.fixed).name,
            "moving": Path(args.moving).name,
        }
        with atomic_path(target / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    if send:  # the warped moving image, on FIXED's grid, joins FIXED's study (the same patient's)
        own = ("modality", "series_description", "window")
        describe = {
            "source_meta": {key: moving.meta[key] for key in own if key in moving.meta},
            "derivation": f"{moving.meta.get('modality') or 'CT'} resampled onto another series' grid by SYMNet "
            f"({result.metrics.get('model', args.model)}, napari-ctcolor)",
            "suffix": "registered",
        }
        url, count = send_series(result.warped, fixed.meta, source, describe=describe)
        print(f"sent {count} instances to {url}")
    logging.getLogger(__name__).info(
        "NCC %.4f -> %.4f, folding %.2g, %.1f s",
        metrics["ncc_before"],
        metrics["ncc_after"],
        metrics["folding_fraction"],
        metrics["seconds"],
    )
    for message in metrics.get("warnings", []):  # a doubtful registration, not a failure: the outputs are written
        warnings.warn(message, stacklevel=1)
    return metrics


def same_patient_header(fixed_url: str, moving: str, moving_meta: dict):
    """FIXED's first header (for the sent series' identity), once MOVING is known to be the same patient's: its
    image must never be stored in another patient's study. MOVING must be DICOM (a series URL or a DICOM folder or
    file) so that its PatientID can be compared."""
    import pydicom

    from .io.dicomweb import series_header

    header = series_header(fixed_url)
    if is_series_url(moving):
        other = series_header(moving)
    elif moving_meta.get("first_file"):
        other = pydicom.dcmread(moving_meta["first_file"], stop_before_pixels=True)
    else:
        raise InputError("--send: MOVING is not DICOM, so it cannot be confirmed as FIXED's patient; nothing is stored")
    if str(other.get("PatientID", "")) != str(header.get("PatientID", "")):
        raise InputError("--send: MOVING belongs to another patient than FIXED; nothing is stored")
    return header


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


def colorize_command(args: argparse.Namespace, show_progress: bool = True) -> Path:
    """Everything one `ctcolor colorize` run does with its parsed options: validate, read, colorize, write OUT
    (and --send). Returns OUT. `ctcolor batch colorize` runs exactly this for each input (without the progress bar).
    """
    from .color import load_palette

    palette = load_palette(args.palette)  # a bad palette file fails before any reading or network work

    out = Path(args.output)
    fmt = args.format or ("nifti" if out.name.lower().endswith(NIFTI_SUFFIXES) else "png")
    if fmt == "nifti" and not out.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputError(f"{out}: NIfTI output needs a .nii or .nii.gz name")
    if fmt != "nifti" and out.name.lower().endswith(NIFTI_SUFFIXES):
        raise InputError(f"{out}: a {fmt} export is a folder; give a folder name, not .nii")
    if fmt != "nifti" and out.suffix.lower() in FILE_SUFFIXES:  # not a folder a user would name so
        raise InputError(
            f"{out}: colorize writes a .nii or .nii.gz file, or a folder of PNG slices or DICOM files "
            f"(--format), not {out.suffix} files"
        )
    remote = is_series_url(args.path)
    check_export_flags(fmt, args.keep_patient_info, args.send, remote)
    check_output(out, folder=fmt != "nifti", inputs=[] if remote else [args.path], overwrite=args.overwrite)
    classes_out = Path(args.classes) if getattr(args, "classes", None) else None
    if classes_out is not None:
        if not classes_out.name.lower().endswith(NIFTI_SUFFIXES):
            raise InputError(f"{classes_out}: --classes writes NIfTI; give a .nii or .nii.gz name")
        if classes_out.resolve() == out.resolve():
            raise InputError(f"{classes_out}: --classes needs a file of its own, not OUT")
        for path in (classes_out, _classes_table(classes_out)):
            check_output(path, folder=False, inputs=[] if remote else [args.path], overwrite=args.overwrite)
    source = None  # a DICOMweb series' first header: the patient and study that --send and --keep-patient-info keep
    if remote and (args.send or args.keep_patient_info):
        volume, source = read_series(args.path, series_uid=args.series, with_source=True)
        read = None
    else:  # read in a child process while this one imports the engine (torch, MONAI: seconds) on the other core
        read = read_volume_soon(args.path, series_uid=args.series)
    from tqdm import tqdm

    from .engines.colorize import colorize
    from .io.export import write_png_slices, write_rgb_dicom, write_rgb_nifti

    if read is not None:
        volume = read()
    modality = volume.meta.get("modality", "OT")
    if modality != "CT" and not args.allow_non_ct:
        # NIfTI/MHA/NRRD carry no modality, only a guess from the values: a CT cropped to soft tissue spans no air or
        # bone but still has fat below 0 HU, and only warns; an image without negative values is not in HU at all.
        if not volume.meta.get("modality_guessed") or float(np.min(volume.array)) >= -50.0:
            what = f"modality is {modality}" if not volume.meta.get("modality_guessed") else "no values below -50 HU"
            raise InputError(f"{args.path}: {what}, not CT; the colorizer is trained on CT (--allow-non-ct)")
        warnings.warn(
            f"{args.path}: its values do not span air to bone in HU; colorizing it as CT (the format has no modality)",
            stacklevel=1,
        )
    total = 2 * volume.shape[0]
    with tqdm(
        total=total, desc="colorize", unit="slice", file=sys.stderr, disable=None if show_progress else True
    ) as bar:

        def progress(done: int, _total: int) -> None:
            bar.update(done - bar.n)

        colour = colorize(
            volume, args.model, args.window, args.chroma, args.device, args.batch_size, palette, progress=progress
        )
    if classes_out is not None:
        _write_classes(colour, volume, palette, classes_out)
    if fmt == "nifti":
        write_rgb_nifti(colour, out, overwrite=args.overwrite)
    elif fmt == "png":
        write_png_slices(colour, out, overwrite=args.overwrite)
    else:
        first = source or volume.meta.get("first_file")  # the read series' own header, never another's
        sources = [first] if args.keep_patient_info and first else None
        written = write_rgb_dicom(
            colour,
            out,
            volume.meta,
            keep_patient_info=args.keep_patient_info,
            source_datasets=sources,
            overwrite=args.overwrite,
        )
        if args.send:  # the sent series always keeps the patient's identity: it joins the patient's own study
            url, count = send_series(colour, volume.meta, source, written if args.keep_patient_info else None)
            print(f"sent {count} instances to {url}")
    return out


def _classes_table(labels_path: Path) -> Path:
    """LABELS.nii.gz -> LABELS.json beside it."""
    name = labels_path.name
    stem = name[: -len(next(x for x in NIFTI_SUFFIXES if name.lower().endswith(x)))]
    return labels_path.with_name(stem + ".json")


def _write_classes(colour, volume, palette, path: Path) -> None:
    """`ctcolor colorize --classes`: the most probable class of each voxel (what the widget's pointer and class
    layer show) as a uint8 label map on the CT's grid, and its names and palette colours as JSON."""
    chroma = colour.chroma
    labels = chroma.most_probable(volume.array)
    write_nifti(Volume(labels, volume.spacing, volume.origin, volume.direction), path)
    table = {
        "labels": {str(k + 1): name for k, name in enumerate(chroma.classes) if name != "air"},
        "rgb": {name: palette.class_rgb(name) for name in chroma.classes if name != "air"},
        "palette": palette.name,
        "model": chroma.model,
        "note": "0: air (no colour class shown); the class a voxel is coloured as, not a segmentation",
    }
    with atomic_path(_classes_table(path)) as tmp:
        tmp.write_text(json.dumps(table, indent=1))


def check_export_flags(fmt: str, keep_patient_info: bool, send: bool, remote: bool = True) -> None:
    """`--keep-patient-info` and `--send` need `--format dicom`; `--send` also a DICOMweb series URL input
    (``remote``). Shared with `ctcolor batch colorize`, which checks them once before any input is read."""
    if keep_patient_info and fmt != "dicom":
        raise InputError("--keep-patient-info applies to --format dicom only")
    if send and (fmt != "dicom" or not remote):
        raise InputError("--send stores a --format dicom output back into the study of a DICOMweb series URL input")
