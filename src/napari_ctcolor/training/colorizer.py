"""Training the colorizers: data from phantoms (all contrast phases) and real labelled CT, cross-entropy against soft
colour-class targets (each network pixel's area share of every class), so the palette stays free at inference.

Real CT without labels (``real_partial``) trains through partial labels derived from its HU (`training.partial`):
pixels without a derived label have weight 0, so they carry no loss.

Pixels are weighted so that small structures count: every labelled structure gets a weight that grows as its size
shrinks (square root of median size / size, clipped to 0.5..4), unlabelled tissue 1. Without it the model learned
the large red-brown soft tissue and painted vertebrae and ribs reddish (bone hue on only ~40 % of bone voxels).

Everything is computed at the network's reduced resolution: the HU are area-averaged by the factor that brings the
pixels to ``chroma_mm``, and the class targets and the weights are area-averaged the same way.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ..engines.colorize import anatomy
from ..errors import InputError
from ..io.write import atomic_path
from ..models.colorizer import Colorizer, ColorizerConfig, context_indices, prepare_input
from ..palettes import PALETTE_NAMES, load_palette
from .data import REPRODUCTION_NOTE, config_from_dict, load_config, shared_data_dir
from .prepare import Reduced, phantom_cases, prepare_training_data, real_cases


@dataclass
class TrainConfig:
    """A training run, read from YAML (see configs/colorizer_2d.yaml)."""

    name: str
    seed: int
    model: dict[str, Any]
    steps: int = 2000
    batch_size: int = 16
    crop: int = 64  # training crop at the network's resolution (pixels); for 3D also `crop_slices`
    crop_slices: int = 16
    real_weight: float = 1.0  # sampling weight of a real CT's slices relative to a phantom's
    partial_weight: float = 1.0  # the same for a `real_partial` CT's slices
    limbs: float = 0.0  # share of 2D samples given a synthetic limb in their air (`Sampler._add_limb`)
    elastic: float = 0.0  # share of 2D samples elastically deformed, rotated and scaled (`Sampler._deform`)
    deenhance: float = 0.0  # share of a real contrast CT's samples given a non-contrast phase (`DE_ENHANCEMENT`)
    # share of a partial-label chest CT's 2D samples whose mediastinal blood pool gets a contrast phase
    # (`CHEST_BLOOD_HU`) and trains as contrast blood (`training.partial.BLOOD`)
    chest_blood: float = 0.0
    boost: float = 0.0  # share of a real contrast CT's samples whose blood is made brighter (`BOOST`)
    # share of a labelled real CT's 2D samples cropped around its aorta (`Sampler._vessel_crop`) and given an arterial
    # phase (`ENHANCEMENT`) or a brighter bolus (`BOOST`): enhanced blood against the vertebral body, the confusion
    # a random crop rarely shows
    vessel_crops: float = 0.0
    # label the partial-label chest CTs' derived descending aorta as aorta (`training.partial._descending_aorta`)
    partial_aorta: bool = False
    # weight of `family_confusion` beside the cross-entropy: the probability a blood pixel gives bone, and a bone
    # pixel gives blood, penalised on their own
    confusion: float = 0.0
    lr: float = 2e-3
    weight_decay: float = 1e-4
    # weights the run starts from (a name or a .safetensors file, `weights.find_weights`): a fine-tuning; "" from
    # scratch. Set by `ctcolor train compare --finetune` (`training.compare`)
    init: str = ""
    # Processes drawing batches (`batch_stream`): 0 draws them in the training process, in the order the seed gives
    # (the shipped recipes); N > 0 gives each of N DataLoader workers a `Sampler` of its own, seeded by (seed, worker),
    # so that a GPU is not left waiting for the CPU-bound sampler. Deterministic for a given N, not equal to 0's order;
    # a run resumed part-way with N > 0 starts the workers' sequences again (their state is not checkpointed).
    loader_workers: int = 0
    checkpoint_every: int = 250
    phantoms: dict[str, Any] = field(default_factory=dict)
    real_train: list[list[str]] = field(default_factory=list)
    real_partial: list[list[str]] = field(default_factory=list)  # [ct, derivation] (training.partial.DERIVATIONS)
    real_val: list[list[str]] = field(default_factory=list)
    tissue_val: list[str] = field(default_factory=list)  # unlabelled CTs validated by `evaluate.tissue_metrics`
    leave_one_out: list[str] = field(default_factory=list)  # models of this recipe less one patient (`leave_one_out`)
    val_phantoms: dict[str, Any] = field(default_factory=dict)
    command: str = ""

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return load_config(cls, path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Path) -> TrainConfig:
        """From a config's mapping (``path``: the file the errors name)."""
        return config_from_dict(cls, raw, path)


#: Synthetic contrast enhancement of a non-contrast CT (HU added per colour class, drawn uniformly), so that the
#: real training patient also teaches enhanced vessels and organs: arterial and portal-venous phases at 120 kVp.
#: The aorta and heart reach about 700 HU (a CT angiography); the iliac arteries stop at about 500 HU, because the
#: 3 mm patient's labels (a segmentation model's, at 3 mm) reach into the pelvic bones beside them: with the iliac
#: arteries enhanced to 700 HU, the shipped model named 23-27 % of that patient's dense pelvic voxels contrast blood
#: (0.4 % before). One training run per recipe (2026-11-26): a change of the data stream alone moves the held-out
#: rows by as much as the recipe does (BENCHMARKS.md).
ENHANCEMENT: dict[str, dict[str, tuple[float, float]]] = {
    "arterial": {
        "aorta": (150, 650),
        "iliac_artery": (150, 450),
        "heart": (100, 650),
        "kidney": (80, 180),
        "spleen": (40, 100),
        "liver": (5, 25),
        "pancreas": (40, 90),
        "portal_vein_and_splenic_vein": (20, 80),
    },
    "portal_venous": {
        "aorta": (100, 180),
        "iliac_artery": (100, 180),
        "heart": (100, 180),
        "inferior_vena_cava": (60, 150),
        "iliac_vena": (60, 150),
        "portal_vein_and_splenic_vein": (100, 180),
        "kidney": (100, 160),
        "spleen": (50, 80),
        "liver": (40, 70),
        "pancreas": (40, 70),
    },
}


#: A brighter bolus for a real contrast CT (config ``boost``): HU added per class, drawn uniformly, so that the
#: portal-venous DICOM patient's aorta (about 150-200 HU) also shows the 300-700 HU of an arterial phase or a CTA.
BOOST: dict[str, tuple[float, float]] = {
    "aorta": (50, 500),
    "heart": (50, 500),
    "iliac_artery": (50, 500),
}
#: Synthetic contrast of a partial-label chest CT's mediastinal blood pool (config ``chest_blood``): the pool's HU
#: (about 40, unenhanced) is raised to a value drawn uniformly from this range, times 1 +- up to `CHEST_BLOOD_TILT`
#: across the sample (the left heart brighter than the right in an arterial phase, or the reverse early in a bolus).
#: No labelled patient shows the heart or the thoracic aorta with contrast: without it, bright in the chest only ever
#: meant bone, and a CT angiography's aorta and heart were named bone (issue 49).
CHEST_BLOOD_HU, CHEST_BLOOD_TILT = (150.0, 700.0), 0.3


#: Synthetic de-enhancement of a contrast CT (config ``deenhance``, off in the shipped recipe): each class's mean HU in
#: the sample is moved down to a non-contrast value drawn uniformly (never up; texture kept, applied in proportion to
#: each pixel's share of the class). Meant to teach a non-contrast aorta from the contrast patient; measured on the
#: 3 mm patient's leave-one-out row it left the aorta where it was (17 % right) and lost spleen (0.86 -> 0.42), so
#: it stays off (BENCHMARKS.md). Non-contrast values at 120 kVp: blood 35-50 HU, liver 50-65, spleen 40-55, kidney
#: 25-40, pancreas 30-45.
DE_ENHANCEMENT: dict[str, tuple[float, float]] = {
    "aorta": (35, 50),
    "heart": (35, 50),
    "inferior_vena_cava": (35, 50),
    "portal_vein_and_splenic_vein": (35, 50),
    "iliac_artery": (35, 50),
    "iliac_vena": (35, 50),
    "liver": (50, 65),
    "spleen": (40, 55),
    "kidney": (25, 40),
    "pancreas": (30, 45),
}


class Sampler:
    """Random training crops (seeded): 2D slices with context, or 3D patches, with augmentation.

    Augmentation per sample: a synthetic limb in the air beside the body (2D, a share ``limbs`` of the samples), an
    elastic deformation with rotation and scaling (2D, a share ``elastic``), a calibration offset (+-8 HU), a gain
    (+-4 %), for real non-contrast CT a synthetic contrast phase half of the time (`ENHANCEMENT`, added in proportion
    to each pixel's share of the class), for real contrast CT a synthetic non-contrast phase in a share ``deenhance``
    of the samples (`DE_ENHANCEMENT`), image noise (0-12 HU at the network's resolution) and blur (0-0.8 pixel).
    Phantoms add what real data lack: varied pixel size, slice thickness and contrast phases.
    """

    def __init__(
        self, cases: list[Reduced], config: ColorizerConfig, train: TrainConfig, seed: int | list[int]
    ) -> None:
        self.cases, self.config, self.train = cases, config, train
        self.rng = np.random.default_rng(seed)
        sizes = np.array([c.hu.shape[0] for c in cases], dtype=np.float64)
        weights = np.array(
            [float(train.real_weight) if c.real else float(train.partial_weight) if c.partial else 1.0 for c in cases]
        )
        self.p = sizes * weights / (sizes * weights).sum()
        self.index = {name: k for k, name in enumerate(config.classes)}
        self.vessels = {}  # case index -> (N, 3) (z, y, x) of the pixels mostly aorta, for `vessel_crops`
        if train.vessel_crops and "aorta" in self.index:
            for i, case in enumerate(cases):
                if case.real:
                    where = torch.nonzero(case.target[:, self.index["aorta"]] > 127)
                    if len(where):
                        self.vessels[i] = where
        self.deform = None
        if train.elastic and config.dims == 2:
            from monai.transforms import Rand2DElastic

            # Control points every 20 pixels (70 mm) moved up to 2.5 pixels (9 mm), rotation up to 10 degrees and
            # scale +-12 % (patient size and pixel spacing): organs take shapes and positions the one real patient
            # does not have.
            self.deform = Rand2DElastic(
                spacing=(20, 20),
                magnitude_range=(0.0, 2.5),
                prob=1.0,
                rotate_range=(0.17,),
                scale_range=(0.12, 0.12),
                padding_mode="border",
                mode="bilinear",
            )
            self.deform.set_random_state(seed=int(self.rng.integers(2**31)))

    def _deform_generators(self) -> list[np.random.RandomState]:
        """The elastic deformation's random states: MONAI's `Rand2DElastic` draws from one of its own, its deformation
        grid's and its affine grid's."""
        return [self.deform.R, self.deform.deform_grid.R, self.deform.rand_affine_grid.R]

    def deform_state(self) -> str:
        """The elastic deformation's random states as JSON for a checkpoint; '' without one. A resumed run that
        re-seeded them would deform differently from the run it continues."""
        if self.deform is None:
            return ""
        states = [r.get_state() for r in self._deform_generators()]
        return json.dumps([[kind, keys.tolist(), pos, gauss, cached] for kind, keys, pos, gauss, cached in states])

    def set_deform_state(self, state: str) -> None:
        """Restore `deform_state` (a checkpoint without one leaves the deformation as seeded)."""
        if self.deform is not None and state:
            for generator, (kind, keys, pos, gauss, cached) in zip(
                self._deform_generators(), json.loads(state), strict=True
            ):
                generator.set_state((kind, np.array(keys, dtype=np.uint32), pos, gauss, cached))

    def _crop(self, t: torch.Tensor, y: int, x: int) -> torch.Tensor:
        size = self.train.crop
        t = t[..., y : y + size, x : x + size]
        pad_y, pad_x = size - t.shape[-2], size - t.shape[-1]
        if pad_y or pad_x:  # small images: pad (replicate) to the crop size
            t = F.pad(t.reshape(-1, 1, *t.shape[-2:]), (0, pad_x, 0, pad_y), mode="replicate").reshape(
                *t.shape[:-2], size, size
            )
        return t

    def _add_limb(self, hu: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Paint an arm or thigh cross-section into the air of a 2D sample: skin, fat, muscle, a bone with cortex and
        fatty marrow, labelled with tissue classes only. Neither the real patient nor the phantoms have limbs beside
        the torso; without them the network gave arms the colour of organs it knew.

        Args:
            hu: (context, h, w) HU at the network's resolution; target: (context, K, h, w) uint8 class shares.
        """
        rng, size = self.rng, hu.shape[-1]
        pixel_mm = self.config.chroma_mm
        radius = float(rng.uniform(35.0, 90.0)) / pixel_mm
        cy, cx = (float(v) for v in rng.uniform(0, size, 2))
        y, x = torch.meshgrid(
            torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
        )
        aspect = float(rng.uniform(0.7, 1.0))
        r = torch.hypot(y - cy, (x - cx) * aspect) / radius
        fat_inner = 1.0 - float(rng.uniform(4.0, 20.0)) / pixel_mm / radius
        by, bx = cy + float(rng.normal(0, 0.15)) * radius, cx + float(rng.normal(0, 0.15)) * radius
        rb = torch.hypot(y - by, x - bx) / (radius * float(rng.uniform(0.15, 0.3)))
        layers = [  # (inside, HU, tissue class), outermost first
            (r < 1.0, float(rng.uniform(20, 60)), "soft_tissue"),  # skin
            (r < 1.0 - 1.5 / pixel_mm / radius, float(rng.uniform(-120, -80)), "fat"),
            (r < fat_inner, float(rng.uniform(30, 70)), "soft_tissue"),  # muscle
            (rb < 1.0, float(rng.uniform(700, 1400)), "bone"),  # cortex
            (rb < 0.6, float(rng.uniform(-80, 60)), None),  # marrow: fatty or red, its HU decide
        ]
        free = hu.amax(dim=0) < -900.0  # only where the sample is air: the limb lies beside the body
        hu, target = hu.clone(), target.clone()
        for inside, value, tissue in layers:
            where = inside & free
            if tissue is None:
                tissue = "fat" if value < -10 else "soft_tissue"
            hu[:, where] = value
            target[:, :, where] = 0
            target[:, self.index[tissue], where] = 255
        return hu, target

    def _enhance_pool(
        self, hu: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, pool: torch.Tensor, centre: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A 2D sample's mediastinal blood pool given contrast (`CHEST_BLOOD_HU`) and trained as contrast blood; the
        derived aorta in it is enhanced alike and keeps its class.

        Args:
            hu: (context, h, w) HU; target: (context, K, h, w) uint8 class shares (none in the pool but the aorta's);
            weight: (1, h, w) the centre slice's loss weights; pool: (context, h, w) uint8 the share x 255 of the pool
            and the aorta; centre: the centre slice's index in the context.
        """
        rng, share = self.rng, pool.float() / 255.0
        size_y, size_x = hu.shape[-2:]
        y = torch.linspace(-1.0, 1.0, size_y)[:, None]
        x = torch.linspace(-1.0, 1.0, size_x)[None, :]
        tilt = 1.0 + float(rng.uniform(-CHEST_BLOOD_TILT, CHEST_BLOOD_TILT)) * x
        tilt = tilt + float(rng.uniform(-CHEST_BLOOD_TILT, CHEST_BLOOD_TILT)) / 2.0 * y
        value = float(rng.uniform(*CHEST_BLOOD_HU))
        hu = hu + share * (value - 45.0) * tilt
        target = target.clone()
        aorta = self.index.get("aorta")
        unlabelled = pool if aorta is None else (pool.int() - target[:, aorta].int()).clamp_(min=0).to(torch.uint8)
        target[:, self.index["contrast_blood"]] += unlabelled
        return hu, target, weight + unlabelled[centre : centre + 1].float() / 255.0

    def _deform_2d(
        self, hu: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One random elastic deformation (MONAI's `Rand2DElastic`) applied alike to a 2D sample's HU (context, h, w),
        class shares (context, K, h, w) and weights (1, h, w); the shares are interpolated too, so they stay shares."""
        n, k = target.shape[:2]
        stack = torch.cat([hu, target.reshape(n * k, *target.shape[2:]).float(), weight])
        out = torch.as_tensor(self.deform(stack))
        return out[:n], out[n : n + n * k].reshape(target.shape), out[n + n * k :]

    def _vessel_crop(self, i: int, h: int, w: int) -> tuple[int, int, int] | None:
        """(z, y, x) of a crop around one of case ``i``'s aorta pixels, drawn uniformly and placed at a random
        position inside the crop's middle half; None for a share 1 - ``vessel_crops`` of the samples or a case
        without aorta."""
        where = self.vessels.get(i)
        if where is None or self.rng.random() >= self.train.vessel_crops:
            return None
        z, y, x = (int(v) for v in where[int(self.rng.integers(len(where)))])
        size = self.train.crop
        dy, dx = (int(v) for v in self.rng.integers(size // 4, size - size // 4, 2))
        return z, min(max(y - dy, 0), max(0, h - size)), min(max(x - dx, 0), max(0, w - size))

    def _augment(self, hu: torch.Tensor, target: torch.Tensor, case: Reduced, vessel: bool = False) -> torch.Tensor:
        """HU (n, h, w) of one sample with its soft targets (n, K, h, w) uint8 -> augmented HU; a ``vessel`` crop
        (`_vessel_crop`) always gets the arterial phase or the brighter bolus."""
        rng = self.rng
        deenhance = self.train.deenhance if case.deenhance else 0.0
        if deenhance and rng.random() < deenhance:  # before the gain: the drawn values are HU of the scan
            for name, (low, high) in DE_ENHANCEMENT.items():
                k = self.index.get(name)
                share = target[:, k].float() / 255.0 if k is not None else None
                if share is None or not bool((share > 0.5).any()):
                    continue
                excess = float(hu[share > 0.5].mean()) - float(rng.uniform(low, high))
                if excess > 0:
                    hu = hu - excess * share
        if case.deenhance and (vessel or (self.train.boost and rng.random() < self.train.boost)):
            for name, (low, high) in BOOST.items():
                k = self.index.get(name)
                if k is not None:
                    hu = hu + float(rng.uniform(low, high)) * target[:, k].float() / 255.0
        hu = hu * float(rng.uniform(0.96, 1.04)) + float(rng.normal(0, 8))
        if case.enhance and (vessel or rng.random() < 0.5):
            phase = ENHANCEMENT["arterial" if vessel else list(ENHANCEMENT)[int(rng.integers(len(ENHANCEMENT)))]]
            for name, (low, high) in phase.items():
                k = self.index.get(name)
                if k is not None:
                    hu = hu + float(rng.uniform(low, high)) * target[:, k].float() / 255.0
        sigma = float(rng.uniform(0.0, 0.8))
        if sigma > 0.2:
            radius = 2
            taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
            taps = taps / taps.sum()
            flat = F.pad(hu[:, None], (radius,) * 4, mode="replicate")
            flat = F.conv2d(F.conv2d(flat, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))
            hu = flat[:, 0]
        noise = float(rng.uniform(0.0, 12.0))
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        return hu + noise * torch.randn(hu.shape, generator=generator)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(network input, soft class targets (B, K, ...) float, weights (B, 1, ...)) of one batch."""
        xs, ys, ws = [], [], []
        for _ in range(self.train.batch_size):
            i = self.rng.choice(len(self.cases), p=self.p)
            case = self.cases[i]
            z_n, h, w = case.hu.shape
            y = int(self.rng.integers(0, max(1, h - self.train.crop + 1)))
            x = int(self.rng.integers(0, max(1, w - self.train.crop + 1)))
            if self.config.dims == 2:
                z = int(self.rng.integers(0, z_n))
                vessel = self._vessel_crop(i, h, w) if self.vessels else None
                if vessel is not None:
                    z, y, x = vessel
                idx = context_indices(z_n, self.config.context)[z]
                centre = slice(self.config.context // 2, self.config.context // 2 + 1)
                hu, target = self._crop(case.hu[idx], y, x), self._crop(case.target[idx], y, x)
                weight = self._crop(case.weight[z : z + 1], y, x)
                if case.blood is not None and self.rng.random() < self.train.chest_blood:
                    hu, target, weight = self._enhance_pool(
                        hu, target, weight, self._crop(case.blood[idx], y, x), self.config.context // 2
                    )
                if self.train.limbs and self.rng.random() < self.train.limbs:
                    hu, target = self._add_limb(hu, target)
                if self.deform is not None and self.rng.random() < self.train.elastic:
                    hu, target, weight = self._deform_2d(hu, target, weight)
                xs.append(self._augment(hu, target, case, vessel is not None))
                ys.append(target[centre][0].float())
                ws.append(weight)
            else:
                d = self.train.crop_slices
                z = int(self.rng.integers(0, max(1, z_n - d + 1)))
                idx = torch.arange(z, z + d).clamp_(max=z_n - 1)
                target = self._crop(case.target[idx], y, x)
                xs.append(self._augment(self._crop(case.hu[idx], y, x), target, case))
                ys.append(target.transpose(0, 1))
                ws.append(self._crop(case.weight[idx][None], y, x))
        targets = torch.stack([y.float() for y in ys]) / 255.0
        targets = targets / targets.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return prepare_input(torch.stack(xs), self.config), targets, torch.stack(ws)


class _WorkerBatches(torch.utils.data.IterableDataset):
    """Endless batches for one DataLoader worker: a `Sampler` seeded by (the run's seed, the worker's index)."""

    def __init__(self, cases: list[Reduced], config: ColorizerConfig, train: TrainConfig) -> None:
        super().__init__()
        self.cases, self.config, self.train = cases, config, train

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        sampler = Sampler(self.cases, self.config, self.train, [self.train.seed, worker.id])
        while True:
            yield sampler.batch()


def batch_stream(sampler: Sampler, train: TrainConfig, pin_memory: bool = False):
    """The training batches: ``sampler``'s own with ``train.loader_workers`` 0, else from that many DataLoader worker
    processes (torch's DataLoader, taken in turn from each worker, so the order is fixed). Nothing starts before the
    first batch is asked for: a resumed run that is already complete starts no worker."""
    if not train.loader_workers:
        yield from iter(sampler.batch, None)
        return
    loader = torch.utils.data.DataLoader(
        _WorkerBatches(sampler.cases, sampler.config, train),
        batch_size=None,
        num_workers=int(train.loader_workers),
        prefetch_factor=4,
        pin_memory=pin_memory,
    )
    yield from loader


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy against soft targets (each pixel's class shares); logits, target (B, K, ...),
    weight (B, 1, ...)."""
    per_pixel = -(target * logits.log_softmax(dim=1)).sum(dim=1, keepdim=True)
    return (per_pixel * weight).sum() / weight.sum()


def family_confusion(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, classes) -> torch.Tensor:
    """The bone-for-blood and blood-for-bone confusions on their own (config ``confusion``): per pixel, its blood
    share (heart, vessels, contrast blood: `anatomy.family`) times -log(1 - the probability it gives all bone
    classes), and its bone share times -log(1 - its blood probability), weighted as the cross-entropy. The
    cross-entropy already penalises them, but no more than any other wrong class; this is the confusion a reader
    sees first (an ivory strip on the aorta). logits, target (B, K, ...), weight (B, 1, ...)."""
    families = [anatomy.family(c) for c in classes]
    bone = torch.tensor([f == "bone" for f in families], device=logits.device)
    blood = torch.tensor([f == "contrast_blood" for f in families], device=logits.device)
    p = logits.float().softmax(dim=1)
    shape = (1, -1) + (1,) * (logits.dim() - 2)
    p_bone, p_blood = (p * bone.view(shape)).sum(1, keepdim=True), (p * blood.view(shape)).sum(1, keepdim=True)
    t_bone, t_blood = (
        (target * bone.view(shape)).sum(1, keepdim=True),
        (target * blood.view(shape)).sum(1, keepdim=True),
    )
    eps = 1e-6
    per_pixel = -(t_blood * torch.log1p(-p_bone.clamp(max=1 - eps)) + t_bone * torch.log1p(-p_blood.clamp(max=1 - eps)))
    return (per_pixel * weight).sum() / weight.sum()


def initial_state(init: str, config: ColorizerConfig) -> dict[str, torch.Tensor]:
    """The state dict of the weights ``init`` (a name or a .safetensors file, its sha256 checked against its card)
    for a fine-tuning; refused when its architecture is not the recipe's."""
    from ..weights import find_weights, load_state, read_card

    path, card_path = find_weights(init)
    card = read_card(card_path) if card_path else {}
    theirs = card.get("architecture", {}).get("config")
    if theirs is not None and ColorizerConfig.from_dict(theirs).to_dict() != config.to_dict():
        raise InputError(f"{path}: its architecture differs from the recipe's model; it cannot be fine-tuned by it")
    return load_state(path, card)[0]


def train_colorizer(
    config_path: Path | TrainConfig,
    out_dir: Path,
    device: str = "cpu",
    resume: bool = False,
    log=print,
    stop_at: int | None = None,
    data_cache: Path | None = None,
) -> tuple[Colorizer, TrainConfig, dict[str, Any]]:
    """Train from a config (a YAML file or a `TrainConfig`); returns the model, the config and training facts.
    Deterministic for a seed on CPU.

    ``resume`` continues from the run's checkpoint in ``out_dir``; ``stop_at`` ends this call after that step (with a
    checkpoint), e.g. to split a long CPU run over sessions; ``data_cache``: the folder where the prepared training
    data are kept (`prepare.prepare_training_data`). A config with ``init`` starts from those weights (fine-tuning).
    """
    from tqdm import tqdm

    train = config_path if isinstance(config_path, TrainConfig) else TrainConfig.load(config_path)
    torch.manual_seed(train.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    config = ColorizerConfig.from_dict(train.model)
    start_state = initial_state(train.init, config) if train.init else None  # refused before minutes of data
    t0 = time.time()
    reduced, train_cases = prepare_training_data(train, config, data_cache, log)
    sampler = Sampler(reduced, config, train, train.seed)

    model = Colorizer(config, monai=True)  # MONAI's definition; inference loads it into `_unet`'s
    if start_state is not None:
        model.load_state_dict(start_state)
    model = model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=train.lr, total_steps=train.steps, pct_start=0.1)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / f"{train.name}.checkpoint.pt"
    start, losses, seconds_before, devices = 0, [], 0.0, []
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        sampler.rng.bit_generator.state = json.loads(state["numpy_rng"])
        sampler.set_deform_state(state.get("deform_rng", ""))
        start, losses = int(state["step"]), list(state["losses"])
        seconds_before = float(state.get("seconds", 0.0))
        devices = list(state.get("devices", []))  # where the steps so far ran (a GPU run evaluated on a CPU, say)
        log(f"resumed from {checkpoint} at step {start}")

    model.train()
    t_loop = time.time()
    end = train.steps if stop_at is None else min(train.steps, stop_at)
    if start < end and str(device) not in devices:
        devices.append(str(device))
    bar = tqdm(range(start, end), initial=start, total=train.steps, file=sys.stderr, desc=train.name)
    batches = batch_stream(sampler, train, pin_memory=torch.device(device).type == "cuda")
    for step in bar:
        x, y, w = next(batches)
        logits, y, w = model(x.to(device)), y.to(device), w.to(device)
        loss = soft_cross_entropy(logits, y, w)
        if train.confusion:
            loss = loss + train.confusion * family_confusion(logits, y, w, config.classes)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
        if (step + 1) % train.checkpoint_every == 0 or step + 1 == end:
            state = {
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "schedule": schedule.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": json.dumps(sampler.rng.bit_generator.state),
                "deform_rng": sampler.deform_state(),
                "step": step + 1,
                "losses": losses,
                "seconds": seconds_before + time.time() - t_loop,  # optimisation time over all resumed runs
                "devices": devices,
            }
            with atomic_path(checkpoint) as tmp:
                torch.save(state, tmp)
    model.eval()
    facts = {
        "steps": train.steps,
        "final_loss": float(np.mean(losses[-100:])),
        "data_seconds": round(t_loop - t0, 1),
        "train_seconds": round(seconds_before + time.time() - t_loop, 1),
        "train_cases": train_cases,
        "device": ", then ".join(devices) or str(device),
    }
    return copy.deepcopy(model).cpu(), train, facts


CITATIONS = {
    "totalsegmentator": "Wasserthal J. et al., TotalSegmentator: Robust Segmentation of 104 Anatomic Structures in CT "
    "Images, Radiology: Artificial Intelligence 2023 (example data, CC BY 4.0 / Apache-2.0)",
    "chest_popi": "chest-popi-2mm: POPI-model 4D CT (Vandemeulebroucke J. et al., The POPI-model, a point-validated "
    "pixel-based breathing thorax model, ICCR 2007), one phase as shipped with ITKElastix's examples (Apache-2.0); "
    "unlabelled, trained through HU-derived partial labels",
    "chest_lung": "chest-lung1-5mm, chest-lung2-5mm: pyradiomics example data (van Griethuysen J.J.M. et al., Cancer "
    "Research 2017; BSD-3-Clause, Harvard Medical School); unlabelled (lung2 trained through HU-derived partial "
    "labels, lung1 held out)",
    "phantom": "napari_ctcolor.phantom procedural torso phantoms (this project), contrast phases from "
    "CONTRAST_PHASES in napari_ctcolor.training.colorizer",
}


def evaluate_all(model: Colorizer, train: TrainConfig, log=print) -> dict[str, Any]:
    """Metrics on the validation real CTs (``real_val``; a CT that is also in ``real_train`` is reported but not held
    out), each also as other exams would show it (``exams``: `evaluate.exam_metrics`), the unlabelled ones
    (``tissue_val``: `evaluate.tissue_metrics`, and ``exams``: `evaluate.chest_exam_metrics`) and held-out phantoms
    (seeds never used in training)."""
    from ..io import read_volume
    from .evaluate import chest_exam_metrics, evaluate_case, evaluate_tissues, exam_metrics, summarise

    results: dict[str, Any] = {}
    trained = {entry[0] for entry in train.real_train}
    if train.tissue_val:
        data = shared_data_dir()
        per_ct = []
        for name in train.tissue_val:
            ct = read_volume(data / "ct" / name)
            per_ct.append(
                {
                    "case": name.split(".")[0],
                    "tissues": evaluate_tissues(model, ct),
                    "exams": chest_exam_metrics(model, ct),
                }
            )
            log(f"  {name}: {json.dumps(per_ct[-1])}")
        results["tissue_val"] = {"cases": per_ct}
    for group, cases in [("real_val", real_cases(train.real_val)), ("phantom_val", phantom_cases(train.val_phantoms))]:
        per_case = []
        for case in cases:
            per_case.append(evaluate_case(model, case))
            if group == "real_val":
                per_case[-1]["trained_on"] = any(case.name == name.split(".")[0] for name in trained)
                per_case[-1]["exams"] = exam_metrics(model, case)
            log(f"  {case.name}: {json.dumps(per_case[-1])}")
        if per_case:
            results[group] = {"summary": summarise(per_case), "cases": per_case}
    return results


def model_card(model: Colorizer, train: TrainConfig, config_path: Path, facts: dict, metrics: dict) -> dict:
    config = model.config
    return {
        "name": train.name,
        "task": "CT colorization: CIE a*, b* from windowed CT; L* is the displayed window's grey, never predicted",
        "architecture": {
            "class": "napari_ctcolor.models.colorizer.Colorizer (MONAI UNet, colour-class logits)",
            "config": config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "inputs": {
            "windows_hu": config.windows,
            "context_slices": config.context if config.dims == 2 else None,
            "chroma_mm": config.chroma_mm,
            "note": "HU are area-averaged in-plane to about chroma_mm pixels before windowing. The network gives "
            "probabilities over the colour classes; a*, b* = probability-weighted palette a*, b*, upsampled to the CT "
            "grid guided by the full-resolution HU, none where HU < -900, composed with the exact luminance of the "
            "display window. Before that, the engine's anatomy step smooths the "
            "probabilities along z where the HU does not change, rules out structures that do not fit the slice's "
            "position relative to the lungs, pelvic ones on and above the most inferior sure liver, spleen or kidney "
            "section, and an organ on the wrong side of the body's midline, "
            "moves fat's probability to a denser tissue where a pixel is denser than fat allows, names pixels where "
            f"no structure reaches {anatomy.CONFIDENT} of what the network said (ruled-out classes counting as "
            "doubt) by their tissues (each structure's probability to its own tissue, so each voxel's HU can "
            "choose), and keeps an organ's name only on its largest connected piece(s); the metrics "
            "include it."
            + (
                " Slices reach the network in the radiological orientation (rows anterior to posterior, columns "
                f"right to left, {'context slices' if config.dims == 2 else 'slices'} inferior to superior) whatever "
                "order the file stores them in (config canonical, napari_ctcolor.engines.orientation.AxialView), in "
                "training as at inference."
                if config.canonical
                else ""
            ),
        },
        "classes": list(config.classes),
        "palettes": {name: load_palette(name).source for name in PALETTE_NAMES},
        "training": {
            "command": f"ctcolor train colorizer --config {config_path.as_posix()}",
            "config": yaml.safe_load(config_path.read_text(encoding="utf-8")),
            "data": CITATIONS,
            **facts,
        },
        "metrics": metrics,
        "limits": [
            f"Trained on procedural phantoms, {len(train.real_train)} real labelled patient(s) "
            f"({', '.join(entry[0] for entry in train.real_train) or 'none'}; non-contrast ones also with synthetic "
            f"contrast phases{', contrast ones also with a synthetic non-contrast phase' if train.deenhance else ''}) "
            f"and {len(train.real_partial)} unlabelled chest CT(s) with partial labels derived from their HU "
            f"({', '.join(entry[0] for entry in train.real_partial) or 'none'}: lung, airways, bone, fat, "
            f"chest-wall muscle{', the descending aorta' if train.partial_aorta else ''}; "
            "napari_ctcolor.training.partial"
            + (", and the mediastinal blood pool given synthetic contrast" if train.chest_blood else "")
            + "). Its structure classes are the labelled patients' "
            "anatomy. Anatomy outside them (head, neck, limbs) mostly falls back to the HU tissue classes but can "
            "take an organ class in places (tests/models/test_colorizer_shipped.py measures it on a synthetic thigh "
            "and on pydicom's CT_small).",
            "Colour is a visual aid, not a segmentation: the most probable class names what a colour stands for, "
            "and it can be wrong where anatomy is unusual (post-surgical, large tumours, implants).",
            "Left and right, vertebral levels, rib numbers and lung lobes are joined into one colour class each.",
            "No labelled patient shows a contrast-filled heart or thoracic aorta: contrast there is learned from "
            "synthetic enhancement (config chest_blood, boost). The exam rows (metrics ... exams) put each "
            "validation patient through non-contrast, portal-venous and arterial (aorta 300-600 HU) versions of its "
            "blood: an aorta lying against a vertebra can still be named bone there.",
            *(
                []
                if train.limbs
                else ["Trained without synthetic limbs (config `limbs`): arms beside the torso may take organ colours."]
            ),
            REPRODUCTION_NOTE,
        ],
    }


#: Where `leave_one_out` models live, under the weights folder: weights/validation/ for the shipped ones.
VALIDATION_DIR = "validation"


def leave_one_out(train: TrainConfig, weights_dir: Path) -> list[dict[str, Any]]:
    """The held-out rows of the recipe: for each model named in ``train.leave_one_out`` (the same recipe trained
    without one labelled patient, in ``weights_dir/validation``), its card's rows of the patients it was not trained
    on, with its file and sha256, so that the shipped card states validation that its own training data cannot give.
    Those models are trained first (their configs' first line says how)."""
    from ..weights import read_card, sha256

    rows = []
    for name in train.leave_one_out:
        path = weights_dir / VALIDATION_DIR / f"{name}.safetensors"
        if not path.is_file():
            raise InputError(
                f"{path}: leave-one-out model not found; train it first (ctcolor train colorizer --config "
                f"configs/<its config>.yaml --weights-dir {weights_dir / VALIDATION_DIR})"
            )
        card = read_card(path.with_suffix(".json"))
        if sha256(path) != card.get("sha256"):
            raise InputError(f"{path}: does not match the sha256 of its model card")
        held_out = [c for c in card["metrics"].get("real_val", {}).get("cases", []) if not c.get("trained_on")]
        if not held_out:
            raise InputError(f"{path}: its card has no held-out real_val case")
        rows.append({"model": f"{VALIDATION_DIR}/{path.name}", "sha256": card["sha256"], "cases": held_out})
    return rows


def run(
    config_path: Path, weights_dir: Path, device: str = "cpu", resume: bool = False, eval_only: bool = False, log=print
) -> Path:
    """`ctcolor train colorizer`: train (or only evaluate), then write the weights and their model card."""
    from ..weights import load_colorizer, save_weights, update_card_metrics

    config_path = Path(config_path)
    train = TrainConfig.load(config_path)
    held_out = leave_one_out(train, weights_dir)  # a missing model is refused before hours of training, not after
    path = weights_dir / f"{train.name}.safetensors"
    if eval_only:
        model = load_colorizer(path)[0]
    else:
        model, train, facts = train_colorizer(config_path, weights_dir / "checkpoints", device, resume, log)
    metrics = evaluate_all(model, train, log)
    if held_out:
        metrics["leave_one_out"] = held_out
    if eval_only:  # the engine's description (anatomy rules, limits) as the code now gives it
        card = model_card(model, train, config_path, {}, metrics)
        return update_card_metrics(path, metrics, inputs=card["inputs"], limits=card["limits"])
    return save_weights(model, model_card(model, train, config_path, facts, metrics), weights_dir, train.name)
