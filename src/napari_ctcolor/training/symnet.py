"""Training SYMNet for intra-patient CT-CT registration on synthetic deformations, and its evaluation.

Pairs: a CT (real or phantom, resampled to an isotropic training spacing) and a copy of it deformed by a random
smooth diffeomorphism (a random velocity field on a coarse control grid, upsampled and integrated by scaling and
squaring, up to ``max_mm`` of displacement), each with its own noise and intensity jitter. The deformation is
random per step, so the network sees new pairs throughout.

Loss (Mok and Chung 2020, the official weights): local NCC of the two half-way images and of both fully warped
images, smoothness of the velocities (divided by ``range_flow`` as in the official code), a penalty on negative
Jacobian determinants of both full fields, and the magnitude balance of the half-way fields. Where the pair has
labels, a soft Dice of up to 12 structures is added (weakly supervised, as VoxelMorph's auxiliary segmentation loss):
it rewards aligning organs rather than only intensity edges.

Evaluation uses the production engine (`engines.register`) on whole volumes on their native grids, with deformations
from a seed never used in training, and reports Dice before/after, folding and seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import yaml
from scipy import ndimage

from ..engines.body import ellipsoid
from ..engines.orientation import AxisMap
from ..io import Volume
from ..io.write import atomic_path
from ..models.diffeo import integrate_velocity, warp
from ..models.symnet import SYMNet, half_way_fields, load_symnet_checkpoint
from ..windowing import window_tensor
from .data import REPRODUCTION_NOTE, LabelledCT, config_from_dict, load_config, load_real_case, shared_data_dir
from .prepare import phantom_cases
from .symnet_losses import local_ncc_loss, magnitude_loss, negative_jacobian_loss, smoothness_loss

#: Labelled structures in the Dice term (the largest in the fixed crop).
DICE_STRUCTURES = 12
#: Structures smaller than this (voxels) are left out of the evaluation Dice.
MIN_EVAL_VOXELS = 100


@dataclass
class SymnetTrainConfig:
    """A SYMNet training run, read from YAML (see configs/symnet_ct.yaml)."""

    name: str
    seed: int
    start_channel: int = 7
    init: str | None = None  # a SYMNet checkpoint under ../shared/data to start from, or None for random weights
    window_hu: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    axes: list[str] = field(default_factory=lambda: ["S", "P", "L"])  # the network's axes (model card inputs.axes)
    steps: int = 1000
    lr: float = 1e-4
    crop: list[int] = field(default_factory=lambda: [48, 96, 96])
    spacing_mm: list[float] = field(default_factory=lambda: [2.0, 3.0])
    min_spacing_mm: float | None = None  # the engine runs the network on voxels at least this large (model card)
    checkpoint_every: int = 100
    loss: dict[str, float] = field(default_factory=dict)
    deformation: dict[str, Any] = field(default_factory=dict)
    phantoms: dict[str, Any] = field(default_factory=dict)
    real_train: list[list[str]] = field(default_factory=list)
    real_val: list[list[str]] = field(default_factory=list)
    val_seed: int = 990001
    val_pairs_per_case: int = 3

    @classmethod
    def load(cls, path: Path) -> SymnetTrainConfig:
        return load_config(cls, path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Path) -> SymnetTrainConfig:
        """From a config's mapping (``path``: the file the errors name)."""
        return config_from_dict(cls, raw, path)


# --- synthetic deformations ------------------------------------------------------------------------------------------


#: The card's ``inference`` section: the defaults of ``ctcolor register`` with these weights (issue 23's measurements,
#: `napari_ctcolor.engines.register.refine`).
INFERENCE = {
    "prealign": "affine",
    "symmetric": True,
    "refine": {"iterations": 50, "voxel_iterations": 75_000_000},
    "bf16": True,
    "network_voxels": 4_194_304,
    "note": "ctcolor register pre-aligns (rigid, then affine), runs the network on the pair and on the swapped pair "
    "(averaged; in bfloat16 on CUDA and on CPUs where it is faster, engines.device.cpu_bf16; on the CPU, Dice "
    "within 0.0002 of float32 on every validation pair), and refines its field with SimpleITK's fast symmetric "
    "demons on intensities plus each image's local structure (so that a contrast-phase change does not pull "
    "vessels apart): 30 iterations on each coarser level (their finer axes averaged to about 2 and 4 mm, for "
    "images finer than 2 mm), then up to 50 at full resolution (fewer on large images: 75 million "
    "voxel-iterations, at least 5), each update smoothed over 3 voxels before it is added (which keeps a rigid "
    "motion's det J near 1) and, on a grid whose voxels are all 2.5 mm or larger, up to one and a half voxels long "
    "instead of Thirion's half. The network runs on at most 4.2 million padded voxels "
    "(network_voxels): a larger CT, such as a 2 mm chest of 512 x 512 x 141, on a coarser working grid, refined at "
    "full resolution. --no-affine, --refine 0 (the network alone) or --refine N override.",
}


def random_displacement(
    shape: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    rng: np.random.Generator,
    max_mm: float,
    control_mm: float,
) -> torch.Tensor:
    """A random smooth diffeomorphic displacement (1, 3, Z, Y, X) in voxels, channels (x, y, z), at most ~max_mm.

    A standard-normal velocity on a control grid of ``control_mm`` spacing is upsampled (trilinear) to ``shape``,
    scaled so that its largest vector is ``max_mm`` long and integrated by scaling and squaring (border padding),
    which keeps the map invertible. The displacement's largest vector comes close to ``max_mm`` for such smooth fields.
    """
    coarse = [max(2, int(np.ceil(n * s / control_mm)) + 1) for n, s in zip(shape, spacing_zyx, strict=True)]
    velocity_mm = torch.from_numpy(rng.standard_normal((1, 3, *coarse)).astype(np.float32))
    velocity_mm = F.interpolate(velocity_mm, size=shape, mode="trilinear", align_corners=True)
    velocity_mm *= max_mm / float(velocity_mm.norm(dim=1).max())
    per_voxel = torch.tensor(spacing_zyx[::-1], dtype=torch.float32).view(1, 3, 1, 1, 1)  # channel (x, y, z) mm
    return integrate_velocity(velocity_mm / per_voxel, padding_mode="border")


def rigid_displacement(
    shape: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    rng: np.random.Generator,
    degrees: float,
    shift_mm: float,
) -> torch.Tensor:
    """A random rigid motion as a displacement (1, 3, Z, Y, X) in voxels, channels (x, y, z): a turn about an axis of
    random direction through the volume's centre by up to ``degrees`` and a shift of up to ``shift_mm`` (a patient
    lying otherwise on the table, left by the pre-alignment or from a small residual it leaves)."""
    from scipy.spatial.transform import Rotation

    axis = rng.standard_normal(3)
    angle = np.deg2rad(rng.uniform(-degrees, degrees))
    turn = Rotation.from_rotvec(angle * axis / np.linalg.norm(axis)).as_matrix()  # in (x, y, z) mm
    shift = rng.uniform(-1.0, 1.0, 3) * shift_mm / np.sqrt(3)
    mm = np.asarray(spacing_zyx[::-1], dtype=np.float64)  # (x, y, z)
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) for n in shape], indexing="ij")  # z, y, x voxel offsets
    points = np.stack([grids[2], grids[1], grids[0]], axis=0).reshape(3, -1) * mm[:, None]
    moved = turn @ points + shift[:, None]
    ddf = ((moved - points) / mm[:, None]).reshape(3, *shape)
    return torch.from_numpy(ddf.astype(np.float32))[None]


@dataclass
class Pair:
    """A training or evaluation pair on one grid: HU images (1, 1, Z, Y, X) and optional label maps (Z, Y, X)."""

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: np.ndarray | None
    moving_labels: np.ndarray | None


def deform_pair(
    hu: np.ndarray,
    labels: np.ndarray | None,
    spacing_zyx: tuple[float, float, float],
    rng: np.random.Generator,
    spec: dict[str, Any],
    max_mm: float | None = None,
) -> Pair:
    """Fixed = the CT with noise; moving = the CT deformed (`random_displacement`), with its own noise and jitter.
    With ``spec``'s ``identity`` and ``rigid`` shares, that share of the pairs is not moved at all, or moved rigidly
    (`rigid_displacement`, up to ``rigid_deg`` and ``rigid_mm``): where nothing deforms, det J is 1 everywhere.

    Outside the volume the deformation reads the border voxel (no artificial air wedge at the edges).
    """
    ddf = _motion(hu.shape, spacing_zyx, rng, spec, max_mm)
    base = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    moving = base.clone() if ddf is None else warp(base, ddf, padding_mode="border")
    moving_labels = None if labels is None else labels.copy()
    if labels is not None and ddf is not None:
        moving_labels = warp(torch.from_numpy(labels.astype(np.int32))[None, None], ddf, "nearest", "border")[0, 0]
        moving_labels = moving_labels.numpy().astype(labels.dtype)

    def jitter(image: torch.Tensor) -> torch.Tensor:
        noise = float(rng.uniform(*spec.get("noise_hu", (0.0, 25.0))))
        gain = float(rng.uniform(*spec.get("gain", (0.95, 1.05))))
        offset = float(rng.uniform(*spec.get("offset_hu", (-20.0, 20.0))))
        out = image * gain + offset
        return out + noise * torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))

    return Pair(jitter(base), jitter(moving), labels, moving_labels)


def _motion(
    shape, spacing_zyx, rng: np.random.Generator, spec: dict[str, Any], max_mm: float | None
) -> torch.Tensor | None:
    """`deform_pair`'s displacement, None for no motion. A spec without ``identity`` or ``rigid`` draws exactly what
    it drew before they existed (the shipped recipe's data stream unchanged)."""
    identity, rigid = float(spec.get("identity", 0.0)), float(spec.get("rigid", 0.0))
    draw = rng.random() if identity or rigid else 1.0
    if draw < identity:
        return None
    if draw < identity + rigid:
        return rigid_displacement(
            shape, spacing_zyx, rng, float(spec.get("rigid_deg", 5.0)), float(spec.get("rigid_mm", 8.0))
        )
    max_mm = float(spec.get("max_mm", 15.0)) if max_mm is None else max_mm
    control_mm = float(rng.uniform(*spec.get("control_mm", (30.0, 80.0))))
    return random_displacement(shape, spacing_zyx, rng, max_mm, control_mm)


#: A later contrast phase than the fixed scan's: HU change per structure-name prefix (TotalSegmentator v2 names).
PHASE_CHANGE_HU = {
    "aorta": -150.0,
    "iliac_artery": -150.0,
    "inferior_vena_cava": 60.0,
    "portal_vein_and_splenic_vein": 60.0,
    "iliac_vena": 60.0,
    "liver": 30.0,
    "spleen": -20.0,
    "kidney": -40.0,
}
#: Noise of the other phase's scan (standard deviation, HU).
PHASE_NOISE_HU = 20.0


def phase_change(hu: np.ndarray, labels: np.ndarray, names: dict[int, str], rng: np.random.Generator) -> np.ndarray:
    """The same anatomy in another contrast phase: arteries 150 HU darker, veins and liver brighter, kidneys and
    spleen darker (`PHASE_CHANGE_HU`), and new noise of `PHASE_NOISE_HU`, as between an arterial and a later phase.

    Args:
        hu: (Z, Y, X) CT in HU; labels: the label map on the same grid; names: label id -> TotalSegmentator name.
    """
    out = np.asarray(hu, dtype=np.float32).copy()
    for label, name in names.items():
        change = next((v for prefix, v in PHASE_CHANGE_HU.items() if name.startswith(prefix)), None)
        if change is not None:
            out[labels == label] += change
    return out + rng.normal(0.0, PHASE_NOISE_HU, out.shape).astype(np.float32)


#: Chest validation (`chest_pairs`): the unlabelled chest CTs, their masks from HU (`chest_masks`) and a breathing-like
#: deformation of up to `BREATHING_MM`. In-plane pixels are box-averaged by CHEST_SHRINK first so that every peer of
#: the bench finishes on two CPU cores (a 512 x 512 x 141 chest CT takes ANTs SyN many minutes).
CHEST_CTS = ("chest-popi-2mm.nii.gz", "chest-lung1-5mm.nrrd", "chest-lung2-5mm.nrrd")
CHEST_LABELS = {1: "lungs", 2: "bone", 3: "airways"}
CHEST_LABEL_IDS = {name: label for label, name in CHEST_LABELS.items()}
CHEST_SHRINK = 2
BREATHING_MM = 20.0
#: The sliding variant's shear layer at the chest wall (mm): the Gaussian that smooths its motion mask; twice this is
#: the margin kept around bone.
SLIDING_LAYER_MM = 3.0
#: The chest phase-change variant: soft tissue that enhances (80..400 HU) this much brighter, and new noise.
CHEST_ENHANCEMENT_HU = 80.0


def _largest_components(mask: np.ndarray, count: int, min_voxels: int = 1) -> np.ndarray:
    """The ``count`` largest 26-connected components of ``mask`` with at least ``min_voxels`` voxels."""
    components = sitk.RelabelComponent(
        sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True), min_voxels
    )
    labels = sitk.GetArrayFromImage(components)
    return (labels >= 1) & (labels <= count)


def chest_masks(hu: np.ndarray) -> np.ndarray:
    """Lungs (1), bone (2) and airways (3) of a chest CT from its HU alone, as a label map on its grid.

    - body: the largest component above -500 HU, its holes filled slice by slice (the lungs are holes in it);
    - airways: the largest component below -950 HU inside the body that reaches the body's top slice (the trachea and
      the bronchi whose lumen is air);
    - lungs: the two largest components of the rest of the air inside the body (below -400 HU);
    - bone: above 300 HU inside the body, components of 500 voxels or more (contrast-filled vessels join it).
    """
    body = _largest_components(hu > -500, 1)
    filled = np.stack([ndimage.binary_fill_holes(axial) for axial in body])
    inside_air = filled & (hu < -400)
    lumen = sitk.GetImageFromArray((inside_air & (hu < -950)).astype(np.uint8))
    lumen = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(lumen, True)))
    top = body.any(axis=(1, 2)).nonzero()[0]
    airways = np.zeros_like(body)
    if top.size:
        # The superior end is the higher slice index when the third axis points to the head (LPS z), as here.
        reaching = np.unique(lumen[top.max() - 2 : top.max() + 1][lumen[top.max() - 2 : top.max() + 1] > 0])
        if reaching.size:
            airways = lumen == reaching.min()  # RelabelComponent numbers by size: the smallest id is the largest
    lungs = _largest_components(inside_air & ~airways, 2, min_voxels=1000)
    bone = _largest_components((hu > 300) & filled, 1000, min_voxels=500)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[lungs] = 1
    labels[bone] = 2
    labels[airways] = 3
    return labels


def breathing_displacement(volume: Volume, max_mm: float = BREATHING_MM) -> torch.Tensor:
    """A breathing-like diffeomorphic displacement (1, 3, Z, Y, X) in voxels, channels (x, y, z), at most ~max_mm.

    The chest's contents move towards the feet and slightly forwards, most at the lung bases and not at all at the
    apices, less towards the body wall (a Gaussian across the slice, sigma a third of the field of view), as between
    expiration and inspiration. Integrated as a stationary velocity (scaling and squaring), so it is invertible.
    """
    lps = _lps_mm(volume)
    superior = (lps[2] - lps[2].min()) / max(float(np.ptp(lps[2])), 1e-6)  # 0 at the feet end, 1 at the head end
    centre = [0.5 * (lps[k].min() + lps[k].max()) for k in range(2)]
    sigma = min(float(np.ptp(lps[0])), float(np.ptp(lps[1]))) / 3.0
    across = np.exp(-((lps[0] - centre[0]) ** 2 + (lps[1] - centre[1]) ** 2) / (2.0 * sigma**2))
    return _inspiration((1.0 - superior) ** 1.5 * across, volume, max_mm)


def _lps_mm(volume: Volume) -> np.ndarray:
    """(3, Z, Y, X) LPS position of every voxel in mm, without the origin."""
    shape = volume.shape
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape[::-1]], indexing="ij")).reshape(3, -1)
    return (volume.affine[:3, :3] @ grid).reshape(3, *shape[::-1]).transpose(0, 3, 2, 1)


def _inspiration(weight: np.ndarray, volume: Volume, max_mm: float) -> torch.Tensor:
    """The flow of a stationary velocity towards the feet by ``weight`` (Z, Y, X) x ``max_mm`` and forwards by a
    quarter of that, integrated by scaling and squaring: (1, 3, Z, Y, X) in voxels, channels (x, y, z)."""
    velocity_lps = np.stack([np.zeros_like(weight), -0.25 * weight, -weight]) * max_mm  # LPS: feet -z, forwards -y
    to_index = np.linalg.inv(volume.direction @ np.diag(volume.spacing[::-1]))  # mm (LPS) -> voxels (x, y, z)
    velocity = np.einsum("ij,j...->i...", to_index, velocity_lps).astype(np.float32)
    return integrate_velocity(torch.from_numpy(velocity)[None].contiguous(), padding_mode="border")


def sliding_breathing_displacement(
    volume: Volume, labels: np.ndarray, max_mm: float = BREATHING_MM, layer_mm: float = SLIDING_LAYER_MM
) -> torch.Tensor:
    """A breathing displacement that slides at the chest wall, (1, 3, Z, Y, X) in voxels, channels (x, y, z).

    Inspiration moves the lungs, the mediastinum and what lies under the diaphragm towards the feet (most at the
    lung bases, none at the apices) and slightly forwards, while the spine, the ribs and the body wall stay: the
    pleura lets the lungs slide along the wall. `breathing_displacement` moves everything together, smoothly across
    the slice, which favours methods that regularise strongly. The moving part (the motion mask of Vandemeulebroucke
    et al., Med Phys 2012) is, on each axial slice, the convex hull of the lungs of ``labels`` (`chest_masks`) on that
    slice and every slice above it (so that the liver dome under a lung base, and the abdomen below the lungs, move
    with the diaphragm), less the bone dilated by twice ``layer_mm``. The velocity is that mask smoothed with a
    Gaussian of ``layer_mm`` (a thin shear layer instead of a tear, which leaves the bone within about 1 mm of where it
    was) times the motion, and it is integrated as a stationary velocity (scaling and squaring), so the map is
    invertible.
    """
    from skimage.morphology import convex_hull_image

    lps = _lps_mm(volume)
    superior = (lps[2] - lps[2].min()) / max(float(np.ptp(lps[2])), 1e-6)  # 0 at the feet end, 1 at the head end
    lungs = labels == CHEST_LABEL_IDS["lungs"]
    cavity = np.zeros(lungs.shape, dtype=bool)
    above = np.zeros(lungs.shape[1:], dtype=bool)
    for z in np.argsort(-superior[:, 0, 0], kind="stable"):  # from the head end down
        above |= lungs[z]
        if above.any():
            cavity[z] = convex_hull_image(above)
    bone = ndimage.binary_dilation(
        labels == CHEST_LABEL_IDS["bone"],
        structure=ellipsoid([round(2.0 * layer_mm / s) for s in volume.spacing]),
    )
    moving = ndimage.gaussian_filter((cavity & ~bone).astype(np.float32), [layer_mm / s for s in volume.spacing])
    return _inspiration((1.0 - superior) ** 1.5 * moving, volume, max_mm)


def chest_pairs(
    rng: np.random.Generator, shrink: int = CHEST_SHRINK, motion: str = "smooth", names: Sequence[str] = CHEST_CTS
) -> list[tuple[str, Volume, np.ndarray, Volume, Volume]]:
    """(name, fixed CT, fixed masks, moving CT, moving masks) for each of ``names``: the CT (in-plane pixels
    box-averaged by ``shrink``) with noise, and the same CT moved by `breathing_displacement` (``motion="smooth"``)
    or `sliding_breathing_displacement` (``"sliding"``) with its own noise.

    The masks are `chest_masks` of the fixed CT, and the same masks moved with the CT (nearest neighbour).
    """
    from ..io import read_volume  # the readers are needed only by the evaluation, not by training

    if motion not in ("smooth", "sliding"):
        raise ValueError(f"motion must be 'smooth' or 'sliding', got {motion!r}")

    data = shared_data_dir() / "ct"
    pairs = []
    for name in names:
        ct = read_volume(data / name)
        if shrink > 1:
            image = sitk.BinShrink(sitk.Cast(ct.to_sitk(), sitk.sitkFloat32), [shrink, shrink, 1])
            ct = Volume.from_sitk(image, meta=ct.meta)
        labels = chest_masks(ct.array)
        ddf = breathing_displacement(ct) if motion == "smooth" else sliding_breathing_displacement(ct, labels)
        base = torch.from_numpy(np.ascontiguousarray(ct.array, dtype=np.float32))[None, None]
        moving = warp(base, ddf, padding_mode="border")[0, 0].numpy()
        moving_labels = warp(torch.from_numpy(labels.astype(np.int32))[None, None], ddf, "nearest", "border")
        geometry = {"spacing": ct.spacing, "origin": ct.origin, "direction": ct.direction}
        noisy = [a + rng.normal(0.0, PHASE_NOISE_HU, a.shape).astype(np.float32) for a in (ct.array, moving)]
        pairs.append(
            (
                name.split(".")[0],
                Volume(noisy[0], **geometry, meta={"source": name}),
                labels,
                Volume(noisy[1], **geometry, meta={"source": f"{name}-breathing"}),
                Volume(moving_labels[0, 0].numpy().astype(np.uint8), **geometry, meta={}),
            )
        )
    return pairs


def chest_phase_change(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The chest CT in a later contrast phase: enhancing soft tissue (80..400 HU) `CHEST_ENHANCEMENT_HU` brighter,
    and new noise of `PHASE_NOISE_HU` (the unlabelled chest CTs have no vessel labels for `phase_change`)."""
    out = np.asarray(hu, dtype=np.float32).copy()
    out[(out > 80.0) & (out < 400.0)] += CHEST_ENHANCEMENT_HU
    return out + rng.normal(0.0, PHASE_NOISE_HU, out.shape).astype(np.float32)


# --- training data ---------------------------------------------------------------------------------------------------


def _isotropic(
    case: LabelledCT | tuple[str, Volume], spacing: float, axes: list[str]
) -> tuple[np.ndarray, np.ndarray | None]:
    """HU (float32) and labels resampled to ``spacing`` mm along every axis (SimpleITK), same physical box, in the
    network's axis order and orientation ``axes`` (`AxisMap`, as the engine feeds the network)."""
    ct, labels = (case.ct, case.labels) if isinstance(case, LabelledCT) else (case[1], None)
    size = [max(1, int(round(n * s / spacing))) for n, s in zip(ct.shape[::-1], ct.spacing[::-1], strict=True)]

    def resample(image: sitk.Image, interpolator: int, default: float, pixel: int) -> np.ndarray:
        out = sitk.Resample(
            image,
            size,
            sitk.Transform(),
            interpolator,
            ct.origin,
            [spacing] * 3,
            ct.direction.flatten(),
            default,
            pixel,
        )
        return sitk.GetArrayFromImage(out)

    axis_map = AxisMap.between(ct, axes)  # resampling keeps the direction, so the CT's map holds

    def oriented(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(axis_map.to_network(torch.from_numpy(array)[None, None])[0, 0].numpy())

    hu = oriented(resample(ct.to_sitk(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    if labels is None:
        return hu, None
    label_image = sitk.GetImageFromArray(labels.astype(np.uint16))
    label_image.CopyInformation(ct.to_sitk())
    # int16: torch cannot reverse uint16 tensors; TotalSegmentator ids are < 200.
    return hu, oriented(resample(label_image, sitk.sitkNearestNeighbor, 0, sitk.sitkInt16))


class PairSampler:
    """Random crops of the training cases with random deformations, as network-ready tensors."""

    def __init__(self, train: SymnetTrainConfig, log=print) -> None:
        from ..io import read_volume

        self.train = train
        self.rng = np.random.default_rng(train.seed)
        cases: list[LabelledCT | tuple[str, Volume]] = list(phantom_cases(train.phantoms))
        data = shared_data_dir() if train.real_train else None
        for entry in train.real_train:
            if len(entry) == 2:
                cases.append(load_real_case(data, entry[0], entry[1]))
            else:
                cases.append((entry[0], read_volume(data / "ct" / entry[0])))
        self.views = [_isotropic(case, s, train.axes) for case in cases for s in train.spacing_mm]
        self.spacings = [s for _ in cases for s in train.spacing_mm]
        self.label_names = [
            case.label_names if isinstance(case, LabelledCT) else {} for case in cases for _ in train.spacing_mm
        ]
        self.names = [case.name if isinstance(case, LabelledCT) else case[0] for case in cases]
        log(f"training data: {len(cases)} cases x {len(train.spacing_mm)} spacings")

    def _crop(self, hu: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        crop = self.train.crop
        pads = [(0, max(0, c - n)) for c, n in zip(crop, hu.shape, strict=True)]
        hu = np.pad(hu, pads, constant_values=-1024.0)
        labels = None if labels is None else np.pad(labels, pads)
        starts = [int(self.rng.integers(0, n - c + 1)) for c, n in zip(crop, hu.shape, strict=True)]
        box = tuple(slice(s, s + c) for s, c in zip(starts, crop, strict=True))
        return hu[box], None if labels is None else labels[box]

    def pair(self) -> Pair:
        index = int(self.rng.integers(len(self.views)))
        hu, labels = self._crop(*self.views[index])
        spacing = self.spacings[index]
        pair = deform_pair(hu, labels, (spacing,) * 3, self.rng, self.train.deformation)
        # Follow-ups differ in more than geometry: another contrast phase, other noise (`phase_change`).
        if pair.moving_labels is not None and self.rng.random() < float(self.train.deformation.get("phase_change", 0)):
            changed = phase_change(pair.moving[0, 0].numpy(), pair.moving_labels, self.label_names[index], self.rng)
            pair = Pair(pair.fixed, torch.from_numpy(changed)[None, None], pair.fixed_labels, pair.moving_labels)
        if self.rng.random() < 0.5:  # either image may be the fixed one
            pair = Pair(pair.moving, pair.fixed, pair.moving_labels, pair.fixed_labels)
        return pair


def normalise(hu: torch.Tensor, window_hu: list[float]) -> torch.Tensor:
    """HU -> [0, 1] through the config's window (the CT weights' normalisation)."""
    low, high = window_hu
    return window_tensor(hu, 0.5 * (low + high), high - low)


def _one_hot(fixed_labels: np.ndarray, moving_labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
    ids, counts = np.unique(fixed_labels[fixed_labels > 0], return_counts=True)
    if ids.size == 0:
        return None
    ids = ids[np.argsort(counts)[::-1][:DICE_STRUCTURES]]

    def encode(labels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([labels == i for i in ids]).astype(np.float32))[None]

    return encode(fixed_labels), encode(moving_labels)


def soft_dice_loss(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """1 - mean Dice over channels of two soft one-hot maps (B, K, Z, Y, X)."""
    dims = (2, 3, 4)
    dice = (2 * (a * b).sum(dims) + eps) / (a.sum(dims) + b.sum(dims) + eps)
    return 1.0 - dice.mean()


def symnet_loss(
    model: SYMNet, fixed: torch.Tensor, moving: torch.Tensor, weights: dict[str, float], labels=None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one normalised pair (B, 1, Z, Y, X) and its parts (see the module docstring)."""
    v_xy, v_yx = model(fixed, moving)
    halves = integrate_velocity(torch.cat((v_xy, v_yx, -v_xy, -v_yx), dim=0))
    xy_half, yx_half = halves[:1], halves[1:2]
    fields = half_way_fields(halves)
    window = int(weights.get("ncc_window", 5))
    parts = {
        "ncc_half": local_ncc_loss(warp(fixed, xy_half), warp(moving, yx_half), window),
        "ncc_full": local_ncc_loss(warp(moving, fields.f_ba), fixed, window)
        + local_ncc_loss(warp(fixed, fields.f_ab), moving, window),
        "smooth": smoothness_loss(v_xy / model.range_flow) + smoothness_loss(v_yx / model.range_flow),
        "antifold": negative_jacobian_loss(fields.f_ab) + negative_jacobian_loss(fields.f_ba),
        "magnitude": magnitude_loss(xy_half, yx_half),
    }
    total = parts["ncc_half"] + parts["ncc_full"]
    for name in ("smooth", "antifold", "magnitude"):
        total = total + float(weights.get(name, 0.0)) * parts[name]
    if labels is not None and weights.get("dice", 0.0) > 0:
        fixed_one_hot, moving_one_hot = labels
        parts["dice"] = soft_dice_loss(warp(moving_one_hot, fields.f_ba), fixed_one_hot)
        total = total + float(weights["dice"]) * parts["dice"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


def initial_model(train: SymnetTrainConfig) -> SYMNet:
    """Random weights; or those of ``init``: an official checkpoint under ../shared/data, or project weights (a
    ``.safetensors`` file with its card, as a comparison's fine-tuning gives; start_channel from its shapes)."""
    if not train.init:
        return SYMNet(train.start_channel)
    if str(train.init).endswith(".safetensors"):
        from ..weights import load_symnet

        model = load_symnet(train.init)[0]
    else:
        model = load_symnet_checkpoint(shared_data_dir() / train.init)
    if model.start_channel != train.start_channel:
        raise ValueError(f"init {train.init} has start_channel {model.start_channel}, config {train.start_channel}")
    return model


def train_symnet(
    config_path: Path | SymnetTrainConfig,
    out_dir: Path,
    device: str = "cpu",
    resume: bool = False,
    log=print,
    stop_at: int | None = None,
) -> tuple[SYMNet, SymnetTrainConfig, dict[str, Any]]:
    """Train from a config (a YAML file or a `SymnetTrainConfig`); returns the model, the config and training facts.
    Seeded; ``resume``/``stop_at`` as `napari_ctcolor.training.colorizer.train_colorizer`."""
    from tqdm import tqdm

    if isinstance(config_path, SymnetTrainConfig):
        train, config_snapshot = config_path, dataclasses.asdict(config_path)
    else:  # what this run was given, for the card
        train = SymnetTrainConfig.load(config_path)
        config_snapshot = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    torch.manual_seed(train.seed)
    t0 = time.time()
    sampler = PairSampler(train, log)
    model = initial_model(train).to(device).train()
    model.to(memory_format=torch.channels_last_3d)
    optimiser = torch.optim.Adam(model.parameters(), lr=train.lr)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / f"{train.name}.checkpoint.pt"
    start, history, seconds_before = 0, [], 0.0
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        torch.set_rng_state(state["torch_rng"])
        sampler.rng.bit_generator.state = json.loads(state["numpy_rng"])
        start, history = int(state["step"]), json.loads(state["history"])
        seconds_before = float(state.get("seconds", 0.0))
        log(f"resumed from {checkpoint} at step {start}")

    t_loop = time.time()
    end = train.steps if stop_at is None else min(train.steps, stop_at)
    bar = tqdm(range(start, end), initial=start, total=train.steps, file=sys.stderr, desc=train.name)
    for step in bar:
        pair = sampler.pair()
        fixed = normalise(pair.fixed, train.window_hu).to(device).contiguous(memory_format=torch.channels_last_3d)
        moving = normalise(pair.moving, train.window_hu).to(device).contiguous(memory_format=torch.channels_last_3d)
        labels = None
        if pair.fixed_labels is not None:
            encoded = _one_hot(pair.fixed_labels, pair.moving_labels)
            labels = None if encoded is None else tuple(t.to(device) for t in encoded)
        loss, parts = symnet_loss(model, fixed, moving, train.loss, labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        history.append({"loss": float(loss.detach()), **parts})
        if step % 10 == 0:
            recent = history[-50:]
            bar.set_postfix({k: f"{np.mean([h[k] for h in recent if k in h]):.4f}" for k in ("loss", "ncc_full")})
        if (step + 1) % train.checkpoint_every == 0 or step + 1 == end:
            state = {
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": json.dumps(sampler.rng.bit_generator.state),
                "step": step + 1,
                "history": json.dumps(history),
                "seconds": seconds_before + time.time() - t_loop,
            }
            with atomic_path(checkpoint) as tmp:
                torch.save(state, tmp)
    model.eval()
    last = history[-100:]
    facts = {
        "config": config_snapshot,
        "steps": train.steps,
        "final_loss": {k: round(float(np.mean([h[k] for h in last if k in h])), 5) for k in last[0]} if last else {},
        "data_seconds": round(t_loop - t0, 1),
        "train_seconds": round(seconds_before + time.time() - t_loop, 1),
        "train_cases": sampler.names,
        "device": str(device),
    }
    return copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format), train, facts


# --- evaluation ------------------------------------------------------------------------------------------------------


def dice_per_structure(a: np.ndarray, b: np.ndarray, names: dict[int, str]) -> dict[str, float]:
    """Dice of every structure with at least `MIN_EVAL_VOXELS` voxels in ``a``."""
    ids, counts = np.unique(a[a > 0], return_counts=True)
    out = {}
    for i in ids[counts >= MIN_EVAL_VOXELS]:
        in_a, in_b = a == i, b == i
        out[names.get(int(i), str(i))] = float(2 * np.logical_and(in_a, in_b).sum() / (in_a.sum() + in_b.sum()))
    return out


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean `dice_per_structure` over the structures of ``a`` (the evaluation's summary Dice)."""
    return float(np.mean(list(dice_per_structure(a, b, {}).values())))


def evaluation_pairs(train: SymnetTrainConfig) -> list[tuple[str, LabelledCT, Volume, Volume]]:
    """(name, case, moving CT, moving labels) for the held-out deformations: native grids, seed ``val_seed``."""
    data = shared_data_dir()
    rng = np.random.default_rng(train.val_seed)
    pairs = []
    for ct_name, labels_name in train.real_val:
        case = load_real_case(data, ct_name, labels_name)
        for k in range(train.val_pairs_per_case):
            pair = deform_pair(case.ct.array, case.labels, case.ct.spacing, rng, train.deformation)
            geometry = {"spacing": case.ct.spacing, "origin": case.ct.origin, "direction": case.ct.direction}
            moving = Volume(pair.moving[0, 0].numpy(), **geometry, meta={"source": f"{case.name}-deformed-{k}"})
            labels = Volume(pair.moving_labels, **geometry, meta={})
            pairs.append((f"{case.name}/{k}", case, moving, labels))
    return pairs


def evaluate_symnet(weights: Path, train: SymnetTrainConfig, log=print, refine: int | None = None) -> dict[str, Any]:
    """Dice before/after, folding and seconds of the production engine on the held-out deformations."""
    from ..engines.register import register

    per_pair = []
    for name, case, moving, moving_labels in evaluation_pairs(train):
        result = register(case.ct, moving, model=weights, refine=refine, moving_labels=moving_labels)
        row = {
            "pair": name,
            "shape": list(case.ct.shape),
            "dice_before": round(mean_dice(case.labels, moving_labels.array), 4),
            "dice_after": round(mean_dice(case.labels, result.warped_labels.array), 4),
            "folding_fraction": result.metrics["folding_fraction"],
            "seconds": result.metrics["seconds"],
        }
        per_pair.append(row)
        log("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    keys = ("dice_before", "dice_after", "folding_fraction", "seconds")

    def mean(rows: list[dict]) -> dict[str, float]:
        return {k: round(float(np.mean([r[k] for r in rows])), 5) for k in keys}

    cases = sorted({r["pair"].split("/")[0] for r in per_pair})
    by_case = {c: mean([r for r in per_pair if r["pair"].split("/")[0] == c]) for c in cases}
    return {"summary": mean(per_pair), "by_case": by_case, "pairs": per_pair}


CITATIONS = {
    "totalsegmentator": "Wasserthal J. et al., TotalSegmentator: Robust Segmentation of 104 Anatomic Structures in CT "
    "Images, Radiology: Artificial Intelligence 2023 (example data, CC BY 4.0 / Apache-2.0)",
    "symnet": "Mok T.C.W. and Chung A.C.S., Fast Symmetric Diffeomorphic Image Registration with Convolutional Neural "
    "Networks, CVPR 2020; initial weights: the official neurite-OASIS checkpoint (MIT licence)",
    "phantom": "napari_ctcolor.phantom procedural torso phantoms (this project)",
}


def model_card(model: SYMNet, train: SymnetTrainConfig, config_path: Path, facts: dict, metrics: dict) -> dict:
    return {
        "name": train.name,
        "task": "intra-patient CT-CT deformable registration (SYMNet, symmetric diffeomorphic)",
        "architecture": {
            "class": "napari_ctcolor.models.symnet.SYMNet",
            "config": {"start_channel": model.start_channel, "range_flow": model.range_flow},
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "inputs": {
            "normalisation": {"mode": "window", "window_hu": list(train.window_hu)},
            "axes": list(train.axes),
            "min_spacing_mm": train.min_spacing_mm,
            "note": "HU clipped to window_hu and mapped to [0, 1]; the engine pads each axis to a multiple of 16"
            + (
                f" and runs the network on voxels of at least {train.min_spacing_mm} mm (fields upsampled to the "
                "fixed grid)"
                if train.min_spacing_mm
                else ""
            )
            + f". Trained at {', '.join(map(str, train.spacing_mm))} mm isotropic voxels.",
        },
        "inference": INFERENCE,
        "training": {
            "command": f"ctcolor train symnet --config {config_path.as_posix()}",
            "data": CITATIONS,
            **facts,
        },
        "metrics": metrics,
        "limits": [
            "Trained on synthetic smooth deformations (up to ~15 mm) of a few CTs and phantoms: intra-patient "
            "motion of that size, not inter-patient registration.",
            "The network alone (--refine 0) runs on voxels of at least min_spacing_mm and is below elastix B-spline "
            "and SimpleITK demons on the same synthetic pairs (BENCHMARKS.md): one forward pass, fine-tuned for "
            f"{train.steps} CPU steps from brain-MRI weights. The default therefore refines its field with demons "
            "at full resolution; the metrics below are of that default.",
            "Registration is a visual aid for comparing scans; check the checkerboard and Jacobian before trusting it.",
            REPRODUCTION_NOTE,
        ],
    }


def run(
    config_path: Path, weights_dir: Path, device: str = "cpu", resume: bool = False, eval_only: bool = False, log=print
) -> Path:
    """`ctcolor train symnet`: train (or only evaluate), then write the weights and their model card."""
    from ..weights import save_weights, update_card_metrics

    config_path = Path(config_path)
    train = SymnetTrainConfig.load(config_path)
    if eval_only:
        path = weights_dir / f"{train.name}.safetensors"
        return update_card_metrics(path, evaluate_symnet(path, train, log))
    model, train, facts = train_symnet(config_path, weights_dir / "checkpoints", device, resume, log)
    card = model_card(model, train, config_path, facts, metrics={})
    with tempfile.TemporaryDirectory() as tmp:
        # Evaluate through the production loader and engine: the weights and card as they will ship.
        metrics = evaluate_symnet(save_weights(model, card, Path(tmp), train.name), train, log)
    return save_weights(model, {**card, "metrics": metrics}, weights_dir, train.name)
