"""Training the colorizers: data from phantoms (all contrast phases) and real labelled CT, L1 on a*, b*.

Why L1 on a*, b*: the targets are a deterministic function of anatomy (one palette colour per structure), so the
colour is not multimodal the way natural-image colour is; plain regression does not wash out to grey here, and L1 is
robust to the blurred label boundaries.

Pixels are weighted so that small structures count: every labelled structure gets a weight that grows as its size
shrinks (square root of median size / size, clipped to 0.5..4), unlabelled tissue 1. Without it the model learned
the large red-brown soft tissue and painted vertebrae and ribs reddish (bone hue on only ~40 % of bone voxels).

Everything is computed at the network's reduced resolution: the HU are area-averaged by the factor that brings the
pixels to ``chroma_mm``, and the a*, b* targets and the weights are area-averaged the same way.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ..color import load_palette
from ..io.write import atomic_path
from ..models.colorizer import Colorizer, ColorizerConfig, context_indices, downsample_hu, prepare_input
from .data import LabelledCT, load_config, load_real_case, phantom_case, shared_data_dir
from .targets import ab_targets

# Contrast phases for phantoms: HU overrides of the phantom's tissue table, as (low, high) ranges drawn uniformly.
# Arterial: aorta/heart up to ~600 HU, overlapping cancellous and cortical bone; portal-venous: vessels ~140-220 HU
# and enhanced parenchyma. Values from typical clinical protocols (120 kVp).
CONTRAST_PHASES: dict[str, dict[str, tuple[float, float]]] = {
    "non_contrast": {"blood": (35, 50)},
    "arterial": {"blood": (250, 600), "kidney": (120, 200), "spleen": (90, 140), "liver": (60, 80)},
    "portal_venous": {"blood": (140, 220), "kidney": (140, 200), "spleen": (100, 130), "liver": (95, 120)},
}


@dataclass
class TrainConfig:
    """A training run, read from YAML (see configs/colorizer_2d.yaml)."""

    name: str
    seed: int
    model: dict[str, Any]
    palette: str = "anatomical"
    steps: int = 2000
    batch_size: int = 16
    crop: int = 64  # training crop at the network's resolution (pixels); for 3D also `crop_slices`
    crop_slices: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    checkpoint_every: int = 250
    phantoms: dict[str, Any] = field(default_factory=dict)
    real_train: list[list[str]] = field(default_factory=list)
    real_val: list[list[str]] = field(default_factory=list)
    val_phantoms: dict[str, Any] = field(default_factory=dict)
    command: str = ""

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        return load_config(cls, path)


def phantom_cases(spec: dict[str, Any]) -> list[LabelledCT]:
    """Phantoms with seeds ``first_seed ..``, cycling through the contrast phases and varying the acquisition."""
    cases = []
    phases = list(spec.get("phases", CONTRAST_PHASES))
    for i in range(int(spec.get("count", 0))):
        seed = int(spec["first_seed"]) + i
        rng = np.random.default_rng(seed)
        phase = phases[i % len(phases)]
        hu = {tissue: float(rng.uniform(*r)) for tissue, r in CONTRAST_PHASES[phase].items()}
        pixel_mm = float(rng.uniform(*spec.get("pixel_mm", (0.7, 1.0))))
        slice_mm = float(rng.uniform(*spec.get("slice_mm", (0.5, 5.0))))
        n_xy = int(math.ceil(spec.get("fov_mm", 360) / pixel_mm / 32) * 32)
        n_z = int(spec.get("slices", 24))
        options = {
            "shape": (n_z, n_xy, n_xy),
            "spacing": (slice_mm, pixel_mm, pixel_mm),
            "noise_hu": float(rng.uniform(*spec.get("noise_hu", (6, 30)))),
            "blur_mm": float(rng.uniform(*spec.get("blur_mm", (0.3, 1.2)))),
            "torso_length_mm": float(rng.uniform(*spec.get("torso_length_mm", (160, 260)))),
            "centre_z_mm": float(rng.uniform(-60, 60)),
            "hu": hu,
        }
        case = phantom_case(seed, options)
        case.name = f"phantom-{seed}-{phase}"
        cases.append(case)
    return cases


def real_cases(pairs: list[list[str]]) -> list[LabelledCT]:
    if not pairs:
        return []
    data = shared_data_dir()
    return [load_real_case(data, ct, labels) for ct, labels in pairs]


@dataclass
class Reduced:
    """A case at the network's resolution: HU (Z, h, w), target a*, b* (Z, 2, h, w), weights (Z, h, w); float32."""

    name: str
    hu: torch.Tensor
    ab: torch.Tensor
    weight: torch.Tensor


def structure_weights(labels: np.ndarray) -> np.ndarray:
    """Per-voxel loss weight: sqrt(median structure size / structure size) clipped to 0.5..4; unlabelled 1."""
    counts = np.bincount(labels.ravel())
    present = np.flatnonzero(counts[1:]) + 1
    table = np.ones(len(counts), np.float32)
    if present.size:
        table[present] = np.clip(np.sqrt(np.median(counts[present]) / counts[present]), 0.5, 4.0)
    return table[labels]


def reduce_case(case: LabelledCT, config: ColorizerConfig, palette) -> Reduced:
    factor = config.factor_for(float(np.mean(case.ct.spacing[1:])))
    ab = ab_targets(case.ct.array, case.labels, case.label_names, palette, case.ct.spacing[1:])
    z, h, w = case.ct.shape
    h2, w2 = h - h % factor, w - w % factor  # area reduction needs whole blocks; the cut edge is air
    hu = torch.from_numpy(case.ct.array[:, :h2, :w2].astype(np.float32))
    ab_t = torch.from_numpy(np.ascontiguousarray(ab[:, :h2, :w2].transpose(0, 3, 1, 2)))
    weight = torch.from_numpy(structure_weights(case.labels[:, :h2, :w2]))
    return Reduced(case.name, downsample_hu(hu, factor), downsample_hu(ab_t, factor), downsample_hu(weight, factor))


class Sampler:
    """Random training crops (seeded): 2D slices with context, or 3D patches."""

    def __init__(self, cases: list[Reduced], config: ColorizerConfig, train: TrainConfig, seed: int) -> None:
        self.cases, self.config, self.train = cases, config, train
        self.rng = np.random.default_rng(seed)
        sizes = np.array([c.hu.shape[0] for c in cases], dtype=np.float64)
        self.p = sizes / sizes.sum()

    def _crop(self, t: torch.Tensor, y: int, x: int) -> torch.Tensor:
        size = self.train.crop
        t = t[..., y : y + size, x : x + size]
        pad_y, pad_x = size - t.shape[-2], size - t.shape[-1]
        if pad_y or pad_x:  # small images: pad (replicate) to the crop size
            t = F.pad(t.reshape(-1, 1, *t.shape[-2:]), (0, pad_x, 0, pad_y), mode="replicate").reshape(
                *t.shape[:-2], size, size
            )
        return t

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(network input, target a*b*, weights (B, 1, ...)) of one batch."""
        xs, ys, ws = [], [], []
        for _ in range(self.train.batch_size):
            case = self.cases[self.rng.choice(len(self.cases), p=self.p)]
            z_n, h, w = case.hu.shape
            y = int(self.rng.integers(0, max(1, h - self.train.crop + 1)))
            x = int(self.rng.integers(0, max(1, w - self.train.crop + 1)))
            # Small HU jitter: scanners differ in calibration by a few HU.
            offset = float(self.rng.normal(0, 8))
            if self.config.dims == 2:
                z = int(self.rng.integers(0, z_n))
                idx = context_indices(z_n, self.config.context)[z]
                xs.append(self._crop(case.hu[idx], y, x) + offset)
                ys.append(self._crop(case.ab[z], y, x))
                ws.append(self._crop(case.weight[z : z + 1], y, x))
            else:
                d = self.train.crop_slices
                z = int(self.rng.integers(0, max(1, z_n - d + 1)))
                idx = torch.arange(z, z + d).clamp_(max=z_n - 1)
                xs.append(self._crop(case.hu[idx], y, x) + offset)
                ys.append(self._crop(case.ab[idx].transpose(0, 1), y, x))
                ws.append(self._crop(case.weight[idx][None], y, x))
        return prepare_input(torch.stack(xs), self.config), torch.stack(ys), torch.stack(ws)


def weighted_l1(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted mean |pred - target| over a*, b*; pred, target (B, 2, ...), weight (B, 1, ...)."""
    return ((pred - target).abs() * weight).sum() / (weight.sum() * pred.shape[1])


def train_colorizer(
    config_path: Path,
    out_dir: Path,
    device: str = "cpu",
    resume: bool = False,
    log=print,
    stop_at: int | None = None,
) -> tuple[Colorizer, TrainConfig, dict[str, Any]]:
    """Train from a config; returns the model, the config and training facts. Deterministic for a seed on CPU.

    ``resume`` continues from the run's checkpoint in ``out_dir``; ``stop_at`` ends this call after that step (with a
    checkpoint), e.g. to split a long CPU run over sessions.
    """
    from tqdm import tqdm

    train = TrainConfig.load(config_path)
    torch.manual_seed(train.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    config = ColorizerConfig.from_dict(train.model)
    palette = load_palette(train.palette)
    t0 = time.time()
    cases = phantom_cases(train.phantoms) + real_cases(train.real_train)
    reduced = [reduce_case(c, config, palette) for c in cases]
    log(f"training data: {len(reduced)} cases, {sum(r.hu.shape[0] for r in reduced)} slices ({time.time() - t0:.0f} s)")
    sampler = Sampler(reduced, config, train, train.seed)

    model = Colorizer(config).to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=train.lr, total_steps=train.steps, pct_start=0.1)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / f"{train.name}.checkpoint.pt"
    start, losses, seconds_before = 0, [], 0.0
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["torch_rng"])
        sampler.rng.bit_generator.state = json.loads(state["numpy_rng"])
        start, losses = int(state["step"]), list(state["losses"])
        seconds_before = float(state.get("seconds", 0.0))
        log(f"resumed from {checkpoint} at step {start}")

    model.train()
    t_loop = time.time()
    end = train.steps if stop_at is None else min(train.steps, stop_at)
    bar = tqdm(range(start, end), initial=start, total=train.steps, file=sys.stderr, desc=train.name)
    for step in bar:
        x, y, w = sampler.batch()
        loss = weighted_l1(model(x.to(device)), y.to(device), w.to(device))
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
                "step": step + 1,
                "losses": losses,
                "seconds": seconds_before + time.time() - t_loop,  # optimisation time over all resumed runs
            }
            with atomic_path(checkpoint) as tmp:
                torch.save(state, tmp)
    model.eval()
    facts = {
        "steps": train.steps,
        "final_loss": float(np.mean(losses[-100:])),
        "data_seconds": round(t_loop - t0, 1),
        "train_seconds": round(seconds_before + time.time() - t_loop, 1),
        "train_cases": [c.name for c in cases],
        "device": str(device),
    }
    return copy.deepcopy(model).cpu(), train, facts


CITATIONS = {
    "totalsegmentator": "Wasserthal J. et al., TotalSegmentator: Robust Segmentation of 104 Anatomic Structures in CT "
    "Images, Radiology: Artificial Intelligence 2023 (example data, CC BY 4.0 / Apache-2.0)",
    "phantom": "napari_ctcolor.phantom procedural torso phantoms (this project), contrast phases from "
    "CONTRAST_PHASES in napari_ctcolor.training.colorizer",
}


def evaluate_all(model: Colorizer, train: TrainConfig, log=print) -> dict[str, Any]:
    """Metrics on the held-out real CTs and held-out phantoms (seeds never used in training)."""
    from .evaluate import evaluate_case, summarise

    results: dict[str, Any] = {}
    for group, cases in [("real_val", real_cases(train.real_val)), ("phantom_val", phantom_cases(train.val_phantoms))]:
        per_case = []
        for case in cases:
            per_case.append(evaluate_case(model, case, train.palette))
            log(f"  {case.name}: " + ", ".join(f"{k} {v}" for k, v in per_case[-1].items() if not isinstance(v, dict)))
        if per_case:
            results[group] = {"summary": summarise(per_case), "cases": per_case}
    return results


def model_card(model: Colorizer, train: TrainConfig, config_path: Path, facts: dict, metrics: dict) -> dict:
    config = model.config
    return {
        "name": train.name,
        "task": "CT colorization: CIE a*, b* from windowed CT; L* is the displayed window's grey, never predicted",
        "architecture": {
            "class": "napari_ctcolor.models.colorizer.Colorizer (MONAI UNet, tanh x ab_max output)",
            "config": config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "inputs": {
            "windows_hu": config.windows,
            "context_slices": config.context if config.dims == 2 else None,
            "chroma_mm": config.chroma_mm,
            "note": "HU are area-averaged in-plane to about chroma_mm pixels before windowing; a*, b* are upsampled "
            "bilinearly to the CT grid and composed with the exact luminance of the display window.",
        },
        "palette": {"name": train.palette, "source": load_palette(train.palette).source},
        "training": {
            "command": f"ctcolor train colorizer --config {config_path.as_posix()}",
            "config": yaml.safe_load(config_path.read_text()),
            "data": CITATIONS,
            **facts,
        },
        "metrics": metrics,
        "limits": [
            "Trained on procedural phantoms and one real labelled CT volume; colours of structures the phantom "
            "lacks (e.g. pelvis, head, limbs) come only from the HU tissue classes.",
            "Colour is a visual aid, not a segmentation: it follows the training palette and can be wrong where "
            "anatomy is unusual (post-surgical, large tumours, implants).",
            "Bit-exact reproduction needs the same torch version and thread count (CPU float reductions).",
        ],
    }


def run(
    config_path: Path, weights_dir: Path, device: str = "cpu", resume: bool = False, eval_only: bool = False, log=print
) -> Path:
    """`ctcolor train colorizer`: train (or only evaluate), then write the weights and their model card."""
    from ..weights import load_colorizer, save_weights, update_card_metrics

    config_path = Path(config_path)
    if eval_only:
        train = TrainConfig.load(config_path)
        path = weights_dir / f"{train.name}.safetensors"
        return update_card_metrics(path, evaluate_all(load_colorizer(path)[0], train, log))
    model, train, facts = train_colorizer(config_path, weights_dir / "checkpoints", device, resume, log)
    metrics = evaluate_all(model, train, log)
    return save_weights(model, model_card(model, train, config_path, facts, metrics), weights_dir, train.name)
