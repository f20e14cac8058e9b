"""Registration peers for the benchmarks: the official SYMNet inference recipe, the classical ANTs SyN, elastix
B-spline and SimpleITK demons, and the fast optimisation methods Greedy (PICSL) and ConvexAdam (the Learn2Reg
challenge's winning method). ``ctcolor peer NAME`` runs each as a whole process, as ``ctcolor register`` runs.

`official_symnet` reimplements the official SYMNet test script's recipe (its code cannot ship here): nibabel arrays as
stored, min-max to [0, 1], float32, a plain forward pass, four sequential scaling-and-squaring integrations, the two
half-way compositions, the warp, and NIfTI outputs. It is what ``ctcolor register`` is timed and compared against.

The other peers are compared with SYMNet on the same pairs (`ctcolor bench`). ANTs (``antspyx``), elastix
(``itk-elastix``), Greedy (``picsl-greedy``) and ConvexAdam (``convexadam``) are optional: install them with
``pip install "napari-ctcolor[bench]"``; `PeerUnavailable` says when one is missing.

Every peer takes a fixed and a moving `Volume` on the same grid (the synthetic-deformation pairs are) and returns
the displacement field that maps fixed voxels to moving points, in mm along the index axes, so that one Jacobian
code (`napari_ctcolor.models.diffeo.jacobian_determinant`) measures folding for every method alike. The images are
handed over with the grid's spacing and an identity direction and zero origin: with both images on one grid the
registration does not depend on where that grid sits, and the fields then come back in index-axis millimetres.

torch is imported only by what needs it (the official recipe, `folding_fraction_mm`): ``ctcolor peer demons`` is
timed as a whole process against ``ctcolor register``, and a demons user does not pay torch's import (1 s on 2 cores).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..engines.geometry import same_grid, warp
from ..errors import InputError
from ..io import Volume

PEERS = ("ANTs SyN", "elastix B-spline", "SimpleITK demons", "Greedy", "ConvexAdam")
#: ``ctcolor peer`` names: the official recipe and the other peers.
PEER_COMMANDS = {
    "official-symnet": "official SYMNet",
    "ants-syn": PEERS[0],
    "elastix-bspline": PEERS[1],
    "demons": PEERS[2],
    "greedy": PEERS[3],
    "convexadam": PEERS[4],
}
ANTS_ITERATIONS = (100, 70, 50)
#: Greedy's documented deformable recipe (``-n``, coarsest level first) and ConvexAdam's default Adam iterations.
GREEDY_ITERATIONS = "100x50x10"
CONVEXADAM_ITERATIONS = 80


class PeerUnavailable(RuntimeError):
    """The peer's package is not installed."""


@dataclass
class PeerResult:
    """``ddf_mm``: (Z, Y, X, 3) float32, (x, y, z) mm along the index axes: fixed voxel p -> moving point p + ddf.

    ``warped_labels``: the moving labels on the fixed grid (nearest neighbour), when labels were given.
    """

    ddf_mm: np.ndarray
    warped_labels: np.ndarray | None
    seconds: float


def folding_fraction_mm(ddf_mm: np.ndarray, spacing_zyx: tuple[float, float, float]) -> float:
    """Share of voxels where p -> p + ddf(p) folds (det J <= 0), for a (Z, Y, X, 3) index-axis field in mm."""
    import torch

    from ..models.diffeo import folding_fraction

    voxels = np.asarray(ddf_mm, dtype=np.float32) / np.asarray(spacing_zyx[::-1], dtype=np.float32)
    return float(folding_fraction(torch.from_numpy(voxels).permute(3, 0, 1, 2)[None].contiguous())[0])


def _check(fixed: Volume, moving: Volume, labels: Volume | None) -> None:
    for other, what in ((moving, "moving image"), (labels, "moving labels")):
        if other is not None and not same_grid(fixed, other):
            raise InputError(f"{what}: the peers register images on one grid; resample it onto the fixed grid first")


def ants_syn(
    fixed: Volume, moving: Volume, moving_labels: Volume | None = None, iterations: tuple[int, ...] = ANTS_ITERATIONS
) -> PeerResult:
    """ANTs SyN (``type_of_transform="SyNOnly"``, Mattes MI, 3 levels of 100/70/50 iterations).

    antspyx's default iterations (40/20/0) skip the full-resolution level: on the shared 3 mm CT with a 15 mm synthetic
    deformation they reached Dice 0.80 against 0.83 with 100/70/50 (2 s vs 18 s). The CC metric reached 0.86 but took
    12 minutes on one core, too slow for a benchmark run.
    """
    try:
        import ants
    except ImportError:
        raise PeerUnavailable("ANTs SyN needs antspyx (pip install 'napari-ctcolor[bench]')") from None
    _check(fixed, moving, moving_labels)
    spacing = tuple(float(s) for s in fixed.spacing[::-1])

    def image(array: np.ndarray) -> ants.ANTsImage:  # antspyx arrays are in ITK index order (X, Y, Z)
        return ants.from_numpy(np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32), spacing=spacing)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        f, m = image(fixed.array), image(moving.array)
        reg = ants.registration(
            f, m, type_of_transform="SyNOnly", reg_iterations=iterations, outprefix=os.path.join(tmp, "syn_")
        )
        seconds = time.perf_counter() - start
        warp_file = next(p for p in reg["fwdtransforms"] if p.endswith("Warp.nii.gz"))
        ddf = ants.image_read(warp_file).numpy().transpose(2, 1, 0, 3)  # (X, Y, Z, 3) -> (Z, Y, X, 3), mm
        warped_labels = None
        if moving_labels is not None:
            out = ants.apply_transforms(f, image(moving_labels.array), reg["fwdtransforms"], "nearestNeighbor")
            warped_labels = np.rint(out.numpy().transpose(2, 1, 0)).astype(moving_labels.array.dtype)
    return PeerResult(np.ascontiguousarray(ddf, dtype=np.float32), warped_labels, seconds)


def elastix_bspline(
    fixed: Volume, moving: Volume, moving_labels: Volume | None = None, iterations: int = 256
) -> PeerResult:
    """elastix B-spline (itk-elastix default "bspline" map: Mattes MI + bending energy, 3 levels, 20 mm final grid)."""
    try:
        import itk
    except ImportError:
        raise PeerUnavailable("elastix B-spline needs itk-elastix (pip install 'napari-ctcolor[bench]')") from None
    if not hasattr(itk, "elastix_registration_method"):
        raise PeerUnavailable("elastix B-spline needs itk-elastix (pip install 'napari-ctcolor[bench]')")
    _check(fixed, moving, moving_labels)
    spacing = [float(s) for s in fixed.spacing[::-1]]

    def image(array: np.ndarray) -> itk.Image:
        out = itk.image_from_array(np.ascontiguousarray(array, dtype=np.float32))
        out.SetSpacing(spacing)
        return out

    parameters = itk.ParameterObject.New()
    bspline = parameters.GetDefaultParameterMap("bspline", 3, 20.0)
    bspline["MaximumNumberOfIterations"] = [str(iterations)]
    parameters.AddParameterMap(bspline)
    start = time.perf_counter()
    f, m = image(fixed.array), image(moving.array)
    # No number_of_threads: with it, itk-elastix 0.25.4 crashed (segmentation fault) on a 64^3 crop of the OASIS pair;
    # ITK then uses every core, as ANTs does.
    _, transform = itk.elastix_registration_method(f, m, parameter_object=parameters, log_to_console=False)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:  # transformix writes its field file into the output directory
        field = itk.transformix_deformation_field(m, transform, output_directory=tmp)
        ddf = itk.array_from_image(field)  # (Z, Y, X, 3), mm
        warped_labels = None
        if moving_labels is not None:
            transform.SetParameter(0, "FinalBSplineInterpolationOrder", "0")  # nearest neighbour for labels
            out = itk.transformix_filter(image(moving_labels.array), transform, output_directory=tmp)
            warped_labels = np.rint(itk.array_from_image(out)).astype(moving_labels.array.dtype)
    return PeerResult(np.ascontiguousarray(ddf, dtype=np.float32), warped_labels, seconds)


def demons(fixed: Volume, moving: Volume, moving_labels: Volume | None = None, iterations: int = 50) -> PeerResult:
    """SimpleITK fast symmetric forces demons (histogram-matched moving image, field smoothing sigma 1.5 voxels)."""
    _check(fixed, moving, moving_labels)
    start = time.perf_counter()
    f = _sitk_image(fixed)
    m = sitk.HistogramMatching(_sitk_image(moving), f, 256, 7, True)
    filter_ = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    filter_.SetNumberOfIterations(iterations)
    filter_.SetStandardDeviations(1.5)
    field = filter_.Execute(f, m)
    seconds = time.perf_counter() - start
    ddf = sitk.GetArrayFromImage(field)  # (Z, Y, X, 3), mm
    return PeerResult(np.ascontiguousarray(ddf, dtype=np.float32), _warp_labels(ddf, moving_labels), seconds)


def _sitk_image(volume: Volume, pixel: type = np.float32) -> sitk.Image:
    """``volume``'s array as a SimpleITK image with its spacing, at the origin with identity direction (the peers
    work in index-axis millimetres)."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(volume.array, dtype=pixel))
    out.SetSpacing([float(s) for s in volume.spacing[::-1]])
    return out


def _warp_labels(ddf_mm: np.ndarray, labels: Volume | None) -> np.ndarray | None:
    """``labels`` read at p + ddf(p) for every voxel p of their grid (index-axis mm), nearest neighbour."""
    if labels is None:
        return None
    return warp(labels, labels, ddf_mm @ labels.direction.T, "nearest", 0)  # index-axis mm -> LPS


def greedy(
    fixed: Volume, moving: Volume, moving_labels: Volume | None = None, iterations: str = GREEDY_ITERATIONS
) -> PeerResult:
    """Greedy (PICSL; ``picsl-greedy``), its documented deformable recipe: NCC over a 2 x 2 x 2 voxel patch,
    ``-n 100x50x10`` (three levels, coarsest first), its default regularisation (Gaussians of sqrt(3) and
    sqrt(0.5) voxels) and step; every core, as its command-line tool runs."""
    try:
        from picsl_greedy import Greedy3D
    except ImportError:
        raise PeerUnavailable("Greedy needs picsl-greedy (pip install 'napari-ctcolor[bench]')") from None
    _check(fixed, moving, moving_labels)
    start = time.perf_counter()
    runner = Greedy3D()
    command = f"-d 3 -V 0 -i fixed moving -m NCC 2x2x2 -n {iterations} -o warp"
    runner.execute(command, fixed=_sitk_image(fixed), moving=_sitk_image(moving), warp=None)
    # The warp is an ITK displacement image: physical (here index-axis) mm per fixed voxel, x first.
    ddf = sitk.GetArrayFromImage(runner["warp"])
    seconds = time.perf_counter() - start
    return PeerResult(np.ascontiguousarray(ddf, dtype=np.float32), _warp_labels(ddf, moving_labels), seconds)


def convexadam(
    fixed: Volume, moving: Volume, moving_labels: Volume | None = None, iterations: int = CONVEXADAM_ITERATIONS
) -> PeerResult:
    """ConvexAdam (Siebert et al., IEEE TMI 2024; ``convexadam``), its package defaults: MIND-SSC features (radius 1,
    dilation 2), a coupled convex search of +-4 grid steps on a grid of 6 voxels made inverse consistent, then 80 Adam
    iterations on a grid of 2 voxels with diffusion regularisation 1.25; float32 on the CPU (the package's own
    fallback from float16). It works in voxels, as the Learn2Reg data it was tuned on are isotropic: the images are
    given as stored, and its voxel field is turned into millimetres."""
    try:
        import torch
        from convexAdam.convex_adam_MIND import convex_adam_pt
    except ImportError:
        raise PeerUnavailable("ConvexAdam needs convexadam (pip install 'napari-ctcolor[bench]')") from None
    _check(fixed, moving, moving_labels)
    start = time.perf_counter()
    voxels = convex_adam_pt(
        np.ascontiguousarray(fixed.array, dtype=np.float32),
        np.ascontiguousarray(moving.array, dtype=np.float32),
        selected_niter=iterations,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )  # (Z, Y, X, 3): voxels along the array axes (z, y, x), fixed voxel p -> moving voxel p + d
    ddf = voxels[..., ::-1] * np.asarray(fixed.spacing[::-1])
    seconds = time.perf_counter() - start
    return PeerResult(np.ascontiguousarray(ddf, dtype=np.float32), _warp_labels(ddf, moving_labels), seconds)


def run_peer(name: str, fixed: Volume, moving: Volume, moving_labels: Volume | None = None, quick: bool = False):
    """One of `PEERS` by name; ``quick`` cuts the iterations for a smoke run."""
    if name == "ANTs SyN":
        return ants_syn(fixed, moving, moving_labels, iterations=(20, 10, 5) if quick else ANTS_ITERATIONS)
    if name == "elastix B-spline":
        return elastix_bspline(fixed, moving, moving_labels, iterations=32 if quick else 256)
    if name == "SimpleITK demons":
        return demons(fixed, moving, moving_labels, iterations=10 if quick else 50)
    if name == "Greedy":
        return greedy(fixed, moving, moving_labels, iterations="20x10x5" if quick else GREEDY_ITERATIONS)
    if name == "ConvexAdam":
        return convexadam(fixed, moving, moving_labels, iterations=16 if quick else CONVEXADAM_ITERATIONS)
    raise InputError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")


def official_symnet(fixed_path: str | os.PathLike, moving_path: str | os.PathLike, checkpoint: str | os.PathLike):
    """The official SYMNet inference recipe on two NIfTI files: (warped moving in min-max units, F_BA, affine).

    As the official test script: each image as nibabel returns it (array axes as stored), min-max normalised, float32
    (1, 1, D0, D1, D2); the network in its default memory format under ``torch.no_grad``; v_xy, v_yx, -v_xy and -v_yx
    integrated one after the other (7 squaring steps each); F_BA = compose(int(v_yx), int(-v_xy)) and
    F_AB = compose(int(v_xy), int(-v_yx)); the moving image warped by F_BA (bilinear, zeros outside).

    Returns:
        (warped (D0, D1, D2) float32, F_BA (D0, D1, D2, 3) voxels with channel c along array axis 2 - c, the fixed
        image's affine).
    """
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    from ..models.diffeo import INTEGRATION_STEPS, compose, identity_grid, sampling_grid
    from ..models.diffeo import warp as warp_tensor
    from ..models.symnet import load_symnet_checkpoint

    def integrate_velocity(velocity: torch.Tensor) -> torch.Tensor:
        # The official DiffeomorphicTransform, out of place as written there (our `integrate_velocity` updates in
        # place without autograd; a reimplementation of the official recipe must not inherit our optimisations).
        identity = identity_grid(tuple(velocity.shape[2:]), velocity)
        ddf = velocity / 2.0**INTEGRATION_STEPS
        for _ in range(INTEGRATION_STEPS):
            grid = sampling_grid(ddf, identity)
            ddf = ddf + F.grid_sample(ddf, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return ddf

    def load(path) -> tuple[torch.Tensor, np.ndarray]:
        try:
            image = nib.load(str(path))
            array = np.asarray(image.get_fdata(), dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a file that is not NIfTI
            raise InputError(f"{path}: the official recipe reads NIfTI files only ({type(exc).__name__})") from None
        if array.ndim != 3:
            raise InputError(f"{path}: expected a 3D image, got shape {array.shape}")
        low, high = array.min(), array.max()
        if high <= low:
            raise InputError(f"{path}: the image is constant; there is nothing to register")
        return torch.from_numpy((array - low) / (high - low)).float()[None, None], image.affine

    fixed, affine = load(fixed_path)
    moving, _ = load(moving_path)
    if fixed.shape != moving.shape or any(n % 16 for n in fixed.shape[2:]):
        raise InputError(
            f"{moving_path}: the official recipe needs two images of one shape, each size a multiple of 16; "
            f"got {tuple(fixed.shape[2:])} and {tuple(moving.shape[2:])}"
        )
    model = load_symnet_checkpoint(checkpoint)
    with torch.no_grad():
        v_xy, v_yx = model(fixed, moving)
        xy_half, yx_half = integrate_velocity(v_xy), integrate_velocity(v_yx)
        xy_half_inv, yx_half_inv = integrate_velocity(-v_xy), integrate_velocity(-v_yx)
        f_ba = compose(yx_half, xy_half_inv)
        compose(xy_half, yx_half_inv)  # F_AB: the official script computes both full fields
        warped = warp_tensor(moving, f_ba)
    return warped[0, 0].numpy(), f_ba[0].permute(1, 2, 3, 0).numpy(), affine
