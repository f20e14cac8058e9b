"""The bone enclosure stage: which voxels are marrow (enclosed by a bony cortex in their axial slice) and where the
bone group gives way (`CORTEX_HU`), as bits packed along X (`colorize.chroma.Chroma.enclosure`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ...io import Volume
from ...threads import cpu_threads
from ..device import runs_torch_stages
from .chroma import Chroma, pack_bits
from .components import component_sizes, label_components, reconstruct
from .groups import MARROW_GROUP_HU, hu_group_of
from .hu import device_hu, hu_slices
from .topology_kernel import topology

#: Marrow: cancellous bone and marrow (a vertebral body at 80-190 HU, a rib's at 30-250) lie in the HU of muscle,
#: organs and enhanced blood, so a voxel's own HU cannot tell them apart, and its 3.5 mm network pixel often holds
#: the muscle or liver beside a thin bone as well; conversely an unenhanced aorta (30-60 HU) beside a vertebra shares
#: pixels with it. What tells them apart is that bone's cortex encloses its marrow (`bone_topology`, `gate_topology`),
#: in the voxel's axial slice, within a hole no larger than `MARROW_MAX_MM2` (a lumbar vertebral body is 1200-1800
#: mm²; the pelvic ring and the thoracic cage enclose far more):
#: - From `MARROW_MIN_HU` up, a voxel in a hole of the mask HU >= `CORTEX_HU`, less its pieces that nowhere reach
#:   `CORTEX_PEAK_HU`, whose network pixel keeps a bone class, is marrow, and so is the partial-volumed cortex around
#:   it (up to `MARROW_GROUP_HU`: the pieces that border such a hole): their `HU_GROUPS` are weighed as at
#:   `MARROW_GROUP_HU`, so plain tissue and organs give way to the bone, and contrast blood keeps its weight (an
#:   aneurysm's thrombus inside a calcified wall stays aorta). An enhancing kidney's cortex (150-300 HU) encloses its
#:   medulla but peaks below bone's compact cortex: a portal-venous phantom's kidney lost 0.24 of its voxels to bone
#:   with the cortex rule and no peak, none with a peak of 300 to 600 HU.
#: - Below `MARROW_MIN_HU` (where the spinal canal's cord and fluid, fat and unenhanced blood lie), bone is named only
#:   inside a rim of at least `RIM_HU`, which a coarse grid's partial-volumed cortex still reaches (fatty marrow in a
#:   long bone, an osteoporotic vertebral body); elsewhere the bone group gives way. In a small bony hole, fatty
#:   marrow is marrow (`FATTY_MARROW_HU`).
#: Measured with the leave-one-out models on their held-out patients (issue 24, 2026-11-25; named right or tissue):
#: on the DICOM patient, vertebrae / ribs 0.886 / 0.723 before, the marrow's cortex at 200 HU 0.912 / 0.763, at
#: 150 HU 0.935 / 0.794, at 100 HU 0.910 / 0.757, and with the cortex around the marrow 0.945 / 0.843 (peak 600 HU:
#: ribs 0.832); closing the cortex's gaps first gained little for ribs (0.817 at 200 HU) and cost 5 ms per 512²
#: slice; raising the marrow to 600 HU (blood giving way too) named aorta beside the spine bone (aorta 0.970 ->
#: 0.957). On the 3 mm patient (3 mm voxels: 46 % of its vertebrae's voxels below 150 HU lie in no hole of the
#: 150 HU mask), the unenhanced aorta 0.843 -> 0.968 with the rim rule (rim 100, 120 and 150 HU alike), its
#: vertebrae 0.980 -> 0.968 (rim 150 HU: 0.948; the rule from 40 HU: aorta 0.887).
CORTEX_HU, RIM_HU, MARROW_MIN_HU, MARROW_MAX_MM2 = 150.0, 100.0, 60.0, 2500.0
CORTEX_PEAK_HU = 400.0
#: A rib's marrow is often fatty, below `MARROW_MIN_HU`, where the spinal canal's cord and fluid lie too; a rib's
#: marrow cavity in one slice is a few tens of mm², the canal's 150-300 mm². So in a bony hole of at most
#: `SMALL_MARROW_MM2`, marrow counts from `FATTY_MARROW_HU` up: the held-out DICOM patient's ribs 0.843 -> 0.892 named
#: right or tissue (holes up to 200 mm² alike; from -30 HU 0.890, from 0 HU 0.883), its spinal cord named bone on
#: 3.1 % of its voxels before and after (holes up to 300 mm² alike), every other class row unchanged.
FATTY_MARROW_HU, SMALL_MARROW_MM2 = -100.0, 100.0


def bone_topology(hu: np.ndarray, pixel_mm2: float, out: np.ndarray | None = None) -> np.ndarray:
    """`bone_topology_torch` of (n, Y, X) slices of HU on the CPU (`topology_kernel.topology`, which holds no lock):
    (7, n, Y, ceil(X / 8)) uint8, its masks packed along X (into ``out`` if given)."""
    if out is None:
        out = np.empty((7, *hu.shape[:2], -(-hu.shape[2] // 8)), dtype=np.uint8)
    topology(np.ascontiguousarray(hu, dtype=np.float32), float(pixel_mm2), _THRESHOLDS, out)
    return out


_THRESHOLDS = tuple(
    np.float32(v)
    for v in (
        CORTEX_HU,
        CORTEX_PEAK_HU,
        RIM_HU,
        MARROW_MIN_HU,
        MARROW_GROUP_HU,
        FATTY_MARROW_HU,
        MARROW_MAX_MM2,
        SMALL_MARROW_MM2,
    )
)


def _holes_torch(dense: torch.Tensor, pixel_mm2: float) -> torch.Tensor:
    """`_holes` of each slice of ``dense`` (n, Y, X) bool, on its device: (n, Y, X) float32 hole areas in mm². The
    parts of the rest that reach the slice's edge are found by `components.reconstruct`; only the holes left, within
    the bounding box of all of them, are labelled for their areas."""
    free = ~dense
    edge = torch.zeros_like(free)
    edge[:, 0], edge[:, -1], edge[:, :, 0], edge[:, :, -1] = True, True, True, True
    holes = free & ~reconstruct(free & edge, free, 4)
    out = torch.zeros(holes.shape, dtype=torch.float32, device=holes.device)
    box = _box_torch(holes)  # a margin of voxels outside the holes: the same components
    if box is not None:
        area = component_sizes(label_components(holes[box], 4)).to(torch.float64) * pixel_mm2
        out[box] = torch.where(holes[box] & (area <= MARROW_MAX_MM2), area, 0.0).to(torch.float32)
    return out


def bone_topology_torch(hu: torch.Tensor, pixel_mm2: float) -> torch.Tensor:
    """What the enclosure reads from a slice's HU alone, for a batch of slices on their device (a GPU),
    before the network's classes are known: ``hu`` (n, Y, X) float; returns (7, n, Y, X) bool:
    in a hole of the peaked bone (`CORTEX_HU`), in one of at most `SMALL_MARROW_MM2`, in a rim (the pieces that
    border such a hole), in no hole of the mask HU >= `RIM_HU`, and the HU ranges of marrow (`MARROW_MIN_HU` up to
    `MARROW_GROUP_HU`), of fatty marrow (`FATTY_MARROW_HU` up to `MARROW_MIN_HU`) and below `MARROW_MIN_HU`
    (`gate_topology` makes the masks from these alone).

    The topology is worked out only on the bounding box of the voxels at or above `RIM_HU` over the batch, and a
    one-voxel margin (a third to a half of a 512² slice): outside it there is no hole and no rim."""
    out = torch.zeros((7, *hu.shape), dtype=torch.bool, device=hu.device)
    out[3] = True
    box = _box_torch(hu >= RIM_HU)
    if box is not None:
        out[(slice(0, 4), *box)] = _bone_topology_in(hu[box], pixel_mm2)
    out[4] = (hu >= MARROW_MIN_HU) & (hu < MARROW_GROUP_HU)
    out[5] = (hu >= FATTY_MARROW_HU) & (hu < MARROW_MIN_HU)
    out[6] = hu < MARROW_MIN_HU
    return out


def _box_torch(mask: torch.Tensor) -> tuple[slice, slice, slice] | None:
    """The bounding box over a batch of slices of a (n, Y, X) ``mask`` and a one-voxel margin; None if empty."""
    rows, cols = torch.nonzero(mask.any(dim=(0, 2))).flatten(), torch.nonzero(mask.any(dim=(0, 1))).flatten()
    if rows.numel() == 0:
        return None
    first_row, last_row, first_col, last_col = (int(v) for v in (rows[0], rows[-1], cols[0], cols[-1]))
    return slice(None), slice(max(first_row - 1, 0), last_row + 2), slice(max(first_col - 1, 0), last_col + 2)


def _bone_topology_in(hu: torch.Tensor, pixel_mm2: float) -> torch.Tensor:
    """`bone_topology_torch` of slices cropped to their box."""
    cortex = hu >= CORTEX_HU
    holes = _holes_torch(reconstruct(hu >= CORTEX_PEAK_HU, cortex, 8), pixel_mm2)  # of the peaked pieces
    enclosed = holes > 0
    grown = enclosed.clone()  # the holes grown by their 4 neighbours
    grown[:, 1:] |= enclosed[:, :-1]
    grown[:, :-1] |= enclosed[:, 1:]
    grown[:, :, 1:] |= enclosed[:, :, :-1]
    grown[:, :, :-1] |= enclosed[:, :, 1:]
    rims = reconstruct(grown & cortex, cortex, 8)  # the pieces that touch a grown hole
    small = enclosed & (holes <= SMALL_MARROW_MM2)
    return torch.stack((enclosed, small, rims, _holes_torch(hu >= RIM_HU, pixel_mm2) == 0))


def gate_topology(topology: torch.Tensor, bone_pixel: torch.Tensor) -> torch.Tensor:
    """The enclosure's masks (2, n, Y, X) from a batch's `bone_topology_torch` (7, n, Y, X) and where each voxel's
    network pixel keeps a bone class (n, Y, X): [0] marrow (fatty too in a hole of at most `SMALL_MARROW_MM2`) and the
    cortex around it, below `MARROW_GROUP_HU`, [1] below `MARROW_MIN_HU`, not marrow and inside no rim of bone.
    Bitwise operations only, so the masks may be bool or bits packed along X alike (uint8: no unpacking)."""
    enclosed, small, rims, open_rim, marrow_hu, fatty_hu, below_marrow_hu = topology
    first = bone_pixel & (marrow_hu & (enclosed | rims) | fatty_hu & small)
    low = bone_pixel & below_marrow_hu & ~first
    return torch.stack((first, low & open_rim))


def enclosure_bits(
    volume: Volume, chroma: Chroma, device: torch.device, topology: BoneTopology | None = None
) -> np.ndarray:
    """`Chroma.enclosure` (2, Z, Y, ceil(X / 8)) uint8 of ``chroma``'s classes on ``volume``: the `BoneTopology`
    ``topology`` (started before the classes were known; here when None) gated by the classes."""
    return (topology or BoneTopology(volume, device)).gate(chroma)


#: Slices per batch of the enclosure and compose stages on the torch path (`device_slices`): their temporaries take
#: about `DEVICE_BYTES_PER_VOXEL`, 0.8 GB for 32 slices of 512².
DEVICE_SLICES = 32
DEVICE_BYTES_PER_VOXEL = 100
#: Slices per call of the CPU's kernel (`bone_topology`): its float32 HU and working arrays, 10 MB for 512².
CPU_SLICES = 4
#: The share of a CUDA GPU's free memory that one batch of the enclosure or compose stage may take.
DEVICE_MEMORY_SHARE = 0.25


def device_slices(device: torch.device, height: int, width: int) -> int:
    """Slices per batch of the torch stages: on a CUDA GPU as many as `DEVICE_MEMORY_SHARE` of its free memory holds
    at `DEVICE_BYTES_PER_VOXEL` (the whole 400-slice bench volume on a 139 GiB H200), else `DEVICE_SLICES`. Fewer,
    larger batches launch fewer kernels and wait for fewer convergence checks: a batch's count of both is about that
    of its slowest slice, whatever its number of slices."""
    if device.type != "cuda":
        return DEVICE_SLICES
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # this process's cached blocks
    return max(1, int(free * DEVICE_MEMORY_SHARE) // (DEVICE_BYTES_PER_VOXEL * height * width))


class BoneTopology:
    """The HU-only half of the enclosure stage, computed in the background from its construction while the host makes
    the network's classes consistent (`consistency.make_consistent`); `gate` waits for it and makes `Chroma.enclosure`
    from the classes without reading the HU again. Kept as bits packed along X, seven per voxel (0.44x the size of
    an int16 CT, freed with the object).

    Where `runs_torch_stages`, `bone_topology_torch` in batches of `device_slices` on the device, in one thread;
    elsewhere (the CPU, Apple's MPS) `bone_topology` slice by slice in `threads.cpu_threads` threads (a kernel
    that holds no lock, so the anatomy step beside it keeps its pace), then gated on bits packed along X, never
    unpacked. Started beside the network's forward passes instead (one thread, when scipy labelled it) it gained
    nothing measurable on 2 cores (4.1-5.6 s against 4.3-5.0 s, 2026-11-26)."""

    def __init__(self, volume: Volume, device: torch.device) -> None:
        self.volume = volume
        on_device = runs_torch_stages(device)
        self.device = device if on_device else torch.device("cpu")
        self._stop = False
        self.slices = device_slices(self.device, *volume.shape[1:])  # per batch, here and in `gate`
        self._pool = ThreadPoolExecutor(1)
        self._bits = self._pool.submit(self._on_device if on_device else self._on_cpu)

    def _on_device(self) -> list[torch.Tensor]:
        z = self.volume.shape[0]
        pixel_mm2 = float(self.volume.spacing[1] * self.volume.spacing[2])
        packed = []
        with torch.inference_mode():
            for start in range(0, z, self.slices):
                if self._stop:
                    break
                hu = device_hu(self.volume, start, min(z, start + self.slices), self.device)
                packed.append(pack_bits(bone_topology_torch(hu, pixel_mm2)))
        return packed

    def _on_cpu(self) -> list[torch.Tensor]:
        """The CPU's slices in the pool's other threads (this one waits), `CPU_SLICES` at a time, and handed on in
        batches of `slices` as on a GPU."""
        z, height, width = self.volume.shape
        pixel_mm2 = float(self.volume.spacing[1] * self.volume.spacing[2])
        out = np.empty((7, z, height, -(-width // 8)), dtype=np.uint8)

        def some(start: int) -> None:
            if not self._stop:
                stop = min(z, start + CPU_SLICES)
                bone_topology(hu_slices(self.volume, start, stop), pixel_mm2, out[:, start:stop])

        with ThreadPoolExecutor(cpu_threads()) as pool:
            list(pool.map(some, range(0, z, CPU_SLICES)))
        return [torch.from_numpy(out[:, start : start + self.slices]) for start in range(0, z, self.slices)]

    def close(self) -> None:
        """Stop after the batch in progress (a run abandoned before `gate`)."""
        self._stop = True
        self._pool.shutdown(wait=False)

    def gate(self, chroma: Chroma) -> np.ndarray:
        """`Chroma.enclosure` (2, Z, Y, ceil(X / 8)) uint8 of ``chroma``'s classes on this volume."""
        packed = self._bits.result()
        self._pool.shutdown()
        z, height, width = self.volume.shape
        device = self.device
        rows, cols = chroma.network_pixel(torch.arange(height, device=device), torch.arange(width, device=device))
        bone = (hu_group_of(chroma.classes) == 0).to(device)
        out = np.empty((2, z, height, -(-width // 8)), dtype=np.uint8)
        with torch.inference_mode():
            for k, start in enumerate(range(0, z, self.slices)):
                stop = min(z, start + self.slices)
                top, prob = chroma.top[start:stop].to(device), chroma.prob[start:stop].to(device)
                kept = (bone[top.long()] & (prob > 0)).any(dim=1)  # (n, h, w)
                bone_pixel = pack_bits(kept.index_select(1, rows).index_select(2, cols))
                out[:, start:stop] = gate_topology(packed[k], bone_pixel).cpu().numpy()
        return out


def enclosure_band(bits: np.ndarray | None, axis: int, start: int, stop: int) -> np.ndarray | None:
    """`Chroma.enclosure` of the voxels [start, stop) along ``axis`` (0 slices, 1 rows, 2 columns: re-packed)."""
    if bits is None:
        return None
    if axis < 2:
        return bits[:, start:stop] if axis == 0 else bits[:, :, start:stop]
    first = start // 8
    unpacked = np.unpackbits(bits[..., first : -(-stop // 8)], axis=-1)
    return np.packbits(unpacked[..., start - 8 * first : stop - 8 * first], axis=-1)
