"""The work behind one ``ctcolor colorize`` call: check the options and outputs, read, colorize, write OUT (and
``--classes``), send. The CLI and ``ctcolor batch colorize`` (on Dask workers) both run `colorize_command` on a
`ColorizeTask`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import NIFTI_SUFFIXES, Volume, write_nifti
from ..io.dicomweb import is_series_url, read_series
from ..io.prefetch import read_volume_soon
from ..io.write import atomic_path
from .export import export_color, identity_of, send_color
from .outputs import FILE_SUFFIXES, FromOptions, check_export_flags, check_output
from .window import AUTO_WINDOW, blood_hu


@dataclass(frozen=True)
class ColorizeTask(FromOptions):
    """One ``ctcolor colorize`` run, as its options name it: the CT (``path``: a file, a folder or a DICOMweb series
    URL; ``series``), OUT and what is written with it (``format``, ``classes``, ``keep_patient_info``, ``send``,
    ``overwrite``), and the colour settings as given (checked into a `ColorizeRequest` once the CT is read)."""

    path: str
    output: str
    window: str | None = None
    model: str = "colorizer-2d"  # `weights.COLORIZER_DEFAULT`, written out: this module imports no torch
    device: str = "auto"
    batch_size: int | None = None
    chroma: float = 1.0
    palette: str = "anatomical"
    format: str | None = None
    classes: str | None = None
    series: str | None = None
    keep_patient_info: bool = False
    allow_non_ct: bool = False
    send: bool = False
    overwrite: bool = False


def colorize_command(
    args: ColorizeTask,
    progress: Callable[[int, int], None] | None = None,
    say: Callable[[str], None] = lambda _line: None,
) -> Path:
    """Everything one `ctcolor colorize` run does: validate, read, colorize, write OUT (and --send). Returns OUT.
    ``progress(done, total)`` follows the colorizing; ``say`` receives each line the user is told (the window chosen
    for contrast, what was sent). `ctcolor batch colorize` runs exactly this for each input.
    """
    from ..palettes import load_palette

    palette = load_palette(args.palette)  # a bad palette file fails before any reading or network work
    out, fmt, classes_out = _check_outputs(args)
    remote = is_series_url(args.path)
    source = None  # a DICOMweb series' first header: the patient and study that --send and --keep-patient-info keep
    if remote and (args.send or args.keep_patient_info):
        volume, source = read_series(args.path, series_uid=args.series, with_source=True)
        read = None
    else:  # read in a child process while this one imports the engine (torch, MONAI: seconds) on the other core
        read = read_volume_soon(args.path, series_uid=args.series)
    from ..engines.device import start_device
    from .colorize_job import ColorizeRequest, colorize_job

    start_device(args.device)  # while the child process reads
    if read is not None:
        volume = read()
    try:  # before the network: a DICOM export that cannot keep the identity asked for is refused now
        identity = identity_of(volume.meta, args.keep_patient_info, fetched=source)
    except InputError as exc:
        raise InputError(f"{args.path}: {exc}") from None
    _check_modality(volume, args)
    request = ColorizeRequest.checked(
        volume, args.window, palette, args.chroma, args.device, args.model, args.batch_size
    )
    outcome = colorize_job(volume, request, progress=progress)
    color = outcome.color
    blood = blood_hu(volume) if str(args.window).strip().lower() == AUTO_WINDOW else None
    if blood is not None:  # the window the CT opens in: its HU show enhanced blood
        win = request.window
        say(f"window {win.centre:g}/{win.width:g}: contrast-enhanced blood found (median {blood:.0f} HU)")
    if outcome.contrast is not None:
        blood, win = outcome.contrast
        say(f"window {win.centre:g}/{win.width:g}: contrast-enhanced blood found (median {blood:.0f} HU)")
    if classes_out is not None:
        _write_classes(color, volume, palette, classes_out)
    written = export_color(color, volume.meta, out, fmt, identity, overwrite=args.overwrite)
    if args.send:
        url, count = send_color(color, volume.meta, written, identity, fetched=source)
        say(f"sent {count} instances to {url}")
    return out


def _check_outputs(args: ColorizeTask) -> tuple[Path, str, Path | None]:
    """OUT, its format and the ``--classes`` path, refused before any work when they cannot be written."""
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
    inputs = [] if remote else [args.path]
    check_output(out, folder=fmt != "nifti", inputs=inputs, overwrite=args.overwrite)
    classes_out = Path(args.classes) if args.classes else None
    if classes_out is not None:
        if not classes_out.name.lower().endswith(NIFTI_SUFFIXES):
            raise InputError(f"{classes_out}: --classes writes NIfTI; give a .nii or .nii.gz name")
        if classes_out.resolve() == out.resolve():
            raise InputError(f"{classes_out}: --classes needs a file of its own, not OUT")
        for path in (classes_out, _classes_table(classes_out)):
            check_output(path, folder=False, inputs=inputs, overwrite=args.overwrite)
    return out, fmt, classes_out


def _check_modality(volume: Volume, args: ColorizeTask) -> None:
    """Refuse an image that is not CT (unless ``--allow-non-ct``); warn for a file format without a modality whose
    values do not span air to bone."""
    modality = volume.meta.get("modality", "OT")
    if modality == "CT" or args.allow_non_ct:
        return
    # NIfTI/MHA/NRRD carry no modality, only a guess from the values: a CT cropped to soft tissue spans no air or
    # bone but still has fat below 0 HU, and only warns; an image without negative values is not in HU at all.
    if not volume.meta.get("modality_guessed") or float(np.min(volume.array)) >= -50.0:
        what = f"modality is {modality}" if not volume.meta.get("modality_guessed") else "no values below -50 HU"
        raise InputError(f"{args.path}: {what}, not CT; the colorizer is trained on CT (--allow-non-ct)")
    warnings.warn(
        f"{args.path}: its values do not span air to bone in HU; colorizing it as CT (the format has no modality)",
        stacklevel=1,
    )


def _classes_table(labels_path: Path) -> Path:
    """LABELS.nii.gz -> LABELS.json beside it."""
    name = labels_path.name
    stem = name[: -len(next(x for x in NIFTI_SUFFIXES if name.lower().endswith(x)))]
    return labels_path.with_name(stem + ".json")


def _write_classes(color, volume, palette, path: Path) -> None:
    """`ctcolor colorize --classes`: the most probable class of each voxel (what the widget's pointer and class
    layer show) as a uint8 label map on the CT's grid, and its names and palette colours as JSON."""
    chroma = color.chroma
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
        tmp.write_text(json.dumps(table, indent=1), encoding="utf-8")
