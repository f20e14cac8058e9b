"""Registration engine: SYMNet deformable registration of two volumes, with physical geometry throughout.

Stages (each reports progress; each runs in a thread of its own while Cancel is polled, `stages.Stages.run`):

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
6. fields: the displacements in mm (LPS), composed with the pre-alignment; the pre-alignment's alone where the
   pre-aligned images differ only by noise (no network runs) or the network's map takes too little of their
   difference away (`stages.NETWORK_GAIN_MIN`), and nothing is refined.
7. refine (the CT card's default, or ``refine=N``): demons from that whole map, on the fixed image and the moving
   image as read, coarse to fine and ending at the fixed image's full resolution, one progress step per few
   iterations: ITK's fast symmetric-forces scheme, numba's kernels on the CPU and torch on a GPU
   (`demons.refine_field`).
8. invert (after a refinement): the refined map's inverse by the fixed-point iteration, in torch on the device
   (`inverse.invert_field`).
9. warp: the original moving image through the final ddf in one trilinear interpolation; labels with nearest.
10. metrics: Jacobian determinant, folding, inverse consistency, NCC, local NCC inside the body, overlap; `warnings`.

Axis conventions: the network sees (D0, D1, D2) in the orientation its card states (`orientation`); outside the
network, fields are on the (Z, Y, X) arrays and channel c is the displacement along array axis 2 - c, i.e. channels
(x, y, z) in voxels. A voxel vector v_xyz is s_xyz * v_xyz mm along the index axes, i.e.
``direction @ (spacing_xyz * v_xyz)`` mm in LPS.

2D pairs (one slice each) are registered as a slab of 16 copies of the slice; the fields are the mean of the two
middle slices with the through-plane component set to 0. The network never saw such slabs in training, so treat 2D
results as approximate.

The network runs on the fixed grid, or on a coarser grid over the same extent (`working_shape`) when the weights' card
asks for a minimum voxel size or the padded grid would exceed the card's voxel budget (``network_voxels``; at most
`MAX_NETWORK_VOXELS`, a whole 512 x 512 x 300 CT exceeds it); the fields are then upsampled to the fixed grid, and
warping, Jacobian and metrics stay at full resolution. ``metrics["network_shape"]`` says which grid was used.

Modules: `model` (the network and its card), `network` (the pair as the network sees it), `fields` (displacements,
sampling, integration), `demons` (the refinement), `inverse` (the refined map's inverse), `metrics` (NCC,
inverse consistency, quality warnings), `stages` (each stage a function), `outcome` (the measures, the metrics
record and the result); `iter_register` here runs them.

Example (the official checkpoint on the shared OASIS pair)::

    fixed = read_volume("../shared/data/symnet-oasis/image_A_full_size.nii.gz")
    moving = read_volume("../shared/data/symnet-oasis/image_B_full_size.nii.gz")
    checkpoint = "../shared/data/symnet-oasis/SYMNet_neurite_oasis_smo30_update_80000.pth"
    result = register(fixed, moving, model=checkpoint)
    result.metrics["ncc_before"], result.metrics["ncc_after"]   # 0.888 -> 0.983
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from typing import Literal

import SimpleITK as sitk

from ...io import Volume
from ..prealign import prealign
from ..steps import Cancel, Progress, Steps, blocking
from . import stages as _stages
from .fields import SLAB_SLICES
from .metrics import IC_STRIDE, LNCC_WINDOW, QUALITY_LIMITS, global_ncc, local_ncc, quality_warnings
from .model import RegistrationModel, load_registration_model
from .network import BODY_LEVEL, MAX_NETWORK_VOXELS, working_shape
from .outcome import RegistrationResult, measure, metrics_of, result_of
from .stages import BYTES_PER_VOXEL, Stages

__all__ = [
    "BODY_LEVEL",
    "BYTES_PER_VOXEL",
    "IC_STRIDE",
    "LNCC_WINDOW",
    "MAX_NETWORK_VOXELS",
    "QUALITY_LIMITS",
    "SLAB_SLICES",
    "RegistrationModel",
    "RegistrationResult",
    "global_ncc",
    "iter_register",
    "load_registration_model",
    "local_ncc",
    "quality_warnings",
    "register",
    "working_shape",
]

Device = Literal["auto", "cpu", "cuda", "mps"]


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
    """Register ``moving`` to ``fixed`` with SYMNet (optionally after an affine pre-alignment): a generator of
    ``(done, total, stage)`` steps, one after each stage (``stage`` names the next) and each refinement chunk, that
    returns the `RegistrationResult` on the fixed grid; `register` runs it to the end, a napari worker's ``quit()``
    closes it between two steps.

    Args:
        fixed: (Z, Y, X) volume in its own units; the output grid.
        moving: (Z, Y, X) volume, any grid overlapping the fixed one in physical (LPS) space.
        model: ``"ct"`` (the project's CT weights) or a SYMNet checkpoint: an official ``.pth`` or a ``.safetensors``
            file with its model card (`load_registration_model`).
        affine: rigid then affine SimpleITK pre-alignment (Mattes MI), composed into the fields; None takes the card's
            default (``inference.prealign``: on for the CT weights, off for an official checkpoint).
        refine: demons iterations (0..10000) at the fixed image's resolution, seeded by the network (0: the network
            alone); None takes the card's ``inference.refine`` (0 for an official checkpoint). 2D: not refined.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"`` or ``"mps"``. Where the card allows it
            (``inference.bf16``) the network runs under bfloat16 autocast on CUDA and on a CPU where that is faster
            (`device.cpu_bf16`); integration and warping stay in float32.
        progress: called as ``progress(done, total)`` after each step; cancel: polled before and within each stage.
        moving_labels: an optional label map on any grid, warped with nearest.
        prealignment: a function that returns `prealign`'s transform of this pair computed elsewhere (``ctcolor
            register`` runs it in a child that reads the inputs), or None where that could not run.

    Raises:
        InputError: 2D vs 3D images, images that do not overlap, a constant image, a missing model file, a
            refinement count outside 0..10000, a registration too large for the memory.
        Cancelled: when ``cancel()`` returned True.
    """
    start = time.perf_counter()
    plan = _stages.plan(fixed, moving, model, affine, refine, device)
    stages = Stages(plan.stage_count, progress, cancel, plan.device)
    stages.seconds["copies"] = plan.check_seconds
    grid = stages.run("model", partial(_stages.network_grid, plan), inference=False)
    yield stages.step("pre-alignment" if plan.affine else "resampling")
    transform = None
    if plan.affine:
        transform = stages.run(
            "prealign", lambda: (prealignment and prealignment()) or prealign(plan.fixed, plan.moving, cancel), False
        )
        yield stages.step("resampling")
    pair = stages.run("resample", partial(_stages.resample_pair, plan, transform), inference=False)
    yield stages.step("network")
    v_xy, v_yx, crop, bf16 = stages.run("forward", partial(_stages.run_network, plan, grid, pair))
    yield stages.step("integration")
    f_ab, f_ba = stages.run("integrate", partial(_stages.integrate, plan, grid, v_xy, v_yx, crop))
    del v_xy, v_yx
    yield stages.step("fields")
    fields = stages.run("fields", partial(_stages.kept_fields, plan, pair, f_ab, f_ba, transform))
    del f_ab, f_ba
    refining = plan.iterations and not pair.prealignment_alone
    yield stages.step("refinement" if refining else "warping")
    if plan.iterations and not refining:
        stages.skip(plan.ticks + 2)  # the refinement's ticks, its end and the inversion
    if refining:
        with stages("refine"):
            refined = yield from _stages.refine(plan, pair, fields, stages, cancel)
        yield stages.step("inversion")
        fields = stages.run("invert", partial(_stages.invert, plan, refined, fields))  # its ddf is the refined map
        yield stages.step("warping")
    warped_t, covered, warped_labels = stages.run(
        "warp", partial(_stages.warp_moving, plan, fields.ddf, moving_labels, pair)
    )
    yield stages.step("metrics")
    measured = stages.run("metrics", partial(measure, plan, pair, fields, warped_t))
    yield stages.step("outputs")
    metrics = metrics_of(plan, grid, pair, fields, measured, stages, bf16, time.perf_counter() - start)
    return result_of(plan, measured, metrics, warped_labels, moving_labels, covered)


register = blocking(iter_register)
