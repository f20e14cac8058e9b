"""Registration engine: SYMNet deformable registration of two volumes, with physical geometry throughout.

Stages (each reports progress and may be cancelled before it starts):

1. model: load the weights (`load_registration_model`).
2. prealign (the CT card's default, or ``affine=True``): rigid, then affine SimpleITK registration, Mattes mutual
   information.
3. resample: the moving image into the fixed image's physical space (SimpleITK, linear, outside = moving minimum).
   Where the moving image does not reach (two scans of different extent), the fixed image is shown to the network
   and to the refinement as background too, so that neither pulls tissue towards the edge of the moving scan.
4. forward: normalise intensities as the weights expect, move the arrays into the axis order and orientation the
   network was trained in (`AxisMap`, from the model card), average onto the working grid when it is coarser
   (`working_shape`), pad each axis to a multiple of 16, run the network; with the card's ``inference.symmetric``
   also on the swapped pair, averaging the two answers (`_symmetric_forward`).
5. integrate: scaling and squaring of the four half-way velocity fields, the two compositions, upsampling to the
   fixed grid from a coarser working grid, and the fields moved back to the (Z, Y, X) arrays.
6. fields: the displacements in mm (LPS), composed with the pre-alignment.
7. refine (the CT card's default, or ``refine=N``): SimpleITK demons from that whole map, on the fixed image and the
   moving image as read, coarse to fine and ending at the fixed image's full resolution (`refine_field`), one
   progress step per few iterations; its inverse by ITK's fixed-point inversion (`invert_field`).
8. warp: the original moving image through the final ddf in one trilinear interpolation; labels with nearest.
9. metrics: Jacobian determinant, folding, inverse consistency, NCC, local NCC inside the body, overlap; `warnings`.

Axis conventions: the network sees (D0, D1, D2) in the orientation its card states (`orientation`); outside the
network, fields are on the (Z, Y, X) arrays and channel c is the displacement along array axis 2 - c, i.e. channels
(x, y, z) in voxels. A voxel vector v_xyz is s_xyz * v_xyz mm along the index axes, i.e.
``direction @ (spacing_xyz * v_xyz)`` mm in LPS.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from napari_ctcolor.errors import Cancelled
from napari_ctcolor.io import InputError, Volume
from napari_ctcolor.memory import check_memory
from napari_ctcolor.models.diffeo import compose, integrate_velocity, jacobian_determinant, sampling_grid
from napari_ctcolor.models.symnet import SIZE_MULTIPLE, SYMNet, half_way_fields
from napari_ctcolor.weights import find_weights, load_symnet
from napari_ctcolor.windowing import window_tensor

from .device import cpu_bf16, resolve_device
from .geometry import resample_onto, same_grid
from .orientation import AxisMap, check_axes
from .prealign import prealign
from .refine import REFINE_BYTES_PER_VOXEL, RefineSettings, check_iterations, chunks, invert_field, refine_field
from .steps import Cancel, Progress, Steps, blocking

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda", "mps"]

#: Intensity normalisation ``(mode, window)``: ``("minmax", None)`` maps each image's own range to [0, 1] (the
#: official checkpoint, per its README); ``("window", (low, high))`` clips HU to [low, high] and maps it to [0, 1]
#: (our CT weights; the window is read from their model card, ``inputs.normalisation.window_hu``).
Normalisation = tuple[str, tuple[float, float] | None]
OFFICIAL_NORMALISATION: Normalisation = ("minmax", None)
#: The official checkpoint saw nibabel's array of the neurite-OASIS volumes as stored: axes i, j, k pointing to the
#: patient's left, inferior and anterior (their affine, e.g. ``image_A_full_size.nii.gz``, is LIA).
OFFICIAL_AXES = ("L", "I", "A")

#: A 2D pair (one slice each) is registered as a slab of this many copies of the slice (see `register`).
SLAB_SLICES = SIZE_MULTIPLE

#: Peak memory of a registration per padded voxel (network activations, 4 fields being integrated, their temporaries):
#: `ctcolor register` on the OASIS pair (160 x 192 x 224) peaks at 3.7-4.1 GB resident on the CPU, up to 590 bytes per
#: voxel, with the allocator keeping freed memory for reuse (the CLI's `_reuse_freed_memory`; 2.6 GB without).
BYTES_PER_VOXEL = 600
#: Two images on one grid whose normalised intensities differ by less than this in mean square over the body are one
#: scan twice and get the identity without the network (`_copies`): an RMS of 0.1 % of the range, 2 HU under the CT
#: weights' 2000 HU window. The same series read from DICOM (integers) and from a float NIfTI differs by rounding,
#: under 0.5 HU; two acquisitions differ at least by both scans' noise (5-20 HU each: 7 HU RMS and more, a mean
#: square of 1.2e-5), which goes to the registration.
COPIES_METRIC = 1e-6
#: Memory per fixed-grid voxel of the full-resolution stages (fields in voxels and mm, warp grid, Jacobian).
FULL_GRID_BYTES_PER_VOXEL = 120
#: The network runs on at most this many padded voxels (256^3, ~10 GB at `BYTES_PER_VOXEL`): a larger fixed image
#: (a whole 512 x 512 x 300 CT) is registered on a coarser working grid, and the fields are upsampled.
MAX_NETWORK_VOXELS = 256**3

#: The inverse-consistency metric is evaluated at every IC_STRIDE-th voxel along each axis.
IC_STRIDE = 2

#: Local NCC (`local_ncc`): box side in voxels, and the body: voxels whose normalised fixed intensity exceeds
#: BODY_LEVEL (-500 HU in the CT weights' -1000..1000 window; a quarter of the range for min-max normalisation).
LNCC_WINDOW = 7
LNCC_EPSILON = 1e-6
BODY_LEVEL = 0.25
#: A registration is reported as doubtful (`warnings`) when a measure is beyond its limit: less overlap or local NCC,
#: more folding, inverse inconsistency or share of the body with det J outside 0.8..1.25.
#: These suit intra-patient CT (a follow-up scan, breathing): a model card can change any of them, or switch one off
#: with null, in ``inference.quality_limits``.
QUALITY_LIMITS: Mapping[str, float | None] = MappingProxyType(
    {
        "overlap_fraction": 0.8,
        "lncc_after": 0.3,
        "folding_fraction": 5e-4,
        "inverse_consistency_mm": 1.0,
        "volume_change_fraction": 0.5,
    }
)
#: The official OASIS checkpoint registers one subject's brain to another's: local volume change there is anatomy
#: (ventricles, sulci), not a failure, so det J far from 1 is not reported (on the OASIS pair it is on 59 % of the
#: brain). The other limits hold.
INTER_SUBJECT_LIMITS: Mapping[str, float | None] = MappingProxyType({**QUALITY_LIMITS, "volume_change_fraction": None})


@dataclass
class RegistrationResult:
    """The output of `register`, all on the fixed image's grid.

    Attributes:
        warped: the moving image in the fixed image's space, in its original units (float32; HU for CT).
        ddf: float32 (Z, Y, X, 3), mm, LPS (x, y, z) components, ITK convention: fixed point p maps to moving point
            p + ddf(p) (the original moving image's space, pre-alignment included). ``sitk.DisplacementFieldTransform``
            of it resamples the moving image onto the fixed grid like ``warped``.
        inverse_ddf: float32 (Z, Y, X, 3), mm, LPS: moving point q maps to fixed point q + inverse_ddf(q), sampled at
            the fixed grid's points (so it covers the moving image where it overlaps the fixed image's box).
        jacobian: det J of the map p -> p + ddf(p), float32 on the fixed grid (1 keeps volume, <= 0 folds).
        metrics: ncc_before, ncc_after (global NCC over the fixed grid; ncc_prealigned, prealign_matrix and
            prealign_offset_mm with the pre-alignment), lncc_before, lncc_after (`local_ncc` in the body),
            folding_fraction, volume_change_fraction (det J outside 0.8..1.25 in the body), inverse_consistency_mm,
            overlap_fraction (of the body covered by the moving image), seconds, stage_seconds, model, network_shape
            (the grid the network ran on), device, refine_iterations, refine_matched (the refinement stopped early: the
            images agreed within noise, `refine.MATCHED_METRIC`), copies (one scan twice: the identity without the
            network, `COPIES_METRIC`), affine, symmetric, and warnings (`warnings`).
        warped_labels: the moving labels in the fixed image's space (nearest), when labels were given.
    """

    warped: Volume
    ddf: np.ndarray
    inverse_ddf: np.ndarray
    jacobian: Volume
    metrics: dict[str, Any]
    warped_labels: Volume | None = None


# --- model and device ------------------------------------------------------------------------------------------------


@dataclass
class RegistrationModel:
    """A SYMNet with what the engine needs to know about it.

    Attributes:
        network: the network, eval mode.
        normalisation: the intensity normalisation its weights expect.
        name: for the metrics (``"ct"`` or the file name).
        axes: the orientation of the network's axes D0, D1, D2 (RAS letters), from the card's ``inputs.axes``.
        min_spacing_mm: the finest voxel the network is run at (coarser working grid below it), from the model card's
            ``inputs.min_spacing_mm``; None runs it on the fixed grid.
        refine: full-resolution refinement settings, from the card's ``inference.refine`` (default iterations).
        prealign: whether the affine pre-alignment runs by default (the card's ``inference.prealign``: "affine").
        symmetric: run the network on (fixed, moving) and (moving, fixed) and average (``inference.symmetric``).
        limits: the quality limits of `warnings` (`QUALITY_LIMITS` with the card's ``inference.quality_limits``).
        bf16: the network may run under bfloat16 autocast (``inference.bf16``): on CUDA, and on a CPU where that
            is faster (`device.cpu_bf16`). Never for an official checkpoint, whose parity is to 1e-3: it runs in
            float32, on CUDA without TF32 convolutions too (`_float32_convolutions`).
        network_voxels: the most padded voxels the network runs on (`working_shape`): the card's
            ``inference.network_voxels`` (at most `MAX_NETWORK_VOXELS`, the default), so that a large CT is
            registered on a coarser working grid and the refinement adds the detail.
    """

    network: SYMNet
    normalisation: Normalisation
    name: str
    axes: tuple[str, str, str] = OFFICIAL_AXES
    min_spacing_mm: float | None = None
    refine: RefineSettings = RefineSettings()
    prealign: bool = False
    symmetric: bool = False
    limits: Mapping[str, float | None] = field(default_factory=lambda: QUALITY_LIMITS)
    bf16: bool = False
    network_voxels: int = MAX_NETWORK_VOXELS


_MODEL_CACHE: dict[tuple, RegistrationModel] = {}


def load_registration_model(model: str | os.PathLike) -> RegistrationModel:
    """The network for ``model``, the intensity normalisation it expects and its name for the metrics.

    Cached per process (as the colorizers are), keyed by the name or by the file with its size and modification
    time, so a re-run in the viewer or a batch worker's next task does not load it again. Its weights are never
    changed; `register` moves the cached module to the run's
    device and memory format in place, which every run sets again.

    Args:
        model: ``"ct"`` (the project's CT weights, sha256-checked against their card) or the path of a SYMNet
            checkpoint: an official ``.pth`` state dict (recognised by its keys, read with ``weights_only=True``) or a
            ``.safetensors`` file of ours with its model card beside it.
    """
    path = Path(model)
    key = (str(model), *((path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else ()))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = _load_registration_model(model)
    return _MODEL_CACHE[key]


def _load_registration_model(model: str | os.PathLike) -> RegistrationModel:
    if str(model) == "ct":
        try:
            find_weights("symnet-ct")
        except InputError:
            raise InputError(
                "CT weights not found (weights/symnet-ct.safetensors); use --model FILE with a SYMNet checkpoint"
            ) from None
        network, card = load_symnet("symnet-ct")  # a damaged file or sha256 mismatch reports itself
        name = "ct"
    else:
        path = Path(model)
        if not path.is_file():
            raise InputError(f"{path}: model file not found (use 'ct' or the path of a SYMNet .pth checkpoint)")
        network, card = load_symnet(path)
        if path.suffix.lower() in (".pth", ".pt"):
            return RegistrationModel(network, OFFICIAL_NORMALISATION, path.name, limits=INTER_SUBJECT_LIMITS)
        name = path.name
    inputs = card.get("inputs", {})
    if "axes" not in inputs:
        raise InputError(f"{name}: its model card does not state the network's axes (inputs.axes, e.g. [S, P, L])")
    min_spacing = inputs.get("min_spacing_mm")
    inference = card.get("inference", {})
    if inference.get("prealign", "none") not in ("none", "affine"):
        raise InputError(f"{name}: its model card's inference.prealign must be 'none' or 'affine'")
    return RegistrationModel(
        network,
        _card_normalisation(card, name),
        name,
        check_axes(inputs["axes"], name),
        min_spacing and float(min_spacing),
        RefineSettings.from_card(inference.get("refine"), name),
        inference.get("prealign") == "affine",
        bool(inference.get("symmetric", False)),
        _card_limits(inference.get("quality_limits"), name),
        bool(inference.get("bf16", False)),
        _card_network_voxels(inference.get("network_voxels"), name),
    )


def _card_network_voxels(value: Any, name: str) -> int:
    """A card's ``inference.network_voxels``: a whole number of voxels (at least 16^3), at most `MAX_NETWORK_VOXELS`."""
    if value is None:
        return MAX_NETWORK_VOXELS
    if isinstance(value, bool) or not isinstance(value, int) or value < 16**3:
        raise InputError(f"{name}: its model card's inference.network_voxels must be a whole number >= 4096")
    return min(value, MAX_NETWORK_VOXELS)


def _card_limits(spec: Any, name: str) -> Mapping[str, float | None]:
    """`QUALITY_LIMITS` updated by a card's ``inference.quality_limits`` (numbers, or null to switch one off)."""
    if spec is None:
        return QUALITY_LIMITS
    if not isinstance(spec, dict) or set(spec) - set(QUALITY_LIMITS):
        raise InputError(f"{name}: inference.quality_limits may set only {', '.join(QUALITY_LIMITS)}")
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in spec.values()):
        raise InputError(f"{name}: inference.quality_limits values are numbers or null")
    return MappingProxyType({**QUALITY_LIMITS, **{k: None if v is None else float(v) for k, v in spec.items()}})


def _card_normalisation(card: dict[str, Any], name: str) -> Normalisation:
    spec = card.get("inputs", {}).get("normalisation", {})
    if spec.get("mode") == "minmax":
        return OFFICIAL_NORMALISATION
    window = spec.get("window_hu")
    if spec.get("mode") != "window" or not isinstance(window, list) or len(window) != 2 or window[0] >= window[1]:
        raise InputError(f"{name}: its model card does not give the intensity normalisation (inputs.normalisation)")
    return "window", (float(window[0]), float(window[1]))


# --- stages ----------------------------------------------------------------------------------------------------------


class _Stages:
    """Progress callbacks, cancellation checks and wall-clock timing of the engine's stages."""

    def __init__(self, total: int, progress: Progress | None, cancel: Cancel | None, device: torch.device):
        self.total, self.done = total, 0
        self.skipped = 0  # refinement ticks not run: it stopped early (`refine.MATCHED_METRIC`)
        self.progress, self.cancel, self.device = progress, cancel, device
        self.seconds: dict[str, float] = {}

    def _check_cancel(self, what: str) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled(f"registration cancelled {what}")

    def tick(self) -> tuple[int, int, str]:
        """One step inside a stage (a refinement step): count it, report it, poll cancel; ``(done, total, stage)``."""
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
        self._check_cancel(f"after step {self.done} of {self.total}")
        return self.done, self.total, "refinement"

    def step(self, following: str) -> tuple[int, int, str]:
        """The step after a stage: ``(done, total, following)``, the name of the stage that runs next."""
        return self.done, self.total, following

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._check_cancel(f"before stage '{name}'")
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels are asynchronous: charge them to their own stage
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.info("register: %-10s %6.2f s", name, self.seconds[name])
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


# --- geometry --------------------------------------------------------------------------------------------------------


def _name(volume: Volume, fallback: str) -> str:
    return str(volume.meta.get("source") or fallback)


def _index_to_mm(volume: Volume) -> np.ndarray:
    """3x3 M = direction @ diag(spacing_xyz): a voxel vector (x, y, z) -> an LPS vector in mm."""
    return volume.direction @ np.diag(volume.spacing[::-1])


#: The least extent per axis (mm) of an image to register: two of the pre-alignment's voxels (`PREALIGN_BASE_MM`).
MIN_EXTENT_MM = 4.0


def _check_pair(fixed: Volume, moving: Volume, prealigned: bool = False) -> None:
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
            f"{_name(moving, 'moving image')}: cannot register a {dims[1]} moving image to a {dims[0]} fixed image; "
            "give two 2D or two 3D images"
        )
    for volume, what in ((fixed, "fixed image"), (moving, "moving image")):
        if min(volume.shape[1:]) < 4 or (not fixed_2d and volume.shape[0] < 4):
            raise InputError(f"{_name(volume, what)}: {volume.shape} voxels is too small to register (4 per axis)")
        extent = [n * s for n, s in zip(volume.shape, volume.spacing, strict=True)][1 if fixed_2d else 0 :]
        if min(extent) < MIN_EXTENT_MM:
            size = " x ".join(f"{e:.3g}" for e in extent)
            raise InputError(
                f"{_name(volume, what)}: covers only {size} mm, too small to register "
                f"(at least {MIN_EXTENT_MM:g} mm per axis); check its voxel spacing"
            )
    # Boxes (voxel centres +- half a voxel) of the fixed grid, mapped into the moving image's continuous index space.
    corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in fixed.shape[::-1]], indexing="ij")).reshape(3, -1)
    points = fixed.affine[:3, :3] @ corners + fixed.affine[:3, 3:]
    in_moving = np.linalg.solve(moving.affine[:3, :3], points - moving.affine[:3, 3:])
    size = np.array(moving.shape[::-1])
    if not prealigned and (np.any(in_moving.max(axis=1) < -0.5) or np.any(in_moving.min(axis=1) > size - 0.5)):
        raise InputError(
            f"{_name(moving, 'moving image')}: its physical extent does not overlap the fixed image "
            f"({_name(fixed, 'no file')}); check both images' origin and direction, or pre-align (--affine)"
        )


def _affine_parts(transform: sitk.AffineTransform | None) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with transform(x) = A x + b in LPS mm; the identity for None."""
    if transform is None:
        return np.eye(3), np.zeros(3)
    a = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre, translation = np.asarray(transform.GetCenter()), np.asarray(transform.GetTranslation())
    return a, centre + translation - a @ centre


def _affine_field(
    shape: tuple[int, int, int], linear: np.ndarray, const: np.ndarray, like: torch.Tensor
) -> torch.Tensor:
    """(Z, Y, X, 3): const + linear @ (i, j, k) at every voxel (i, j, k) = (X, Y, Z) index.

    Built from three broadcast 1D terms, without a coordinate grid.
    """
    linear = torch.as_tensor(linear, dtype=like.dtype, device=like.device)
    z, y, x = (torch.arange(n, dtype=like.dtype, device=like.device) for n in shape)
    out = torch.as_tensor(const, dtype=like.dtype, device=like.device) + z[:, None, None, None] * linear[:, 2]
    return out + y[None, :, None, None] * linear[:, 1] + x[None, None, :, None] * linear[:, 0]


def _affine_displacement(grid: Volume, a: np.ndarray, b: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """(Z, Y, X, 3) mm: A x + b - x at every voxel position x of ``grid`` (LPS)."""
    a_minus_i = a - np.eye(3)
    const = a_minus_i @ np.asarray(grid.origin) + b
    return _affine_field(grid.shape, a_minus_i @ _index_to_mm(grid), const, like)


def _physical_sampling_grid(image: Volume, grid: Volume, offset_mm: torch.Tensor) -> torch.Tensor:
    """``grid_sample`` grid (1, Z, Y, X, 3), ``align_corners=True``, that reads ``image`` at x + offset_mm(x).

    x runs over ``grid``'s voxel positions (LPS mm); ``image`` may have any geometry. This is how the moving image is
    warped by the final ddf in one interpolation, whatever its grid and the pre-alignment.

    Args:
        image: the volume to be sampled (its pixels are not read).
        grid: the output geometry.
        offset_mm: (Z, Y, X, 3) on ``grid``, LPS mm.
    """
    # mm -> image index (i, j, k) -> normalised [-1, 1] coordinates; a singleton axis maps to -1 as in diffeo.
    to_normalised = np.diag(2.0 / np.maximum(np.array(image.shape[::-1]) - 1, 1)) @ np.linalg.inv(_index_to_mm(image))
    linear = to_normalised @ _index_to_mm(grid)
    const = to_normalised @ (np.asarray(grid.origin) - np.asarray(image.origin)) - 1.0
    to_normalised = torch.as_tensor(to_normalised, dtype=offset_mm.dtype, device=offset_mm.device)
    return (_affine_field(grid.shape, linear, const, offset_mm) + offset_mm @ to_normalised.T).unsqueeze(0)


def _sample(image: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``grid_sample`` with the project's conventions (``align_corners=True``, zeros outside)."""
    return F.grid_sample(image, grid.to(image.dtype), mode=mode, padding_mode="zeros", align_corners=True)


def _voxels_to_mm(field: torch.Tensor, grid: Volume) -> torch.Tensor:
    """(1, 3, Z, Y, X) voxels, channels (x, y, z) -> (Z, Y, X, 3) mm, LPS (x, y, z)."""
    m = torch.as_tensor(_index_to_mm(grid), dtype=field.dtype, device=field.device)
    return field[0].permute(1, 2, 3, 0) @ m.T


# --- network input and fields ----------------------------------------------------------------------------------------


def _covered(image: torch.Tensor, outside: np.ndarray | None) -> torch.Tensor:
    """``image`` (1, 1, Z, Y, X), normalised, with the background's 0 where ``outside`` (the fixed voxels a moving
    scan on another grid does not cover): both images then show background there, which gives no force. Without it
    the fixed image's tissue faced the moving scan's padding, and the network and demons pulled it towards that edge:
    a rigid motion onto a moving scan 24 mm shorter was recovered to 5.7 mm on the fixed slice next to its edge,
    0.7 mm in the middle (1.82 / 5.26 mm mean / p95 in the body, 0.93 / 1.88 with it). Not on one grid, where only the
    motion takes content out of the field: there it cost a plain deformation of the 3 mm CT 0.006 Dice."""
    if outside is None or not outside.any():
        return image
    return image.masked_fill(torch.from_numpy(outside).to(image.device)[None, None], 0.0)


def _normalise(image: torch.Tensor, normalisation: Normalisation, low: float, high: float) -> torch.Tensor:
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


def _network_input(image: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(1, 1, D0, D1, D2) -> padded to multiples of 16 with zeros (the normalised background), and the crop back."""
    pads = _pad_amounts(tuple(image.shape[2:]))
    flat = [p for before_after in reversed(pads) for p in before_after]  # F.pad wants the last axis first
    padded = F.pad(image, flat) if any(flat) else image
    crop = tuple(slice(before, before + n) for (before, _), n in zip(pads, image.shape[2:], strict=True))
    return padded.contiguous(), crop


def _padded_voxels(shape: tuple[int, ...]) -> int:
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
    while _padded_voxels(at(t)) > max_voxels:
        t *= 1.02
    return at(t)


def _resize_field(fields: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, 3, D0, D1, D2) voxels -> the same displacements on a grid of ``shape`` over the same extent.

    Trilinear with ``align_corners=False`` (voxel boxes tile the same extent, as adaptive average pooling's), and each
    channel (x, y, z) rescaled to the new grid's voxels.
    """
    ratio = [new / old for new, old in zip(shape[::-1], fields.shape[2:][::-1], strict=True)]
    scale = torch.tensor(ratio, dtype=fields.dtype, device=fields.device).view(1, 3, 1, 1, 1)
    return F.interpolate(fields * scale, size=tuple(shape), mode="trilinear", align_corners=False)


def _integrate_halves(
    v_xy: torch.Tensor, v_yx: torch.Tensor, inverse: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(f_ab, f_ba) as `symnet_forward_fields`: integrate v_xy, v_yx, -v_xy, -v_yx (one batch), `half_way_fields`.
    ``inverse=False``: f_ab is None, and only the two halves that f_ba composes (v_yx, -v_xy) are integrated (half the
    work). Each field of a batch is integrated on its own, but the halved batch may fall below
    `diffeo.KERNEL_MIN_VOXELS` and take ``grid_sample`` instead of the numba kernel: f_ba then differs by float32
    rounding (1e-3 voxels measured on a 1.3-million-voxel field)."""
    if not inverse:
        yx_half, xy_half_inv = integrate_velocity(torch.cat((v_yx, -v_xy), dim=0).float().contiguous()).chunk(2)
        return None, compose(yx_half, xy_half_inv)
    v = torch.cat((v_xy, v_yx), dim=0).float()
    fields = half_way_fields(integrate_velocity(torch.cat((v, -v), dim=0).contiguous()))
    return fields.f_ab, fields.f_ba


def _slab_to_slice(field: torch.Tensor) -> torch.Tensor:
    """(1, 3, SLAB_SLICES, Y, X) -> (1, 3, 1, Y, X): the mean of the two middle slices, no through-plane motion."""
    middle = slice(SLAB_SLICES // 2 - 1, SLAB_SLICES // 2 + 1)
    field = field[:, :, middle].mean(dim=2, keepdim=True)
    field[:, 2] = 0.0
    return field.contiguous()


def global_ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised cross-correlation of two images over all their voxels, in [-1, 1] (0 when one is constant)."""
    a = a.flatten().double()
    b = b.flatten().double()
    a = a - a.mean()
    b = b - b.mean()
    denominator = float(torch.sqrt((a @ a) * (b @ b)))
    return float(a @ b) / denominator if denominator > 0 else 0.0


def _inverse_consistency_mm(f_ab: torch.Tensor, f_ba: torch.Tensor, spacing_xyz: torch.Tensor) -> float:
    """Mean round-trip residual length in mm, both directions averaged, at every `IC_STRIDE`-th voxel per axis.

    The residual of "f2, then f1" at p is f2(p) + f1(p + f2(p)) (as `compose`), zero for exact inverses, over the
    points p whose p + f2(p) lies on the grid (where f1 is known: a pre-aligned shift moves part of the grid off it).
    Sampling 1/8 of the voxels estimates the mean to well under 1% and costs 1/8 of two full compositions.
    """
    scale = spacing_xyz.view(1, 3, 1, 1, 1)
    step = slice(None, None, IC_STRIDE)

    def residual_mm(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        grid = sampling_grid(f2)[:, step, step, step]
        moved = F.grid_sample(f1, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        residual = ((moved + f2[:, :, step, step, step]) * scale).norm(dim=1)
        on_grid = (grid.abs() <= 1.0).all(dim=-1)
        return residual[on_grid].mean() if bool(on_grid.any()) else residual.new_zeros(())

    return float(0.5 * (residual_mm(f_ab, f_ba) + residual_mm(f_ba, f_ab)))


def local_ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean local normalised cross-correlation of two (1, 1, Z, Y, X) images over ``mask``, in [-1, 1].

    The correlation in a box of `LNCC_WINDOW` voxels around each voxel (means, variances and covariance over the box,
    boxes clipped at the border), as MONAI's ``LocalNormalizedCrossCorrelationLoss`` with a rectangular kernel, and
    written here with separable average pooling because importing ``monai.losses`` costs every ``ctcolor register``
    about 3 s of start-up. A voxel whose box is constant in either image counts as 0. 0 for an empty mask.

    The mean is taken at every `IC_STRIDE`-th voxel along each axis (the pooling strides there, so the boxes cost
    about a third of full resolution: 2.4 s -> 0.8 s on a 160x192x224 pair); like the inverse-consistency sample, it
    estimates the mean over the mask to well under 1 %.
    """
    if not bool(mask.any()):
        return 0.0
    k, pad = LNCC_WINDOW, LNCC_WINDOW // 2

    def box(t: torch.Tensor) -> torch.Tensor:
        for axis in (2, 1, 0):  # the contiguous axis first, at full resolution; each pass strides its own axis
            if t.shape[2 + axis] == 1:  # a 2D image: no box across its single slice
                continue
            kernel, stride, padding = [1, 1, 1], [1, 1, 1], [0, 0, 0]
            kernel[axis], stride[axis], padding[axis] = k, IC_STRIDE, pad
            t = F.avg_pool3d(t, tuple(kernel), stride=tuple(stride), padding=tuple(padding), count_include_pad=False)
        return t

    # Box centres at 0, s, 2s, ... on each pooled axis: the voxels mask[::s, ::s, ::s] (a singleton axis keeps its one).
    mask = mask[..., ::IC_STRIDE, ::IC_STRIDE, ::IC_STRIDE]
    if not bool(mask.any()):
        return 0.0

    a, b = a.float(), b.float()
    mean_a, mean_b = box(a), box(b)
    var_a = (box(a * a) - mean_a * mean_a).clamp_min(0)
    var_b = (box(b * b) - mean_b * mean_b).clamp_min(0)
    covariance = box(a * b) - mean_a * mean_b
    denominator = torch.sqrt(var_a * var_b)
    ncc = torch.where(denominator > LNCC_EPSILON, covariance / denominator.clamp_min(LNCC_EPSILON), 0.0)
    return float(ncc[mask].double().mean())


def quality_warnings(metrics: dict[str, Any], limits: Mapping[str, float | None] = QUALITY_LIMITS) -> list[str]:
    """One line per quality measure out of its range (``limits``; a None limit is not checked); empty when the
    registration looks sound."""
    out = []
    if metrics.get("copies"):
        out.append(
            "the two images are one scan twice (intensities within 2 HU on one grid): the result is the identity; "
            "check that the moving image is the series you meant"
        )

    def below(key: str) -> bool:
        return limits[key] is not None and metrics[key] < limits[key]

    def above(key: str) -> bool:
        return limits[key] is not None and metrics[key] > limits[key]

    if below("overlap_fraction"):
        out.append(
            f"the moving image covers only {100 * metrics['overlap_fraction']:.0f}% of the fixed image's body; "
            "the rest is not registered"
        )
    if below("lncc_after"):
        out.append(
            f"local NCC in the body is {metrics['lncc_after']:.2f} after registration (below "
            f"{limits['lncc_after']}): the images are not aligned; check that they show the same anatomy"
            + ("" if metrics["affine"] else ", or pre-align (--affine)")
        )
    if above("folding_fraction"):
        out.append(f"the field folds on {100 * metrics['folding_fraction']:.3f}% of voxels (det J <= 0)")
    if above("inverse_consistency_mm"):
        out.append(
            f"the field does not undo itself: mapped forward and back, points land "
            f"{metrics['inverse_consistency_mm']:.1f} mm from where they started on average (sound: under "
            f"{limits['inverse_consistency_mm']:g} mm); the scans may not show the same region or anatomy"
            + ("" if metrics.get("affine") else ", or need pre-alignment (--affine)")
        )
    if above("volume_change_fraction"):
        out.append(
            f"det J is outside 0.8..1.25 on {100 * metrics['volume_change_fraction']:.0f}% of the body: "
            "large local volume changes; check the warped image"
        )
    return out


def _float32_convolutions(strict: bool) -> contextlib.AbstractContextManager:
    """With ``strict``, cuDNN convolutions in true float32. PyTorch lets them use TF32 by default: a 10-bit mantissa,
    whose rounding (about 1e-3 relative) is as large as the official checkpoint's parity bound. No effect on the CPU."""
    if not strict:
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(
        enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False
    )


def _forward(network: SYMNet, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return network(
        fixed.contiguous(memory_format=torch.channels_last_3d), moving.contiguous(memory_format=torch.channels_last_3d)
    )


def _symmetric_forward(network: SYMNet, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_xy, v_yx) averaged with the swapped pair's (v_yx, v_xy), in one batch of two.

    Swapping fixed and moving then swaps the two velocities exactly, so the registration of (B, A) is the inverse of
    that of (A, B) up to the integration's arithmetic, and two identical images give v_xy = v_yx, i.e. the identity
    map. The CT weights alone do not have either property: on an image registered to itself they moved voxels by up to
    5.6 mm (the 3 mm CT) and changed volume by more than 20% on a third of the 1 mm DICOM series.
    """
    v_xy, v_yx = _forward(network, torch.cat((fixed, moving)), torch.cat((moving, fixed)))
    return 0.5 * (v_xy[:1] + v_yx[1:]), 0.5 * (v_yx[:1] + v_xy[1:])


def _mm_to_voxels(field: torch.Tensor, grid: Volume) -> torch.Tensor:
    """(Z, Y, X, 3) mm, LPS -> (1, 3, Z, Y, X) voxels of ``grid``, channels (x, y, z) (inverse of `_voxels_to_mm`)."""
    m_inv = torch.as_tensor(np.linalg.inv(_index_to_mm(grid)), dtype=field.dtype, device=field.device)
    return (field @ m_inv.T).permute(3, 0, 1, 2)[None].contiguous()


def _as_tensor(array: np.ndarray, fill: float, device: torch.device) -> torch.Tensor:
    """(Z, Y, X) -> float32 (1, 1, Z, Y, X) on ``device``, NaN replaced by ``fill``."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        array = np.nan_to_num(array, nan=fill, posinf=fill, neginf=fill)
    return torch.from_numpy(array)[None, None].to(device)


def _intensity_range(volume: Volume, what: str) -> tuple[float, float]:
    finite = volume.array if volume.array.dtype.kind in "iub" else volume.array[np.isfinite(volume.array)]
    if finite.size == 0 or finite.min() == finite.max():
        raise InputError(f"{_name(volume, what)}: the image is constant; there is nothing to register")
    return float(finite.min()), float(finite.max())


def _copies(fixed: Volume, moving: Volume, normalisation: Normalisation, lows: tuple, highs: tuple) -> bool:
    """Whether two images on one grid are one scan twice (the same series read from DICOM and from NIfTI, say): their
    normalised intensities differ by less than `COPIES_METRIC` in mean square over the body (either image above
    `BODY_LEVEL`).

    Every fourth voxel along each axis is compared first: its squared differences are part of the whole sum, so when
    they alone reach `COPIES_METRIC` times the voxel count the images differ, without reading the rest (two scans of
    the 512 x 512 x 141 chest CT: 0.8 s for every voxel)."""
    cpu = torch.device("cpu")
    for step in (4, 1):
        cut = (slice(None, None, step),) * 3
        a = _normalise(_as_tensor(fixed.array[cut], lows[0], cpu), normalisation, lows[0], highs[0])
        b = _normalise(_as_tensor(moving.array[cut], lows[1], cpu), normalisation, lows[1], highs[1])
        body = (a > BODY_LEVEL) | (b > BODY_LEVEL)
        squares = float(((a - b)[body] ** 2).sum())
        if step > 1 and squares >= COPIES_METRIC * math.prod(fixed.shape):
            return False
    return bool(body.any()) and squares / int(body.sum()) < COPIES_METRIC


def _ticks(steps: Iterator[None], stages: _Stages, count: int) -> Steps[np.ndarray]:
    """Run a refinement generator of at most ``count`` yields, reporting each as a progress tick (those it skipped
    by stopping early are counted at its end); return its value."""
    end = stages.done + count
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            stages.skipped, stages.done = end - stages.done, end
            return stop.value
        yield stages.tick()


# --- the engine ------------------------------------------------------------------------------------------------------


def iter_register(
    fixed: Volume,
    moving: Volume,
    model: str | os.PathLike = "ct",
    affine: bool | None = None,
    refine: int | None = None,
    device: Device | str = "auto",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    moving_labels: Volume | None = None,
    prealignment: Callable[[], sitk.Transform | None] | None = None,
) -> Steps[RegistrationResult]:
    """Register ``moving`` to ``fixed`` with SYMNet (optionally after an affine pre-alignment).

    Example (the official checkpoint on the shared OASIS pair)::

        fixed = read_volume("../shared/data/symnet-oasis/image_A_full_size.nii.gz")
        moving = read_volume("../shared/data/symnet-oasis/image_B_full_size.nii.gz")
        checkpoint = "../shared/data/symnet-oasis/SYMNet_neurite_oasis_smo30_update_80000.pth"
        result = register(fixed, moving, model=checkpoint)
        result.metrics["ncc_before"], result.metrics["ncc_after"]   # 0.888 -> 0.983

    A generator of ``(done, total)`` steps, one after each stage and each refinement chunk, that returns the
    `RegistrationResult`: a napari ``GeneratorWorker`` runs it with a progress bar, and its ``quit()`` closes the
    generator between two steps. `register` runs it to the end.

    2D pairs (one slice each) are registered as a slab of 16 copies of the slice; the fields are the mean of the two
    middle slices with the through-plane component set to 0. The network never saw such slabs in training, so treat
    2D results as approximate.

    The network runs on the fixed grid, or on a coarser grid over the same extent (`working_shape`) when the weights'
    card asks for a minimum voxel size or the padded grid would exceed the card's voxel budget (``network_voxels``;
    at most `MAX_NETWORK_VOXELS`, a whole 512 x 512 x 300 CT exceeds it); the fields are then upsampled to the fixed
    grid, and warping, Jacobian and metrics stay at full resolution.
    ``metrics["network_shape"]`` says which grid was used.

    Args:
        fixed: (Z, Y, X) volume in its own units; the output grid.
        moving: (Z, Y, X) volume, any grid overlapping the fixed one in physical (LPS) space.
        model: ``"ct"`` (the project's CT weights) or the path of a SYMNet checkpoint: an official ``.pth`` or a
            ``.safetensors`` file with its model card (`load_registration_model`).
        affine: rigid then affine SimpleITK pre-alignment (Mattes MI, a few seconds), composed into the fields;
            None takes the model card's default (``inference.prealign``: on for the CT weights, off for an official
            checkpoint, whose training pairs were already affinely aligned).
        refine: demons iterations (0..10000) at the fixed image's resolution, seeded by the network (`refine_field`;
            0: the network alone); None takes the model card's default (``inference.refine.iterations``; 0 for an
            official checkpoint). 2D pairs are not refined.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"`` or ``"mps"``. Where the card allows it
            (``inference.bf16``: the CT weights) the network runs under bfloat16 autocast on CUDA and on a CPU where
            that is faster (`device.cpu_bf16`); an official checkpoint runs in float32 everywhere. Integration and
            warping stay in float32.
        progress: called as ``progress(done, total)`` after each stage.
        cancel: called before each stage; when it returns True the engine raises `Cancelled`.
        moving_labels: an optional label map on the moving image's grid (or any grid), warped with nearest.
        prealignment: used when the pre-alignment runs: a function that returns `prealign`'s transform of this
            pair computed elsewhere (``ctcolor register`` runs it in a child that reads its inputs while this
            process imports torch), or None where that could not run. None: computed here.

    Returns:
        `RegistrationResult` on the fixed grid.

    Raises:
        InputError: 2D vs 3D images, images that do not overlap, a constant image, a missing model file, a
            refinement count outside 0..10000, a refinement too large for the memory.
        Cancelled: when ``cancel()`` returned True.
    """
    start = time.perf_counter()
    two_d = fixed.shape[0] == 1
    loaded = load_registration_model(model)  # before the stages: a bad file or refinement count fails at once
    affine = (loaded.prealign and not two_d) if affine is None else bool(affine)  # 2D: never by default
    _check_pair(fixed, moving, prealigned=affine)
    fixed, moving = fixed.finite(), moving.finite()
    torch_device = resolve_device(device)
    fixed_low, fixed_high = _intensity_range(fixed, "fixed image")
    moving_low, moving_high = _intensity_range(moving, "moving image")
    if two_d:
        iterations = 0
    else:
        iterations = loaded.refine.auto_iterations(fixed.shape) if refine is None else check_iterations(refine)
    # One scan twice: the identity, without pre-alignment, network or refinement (seconds instead of minutes).
    check_start = time.perf_counter()
    lows, highs = (fixed_low, moving_low), (fixed_high, moving_high)
    copies = not two_d and same_grid(fixed, moving) and _copies(fixed, moving, loaded.normalisation, lows, highs)
    check_seconds = round(time.perf_counter() - check_start, 3)
    if copies:
        affine, iterations = False, 0
    ticks = chunks(fixed.spacing, iterations)
    # 7 stages, the pre-alignment, and the refinement: one tick per few demons iterations, one when its stage ends.
    stages = _Stages(7 + affine + (ticks + 1 if iterations else 0), progress, cancel, torch_device)
    stages.seconds["copies"] = check_seconds

    with stages("model"):
        # The network's view of the fixed grid: its axes (a 2D slice as a slab whose copies are never averaged).
        axis_map = AxisMap.between(fixed, loaded.axes)
        grid_shape = (SLAB_SLICES, *fixed.shape[1:]) if two_d else fixed.shape
        grid_spacing = (float("inf"), *fixed.spacing[1:]) if two_d else fixed.spacing
        net_shape = axis_map.shape_to_network(grid_shape)
        work = working_shape(
            net_shape, axis_map.shape_to_network(grid_spacing), loaded.min_spacing_mm, loaded.network_voxels
        )
        # BYTES_PER_VOXEL covers the whole run when the network sees the fixed grid (twice the activations for the
        # swapped pair); a coarser working grid leaves the full-resolution stages on the fixed grid, and the
        # network's activations are freed before the refinement: the larger of the two phases counts, not their sum.
        # The 512 x 512 x 141 chest CT against a breathing motion of itself (network on 107 x 189 x 189, refined)
        # peaked at 8.5 GB resident, estimated 12.7 GB (17.7 GB as a sum; 2 threads, 2026-11-26).
        network_bytes = _padded_voxels(work) * BYTES_PER_VOXEL * (1 + loaded.symmetric)
        refine_bytes = int(np.prod(fixed.shape)) * REFINE_BYTES_PER_VOXEL if iterations else 0
        if work != net_shape:
            needed = int(np.prod(fixed.shape)) * FULL_GRID_BYTES_PER_VOXEL + max(network_bytes, refine_bytes)
        else:
            needed = network_bytes + refine_bytes
        what = f"registration of {fixed.shape} voxels" + (" with refinement (try --refine 0)" if iterations else "")
        check_memory(needed, what)
        network, normalisation = loaded.network.to(torch_device), loaded.normalisation
    yield stages.step("pre-alignment" if affine else "resampling")
    transform = None
    if affine:
        with stages("prealign"):
            transform = (prealignment and prealignment()) or prealign(fixed, moving, cancel)
        yield stages.step("resampling")

    with stages("resample"):
        if transform is None and same_grid(fixed, moving):
            moving_on_fixed, outside = moving.array, None
        else:
            # NaN marks the fixed voxels the moving image does not cover (the overlap metric), then the minimum.
            moving_on_fixed = resample_onto(moving, fixed, transform, "linear", default=np.nan)
            outside = np.isnan(moving_on_fixed)
        # Background for both images where a moving scan on another grid does not reach (`_covered`); on one grid the
        # scans cover the same field and only the motion takes content out of it, which the network may still follow.
        unreached = None if same_grid(fixed, moving) else outside
        fixed_t = _as_tensor(fixed.array, fixed_low, torch_device)
        moving_t = _as_tensor(moving_on_fixed, moving_low, torch_device)
        del moving_on_fixed
        fixed_n = _normalise(fixed_t, normalisation, fixed_low, fixed_high)
        body = fixed_n > BODY_LEVEL
        ncc_before = global_ncc(fixed_t, moving_t)
        if affine:
            ncc_prealigned = ncc_before
            unaligned = resample_onto(moving, fixed, None, "linear", default=moving_low)
            unaligned = _as_tensor(unaligned, moving_low, torch_device)
            ncc_before = global_ncc(fixed_t, unaligned)
        else:
            unaligned = moving_t
        lncc_before = local_ncc(fixed_n, _normalise(unaligned, normalisation, moving_low, moving_high), body)
        del unaligned
    yield stages.step("network")

    with stages("forward"), torch.inference_mode():
        bf16 = False
        if copies:
            v_xy = v_yx = None
        else:
            inputs = []
            for image, low, high in ((fixed_t, fixed_low, fixed_high), (moving_t, moving_low, moving_high)):
                image = _covered(_normalise(image, normalisation, low, high), unreached).expand(-1, -1, *grid_shape)
                image = axis_map.to_network(image)
                if work != net_shape:  # the working grid: box averages over the same extent
                    image = F.adaptive_avg_pool3d(image, work)
                inputs.append(image)
            (fixed_in, crop), (moving_in, _) = _network_input(inputs[0]), _network_input(inputs[1])
            del inputs
            # channels_last_3d is about twice as fast on the CPU (as in symnet_forward_fields).
            network.to(memory_format=torch.channels_last_3d)
            bf16 = loaded.bf16 and (torch_device.type == "cuda" or (torch_device.type == "cpu" and cpu_bf16()))
            with torch.autocast(torch_device.type, dtype=torch.bfloat16, enabled=bf16), _float32_convolutions(not bf16):
                forward = _symmetric_forward if loaded.symmetric else _forward
                v_xy, v_yx = forward(network, fixed_in, moving_in)
            v_xy, v_yx = v_xy.float().contiguous(), v_yx.float().contiguous()
            del fixed_in, moving_in
        del moving_t  # the refinement reads the moving image as it was read
    yield stages.step("integration")

    with stages("integrate"), torch.inference_mode():

        def on_fixed_axes(f: torch.Tensor) -> torch.Tensor:
            f = f[(..., *crop)]
            if work != net_shape:
                f = _resize_field(f, net_shape)
            f = axis_map.field_from_network(f)
            return _slab_to_slice(f) if two_d else f

        if copies:
            f_ab = f_ba = torch.zeros((1, 3, *fixed.shape), device=torch_device)
        else:
            # A refined map gets its inverse from ITK's inversion (below): then only the forward map is integrated.
            f_ab, f_ba = _integrate_halves(v_xy, v_yx, inverse=not iterations)
            f_ab, f_ba = (None if f_ab is None else on_fixed_axes(f_ab)), on_fixed_axes(f_ba)
        del v_xy, v_yx
    yield stages.step("fields")

    with stages("fields"), torch.inference_mode():
        ddf, inverse_ddf = _voxels_to_mm(f_ba, fixed), (None if f_ab is None else _voxels_to_mm(f_ab, fixed))
        a, b = _affine_parts(transform)
        affine_det = float(np.linalg.det(a))  # the Jacobian's constant factor where f_ba leaves the affine out
        if transform is not None:
            # The network registered M(T(x)); the full map is x -> T(x + u(x)), so ddf(x) = A u(x) + (A x + b - x).
            a_t = torch.as_tensor(a, dtype=ddf.dtype, device=ddf.device)
            ddf = ddf @ a_t.T + _affine_displacement(fixed, a, b, ddf)
        if transform is not None and inverse_ddf is not None:
            # Its inverse maps q to y + u_inv(y) with y = T^-1(q): sample u_inv at y (zeros outside the fixed grid).
            a_inv = np.linalg.inv(a)
            to_y = _affine_displacement(fixed, a_inv, -a_inv @ b, ddf)
            u_inv_at_y = _sample(inverse_ddf.permute(3, 0, 1, 2)[None], _physical_sampling_grid(fixed, fixed, to_y))
            inverse_ddf = u_inv_at_y[0].permute(1, 2, 3, 0) + to_y
    yield stages.step("refinement" if iterations else "warping")

    if iterations:
        with stages("refine"):  # SimpleITK on the CPU, in LPS mm, from the whole map (pre-alignment included)
            cpu = torch.device("cpu")
            moving_n = _normalise(_as_tensor(moving.array, moving_low, cpu), normalisation, moving_low, moving_high)
            normalised = (
                Volume(_covered(fixed_n, unreached)[0, 0].cpu().numpy(), fixed.spacing, fixed.origin, fixed.direction),
                Volume(moving_n[0, 0].numpy(), moving.spacing, moving.origin, moving.direction),
            )
            del moving_n
            refining = refine_field(*normalised, ddf.cpu().numpy(), iterations, cancel)
            refined = yield from _ticks(refining, stages, ticks)
            del normalised
            yield stages.step("inversion")
            ddf = torch.from_numpy(refined.astype(np.float32)).to(torch_device)
            inverse_ddf = torch.from_numpy(invert_field(refined, fixed).astype(np.float32)).to(torch_device)
            del refined
            # The metrics below see the whole map: its fields in fixed voxels, and no separate affine factor.
            f_ba, f_ab = _mm_to_voxels(ddf, fixed), _mm_to_voxels(inverse_ddf, fixed)
            affine_det = 1.0
        yield stages.step("warping")

    with stages("warp"), torch.inference_mode():
        # One interpolation of the original moving image through the final ddf (no resample-then-warp blur), with
        # (moving - low) sampled so that zeros outside means "the moving minimum" (air for CT), not 0 HU.
        original = _as_tensor(moving.array, moving_low, torch_device)
        if copies:  # the identity on one grid: the moving image itself
            warped_t = original
        else:
            warped_t = _sample(original - moving_low, _physical_sampling_grid(moving, fixed, ddf)) + moving_low
        del original
        warped_labels = None
        if copies and moving_labels is not None and same_grid(moving_labels, fixed):
            warped_labels = moving_labels.array.copy()
        elif moving_labels is not None:
            # float64 holds every integer label exactly; nearest never mixes two labels.
            labels = torch.from_numpy(np.asarray(moving_labels.array, dtype=np.float64))[None, None].to(torch_device)
            grid = _physical_sampling_grid(moving_labels, fixed, ddf.double())
            warped_labels = _sample(labels, grid, mode="nearest")[0, 0].cpu().numpy().astype(moving_labels.array.dtype)
            del labels, grid
    yield stages.step("metrics")

    with stages("metrics"), torch.inference_mode():
        # det J is invariant under the voxel -> mm similarity, so the voxel field gives it; the affine part is constant.
        if copies:  # the identity's values, exactly
            jacobian = torch.ones(fixed.shape, device=torch_device)
            inverse_consistency, ncc_after, lncc_after = 0.0, ncc_before, lncc_before
        else:
            slab = f_ba.expand(-1, -1, 2, -1, -1) if two_d else f_ba  # a 2D field needs 2 slices for its gradient
            jacobian = jacobian_determinant(slab)[0, : fixed.shape[0]] * affine_det
            spacing_xyz = torch.tensor(fixed.spacing[::-1], dtype=f_ba.dtype, device=f_ba.device)
            inverse_consistency = _inverse_consistency_mm(f_ab, f_ba, spacing_xyz)
            ncc_after = global_ncc(fixed_t, warped_t)
            lncc_after = local_ncc(fixed_n, _normalise(warped_t, normalisation, moving_low, moving_high), body)
        in_body = jacobian[body[0, 0]]
        volume_change = float(((in_body < 0.8) | (in_body > 1.25)).float().mean()) if in_body.numel() else 0.0
        spread = np.percentile(in_body.cpu().numpy(), (1, 99)).tolist() if in_body.numel() else [1.0, 1.0]
        ddf = ddf.cpu().numpy().astype(np.float32, copy=False)
        inverse_ddf = inverse_ddf.cpu().numpy().astype(np.float32, copy=False)
        jacobian = jacobian.cpu().numpy().astype(np.float32, copy=False)
        warped = warped_t[0, 0].cpu().numpy()
        body_np = body[0, 0].cpu().numpy()
        overlap = 1.0 if outside is None or not body_np.any() else float(1.0 - outside[body_np].mean())
    yield stages.step("outputs")

    metrics: dict[str, Any] = {
        "ncc_before": ncc_before,
        "ncc_after": ncc_after,
        "lncc_before": lncc_before,
        "lncc_after": lncc_after,
        "folding_fraction": float(np.mean(jacobian <= 0)),
        "volume_change_fraction": volume_change,
        "jacobian_body_p1_p99": [round(float(v), 3) for v in spread],
        "inverse_consistency_mm": inverse_consistency,
        "overlap_fraction": overlap,
        "seconds": round(time.perf_counter() - start, 3),
        "stage_seconds": stages.seconds,
        "model": loaded.name,
        # The working grid in the fixed image's (Z, Y, X) order (the network saw it in its own axis order).
        "network_shape": [work[axis_map.axes.index(a)] for a in range(3)],
        "device": str(torch_device),
        "network_dtype": "bfloat16" if bf16 else "float32",
        "refine_iterations": iterations,
        "refine_matched": stages.skipped > 0,
        "copies": copies,
        "affine": bool(affine),
        "symmetric": loaded.symmetric,
    }
    if affine:
        metrics["ncc_prealigned"] = ncc_prealigned
        metrics["prealign_matrix"] = a.tolist()
        metrics["prealign_offset_mm"] = b.tolist()
    if two_d:
        metrics["two_d"] = True
    metrics["quality_limits"] = dict(loaded.limits)
    metrics["warnings"] = quality_warnings(metrics, loaded.limits)

    def on_fixed_grid(array: np.ndarray, **meta: Any) -> Volume:
        return Volume(array, fixed.spacing, fixed.origin, fixed.direction.copy(), meta=meta)

    return RegistrationResult(
        warped=on_fixed_grid(warped, **{**moving.meta, "registered_to": fixed.meta.get("source", "")}),
        ddf=ddf,
        inverse_ddf=inverse_ddf,
        jacobian=on_fixed_grid(jacobian, quantity="jacobian_determinant"),
        metrics=metrics,
        warped_labels=None if warped_labels is None else on_fixed_grid(warped_labels, **moving_labels.meta),
    )


register = blocking(iter_register)
