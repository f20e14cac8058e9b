"""The pair as the network sees it: checked, intensities normalised as its weights expect, the working grid, padding,
and the forward pass (once, or symmetric: the swapped pair averaged in)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import InputError
from ...io import Volume
from ...models.symnet import SIZE_MULTIPLE, SYMNet
from ...windowing import window_tensor

#: Intensity normalisation ``(mode, window)``: ``("minmax", None)`` maps each image's own range to [0, 1] (the
#: official checkpoint, per its README); ``("window", (low, high))`` clips HU to [low, high] and maps it to [0, 1]
#: (our CT weights; the window is read from their model card, ``inputs.normalisation.window_hu``).
Normalisation = tuple[str, tuple[float, float] | None]


OFFICIAL_NORMALISATION: Normalisation = ("minmax", None)


#: The network runs on at most this many padded voxels (256^3, ~10 GB at `BYTES_PER_VOXEL`): a larger fixed image
#: (a whole 512 x 512 x 300 CT) is registered on a coarser working grid, and the fields are upsampled.
MAX_NETWORK_VOXELS = 256**3


#: Two images on one grid whose normalised intensities differ by less than this in mean square over the body are one
#: scan twice and get the identity without the network (`are_copies`): an RMS of 0.1 % of the range, 2 HU under the CT
#: weights' 2000 HU window. The same series read from DICOM (integers) and from a float NIfTI differs by rounding,
#: under 0.5 HU; two acquisitions differ at least by both scans' noise (5-20 HU each: 7 HU RMS and more, a mean
#: square of 1.2e-5), which goes to the registration.
COPIES_METRIC = 1e-6


BODY_LEVEL = 0.25


def volume_name(volume: Volume, fallback: str) -> str:
    return str(volume.meta.get("source") or fallback)


#: The least extent per axis (mm) of an image to register: two of the pre-alignment's voxels (`PREALIGN_BASE_MM`).
MIN_EXTENT_MM = 4.0


def check_pair(fixed: Volume, moving: Volume, prealigned: bool = False) -> None:
    """Raise InputError for a 2D/3D mismatch, a too small image or images whose physical boxes do not overlap.

    With ``prealigned`` (affine pre-alignment on), disjoint boxes are allowed: a prior and a current scan exported in
    different coordinate frames (an origin 400 mm away) are brought together by the pre-alignment, which starts by
    superimposing the two boxes' centres (`prealign`).
    """
    fixed_2d, moving_2d = fixed.shape[0] == 1, moving.shape[0] == 1
    if fixed_2d != moving_2d:
        dims = [
            "2D (1 slice)" if is_2d else f"3D ({v.shape[0]} slices)"
            for v, is_2d in ((fixed, fixed_2d), (moving, moving_2d))
        ]
        raise InputError(
            f"{volume_name(moving, 'moving image')}: cannot register a {dims[1]} moving image to a {dims[0]} fixed "
            "image; give two 2D or two 3D images"
        )
    for volume, what in ((fixed, "fixed image"), (moving, "moving image")):
        if min(volume.shape[1:]) < 4 or (not fixed_2d and volume.shape[0] < 4):
            raise InputError(
                f"{volume_name(volume, what)}: {volume.shape} voxels is too small to register (4 per axis)"
            )
        extent = [n * s for n, s in zip(volume.shape, volume.spacing, strict=True)][1 if fixed_2d else 0 :]
        if min(extent) < MIN_EXTENT_MM:
            size = " x ".join(f"{e:.3g}" for e in extent)
            raise InputError(
                f"{volume_name(volume, what)}: covers only {size} mm, too small to register "
                f"(at least {MIN_EXTENT_MM:g} mm per axis); check its voxel spacing"
            )
    # Boxes (voxel centres +- half a voxel) of the fixed grid, mapped into the moving image's continuous index space.
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in fixed.shape[::-1]], indexing="ij")).reshape(3, -1)
    points = fixed.affine[:3, :3] @ corners + fixed.affine[:3, 3:]
    in_moving = np.linalg.solve(moving.affine[:3, :3], points - moving.affine[:3, 3:])
    size = np.array(moving.shape[::-1])
    if not prealigned and (np.any(in_moving.max(axis=1) < -0.5) or np.any(in_moving.min(axis=1) > size - 0.5)):
        raise InputError(
            f"{volume_name(moving, 'moving image')}: its physical extent does not overlap the fixed image "
            f"({volume_name(fixed, 'no file')}); check both images' origin and direction, or pre-align (--affine)"
        )


def covered(image: torch.Tensor, outside: np.ndarray | None) -> torch.Tensor:
    """``image`` (1, 1, Z, Y, X), normalised, with the background's 0 where ``outside`` (the fixed voxels a moving
    scan on another grid does not cover): both images then show background there, which gives no force. Without it
    the fixed image's tissue faced the moving scan's padding, and the network and demons pulled it towards that edge:
    a rigid motion onto a moving scan 24 mm shorter was recovered to 5.7 mm on the fixed slice next to its edge,
    0.7 mm in the middle (1.82 / 5.26 mm mean / p95 in the body, 0.93 / 1.88 with it). Not on one grid, where only the
    motion takes content out of the field: there it cost a plain deformation of the 3 mm CT 0.006 Dice."""
    if outside is None or not outside.any():
        return image
    return image.masked_fill(torch.from_numpy(outside).to(image.device)[None, None], 0.0)


def normalise(image: torch.Tensor, normalisation: Normalisation, low: float, high: float) -> torch.Tensor:
    """Intensities as the weights expect: min-max with the image's own (low, high), or a fixed HU window."""
    mode, window = normalisation
    if mode == "minmax":
        return (image - low) * (1.0 / (high - low))
    low_hu, high_hu = window
    return window_tensor(image, 0.5 * (low_hu + high_hu), high_hu - low_hu)


def _pad_amounts(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(before, after) padding per axis to the next multiple of 16, split evenly so the image stays centred."""
    pads = []
    for n in shape:
        extra = -n % SIZE_MULTIPLE
        pads.append((extra // 2, extra - extra // 2))
    return pads


def network_input(image: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(1, 1, D0, D1, D2) -> padded to multiples of 16 with zeros (the normalised background), and the crop back."""
    pads = _pad_amounts(tuple(image.shape[2:]))
    flat = [p for before_after in reversed(pads) for p in before_after]  # F.pad wants the last axis first
    padded = F.pad(image, flat) if any(flat) else image
    crop = tuple(slice(before, before + n) for (before, _), n in zip(pads, image.shape[2:], strict=True))
    return padded.contiguous(), crop


def padded_voxels(shape: tuple[int, ...]) -> int:
    """Voxels of the network input for an image of ``shape`` (each axis padded to a multiple of 16)."""
    return int(np.prod([n + before + after for n, (before, after) in zip(shape, _pad_amounts(shape), strict=True)]))


def working_shape(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    min_spacing_mm: float | None = None,
    max_voxels: int = MAX_NETWORK_VOXELS,
) -> tuple[int, int, int]:
    """The grid the network runs on: ``shape`` itself, or a coarser grid over the same extent.

    Coarser when the weights ask for voxels of at least ``min_spacing_mm`` or when the padded grid would exceed
    ``max_voxels`` (the card's ``inference.network_voxels``, at most `MAX_NETWORK_VOXELS`): each axis gets about
    ``extent / t`` voxels for the smallest spacing t that satisfies both, never more than it has (so the coarse axes
    of an anisotropic CT keep their voxels) and never fewer than 4. An axis of infinite spacing (the copies of a 2D
    slab) keeps its voxels.
    """

    def at(t: float) -> tuple[int, int, int]:
        return tuple(
            n if n == 1 or math.isinf(s) else min(n, max(4, round(n * s / t)))
            for n, s in zip(shape, spacing, strict=True)
        )

    t = max(min(spacing), min_spacing_mm or 0.0)
    while padded_voxels(at(t)) > max_voxels:
        t *= 1.02
    return at(t)


def float32_convolutions(strict: bool) -> contextlib.AbstractContextManager:
    """With ``strict``, cuDNN convolutions in true float32. PyTorch lets them use TF32 by default: a 10-bit mantissa,
    whose rounding (about 1e-3 relative) is as large as the official checkpoint's parity bound. No effect on the CPU."""
    if not strict:
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
    )


def forward_pair(network: SYMNet, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return network(
        fixed.contiguous(memory_format=torch.channels_last_3d), moving.contiguous(memory_format=torch.channels_last_3d)
    )


def symmetric_forward(network: SYMNet, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_xy, v_yx) averaged with the swapped pair's (v_yx, v_xy), in one batch of two.

    Swapping fixed and moving then swaps the two velocities exactly, so the registration of (B, A) is the inverse of
    that of (A, B) up to the integration's arithmetic, and two identical images give v_xy = v_yx, i.e. the identity
    map. The CT weights alone do not have either property: on an image registered to itself they moved voxels by up to
    5.6 mm (the 3 mm CT) and changed volume by more than 20% on a third of the 1 mm DICOM series.
    """
    v_xy, v_yx = forward_pair(network, torch.cat((fixed, moving)), torch.cat((moving, fixed)))
    return 0.5 * (v_xy[:1] + v_yx[1:]), 0.5 * (v_yx[:1] + v_xy[1:])


def as_tensor(array: np.ndarray, fill: float, device: torch.device) -> torch.Tensor:
    """(Z, Y, X) -> float32 (1, 1, Z, Y, X) on ``device``, NaN replaced by ``fill``."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not bool(tensor.isfinite().all()):  # torch's, out of place (the array may be the caller's): on every core
        tensor = torch.nan_to_num(tensor, nan=fill, posinf=fill, neginf=fill)
    return tensor[None, None].to(device)


def intensity_range(volume: Volume, what: str) -> tuple[float, float]:
    finite = volume.array if volume.array.dtype.kind in "iub" else volume.array[np.isfinite(volume.array)]
    if finite.size == 0 or finite.min() == finite.max():
        raise InputError(f"{volume_name(volume, what)}: the image is constant; there is nothing to register")
    return float(finite.min()), float(finite.max())


def are_copies(fixed: Volume, moving: Volume, normalisation: Normalisation, lows: tuple, highs: tuple) -> bool:
    """Whether two images on one grid are one scan twice (the same series read from DICOM and from NIfTI, say): their
    normalised intensities differ by less than `COPIES_METRIC` in mean square over the body (either image above
    `BODY_LEVEL`).

    Every fourth voxel along each axis is compared first: its squared differences are part of the whole sum, so when
    they alone reach `COPIES_METRIC` times the voxel count the images differ, without reading the rest (two scans of
    the 512 x 512 x 141 chest CT: 0.8 s for every voxel)."""
    cpu = torch.device("cpu")
    for step in (4, 1):
        cut = (slice(None, None, step),) * 3
        a = normalise(as_tensor(fixed.array[cut], lows[0], cpu), normalisation, lows[0], highs[0])
        b = normalise(as_tensor(moving.array[cut], lows[1], cpu), normalisation, lows[1], highs[1])
        body = (a > BODY_LEVEL) | (b > BODY_LEVEL)
        squares = float(((a - b)[body] ** 2).sum())
        if step > 1 and squares >= COPIES_METRIC * math.prod(fixed.shape):
            return False
    return bool(body.any()) and squares / int(body.sum()) < COPIES_METRIC
