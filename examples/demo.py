"""The README's main job on the built-in default: make the CT phantom, save it, describe it with `ctcolor info`.

Run: ``python examples/demo.py --out demo-out`` (``make demo`` does this after setting everything up).
With ``--view`` and a display, the phantom opens in napari.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from napari_ctcolor.cli import main as ctcolor
from napari_ctcolor.io import write_nifti
from napari_ctcolor.phantom import make_phantom


def run(out: Path, seed: int = 0, view: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(seed=seed)
    path = write_nifti(phantom.volume, out / "phantom.nii.gz")
    print(f"wrote {path}")
    ctcolor(["info", str(path)])
    if view and os.environ.get("DISPLAY"):
        import napari

        viewer = napari.Viewer()
        viewer.open(str(path), plugin="napari-ctcolor")
        napari.run()
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--view", action="store_true", help="open the result in napari (needs a display)")
    args = parser.parse_args()
    run(args.out, args.seed, args.view)
