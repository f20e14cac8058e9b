"""The README's main job on the built-in default: colorize the CT phantom and write the results.

Writes ``OUT/phantom.nii.gz`` (the CT), ``OUT/phantom_colorized.nii.gz`` (NIfTI RGB24) and ``OUT/montage.png``
(grey CT above, colorized below, four slices), and prints `ctcolor info`. It also writes
``OUT/phantom_followup.nii.gz``: the same phantom turned by 4 degrees and moved by 6, -4 and 3 mm, as a follow-up
scan is positioned differently from the first (the user guide registers it to the first). With a display
(``$DISPLAY``) and ``--view``, both open in napari, the colour overlaid on the CT.

Run: ``python examples/demo.py --out demo-out`` (``make demo`` sets everything up first).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from napari_ctcolor.cli import main as ctcolor
from napari_ctcolor.engines.colorize import colorize
from napari_ctcolor.engines.geometry import resample_onto
from napari_ctcolor.io import Volume, write_nifti
from napari_ctcolor.io.export import write_rgb_nifti
from napari_ctcolor.phantom import make_phantom
from napari_ctcolor.windowing import PRESETS, window


def montage(grey: np.ndarray, rgb: np.ndarray, slices: list[int]) -> np.ndarray:
    """(2 * Y, len(slices) * X, 3) uint8: the grey slices on top, their colorized versions below."""
    top = np.concatenate([np.repeat(np.round(grey[z] * 255).astype(np.uint8)[..., None], 3, -1) for z in slices], 1)
    bottom = np.concatenate([rgb[z] for z in slices], axis=1)
    return np.concatenate([top, bottom], axis=0)


def followup(volume: Volume) -> Volume:
    """``volume`` turned by 4 degrees about the patient's long axis and moved by (6, -4, 3) mm (LPS), on its grid."""
    centre = (volume.affine @ [*(np.asarray(volume.shape[::-1]) - 1) / 2, 1.0])[:3]  # the middle voxel, LPS mm
    motion = sitk.Euler3DTransform(centre.tolist(), 0.0, 0.0, np.deg2rad(4.0), (6.0, -4.0, 3.0))
    return volume.with_array(resample_onto(volume, volume, motion, "linear", default=-1000.0))


def run(out: Path, seed: int = 0, view: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(seed=seed, shape=(48, 384, 384), spacing=(2.5, 0.9, 0.9))
    ct_path = write_nifti(phantom.volume, out / "phantom.nii.gz")
    write_nifti(followup(phantom.volume), out / "phantom_followup.nii.gz")
    ctcolor(["info", str(ct_path)])

    start = time.perf_counter()
    color = colorize(phantom.volume, model="colorizer-2d", window="abdomen")
    seconds = time.perf_counter() - start
    rgb_path = out / "phantom_colorized.nii.gz"
    write_rgb_nifti(color, rgb_path, overwrite=True)
    grey = window(phantom.volume.array, *PRESETS["abdomen"])
    z = phantom.volume.shape[0]
    Image.fromarray(montage(grey, color.rgb, [z // 5, 2 * z // 5, 3 * z // 5, 4 * z // 5])).save(out / "montage.png")
    print(f"colorized {z} slices in {seconds:.1f} s -> {rgb_path}, {out / 'montage.png'}")

    if view and os.environ.get("DISPLAY"):
        import napari

        viewer = napari.Viewer()
        viewer.open(str(ct_path), plugin="napari-ctcolor")
        [layer] = viewer.open(str(rgb_path), plugin="napari-ctcolor")  # an RGB layer at the CT's position
        layer.opacity = 0.8
        napari.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--view", action="store_true", help="open the result in napari (needs a display)")
    args = parser.parse_args()
    run(args.out, args.seed, args.view)
