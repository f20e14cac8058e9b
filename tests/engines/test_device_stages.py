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

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_ctcolor.color import grey_to_lightness, srgb_to_lab
from napari_ctcolor.engines.colorize import compose_chroma, predict_chroma
from napari_ctcolor.engines.colorize.components import component_sizes, label_components, reconstruct
from napari_ctcolor.engines.colorize.enclosure import (
    CORTEX_HU,
    CORTEX_PEAK_HU,
    DEVICE_SLICES,
    FATTY_MARROW_HU,
    MARROW_MAX_MM2,
    MARROW_MIN_HU,
    RIM_HU,
    SMALL_MARROW_MM2,
    bone_topology,
    bone_topology_torch,
    enclosure_bits,
    gate_topology,
)
from napari_ctcolor.engines.colorize.groups import MARROW_GROUP_HU
from napari_ctcolor.engines.device import TORCH_STAGES_ENV
from napari_ctcolor.io import Volume, read_color_volume, read_volume
from napari_ctcolor.windowing import window

from conftest import CT_DIR, LUMINANCE_BOUND, ctcolor, require_shared

CUT = CT_DIR / "totalseg-body-3mm-30slices.nii.gz"


def _scipy_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding box of a (Y, X) ``mask`` and a one-voxel margin, None if it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2)


def _scipy_holes(dense: np.ndarray, pixel_mm2: float) -> np.ndarray:
    """(Y, X) float32: the area in mm² of the hole of one slice's ``dense`` mask that holds each voxel, 0 outside
    the holes no larger than `MARROW_MAX_MM2`: the connected components of the rest that do not touch the slice's
    edge (`scipy.ndimage.label`: a third of the time of ``binary_fill_holes``, and their areas come with it). Only
    the mask's bounding box and a one-voxel margin are labelled: everything outside it is one component open to the
    edge, so the holes are the same."""
    out = np.zeros(dense.shape, dtype=np.float32)
    box = _scipy_box(dense)
    if box is None:
        return out
    parts, count = ndimage.label(~dense[box])
    area = (np.bincount(parts.ravel(), minlength=count + 1) * pixel_mm2).astype(np.float32)
    area[area > MARROW_MAX_MM2] = 0.0
    area[0] = 0.0  # the mask itself
    area[np.concatenate((parts[0], parts[-1], parts[:, 0], parts[:, -1]))] = 0.0  # open to the edge
    out[box] = area[parts]
    return out


def _scipy_bony_enclosure(hu: np.ndarray, pixel_mm2: float) -> tuple[np.ndarray, np.ndarray]:
    """``(holes, rims)`` of one slice's HU: (Y, X) float32 the area of the hole (`_scipy_holes`) of the bony part of the
    mask HU >= `CORTEX_HU` (its 8-connected pieces that reach `CORTEX_PEAK_HU`: an enhancing kidney's cortex, which
    encloses its medulla, does not) that holds each voxel, 0 outside them, and (Y, X) bool those pieces that border a
    hole: the cortex around a marrow."""
    holes, rims = np.zeros(hu.shape, dtype=np.float32), np.zeros(hu.shape, dtype=bool)
    box = _scipy_box(hu >= CORTEX_HU)
    if box is None:
        return holes, rims
    part = hu[box]
    pieces, count = ndimage.label(part >= CORTEX_HU, structure=np.ones((3, 3), dtype=bool))
    peaked = np.zeros(count + 1, dtype=bool)
    peaked[pieces[part >= CORTEX_PEAK_HU]] = True
    peaked[0] = False
    holes[box] = _scipy_holes(peaked[pieces], pixel_mm2)
    inner = holes[box] > 0
    if inner.any():
        grown = inner.copy()  # the holes grown by their 4 neighbours (30x faster than ndimage.binary_dilation)
        grown[1:] |= inner[:-1]
        grown[:-1] |= inner[1:]
        grown[:, 1:] |= inner[:, :-1]
        grown[:, :-1] |= inner[:, 1:]
        borders = np.zeros(count + 1, dtype=bool)
        borders[pieces[grown]] = True  # a hole's 4-neighbours are all bony: only peaked pieces
        borders[0] = False
        rims[box] = borders[pieces]
    return holes, rims


def scipy_topology(hu: np.ndarray, pixel_mm2: float) -> np.ndarray:
    """The reference: the seven masks of `bone_topology_torch` of one (Y, X) slice of HU, written with
    ``scipy.ndimage.label`` and numpy from the rules' words (the CPU path until 2026-11-29): (7, Y, X) bool."""
    holes, rims = _scipy_bony_enclosure(hu, pixel_mm2)
    enclosed = holes > 0
    return np.stack(
        (
            enclosed,
            enclosed & (holes <= SMALL_MARROW_MM2),
            rims,
            _scipy_holes(hu >= RIM_HU, pixel_mm2) == 0,
            (hu >= MARROW_MIN_HU) & (hu < MARROW_GROUP_HU),
            (hu >= FATTY_MARROW_HU) & (hu < MARROW_MIN_HU),
            hu < MARROW_MIN_HU,
        )
    )


@pytest.mark.parametrize("connectivity", [4, 8])
def test_torch_components_are_scipys_components(connectivity):
    """Random masks (blobs of every shape, and noise near the percolation threshold: long winding components) and
    seeds: `label_components` gives the partition and sizes of ``ndimage.label``, `reconstruct` the components that
    hold a seed."""
    rng = np.random.default_rng(3)
    masks = ndimage.gaussian_filter(rng.random((6, 70, 90)), (0, 1.5, 1.5)) > 0.5
    masks[5] = rng.random((70, 90)) > 0.45
    seeds = rng.random(masks.shape) > 0.995
    label = label_components(torch.from_numpy(masks), connectivity)
    sizes = component_sizes(label).numpy()
    marked = reconstruct(torch.from_numpy(seeds), torch.from_numpy(masks), connectivity).numpy()
    label = label.numpy()
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    for k in range(masks.shape[0]):
        want, count = ndimage.label(masks[k], structure)
        assert count > 3
        assert ((label[k] >= 0) == masks[k]).all()
        pairs = {(int(a), int(b)) for a, b in zip(want[masks[k]], label[k][masks[k]], strict=True)}
        assert len(pairs) == count == len({b for _, b in pairs})  # one torch label per scipy component, and back
        assert (sizes[k][masks[k]] == np.bincount(want.ravel())[want][masks[k]]).all()
        hit = np.zeros(count + 1, dtype=bool)
        hit[want[seeds[k] & masks[k]]] = True
        assert (marked[k] == (hit[want] & masks[k])).all()


def _kernel_topology(hu: np.ndarray, pixel_mm2: float) -> np.ndarray:
    """The CPU kernel's masks of slices (n, Y, X), unpacked: (7, n, Y, X) bool."""
    return np.unpackbits(bone_topology(hu, pixel_mm2), axis=-1, count=hu.shape[-1]).astype(bool)


@pytest.mark.parametrize("name", ["totalseg-abdomen-dicom", "chest-popi-2mm.nii.gz"])
def test_enclosure_on_the_cpu_and_the_device_is_scipys_on_real_slices(name):
    """`bone_topology` (the CPU's union-find kernel) and `bone_topology_torch` (connected components from tensor
    operations) against the masks scipy's labelling gives (`scipy_topology`), on 512² slices of a contrast abdomen
    and a chest, then gated by `gate_topology` with every voxel a network pixel of bone (all the rules apply
    everywhere): the same topology and the same bits."""
    ct = read_volume(require_shared(CT_DIR / name))
    hu = ct.array[np.linspace(0, ct.shape[0] - 1, 3).astype(int)].astype(np.float32)
    pixel_mm2 = float(ct.spacing[1] * ct.spacing[2])
    bone = np.ones(hu.shape, dtype=bool)
    want = torch.from_numpy(np.stack([scipy_topology(slice_, pixel_mm2) for slice_ in hu], axis=1))
    assert want[0].sum() > 100 and want[2].sum() > 100  # marrow and its cortex on every such CT
    kernel = torch.from_numpy(_kernel_topology(hu, pixel_mm2))
    assert (kernel == want).all(), (kernel != want).sum(dim=(1, 2, 3)).tolist()
    got = bone_topology_torch(torch.from_numpy(hu), pixel_mm2)
    assert (got == want).all(), (got != want).sum(dim=(1, 2, 3)).tolist()
    masks = gate_topology(got, torch.from_numpy(bone))
    assert masks.sum() > 1000 and (masks == gate_topology(want, torch.from_numpy(bone))).all()


def test_cpu_enclosure_kernel_is_scipys_on_random_slices():
    """The CPU kernel against scipy's masks on slices made to reach every branch: smooth random HU fields across
    every threshold (pieces and holes that touch the slice's edges, holes either side of the area limits, rings of
    cortex with and without a peak), a ring whose hole is over the limit and one open to the edge, odd widths (bits
    packed into a last partial byte), a slice with no bone and one all bone."""
    rng = np.random.default_rng(11)
    thresholds = (FATTY_MARROW_HU, MARROW_MIN_HU, RIM_HU, CORTEX_HU, MARROW_GROUP_HU, CORTEX_PEAK_HU)
    cases = (((64, 77), 2.0, 1.0), ((96, 61), 1.2, 4.0), ((50, 50), 3.0, 30.0))
    holes = []
    for case, (shape, sigma, pixel_mm2) in enumerate(cases):
        field = ndimage.gaussian_filter(rng.normal(size=(4, *shape)), (0, sigma, sigma))
        hu = (field / field.std() * 250.0 + 120.0).astype(np.float32)
        hu[0, ::7] = thresholds[case]  # rows exactly at a threshold
        hu[1] = np.round(hu[1] / 50.0) * 50.0  # plateaus at the thresholds' values
        hu[2] = -500.0  # a square ring of peaked cortex around 32 x 32 voxels (a hole over the area limit from
        hu[2, 4:40, 4:40] = 800.0  # 2.5 mm² voxels), with a second ring open to the slice's edge
        hu[2, 6:38, 6:38] = 20.0
        hu[2, :12, -9:] = 800.0
        hu[2, :10, -7:] = 20.0
        hu[3] = 800.0
        want = np.stack([scipy_topology(slice_, pixel_mm2) for slice_ in hu], axis=1)
        got = _kernel_topology(hu, pixel_mm2)
        assert (got == want).all(), (shape, (got != want).sum(axis=(1, 2, 3)).tolist())
        holes += [
            _scipy_holes(slice_ >= threshold, pixel_mm2) for slice_ in hu[:2] for threshold in (RIM_HU, CORTEX_HU)
        ]
    areas = np.unique(np.concatenate([h[h > 0] for h in holes]))
    assert (areas <= SMALL_MARROW_MM2).any() and (areas > SMALL_MARROW_MM2).any() and areas.max() <= MARROW_MAX_MM2


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
_SYNCS = (
    (torch.Tensor, ("cpu", "numpy", "item", "tolist", "__bool__", "nonzero")),
    (torch, ("equal", "nonzero")),
)


def _counting(original, count: list[int]):
    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    return counted


@contextlib.contextmanager
def _count_syncs(monkeypatch) -> Iterator[list[int]]:
    """Count the calls of `_SYNCS` in every thread (the enclosure's topology runs in a worker thread)."""
    count = [0]
    with monkeypatch.context() as patch:
        for owner, names in _SYNCS:
            for name in names:
                patch.setattr(owner, name, _counting(getattr(owner, name), count))
        yield count


def test_gpu_stages_wait_for_the_device_once_per_batch_not_per_slice(monkeypatch):
    """The enclosure and compose stages on the torch path, counted: the whole 30-slice cut (batches of
    `DEVICE_SLICES`) makes per batch at most the synchronisations of one slice, plus what the components'
    convergence checks add for the slowest slice of a batch (3 per batch); a stage that waited once per slice would
    make 30."""
    ct = read_volume(require_shared(CUT))
    chroma = predict_chroma(ct, device="cpu")
    monkeypatch.setenv(TORCH_STAGES_ENV, "1")
    counts = {}
    for z in (1, ct.shape[0]):
        part = Volume(ct.array[:z], ct.spacing, ct.origin, ct.direction, ct.meta)
        sub = type(chroma)(**{**vars(chroma), "top": chroma.top[:z], "prob": chroma.prob[:z]})
        with _count_syncs(monkeypatch) as enclosure:
            sub.enclosure = enclosure_bits(part, sub, torch.device("cpu"))
        with _count_syncs(monkeypatch) as compose:
            compose_chroma(part, sub, "abdomen", device="cpu")
        counts[z] = (enclosure[0], compose[0])
    batches = -(-ct.shape[0] // DEVICE_SLICES)
    for stage, (one, whole) in enumerate(zip(counts[1], counts[ct.shape[0]], strict=True)):
        print(f"stage {stage}: {one} synchronisations for one slice, {whole} for {ct.shape[0]}")
        assert whole <= batches * (one + 3) < ct.shape[0], (stage, one, whole)


def test_gpu_stages_give_the_same_colours_in_any_batch_size(monkeypatch):
    """On a GPU the enclosure and compose stages take as many slices per batch as its free memory allows
    (`device_slices`); the slices of a batch never meet (in-plane components, a bounding box with no hole or rim
    outside it), so batches of 7, 13 and 32 slices give the same enclosure bits (integer work), the CPU kernels' too,
    and the same colours: the same float32 arithmetic per voxel, which a kernel may vectorise differently for another
    batch shape, so one 8-bit code apart on at most 1e-4 of the voxels (on an H200, 1.05e-7: BENCHMARKS.md)."""
    from napari_ctcolor.engines.colorize import compose, enclosure

    ct = read_volume(require_shared(CUT))
    chroma = predict_chroma(ct, device="cpu")
    monkeypatch.setenv(TORCH_STAGES_ENV, "1")
    results = {}
    for batch in (7, 13, 32):
        monkeypatch.setattr(enclosure, "device_slices", lambda _device, _h, _w, batch=batch: batch)
        monkeypatch.setattr(compose, "device_slices", lambda _device, _h, _w, batch=batch: batch)
        bits = enclosure_bits(ct, chroma, torch.device("cpu"))
        sub = type(chroma)(**{**vars(chroma), "enclosure": bits})
        results[batch] = bits, compose_chroma(ct, sub, "abdomen", device="cpu").rgb
    assert (results[32][0] == chroma.enclosure).all()  # the CPU kernels' bits (predict_chroma's own)
    for batch in (7, 13):
        assert (results[batch][0] == results[32][0]).all(), batch
        step = np.abs(results[batch][1].astype(np.int16) - results[32][1]).max(axis=-1)
        assert step.max() <= 1 and (step > 0).mean() <= 1e-4, (batch, int(step.max()), float((step > 0).mean()))
