"""The README's main job on the built-in default: colorize the CT phantom and write the results.

Writes ``OUT/phantom.nii.gz`` (the CT), ``OUT/phantom_colorized.nii.gz`` (NIfTI RGB24) and ``OUT/montage.png``
(grey CT above, colorized below, four slices), and prints `ctcolor info`. With a display (``$DISPLAY``) and
``--view``, both open in napari, the colour overlaid on the CT.

Run: ``python examples/demo.py --out demo-out`` (``make demo`` sets everything up first).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from napari_ctcolor.cli import main as ctcolor
from napari_ctcolor.engines.colorize import colorize
from napari_ctcolor.io import write_nifti
from napari_ctcolor.io.export import write_rgb_nifti
from napari_ctcolor.phantom import make_phantom
from napari_ctcolor.windowing import PRESETS, window


def montage(grey: np.ndarray, rgb: np.ndarray, slices: list[int]) -> np.ndarray:
    """(2 * Y, len(slices) * X, 3) uint8: the grey slices on top, their colorized versions below."""
    top = np.concatenate([np.repeat(np.round(grey[z] * 255).astype(np.uint8)[..., None], 3, -1) for z in slices], 1)
    bottom = np.concatenate([rgb[z] for z in slices], axis=1)
    return np.concatenate([top, bottom], axis=0)


def run(out: Path, seed: int = 0, view: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(seed=seed, shape=(48, 384, 384), spacing=(2.5, 0.9, 0.9))
    ct_path = write_nifti(phantom.volume, out / "phantom.nii.gz")
    ctcolor(["info", str(ct_path)])

    start = time.perf_counter()
    colour = colorize(phantom.volume, model="colorizer-2d", window="abdomen")
    seconds = time.perf_counter() - start
    rgb_path = out / "phantom_colorized.nii.gz"
    write_rgb_nifti(colour, rgb_path, overwrite=True)
    grey = window(phantom.volume.array, *PRESETS["abdomen"])
    z = phantom.volume.shape[0]
    Image.fromarray(montage(grey, colour.rgb, [z // 5, 2 * z // 5, 3 * z // 5, 4 * z // 5])).save(out / "montage.png")
    print(f"colorized {z} slices in {seconds:.1f} s -> {rgb_path}, {out / 'montage.png'}")

    if view and os.environ.get("DISPLAY"):
        import napari

        viewer = napari.Viewer()
        viewer.open(str(ct_path), plugin="napari-ctcolor")
        viewer.add_image(colour.rgb, rgb=True, name="phantom colorized", opacity=0.8, **colour.napari_kwargs())
        napari.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--view", action="store_true", help="open the result in napari (needs a display)")
    args = parser.parse_args()
    run(args.out, args.seed, args.view)
