"""The work behind one ``ctcolor peer`` call: a registration peer (the official SYMNet recipe, ANTs, elastix,
demons, Greedy, ConvexAdam; `napari_ctcolor.peers`) run as a whole process on a pair, its outputs written as ``ctcolor
register`` writes its own, so that the two are compared file for file."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import Volume, read_volume, write_nifti, write_vector_nifti
from ..io.write import atomic_path
from .outputs import FromOptions, register_outdir


@dataclass(frozen=True)
class PeerTask(FromOptions):
    """One ``ctcolor peer`` run: the peer's ``name`` (`peers.PEER_COMMANDS` or ``official-symnet``, whose checkpoint
    is ``model``), ``fixed``, ``moving`` and ``outdir``."""

    name: str
    fixed: str
    moving: str
    outdir: str
    model: str | None = None
    overwrite: bool = False


def peer_command(args: PeerTask) -> dict:
    """Everything one ``ctcolor peer`` run does: read, run the peer, write OUTDIR (warped image, its field and
    metrics.json, as ``ctcolor register`` names them). Returns the metrics."""
    import nibabel as nib

    from .. import peers
    from ..engines.geometry import resample_onto, same_grid, warp

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
        tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
