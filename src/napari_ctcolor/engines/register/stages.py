"""The registration engine's stages, each a function of what the stages before it made (`iter_register` runs them in
order): the plan (what was asked, and what the images and the model card decide before any work), the network's grid,
the resampled pair, the network's velocities, their integration, the fields in mm, the refinement and the warp (the
measures and the result that follow: `outcome`).

Tensors a later stage no longer needs are dropped as soon as their stage ends (the peak memory `BYTES_PER_VOXEL`
and `FULL_GRID_BYTES_PER_VOXEL` describe was measured with these lifetimes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ...errors import Cancelled
from ...io import Volume
from ...memory import check_memory
from ..device import cpu_bf16, resolve_device
from ..geometry import resample_onto, same_grid
from ..orientation import AxisMap
from ..steps import Cancel, Progress, Steps, in_thread, map_steps
from .demons import refine_field
from .fields import (
    SLAB_SLICES,
    affine_displacement,
    affine_parts,
    integrate_halves,
    mm_to_voxels,
    physical_sampling_grid,
    resize_field,
    sample,
    slab_to_slice,
    to_edge_within_half_voxel,
    voxels_to_mm,
)
from .inverse import invert_field
from .metrics import global_ncc, local_ncc
from .model import RegistrationModel, load_registration_model
from .network import (
    BODY_LEVEL,
    are_copies,
    as_tensor,
    check_pair,
    covered,
    float32_convolutions,
    forward_pair,
    intensity_range,
    network_input,
    normalise,
    padded_voxels,
    symmetric_forward,
    working_shape,
)
from .refine import REFINE_BYTES_PER_VOXEL, cancel_check, check_iterations, chunks, match_resolution

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Peak memory of a registration per padded voxel (network activations, 4 fields being integrated, their temporaries):
#: `ctcolor register` on the OASIS pair (160 x 192 x 224) peaks at 3.7-4.1 GB resident on the CPU, up to 590 bytes per
#: voxel, with the allocator keeping freed memory for reuse (the CLI's `_reuse_freed_memory`; 2.6 GB without).
BYTES_PER_VOXEL = 600


#: Memory per fixed-grid voxel of the full-resolution stages (fields in voxels and mm, warp grid, Jacobian).
FULL_GRID_BYTES_PER_VOXEL = 120


#: Seconds between two polls of cancel inside a stage's torch operations (`PolledTorch`).
POLL_SECONDS = 0.1


class PolledTorch(TorchFunctionMode):
    """Within it, ``check`` (which raises `Cancelled` once cancel is asked) runs before a torch operation at most every
    `POLL_SECONDS`: a stage of a few large tensor operations (the network's convolutions, the integration's
    compositions, the Jacobian, the local NCC) left behind by Cancel (`Stages.run`) stops within one of them, not at
    its end."""

    def __init__(self, check: Callable[[], None]) -> None:
        super().__init__()
        self.check, self.next = check, 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        now = time.perf_counter()
        if now >= self.next:
            self.next = now + POLL_SECONDS
            self.check()
        return func(*args, **(kwargs or {}))


class Stages:
    """Progress callbacks, cancellation checks and wall-clock timing of the engine's stages."""

    def __init__(self, total: int, progress: Progress | None, cancel: Cancel | None, device: torch.device):
        self.total, self.done = total, 0
        self.skipped = 0  # refinement ticks not run: it stopped early (`refine.MATCHED_METRIC`)
        self.progress, self.cancel, self.device = progress, cancel, device
        self.seconds: dict[str, float] = {}

    def _check_cancel(self, what: str) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled(f"registration cancelled {what}")

    def skip(self, count: int) -> None:
        """Count ``count`` steps that will not run (a refinement not needed: `Pair.prealigned_matched`)."""
        self.skipped += count
        self.done += count
        if self.progress is not None:
            self.progress(self.done, self.total)

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
        """Time stage ``name``, polling cancel before it. A stage that yields (the refinement) polls by itself; the
        others run through `run`."""
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

    def run(self, name: str, call: Callable[[], T], inference: bool = True) -> T:
        """Stage ``name`` (timed as `__call__` times it): ``call()``, under torch's inference mode with
        ``inference``, in a thread of its own (`steps.in_thread`) while this one polls cancel every
        `steps.CANCEL_POLL_S`. One operation can hold its thread for seconds (on popi's 512 x 512 x 141 chest, 2
        cores, 2026-11-27: an iteration of the pre-alignment 1.4 s, a torch operation of the warp 1.9 s); Cancel
        returns within a poll all the same, and the call left behind stops before its next torch operation
        (`PolledTorch`) or at its SimpleITK optimiser's next iteration (which polls cancel itself)."""
        with self(name):
            mode = torch.inference_mode if inference else contextlib.nullcontext
            if self.cancel is None:
                with mode():
                    return call()
            stopped = threading.Event()

            def left_behind() -> None:
                if stopped.is_set():
                    raise Cancelled(f"registration cancelled during stage '{name}'")

            def work() -> T:
                with mode(), PolledTorch(left_behind):
                    return call()

            try:
                return in_thread(work, lambda: self._check_cancel(f"during stage '{name}'"), f"ctcolor-{name}")
            except Cancelled:
                stopped.set()
                raise


def refine_ticks(
    steps: Generator[None, None, np.ndarray | torch.Tensor], stages: Stages, count: int
) -> Steps[np.ndarray | torch.Tensor]:
    """Run a refinement generator of at most ``count`` yields, reporting each as a progress tick (those it skipped
    by stopping early are counted at its end); return its value."""
    end = stages.done + count
    value = yield from map_steps(steps, lambda _: stages.tick())
    stages.skipped, stages.done = end - stages.done, end
    return value


@dataclass
class Plan:
    """What a registration was asked and what the images and the model card decide before any stage runs.

    Attributes:
        fixed, moving: the images, their non-finite voxels replaced (`Volume.finite`).
        loaded: the network and its card's settings.
        device: where the network and the fields are computed.
        affine: whether the pre-alignment runs.
        iterations: demons iterations of the refinement (0: none).
        copies: one scan twice: the identity, without pre-alignment, network or refinement.
        two_d: a pair of single slices (a slab of `SLAB_SLICES` copies for the network).
        lows, highs: each image's intensity range (fixed, moving).
        check_seconds: the time the copies check took.
    """

    fixed: Volume
    moving: Volume
    loaded: RegistrationModel
    device: torch.device
    affine: bool
    iterations: int
    copies: bool
    two_d: bool
    lows: tuple[float, float]
    highs: tuple[float, float]
    check_seconds: float

    @property
    def stage_count(self) -> int:
        """7 stages, the pre-alignment, and the refinement: one tick per few demons iterations, one when it ends, and
        the inversion."""
        return 7 + self.affine + (self.ticks + 2 if self.iterations else 0)

    @property
    def ticks(self) -> int:
        return chunks(self.fixed.spacing, self.iterations)

    def normalised(self, image: torch.Tensor, which: int) -> torch.Tensor:
        """``image`` of the fixed (0) or moving (1) image, normalised as the weights expect."""
        return normalise(image, self.loaded.normalisation, self.lows[which], self.highs[which])


def plan(fixed: Volume, moving: Volume, model, affine: bool | None, refine: int | None, device: Any) -> Plan:
    """The `Plan`; `InputError` for a bad model file, refinement count or pair, before any stage."""
    two_d = fixed.shape[0] == 1
    loaded = load_registration_model(model)  # before the stages: a bad file or refinement count fails at once
    affine = (loaded.prealign and not two_d) if affine is None else bool(affine)  # 2D: never by default
    check_pair(fixed, moving, prealigned=affine)
    fixed, moving = fixed.finite(), moving.finite()
    torch_device = resolve_device(device)
    (fixed_low, fixed_high), (moving_low, moving_high) = (
        intensity_range(fixed, "fixed image"),
        intensity_range(moving, "moving image"),
    )
    if two_d:
        iterations = 0
    else:
        iterations = loaded.refine.auto_iterations(fixed.shape) if refine is None else check_iterations(refine)
    # One scan twice: the identity, without pre-alignment, network or refinement (seconds instead of minutes).
    check_start = time.perf_counter()
    lows, highs = (fixed_low, moving_low), (fixed_high, moving_high)
    copies = not two_d and same_grid(fixed, moving) and are_copies(fixed, moving, loaded.normalisation, lows, highs)
    check_seconds = round(time.perf_counter() - check_start, 3)
    if copies:
        affine, iterations = False, 0
    return Plan(fixed, moving, loaded, torch_device, affine, iterations, copies, two_d, lows, highs, check_seconds)


@dataclass(frozen=True)
class Grid:
    """The network's view of the fixed grid.

    Attributes:
        axis_map: the fixed arrays' axes to the network's.
        grid_shape: the fixed grid (a 2D slice as a slab whose copies are never averaged).
        net_shape: that grid in the network's axis order.
        work: the working grid the network runs on (`working_shape`): ``net_shape`` or coarser.
    """

    axis_map: AxisMap
    grid_shape: tuple[int, int, int]
    net_shape: tuple[int, int, int]
    work: tuple[int, int, int]


def network_grid(plan: Plan) -> Grid:
    """The network's `Grid`, after checking that the registration fits in memory; the network moved to the device."""
    fixed, loaded = plan.fixed, plan.loaded
    axis_map = AxisMap.between(fixed, loaded.axes)
    grid_shape = (SLAB_SLICES, *fixed.shape[1:]) if plan.two_d else fixed.shape
    grid_spacing = (float("inf"), *fixed.spacing[1:]) if plan.two_d else fixed.spacing
    net_shape = axis_map.shape_to_network(grid_shape)
    work = working_shape(
        net_shape, axis_map.shape_to_network(grid_spacing), loaded.min_spacing_mm, loaded.network_voxels
    )
    # BYTES_PER_VOXEL covers the whole run when the network sees the fixed grid (twice the activations for the
    # swapped pair); a coarser working grid leaves the full-resolution stages on the fixed grid, and the network's
    # activations are freed before the refinement: the larger of the two phases counts, not their sum. The 512 x 512
    # x 141 chest CT against a breathing motion of itself (network on 107 x 189 x 189, refined) peaked at 8.5 GB
    # resident, estimated 12.7 GB (17.7 GB as a sum; 2 threads, 2026-11-26).
    network_bytes = padded_voxels(work) * BYTES_PER_VOXEL * (1 + loaded.symmetric)
    refine_bytes = int(np.prod(fixed.shape)) * REFINE_BYTES_PER_VOXEL if plan.iterations else 0
    if work != net_shape:
        needed = int(np.prod(fixed.shape)) * FULL_GRID_BYTES_PER_VOXEL + max(network_bytes, refine_bytes)
    else:
        needed = network_bytes + refine_bytes
    what = f"registration of {fixed.shape} voxels" + (" with refinement (try --refine 0)" if plan.iterations else "")
    check_memory(needed, what)
    loaded.network.to(plan.device)  # in place: the cached module moves to this run's device
    return Grid(axis_map, grid_shape, net_shape, work)


@dataclass
class Pair:
    """The pair on the fixed grid (`resample_pair`).

    Attributes:
        fixed_t: the fixed image (1, 1, Z, Y, X) on the device.
        moving_t: the moving image resampled onto the fixed grid (pre-alignment included); dropped after the network.
        fixed_n: the fixed image normalised.
        body: where ``fixed_n`` exceeds `BODY_LEVEL` (the local NCC's and the Jacobian's region).
        outside: bool (Z, Y, X), the fixed voxels the moving image does not cover, or None (one grid, no
            pre-alignment).
        unreached: ``outside`` where the moving image is on another grid (`covered`), else None.
        ncc_before, lncc_before: the measures before registration (without the pre-alignment).
        ncc_prealigned: the global NCC after the pre-alignment, when it ran.
        prealigned_matched: the pre-aligned images differ only by noise and resampling (`PREALIGNED_MATCHED_METRIC`):
            the pre-alignment is the registration, without the network or the refinement, which could only fit that
            noise.
        mse_prealigned: the normalised images' mean squared difference in the body after the pre-alignment.
        coarse_mse_prealigned: the same averaged over boxes of about `COARSE_MM` (`coarse_mean_square`).
        network_gain: the share of it the network's map took away (`network_gain`), when it was measured.
        network_dropped: the network found nothing the pre-alignment left (`NETWORK_GAIN_MIN`): the pre-alignment
            is the registration, without the refinement.
    """

    fixed_t: torch.Tensor
    moving_t: torch.Tensor | None
    fixed_n: torch.Tensor
    body: torch.Tensor
    outside: np.ndarray | None
    unreached: np.ndarray | None
    ncc_before: float
    lncc_before: float
    ncc_prealigned: float | None = None
    prealigned_matched: bool = False
    mse_prealigned: float | None = None
    coarse_mse_prealigned: float | None = None
    network_gain: float | None = None
    network_dropped: bool = False

    @property
    def prealignment_alone(self) -> bool:
        """Whether the pre-alignment is the registration (no refinement follows)."""
        return self.prealigned_matched or self.network_dropped


#: After the pre-alignment, images whose normalised intensities, averaged over boxes of about `COARSE_MM`, differ by
#: less than this in mean square (in the body, where the moving image reaches) differ only by what the averaging
#: removes: noise and the moved copy's interpolation blur. No smooth deformation is left for the network or the
#: refinement, which could only fit that noise (`Pair.prealigned_matched`). Measured 2026-11-29 (2-core AMD EPYC
#: without AVX-512, the CT window): rigid motions (turned 4-5 degrees, moved 7-8 mm, resampled), with and without 15 HU
#: of added noise, 2.5e-6 to 1.5e-5 (popi's 512 x 512 x 141 chest 2.5 / 3.0e-6, the 1 mm DICOM series 5.5 / 6.0e-6,
#: the 5 mm chests 3.9e-6 to 1.5e-5), and 1.2-1.3e-4 on the 3 mm CT, whose 2-voxel boxes keep its blur (the network
#: refines those: `NETWORK_GAIN_MIN`); every pair whose deformation the network reduced by more than `NETWORK_GAIN_MIN`
#: 1.7e-4 or more: the bench's 24 register-CT pairs 1.7e-4 (popi's smooth breathing) to 2.8e-3, smooth deformations of
#: at most 4 / 6 mm of the 3 mm CT 2.1e-4 / 6.7e-4, of at most 2 / 4 / 6 mm of the DICOM series 2.0e-4 / 2.3e-4 /
#: 6.2e-4. The threshold lies a factor 3 from either side. Untested: low-dose CT, whose correlated noise averages down
#: less (a pair above the threshold only costs the network's time: `NETWORK_GAIN_MIN` still ends it at the
#: pre-alignment where the network finds nothing), and MR. Before 2026-11-29 the same test took the full-resolution
#: difference below 1e-5, which no resampled rigid motion reached (3.2e-5 to 5.7e-4).
PREALIGNED_MATCHED_METRIC = 5e-5
#: The side (mm) of the boxes the pre-aligned difference is averaged over (`coarse_mean_square`): 6 mm averages 8 to
#: 80 voxels of a CT, which brings white noise's mean square 8 to 80 times down and a moved copy's interpolation blur
#: (a voxel's scale) with it, while a deformation of a few mm still moves the averaged edges.
COARSE_MM = 6.0


def mean_square(fixed_n: torch.Tensor, moving_n: torch.Tensor, body: torch.Tensor, outside) -> float | None:
    """The mean squared difference of two normalised images on one grid over ``body`` where the moving image
    reaches (not ``outside``); None where that region is empty."""
    region = body if outside is None else body & ~torch.from_numpy(outside).to(body.device)[None, None]
    return float(((fixed_n - moving_n)[region] ** 2).mean()) if bool(region.any()) else None


def coarse_mean_square(plan: Plan, fixed_n: torch.Tensor, moving_n: torch.Tensor, outside) -> float | None:
    """`mean_square` of the two normalised images averaged over boxes of about `COARSE_MM` (whole voxels per axis),
    over the boxes whose fixed average is body (`BODY_LEVEL`) and that the moving image covers entirely; None where
    there are none."""
    factors = tuple(
        min(n, max(1, round(COARSE_MM / s))) for n, s in zip(plan.fixed.shape, plan.fixed.spacing, strict=True)
    )
    pool = partial(F.avg_pool3d, kernel_size=factors, ceil_mode=True)
    fixed_c, moving_c = pool(fixed_n), pool(moving_n)
    region = fixed_c > BODY_LEVEL
    if outside is not None:
        region &= pool(torch.from_numpy(outside).to(fixed_n.device)[None, None].float()) == 0
    return float(((fixed_c - moving_c)[region] ** 2).mean()) if bool(region.any()) else None


#: The network's map is kept only where it takes at least this share of the pre-aligned images' mean squared
#: difference in the body away (`network_gain`); below it the pre-alignment is the registration, ended there, with
#: det J that of the affine map everywhere. Measured 2026-11-29 (2-core AMD EPYC without AVX-512, in process,
#: ``refine=0``): the bench's 24 register-CT pairs 0.35-0.88 (popi's smooth breathing 0.35-0.37, the 5 mm chests'
#: 0.39-0.41, the DICOM series' 0.85-0.88); smooth deformations of at most 2 / 4 / 6 mm of the 30-slice 3 mm CT -0.01 /
#: 0.24 / 0.31 (the pre-alignment alone gave Dice 1.000 / 0.998 / 0.922, the default registration 1.000 / 0.995 /
#: 0.953) and of the DICOM series 0.34 / 0.74 / 0.82 (the registration +0.011 to +0.127 Dice): wherever the
#: registration added Dice, at least 0.31. Rigid motions (turned 4-5 degrees, moved 7-8 mm): popi's 512 x 512 x 141
#: chest -0.07, the DICOM series -0.16, the 5 mm lung2 chest -0.50 (the network made them worse), the 3 mm CT (30 and
#: 112 slices) 0.23-0.25 (at 3 mm voxels it fits the moved copy's interpolation blur): these keep being refined.
#: Untested: MR, contrast-phase changes without motion, pairs whose only change is a lesion's growth.
NETWORK_GAIN_MIN = 0.1


def resample_pair(plan: Plan, transform: sitk.Transform | None) -> Pair:
    """The moving image on the fixed grid through the pre-alignment (linear, its minimum where it does not reach), the
    measures before registration, and how far the pre-alignment brought the pair (`PREALIGNED_MATCHED_METRIC`)."""
    fixed, moving, device = plan.fixed, plan.moving, plan.device
    (fixed_low, moving_low) = plan.lows
    if transform is None and same_grid(fixed, moving):
        moving_on_fixed, outside = moving.array, None
    else:
        # NaN marks the fixed voxels the moving image does not cover (the overlap metric), then the minimum.
        moving_on_fixed = resample_onto(moving, fixed, transform, "linear", default=np.nan)
        outside = np.isnan(moving_on_fixed)
    fixed_t = as_tensor(fixed.array, fixed_low, device)
    moving_t = as_tensor(moving_on_fixed, moving_low, device)
    del moving_on_fixed
    fixed_n = plan.normalised(fixed_t, 0)
    body = fixed_n > BODY_LEVEL
    # Background for both images where a moving scan on another grid does not reach (`covered`); on one grid the
    # scans cover the same field and only the motion takes content out of it, which the network may still follow.
    unreached = None if same_grid(fixed, moving) else outside
    ncc_before = global_ncc(fixed_t, moving_t)
    ncc_prealigned, matched, mse, coarse_mse = None, False, None, None
    if plan.affine:
        ncc_prealigned = ncc_before
        moving_n = plan.normalised(moving_t, 1)
        mse = mean_square(fixed_n, moving_n, body, outside)
        coarse_mse = coarse_mean_square(plan, fixed_n, moving_n, outside)
        matched = coarse_mse is not None and coarse_mse < PREALIGNED_MATCHED_METRIC
        del moving_n
        unaligned = moving.array if same_grid(fixed, moving) else resample_onto(moving, fixed, None, default=moving_low)
        unaligned = as_tensor(unaligned, moving_low, device)
        ncc_before = global_ncc(fixed_t, unaligned)
    else:
        unaligned = moving_t
    lncc_before = local_ncc(fixed_n, plan.normalised(unaligned, 1), body)
    return Pair(
        fixed_t,
        moving_t,
        fixed_n,
        body,
        outside,
        unreached,
        ncc_before,
        lncc_before,
        ncc_prealigned,
        matched,
        mse,
        coarse_mse,
    )


def run_network(plan: Plan, grid: Grid, pair: Pair) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple, bool]:
    """(v_xy, v_yx, the crop back from the padded grid, whether bfloat16 ran): the network's half-way velocities on
    its working grid (None for copies and where the pre-alignment is the registration). Drops ``pair.moving_t`` once
    the network ran: the refinement reads the moving image as it was read.
    """
    bf16, crop = False, ()
    if plan.copies or pair.prealigned_matched:
        v_xy = v_yx = None
    else:
        inputs = []
        for which, image in enumerate((pair.fixed_t, pair.moving_t)):
            image = covered(plan.normalised(image, which), pair.unreached).expand(-1, -1, *grid.grid_shape)
            image = grid.axis_map.to_network(image)
            if grid.work != grid.net_shape:  # the working grid: box averages over the same extent
                image = F.adaptive_avg_pool3d(image, grid.work)
            inputs.append(image)
        (fixed_in, crop), (moving_in, _) = network_input(inputs[0]), network_input(inputs[1])
        del inputs
        # channels_last_3d is about twice as fast on the CPU (as in symnet_forward_fields).
        loaded, device = plan.loaded, plan.device
        network = loaded.network.to(memory_format=torch.channels_last_3d)
        bf16 = loaded.bf16 and (device.type == "cuda" or (device.type == "cpu" and cpu_bf16()))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), float32_convolutions(not bf16):
            forward = symmetric_forward if loaded.symmetric else forward_pair
            v_xy, v_yx = forward(network, fixed_in, moving_in)
        v_xy, v_yx = v_xy.float().contiguous(), v_yx.float().contiguous()
        del fixed_in, moving_in
        pair.moving_t = None
    return v_xy, v_yx, crop, bf16


def integrate(
    plan: Plan, grid: Grid, v_xy: torch.Tensor | None, v_yx: torch.Tensor | None, crop: tuple
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(f_ab, f_ba) in fixed voxels on the fixed grid: the velocities integrated, composed half-way, upsampled from a
    coarser working grid and moved back to the (Z, Y, X) arrays. A refined map gets its inverse by inversion
    (`invert`): then only the forward map is integrated and f_ab is None."""
    fixed = plan.fixed
    if v_xy is None:  # no network ran (copies, or images that agree after the pre-alignment): the identity
        f_ab = f_ba = torch.zeros((1, 3, *fixed.shape), device=plan.device)
        return f_ab, f_ba

    def on_fixed_axes(f: torch.Tensor) -> torch.Tensor:
        f = f[(..., *crop)]
        if grid.work != grid.net_shape:
            f = resize_field(f, grid.net_shape)
        f = grid.axis_map.field_from_network(f)
        return slab_to_slice(f) if plan.two_d else f

    f_ab, f_ba = integrate_halves(v_xy, v_yx, inverse=not plan.iterations)
    return (None if f_ab is None else on_fixed_axes(f_ab)), on_fixed_axes(f_ba)


@dataclass
class Fields:
    """The map in both forms.

    Attributes:
        ddf: (Z, Y, X, 3) mm, LPS, the whole map (pre-alignment included).
        inverse_ddf: its inverse, the same form; None until the refinement inverts a refined map.
        f_ba, f_ab: the network's maps in fixed voxels (the Jacobian and inverse consistency read them).
        affine_det: the Jacobian's constant factor where f_ba leaves the pre-alignment out (1 once refined).
        a, b: the pre-alignment x -> A x + b (LPS mm); the identity without it.
    """

    ddf: torch.Tensor
    inverse_ddf: torch.Tensor | None
    f_ba: torch.Tensor
    f_ab: torch.Tensor | None
    affine_det: float
    a: np.ndarray
    b: np.ndarray


def to_mm(plan: Plan, f_ab: torch.Tensor | None, f_ba: torch.Tensor, transform: sitk.Transform | None) -> Fields:
    """The network's maps in mm, composed with the pre-alignment."""
    fixed = plan.fixed
    ddf, inverse_ddf = voxels_to_mm(f_ba, fixed), (None if f_ab is None else voxels_to_mm(f_ab, fixed))
    a, b = affine_parts(transform)
    if transform is not None:
        # The network registered M(T(x)); the full map is x -> T(x + u(x)), so ddf(x) = A u(x) + (A x + b - x).
        a_t = torch.as_tensor(a, dtype=ddf.dtype, device=ddf.device)
        ddf = ddf @ a_t.T + affine_displacement(fixed, a, b, ddf)
    if transform is not None and inverse_ddf is not None:
        # Its inverse maps q to y + u_inv(y) with y = T^-1(q): sample u_inv at y (zeros outside the fixed grid).
        a_inv = np.linalg.inv(a)
        to_y = affine_displacement(fixed, a_inv, -a_inv @ b, ddf)
        u_inv_at_y = sample(inverse_ddf.permute(3, 0, 1, 2)[None], physical_sampling_grid(fixed, fixed, to_y))
        inverse_ddf = u_inv_at_y[0].permute(1, 2, 3, 0) + to_y
    return Fields(ddf, inverse_ddf, f_ba, f_ab, float(np.linalg.det(a)), a, b)


def network_gain(plan: Plan, pair: Pair, fields: Fields) -> float | None:
    """The share of the pre-aligned images' mean squared difference in the body that the network's map takes away:
    1 - (the difference with the moving image warped through ``fields``) / ``pair.mse_prealigned``. None where no
    pre-alignment or no network ran."""
    if not plan.affine or plan.copies or pair.prealigned_matched or not pair.mse_prealigned:
        return None
    warped_t, reached, _ = warp_moving(plan, fields.ddf, None)
    outside = ~reached if pair.outside is None else ~reached | pair.outside
    mse = mean_square(pair.fixed_n, plan.normalised(warped_t, 1), pair.body, outside)
    return None if mse is None else 1.0 - mse / pair.mse_prealigned


def prealignment_fields(plan: Plan, transform: sitk.Transform | None, like: torch.Tensor) -> Fields:
    """The pre-alignment x -> A x + b alone as `Fields`: its displacement and its exact inverse q -> A^-1 (q - b) in mm,
    identity network maps (``like``: their shape, dtype and device)."""
    a, b = affine_parts(transform)
    a_inv = np.linalg.inv(a)
    ddf = affine_displacement(plan.fixed, a, b, like)
    inverse_ddf = affine_displacement(plan.fixed, a_inv, -a_inv @ b, like)
    identity = torch.zeros_like(like)
    return Fields(ddf, inverse_ddf, identity, identity, float(np.linalg.det(a)), a, b)


def kept_fields(plan: Plan, pair: Pair, f_ab, f_ba, transform: sitk.Transform | None) -> Fields:
    """The network's maps in mm (`to_mm`), unless no network ran after the pre-alignment (`Pair.prealigned_matched`)
    or they take less than `NETWORK_GAIN_MIN` of the pre-aligned images' difference away (`network_gain`): then the
    pre-alignment's alone (``pair.network_dropped`` in the second case)."""
    if pair.prealigned_matched:
        return prealignment_fields(plan, transform, f_ba)
    fields = to_mm(plan, f_ab, f_ba, transform)
    pair.network_gain = network_gain(plan, pair, fields)
    if pair.network_gain is None or pair.network_gain >= NETWORK_GAIN_MIN:
        return fields
    pair.network_dropped = True
    del fields
    return prealignment_fields(plan, transform, f_ba)


def refine(plan: Plan, pair: Pair, fields: Fields, stages: Stages, cancel: Cancel | None) -> Steps[torch.Tensor]:
    """Demons in LPS mm from the whole map (pre-alignment included), one progress tick per few iterations, on the
    plan's device (`demons.refine_field`: numba's kernels on the CPU, torch on a GPU). Returns the refined map,
    (Z, Y, X, 3) float32 mm on the plan's device."""
    fixed, moving, (_, moving_low) = plan.fixed, plan.moving, plan.lows
    moving_n = plan.normalised(as_tensor(moving.array, moving_low, torch.device("cpu")), 1)
    normalised = match_resolution(
        Volume(covered(pair.fixed_n, pair.unreached)[0, 0].cpu().numpy(), fixed.spacing, fixed.origin, fixed.direction),
        Volume(moving_n[0, 0].numpy(), moving.spacing, moving.origin, moving.direction),
    )
    del moving_n
    refining = refine_field(*normalised, fields.ddf, plan.iterations, cancel_check(cancel))
    return (yield from refine_ticks(refining, stages, plan.ticks))


def invert(plan: Plan, ddf: torch.Tensor, fields: Fields) -> Fields:
    """The refined map with its inverse (`invert_field`, on the plan's device) as `Fields`: the metrics see the whole
    map, its fields in fixed voxels, and no separate affine factor."""
    fixed = plan.fixed
    inverse_ddf = invert_field(ddf, fixed)
    return Fields(ddf, inverse_ddf, mm_to_voxels(ddf, fixed), mm_to_voxels(inverse_ddf, fixed), 1.0, fields.a, fields.b)


def warp_moving(
    plan: Plan, ddf: torch.Tensor, moving_labels: Volume | None, pair: Pair | None = None
) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None]:
    """(the moving image through ``ddf`` on the fixed grid, (1, 1, Z, Y, X); where that reads the moving image, bool
    (Z, Y, X): False where the point lies beyond it, which ``warped`` fills with the moving minimum; the labels
    through it, or None).

    One interpolation of the original moving image through the final ddf (no resample-then-warp blur), with
    (moving - low) sampled so that zeros outside means "the moving minimum" (air for CT), not 0 HU. After a
    pre-alignment, points up to half a voxel outside the moving image read its edge voxel, as SimpleITK's resampling
    does (`to_edge_within_half_voxel`); without one, zeros there, as the official SYMNet recipe warps (its parity).
    Labels are sampled nearest, in float64, which holds every integer label exactly. Where no network ran after the
    pre-alignment (`Pair.prealigned_matched`), ``pair``'s moving image resampled through it (SimpleITK's linear
    interpolation, the same map, edge voxels read the same way) is the warped image."""
    fixed, moving, (_, moving_low) = plan.fixed, plan.moving, plan.lows
    if plan.copies:  # the identity on one grid: the moving image itself
        warped_t, covered = as_tensor(moving.array, moving_low, plan.device), np.ones(fixed.shape, dtype=bool)
    elif pair is not None and pair.prealigned_matched and pair.moving_t is not None:
        warped_t = pair.moving_t
        covered = np.ones(fixed.shape, dtype=bool) if pair.outside is None else ~pair.outside
    else:
        original = as_tensor(moving.array, moving_low, plan.device)
        at = physical_sampling_grid(moving, fixed, ddf)
        at = to_edge_within_half_voxel(at, moving.shape) if plan.affine else at
        warped_t = sample(original - moving_low, at) + moving_low
        covered = torch.ones(at.shape[1:-1], dtype=torch.bool, device=at.device)
        for axis in range(3):  # one component at a time: a bool per voxel, no float copy of the grid
            covered &= (at[0, ..., axis] >= -1) & (at[0, ..., axis] <= 1)
        covered = covered.cpu().numpy()
        del at, original
    warped_labels = None
    if plan.copies and moving_labels is not None and same_grid(moving_labels, fixed):
        warped_labels = moving_labels.array.copy()
    elif moving_labels is not None:
        labels = torch.from_numpy(np.asarray(moving_labels.array, dtype=np.float64))[None, None].to(plan.device)
        grid = physical_sampling_grid(moving_labels, fixed, ddf.double())
        grid = to_edge_within_half_voxel(grid, moving_labels.shape) if plan.affine else grid
        warped_labels = sample(labels, grid, mode="nearest")[0, 0].cpu().numpy().astype(moving_labels.array.dtype)
    return warped_t, covered, warped_labels
