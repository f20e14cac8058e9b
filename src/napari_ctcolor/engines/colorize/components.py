"""Connected components of 2D masks on any torch device, batched over slices: what the enclosure stage
(`enclosure.bone_topology_torch`) needs on a GPU, where ``scipy.ndimage.label`` cannot run.

Written here because torch has no connected-component labelling (kornia's ``connected_components`` propagates one
pixel per iteration, thousands of iterations for a 512² slice). Two operations, both exact once converged:
- `reconstruct`: the voxels of a mask connected to seed voxels, as one byte per voxel; each step spreads the seeds
  along the whole rows and columns of the mask they touch (a running count per run), then to the neighbours.
- `label_components`: label propagation with pointer jumping: every voxel of the mask starts with its own index,
  takes the largest label of its row and column runs and of its neighbours, then the label of the voxel its label
  names (labels never decrease, so the named voxel's is at least as large). It converges to the largest index of
  each component in far fewer iterations than the component's diameter.
Both stop when `_CHECK_EVERY` steps change nothing (one host synchronisation per check).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Iterations between two convergence checks (each check waits for the device).
_CHECK_EVERY = 4


def _neighbour_max(label: torch.Tensor, connectivity: int) -> torch.Tensor:
    """(n, Y, X) int64: the largest label among each voxel and its 4 or 8 in-plane neighbours (-1 beyond the edge)."""
    padded = F.pad(label, (1, 1, 1, 1), value=-1)
    if connectivity == 8:  # the 3 x 3 square is separable: rows, then columns
        rows = torch.maximum(torch.maximum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
        return torch.maximum(torch.maximum(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])
    best = torch.maximum(label, padded[:, :-2, 1:-1])
    best = torch.maximum(best, padded[:, 2:, 1:-1])
    best = torch.maximum(best, padded[:, 1:-1, :-2])
    return torch.maximum(best, padded[:, 1:-1, 2:])


def _prefix_run_max(label: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """(n, Y, X) int64: the largest label so far within each voxel's run (consecutive mask voxels along ``dim``, 1 or
    2), by a running maximum (``torch.cummax``) of the labels lifted by their run's rank along the line, so that no
    run's maximum carries into the next."""
    previous = F.pad(mask, (1, 0) if dim == 2 else (0, 0, 1, 0))
    starts = mask & ~(previous[:, :, :-1] if dim == 2 else previous[:, :-1])
    lift = starts.to(torch.int64).cumsum(dim) * (label.shape[1] * label.shape[2] + 1)
    return (label + lift).cummax(dim).values - lift


def _run_max(label: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """(n, Y, X) int64: the largest label of each voxel's run along ``dim``: the largest before it, each way."""
    backward = _prefix_run_max(label.flip(dim), mask.flip(dim), dim).flip(dim)
    return torch.maximum(_prefix_run_max(label, mask, dim), backward)


def label_components(mask: torch.Tensor, connectivity: int = 4) -> torch.Tensor:
    """The components of each slice of ``mask`` (n, Y, X) bool, 4- or 8-connected in-plane: (n, Y, X) int64, the
    largest row-major index of the voxel's component in its slice, -1 outside the mask. So two voxels of one slice
    share a label exactly when they are connected."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    n, height, width = mask.shape
    size = height * width
    label = torch.arange(size, device=mask.device, dtype=torch.int64).reshape(1, height, width).expand(n, -1, -1)
    outside = torch.full_like(label, -1)
    label = torch.where(mask, label, outside)
    while True:
        before = label
        for _ in range(_CHECK_EVERY):
            label = torch.where(mask, _neighbour_max(label, connectivity), outside)
            label = torch.where(mask, _run_max(label, mask, 2), outside)
            label = torch.where(mask, _run_max(label, mask, 1), outside)
            flat = label.reshape(n, size)
            jumped = flat.gather(1, flat.remainder(size))  # the label of the voxel this label names
            label = torch.where(flat >= 0, jumped, -1).reshape(n, height, width)
        if torch.equal(label, before):
            return label


def _prefix_run_any(flag: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """(n, Y, X) bool: whether a flagged voxel lies at or before each voxel within its run (consecutive ``mask``
    voxels along ``dim``, 1 or 2): the running count of flags, less its value where the run starts (the count is
    non-decreasing, so the latest start's value is a running maximum)."""
    previous = F.pad(mask, (1, 0) if dim == 2 else (0, 0, 1, 0))
    starts = mask & ~(previous[:, :, :-1] if dim == 2 else previous[:, :-1])
    flags = (flag & mask).to(torch.int32)
    count = flags.cumsum(dim, dtype=torch.int32)
    before = torch.where(starts, count - flags, 0).cummax(dim).values
    return mask & (count > before)


def _spread(flag: torch.Tensor, mask: torch.Tensor, connectivity: int) -> torch.Tensor:
    """One step of `reconstruct`: ``flag`` spread over the rows and columns of ``mask`` it touches, then to its 4 or 8
    neighbours in ``mask``."""
    for dim in (2, 1):
        flag = _prefix_run_any(flag, mask, dim) | _prefix_run_any(flag.flip(dim), mask.flip(dim), dim).flip(dim)
    padded = F.pad(flag, (1, 1, 1, 1))
    if connectivity == 8:
        rows = padded[:, :-2] | padded[:, 1:-1] | padded[:, 2:]
        grown = rows[:, :, :-2] | rows[:, :, 1:-1] | rows[:, :, 2:]
    else:
        grown = flag | padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    return grown & mask


def reconstruct(seed: torch.Tensor, mask: torch.Tensor, connectivity: int = 4) -> torch.Tensor:
    """(n, Y, X) bool: the voxels of ``mask`` connected (4 or 8 in-plane neighbours) to a ``seed`` voxel in it, the
    morphological reconstruction of the seed under the mask (the components of `label_components` that hold a
    seed), with one byte per voxel instead of eight and whole rows and columns crossed per step."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    flag = seed & mask
    while True:
        before = flag
        for _ in range(_CHECK_EVERY):
            flag = _spread(flag, mask, connectivity)
        if torch.equal(flag, before):
            return flag


def component_sizes(label: torch.Tensor) -> torch.Tensor:
    """(n, Y, X) int64: the number of voxels in each voxel's component (`label_components`), 0 outside the mask."""
    n, height, width = label.shape
    size = height * width
    inside = label >= 0
    key = (label.remainder(size) + torch.arange(n, device=label.device)[:, None, None] * size).reshape(-1)
    counts = torch.zeros(n * size, dtype=torch.int64, device=label.device)
    counts.index_add_(0, key, inside.reshape(-1).to(torch.int64))
    return torch.where(inside, counts[key].reshape(n, height, width), 0)
