"""The work behind one ``ctcolor register`` call: check the outputs, read, register, write OUTDIR, send. The CLI
and ``ctcolor batch register`` (on Dask workers) both run `register_command` on a `RegisterTask`, and it raises
`InputError` for anything the user can fix.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..errors import InputError
from ..io import Volume, write_nifti, write_vector_nifti
from ..io.dicomweb import is_series_url, send_series
from ..io.prefetch import read_volumes_soon
from ..io.write import atomic_path, new_folder
from .outputs import FromOptions, register_outdir


def prealign_pair(volumes: list[Volume]):
    """The reader child's job for ``ctcolor register``: `prealign` of (fixed, moving), without torch."""
    from ..engines.prealign import prealign

    return prealign(*volumes)


@dataclass(frozen=True)
class RegisterTask(FromOptions):
    """One ``ctcolor register`` run, as its options name it: ``fixed``, ``moving`` (files, folders or DICOMweb series
    URLs), ``outdir``, and the settings as given: ``affine`` True, False or None (the model card's default);
    ``refine`` the CLI's text (``auto`` or an iteration count, `parse_refine`), a count, or None."""

    fixed: str
    moving: str
    outdir: str
    model: str = "ct"
    affine: bool | None = None
    refine: str | int | None = "auto"
    device: str = "auto"
    send: bool = False
    overwrite: bool = False


def register_command(args: RegisterTask, say: Callable[[str], None] = lambda _line: None) -> dict:
    """Everything one `ctcolor register` run does: refuse bad options and outputs, read, register, write OUTDIR.

    Returns the metrics written to metrics.json. `ctcolor batch register` runs exactly this for each pair. Each of
    the registration's quality warnings (``metrics["warnings"]``, also in metrics.json) is issued as a Python
    warning once the outputs are written: `cli.main` prints it as a ``warning: ...`` line on stderr (exit code 0),
    a batch as a warning of that input. ``say`` receives each line the user is told (what was sent).
    """
    send = args.send
    if send and not is_series_url(args.fixed):
        raise InputError("--send stores the warped image into the study of FIXED, which must be a DICOMweb series URL")
    outputs = register_outdir(args)
    # Child processes read the two inputs side by side, and the second pre-aligns them where the pre-alignment will
    # run (SimpleITK only), while this one imports the engine (torch: 1-1.5 s on 2 cores). The CT weights' card turns
    # it on unless --no-affine; any other model's card is read with torch, too late for this, so its pre-alignment
    # runs in the engine.
    early = args.affine or (args.affine is None and str(args.model) == "ct")
    reads, prealigned = read_volumes_soon([args.fixed, args.moving], then=prealign_pair if early else None)
    try:
        from .register_job import RegisterRequest, register_job  # torch: only the commands that need it import it

        # A bad --refine or --device stops here: the reader is a daemonic child, ended at exit, and nothing has been
        # written.
        request = RegisterRequest.checked(args.model, args.affine, args.refine, args.device)
        start = time.perf_counter()
        fixed, moving = (read().finite() for read in reads)  # the checkerboard below reads fixed too
        read_seconds = time.perf_counter() - start  # what reading added after the import: the wait for the child
        source = same_patient_header(args.fixed, args.moving, moving.meta) if send else None
        result = register_job(fixed, moving, request, prealignment=prealigned.result).result
    finally:
        prealigned.cancel()  # unused (a card without pre-alignment, an error before it): the child ends now

    metrics = _write_outdir(outputs["metrics.json"].parent, fixed, result, read_seconds, args)
    if send:  # the warped moving image, on FIXED's grid, joins FIXED's study (the same patient's)
        say(_send_warped(result, fixed, moving, source, args.model))
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


def _write_outdir(outdir: Path, fixed: Volume, result, read_seconds: float, args: RegisterTask) -> dict:
    """Write OUTDIR (`REGISTER_OUTPUTS`), all or nothing; returns the metrics written to metrics.json."""
    from .register_job import checkerboard

    start = time.perf_counter()
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
            tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def _send_warped(result, fixed: Volume, moving: Volume, source, model: str) -> str:
    """``--send``: the warped moving image, on FIXED's grid, stored into FIXED's study as a derived series. Returns
    the line that says so."""
    own = ("modality", "series_description", "window")
    describe = {
        "source_meta": {key: moving.meta[key] for key in own if key in moving.meta},
        "derivation": f"{moving.meta.get('modality') or 'CT'} resampled onto another series' grid by SYMNet "
        f"({result.metrics.get('model', model)}, napari-ctcolor)",
        "suffix": "registered",
    }
    url, count = send_series(result.warped, fixed.meta, source, describe=describe)
    return f"sent {count} instances to {url}"


def same_patient_header(fixed_url: str, moving: str, moving_meta: dict):
    """FIXED's first header (for the sent series' identity), once MOVING is known to be the same patient's: its
    image must never be stored in another patient's study. MOVING must be DICOM (a series URL or a DICOM folder or
    file) so that its PatientID can be compared."""
    import pydicom

    from ..io.dicomweb import series_header

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
