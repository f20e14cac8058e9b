"""``ctcolor bench --only register-device``: whole ``ctcolor register`` processes on every device of this machine in
the same run (the GPU bundle's rows, docs/gpu-server.md), with the share of each stage of the engine.

The pairs need only the shared data the bundle carries: the 3 mm CT against a smooth deformation of itself, and the
20-slice 512² contrast series repeated forwards and backwards to `LARGE_SLICES` slices against itself turned
`TURN_DEG` about the patient's long axis and moved `SHIFT_MM` to the patient's left (``quick``: the 30-slice cut and the
20 slices).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from ..errors import CTColorError
from ..io import Volume, read_volume, write_nifti
from .runs import bench_devices, bench_row, ctcolor_seconds, seconds_row

LARGE_SLICES = 141
TURN_DEG, SHIFT_MM = 4.0, 7.0
SECTION = "register device"
ITEM = "ctcolor register (whole process)"


def _turned(volume: Volume, degrees: float, shift_mm: float) -> Volume:
    """``volume`` turned about its centre's z axis and moved along x (LPS), on its own grid (air outside)."""
    import SimpleITK as sitk

    image = volume.to_sitk()
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    turn = sitk.Euler3DTransform(centre, 0.0, 0.0, np.deg2rad(degrees), (shift_mm, 0.0, 0.0))
    moved = sitk.Resample(image, image, turn, sitk.sitkLinear, -1024.0, image.GetPixelID())
    return Volume.from_sitk(moved)


def _pairs(data: Path, quick: bool) -> list[tuple[str, Volume, Volume]]:
    """(label, fixed, moving) of the section's pairs."""
    from ..training.symnet import PHASE_NOISE_HU, deform_pair

    small = read_volume(data / "ct" / ("totalseg-body-3mm-30slices.nii.gz" if quick else "totalseg-body-3mm.nii.gz"))
    rng = np.random.default_rng(81)
    labels = np.zeros(small.shape, dtype=np.uint8)
    pair = deform_pair(small.array, labels, small.spacing, rng, {"max_mm": 15.0, "noise_hu": (PHASE_NOISE_HU,) * 2})
    geometry = {"spacing": small.spacing, "origin": small.origin, "direction": small.direction}
    out = [
        (
            "x".join(map(str, small.shape[::-1])) + " 3 mm CT, smooth 15 mm",
            Volume(pair.fixed[0, 0].numpy(), **geometry),
            Volume(pair.moving[0, 0].numpy(), **geometry),
        )
    ]
    series = read_volume(data / "ct" / "totalseg-abdomen-dicom")
    count = series.shape[0] if quick else LARGE_SLICES
    order = np.concatenate(
        [np.arange(series.shape[0])[:: 1 - 2 * (k % 2)] for k in range(-(-count // series.shape[0]))]
    )
    large = Volume(series.array[order[:count]], series.spacing, series.origin, series.direction)
    label = "x".join(map(str, large.shape[::-1])) + f" contrast series, turned {TURN_DEG:g} deg, moved {SHIFT_MM:g} mm"
    out.append((label, large, _turned(large, TURN_DEG, SHIFT_MM)))
    return out


def _shares(metrics: dict) -> str:
    stages = metrics.get("stage_seconds") or {}
    total = sum(stages.values()) or 1.0
    return ", ".join(f"{name} {seconds / total:.0%}" for name, seconds in stages.items())


def bench_register_device(quick: bool) -> list[dict]:
    """One whole ``ctcolor register`` process per pair (`_pairs`) and device, in this run: its wall seconds, with
    NCC before and after and the share of each engine stage in the note."""
    from ..training.data import shared_data_dir

    try:
        data = shared_data_dir()
        pairs = _pairs(data, quick)
    except (OSError, CTColorError) as exc:
        return [bench_row(SECTION, ITEM, "cpu", "", "s", note=f"not measured: {str(exc).splitlines()[0]}")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, fixed, moving) in enumerate(pairs):
            paths = [Path(tmp) / f"{k}-{name}.nii.gz" for name in ("fixed", "moving")]
            write_nifti(fixed, paths[0])
            write_nifti(moving, paths[1])
            for device in bench_devices():
                out = Path(tmp) / f"{k}-{device}"
                seconds = ctcolor_seconds(["register", *map(str, paths), "-o", str(out), "--device", device])
                metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
                note = f"NCC {metrics['ncc_before']:.3f} -> {metrics['ncc_after']:.3f}; stages: {_shares(metrics)}"
                rows.append(seconds_row(SECTION, ITEM, device, label, [seconds], note=note))
    return rows
