"""The colorize stages as a GPU runs them (batched torch operations: enclosure, guided upsampling, composition), checked
on the CPU: ``CTCOLOR_TORCH_STAGES=1`` makes the CPU take that path (`engines.device.runs_torch_stages`).

Tolerances from the arithmetic:
- the enclosure is integer work (connected components, hole areas against thresholds): the torch labelling
  (`components.label_components`) must give exactly scipy's components, so its bits equal the CPU path's;
- the composition is the same float32 arithmetic as the fused numba kernel in another order (and the exp where the
  kernel interpolates a table, 5e-6 apart): one 8-bit code apart at most, on at most 2 % of the voxels (0.7 % on
  the 30-slice cut, 2026-11-26), the luminance within `LUMINANCE_BOUND` on both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.overrides import TorchFunctionMode

from napari_ctcolor.color import grey_to_lightness, srgb_to_lab
from napari_ctcolor.engines.colorize import compose_chroma, predict_chroma
from napari_ctcolor.engines.colorize.components import component_sizes, label_components, seeded
from napari_ctcolor.engines.colorize.enclosure import DEVICE_SLICES, enclosure_bits
from napari_ctcolor.engines.device import TORCH_STAGES_ENV
from napari_ctcolor.io import Volume, read_color_volume, read_volume
from napari_ctcolor.windowing import window

from conftest import CT_DIR, LUMINANCE_BOUND, ctcolor, require_shared

CUT = CT_DIR / "totalseg-body-3mm-30slices.nii.gz"


@pytest.mark.parametrize("connectivity", [4, 8])
def test_label_components_are_scipys_components(connectivity):
    """Random masks (blobs of every shape, spirals of noise) and seeds: the same partition as ``ndimage.label``, each
    component's size, and which components hold a seed."""
    rng = np.random.default_rng(3)
    masks = ndimage.gaussian_filter(rng.random((6, 70, 90)), (0, 1.5, 1.5)) > 0.5
    masks[5] = rng.random((70, 90)) > 0.45  # noise near the percolation threshold: long winding components
    seeds = rng.random(masks.shape) > 0.995
    label = label_components(torch.from_numpy(masks), connectivity, torch.from_numpy(seeds))
    sizes, marked = component_sizes(label).numpy(), seeded(label).numpy()
    label = label.numpy()
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    for k in range(masks.shape[0]):
        want, count = ndimage.label(masks[k], structure)
        assert count > 3
        assert ((label[k] >= 0) == masks[k]).all()
        pairs = {(int(a), int(b)) for a, b in zip(want[masks[k]], label[k][masks[k]], strict=True)}
        assert len(pairs) == count == len({b for _, b in pairs})  # one torch label per scipy component, and back
        want_sizes = np.bincount(want.ravel())[want]
        assert (sizes[k][masks[k]] == want_sizes[masks[k]]).all()
        hit = np.zeros(count + 1, dtype=bool)
        hit[want[seeds[k] & masks[k]]] = True
        assert (marked[k] == (hit[want] & masks[k])).all()


def test_cli_colorize_with_the_gpu_stages_gives_the_cpu_kernels_colors(tmp_path, monkeypatch):
    """``ctcolor colorize`` with the stages as torch operations against the CPU's numba and scipy kernels, each a
    whole process: the same colours (one code on a few voxels), the luminance exact in both."""
    cut = require_shared(CUT)
    rgb = {}
    for stages in ("kernels", "torch"):
        monkeypatch.setenv(TORCH_STAGES_ENV, "1" if stages == "torch" else "0")
        out = tmp_path / f"{stages}.nii.gz"
        done = ctcolor("colorize", str(cut), "-o", str(out), "--window", "abdomen", "--device", "cpu", timeout=300)
        assert done.returncode == 0, done.stderr
        rgb[stages] = read_color_volume(out).rgb
    step = np.abs(rgb["torch"].astype(np.int16) - rgb["kernels"]).max(axis=-1)
    assert step.max() <= 1 and (step > 0).mean() <= 0.02, (int(step.max()), float((step > 0).mean()))
    grey = grey_to_lightness(window(read_volume(cut).array, 40, 400))
    for stages, color in rgb.items():
        assert np.abs(srgb_to_lab(color)[..., 0] - grey).max() <= LUMINANCE_BOUND, stages


#: What makes the host wait for a device: a copy back, a value read, a data-dependent shape.
_SYNCS = {
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.equal,
    torch.nonzero,
    torch.Tensor.nonzero,
}


class _CountSyncs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in _SYNCS
        return func(*args, **(kwargs or {}))


def test_gpu_stages_wait_for_the_device_once_per_batch_not_per_slice(monkeypatch):
    """The enclosure and compose stages on the torch path, counted: the whole 30-slice cut (two batches of
    `DEVICE_SLICES`) makes at most twice the synchronisations of one slice, plus what the labelling's convergence
    checks add for the slowest slice of a batch (3 per batch); a stage that waited once per slice would make 30."""
    ct = read_volume(require_shared(CUT))
    chroma = predict_chroma(ct, device="cpu")
    monkeypatch.setenv(TORCH_STAGES_ENV, "1")
    counts = {}
    for z in (1, ct.shape[0]):
        part = Volume(ct.array[:z], ct.spacing, ct.origin, ct.direction, ct.meta)
        sub = type(chroma)(**{**vars(chroma), "top": chroma.top[:z], "prob": chroma.prob[:z]})
        with _CountSyncs() as enclosure:
            sub.enclosure = enclosure_bits(part, sub, torch.device("cpu"))
        with _CountSyncs() as compose:
            compose_chroma(part, sub, "abdomen", device="cpu")
        counts[z] = (enclosure.count, compose.count)
    batches = -(-ct.shape[0] // DEVICE_SLICES)
    assert batches == 2
    for stage, (one, whole) in enumerate(zip(counts[1], counts[ct.shape[0]], strict=True)):
        print(f"stage {stage}: {one} synchronisations for one slice, {whole} for {ct.shape[0]}")
        assert whole <= batches * (one + 3) < ct.shape[0], (stage, one, whole)
