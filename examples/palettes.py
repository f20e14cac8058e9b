"""One network run, several palettes: colorize a CT once, then recompose it in the anatomical and the DICOM colours.

    python examples/palettes.py PATH [--out DIR]

PATH is any CT `ctcolor` reads (a DICOM folder, NIfTI, MHA, NRRD). Writes ``DIR/anatomical.nii.gz`` and
``DIR/dicom.nii.gz`` (NIfTI RGB24 on the CT's grid) and prints the colour classes the CT shows most, with their share
of the volume and their colour in each palette.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_ctcolor.engines.colorize import compose_chroma, predict_chroma
from napari_ctcolor.io import read_volume
from napari_ctcolor.io.export import write_rgb_nifti
from napari_ctcolor.palettes import load_palette


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--out", default="palettes-out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    ct = read_volume(args.path)
    chroma = predict_chroma(ct, "colorizer-2d")  # the network, once: class probabilities at ~3.5 mm
    for palette in ("anatomical", "dicom"):
        color = compose_chroma(ct, chroma, "abdomen", palette=palette)  # no network run
        write_rgb_nifti(color, out / f"{palette}.nii.gz", overwrite=True)
    shares = sorted(chroma.class_shares().items(), key=lambda item: -item[1])[:12]
    anatomical, dicom = load_palette("anatomical"), load_palette("dicom")
    for name, share in shares:
        print(f"{name:30s} {share:6.1%}  anatomical {anatomical.class_rgb(name)}  dicom {dicom.class_rgb(name)}")


if __name__ == "__main__":
    main()
