"""The CUDA path through the commands users run: ``ctcolor colorize`` and ``ctcolor register`` with ``--device cuda``,
each compared with the same command on the CPU in the same run (skipped without a CUDA device; CI has none, a lent
GPU runs them: BENCHMARKS.md says when).

Tolerances come from the arithmetic, not from bit equality across devices:
- colorize: the colorizer runs in bfloat16 on CUDA (8-bit mantissa: logits move by ~0.4 % of their size) and in
  float32 or bfloat16 on the CPU, so class probabilities, and the colours mixed from them, differ a little where two
  classes are close. Luminance is composed exactly on both (`LUMINANCE_BOUND`); colours are bounded as the engine's
  own CUDA test bounds them (CIE76 mean < 2, 99th percentile < 6).
- register with the CT weights: the network runs in bfloat16 on CUDA; the field it seeds is refined by the same
  demons scheme on each device (numba's kernels on the CPU, torch on CUDA), so the two ddfs may differ by a fraction
  of a voxel where the images give no contrast. Bounded in the
  body at a tenth of the 3 mm voxel on average, a voxel at the 99th percentile, and the warped labels' Dice within
  0.01. The inverse of the refined map is computed on each device (`register.inverse`) within the same bounds.
- register with the official checkpoint: float32 on CUDA, without TF32 convolutions, so parity with the official
  reference holds to the same 1e-3 as on the CPU.

Measured on a lent H100 (2026-11-24, torch 2.11.0+cu130, against its 16-core Xeon): CIE76 mean 0.022 / 0.020, 99th
percentile 0.62 / 0.59 (2D / 3D); ddf gap 0.001 / 0.011 mm (mean / p99), Dice 0.9613 / 0.9614; official parity
3.0e-05.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from napari_ctcolor.color import grey_to_lightness, srgb_to_lab
from napari_ctcolor.engines.geometry import resample_onto, warp
from napari_ctcolor.io import Volume, read_color_volume, read_volume, write_nifti
from napari_ctcolor.windowing import window

from conftest import CT_DIR, LUMINANCE_BOUND, ct_weights_shipped, ctcolor, require_shared
from test_register import CT, OASIS, _deformed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def run(*args: str) -> None:
    """``ctcolor ARGS`` as its own process, which must succeed."""
    done = ctcolor(*args, timeout=900)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("model", ["colorizer-2d", "colorizer-3d"])
def test_cli_colorize_on_cuda_keeps_luminance_exact_and_the_cpu_colors(dicom_series, tmp_path, model):
    ct = read_volume(dicom_series)
    rgb = {}
    for k, device in enumerate(("cuda", "cpu")):
        out = tmp_path / f"{k}-{device}.nii.gz"
        run("colorize", str(dicom_series), "-o", str(out), "--window", "abdomen", "--model", model, "--device", device)
        rgb[device] = read_color_volume(out).rgb
    grey = grey_to_lightness(window(ct.array, 40, 400))
    for device, color in rgb.items():
        assert color.shape == (*ct.shape, 3)
        assert np.abs(srgb_to_lab(color)[..., 0] - grey).max() <= LUMINANCE_BOUND, device
    delta_e = np.linalg.norm(srgb_to_lab(rgb["cuda"]) - srgb_to_lab(rgb["cpu"]), axis=-1)  # CIE76
    print(f"\n{model} cuda vs cpu: CIE76 mean {delta_e.mean():.3f}, p99 {np.percentile(delta_e, 99):.2f}")
    assert delta_e.mean() < 2.0 and np.percentile(delta_e, 99) < 6.0


def test_cli_register_ct_on_cuda_gives_the_cpu_registration(tmp_path):
    if not ct_weights_shipped():
        pytest.skip("weights/symnet-ct.safetensors is not shipped in this checkout")
    ct = read_volume(require_shared(CT))
    # The whole CT's labels on this 30-slice grid (as the GPU run of 2026-11-24 measured them).
    labels = read_volume(require_shared(CT_DIR / "totalseg-body-3mm-labels.nii.gz"))
    labels = Volume(resample_onto(labels, ct, interpolator="nearest"), ct.spacing, ct.origin, ct.direction)
    moving, moving_labels = _deformed(ct, labels, seed=5)
    paths = [tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"]
    write_nifti(ct, paths[0])
    write_nifti(moving, paths[1])
    out = {}
    for k, device in enumerate(("cuda", "cpu")):
        folder = tmp_path / f"{k}-{device}"
        run("register", *map(str, paths), "-o", str(folder), "--device", device)
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        fields = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{f}.nii.gz"))) for f in ("ddf", "inverse_ddf"))
        out[device] = metrics, *fields
        assert metrics["folding_fraction"] <= 5e-4 and not metrics["warnings"], (device, metrics["warnings"])
    assert out["cuda"][0]["network_dtype"] == "bfloat16"
    body = ct.array > -500
    gap = np.linalg.norm(out["cuda"][1] - out["cpu"][1], axis=-1)[body]
    inverse_gap = np.linalg.norm(out["cuda"][2] - out["cpu"][2], axis=-1)[body]  # inverted on each device
    dice = {}
    for device, (_, ddf, _) in out.items():
        warped = warp(moving_labels, ct, ddf, "nearest", 0)
        organs = labels.array > 0
        dice[device] = (
            2 * float((warped[organs] == labels.array[organs]).sum()) / float(organs.sum() + (warped > 0).sum())
        )
    print(
        f"\nsymnet-ct cuda vs cpu: ddf gap {gap.mean():.3f} / {np.percentile(gap, 99):.3f} mm (mean / p99), "
        f"inverse {inverse_gap.mean():.3f} / {np.percentile(inverse_gap, 99):.3f} mm, "
        f"Dice {dice['cuda']:.4f} / {dice['cpu']:.4f}, seconds {out['cuda'][0]['seconds']:.1f} / "
        f"{out['cpu'][0]['seconds']:.1f}"
    )
    assert gap.mean() <= 0.3 and np.percentile(gap, 99) <= 3.0
    assert inverse_gap.mean() <= 0.3 and np.percentile(inverse_gap, 99) <= 3.0
    assert abs(dice["cuda"] - dice["cpu"]) <= 0.01


def test_cli_register_official_checkpoint_on_cuda_keeps_parity(tmp_path):
    checkpoint = require_shared(OASIS / "SYMNet_neurite_oasis_smo30_update_80000.pth")
    paths = [OASIS / "image_A_full_size.nii.gz", OASIS / "image_B_full_size.nii.gz"]
    reference = nib.load(OASIS / "reference-warped-B-to-A.nii.gz").get_fdata()
    moving = nib.load(paths[1]).get_fdata()
    low, high = moving.min(), moving.max()
    out = tmp_path / "out"
    run("register", *map(str, paths), "-o", str(out), "--model", str(checkpoint), "--device", "cuda")
    diff = np.abs((nib.load(out / "warped.nii.gz").get_fdata() - low) / (high - low) - reference)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    print(f"\nofficial checkpoint on cuda vs official reference: max {diff.max():.2e}, {metrics['seconds']:.1f} s")
    assert metrics["network_dtype"] == "float32" and diff.max() <= 1e-3
