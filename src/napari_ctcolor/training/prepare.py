"""The colorizers' training data at the network's resolution (`Reduced` cases), prepared once per recipe.

Preparing a recipe's data (the phantoms drawn, the real CTs read, their labels resampled, the chest CTs' partial labels
derived, everything area-reduced to the network's pixels) takes minutes on two cores: 136 s for the held-out DICOM
recipe's 51 cases and 1,274 slices (2026-11-28, 2-core AMD EPYC without AVX-512). `prepare_training_data` keeps the
result in a cache folder as one safetensors file (tensors only, no pickle; 0.7 GB), keyed by the recipe's data
section (`data_key`): every arm and seed of a comparison (`training.compare`) and every rerun of a recipe reads it
back in under a second.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from ..engines.orientation import AxialView
from ..errors import InputError
from ..io.write import atomic_path
from ..models.colorizer import ColorizerConfig, downsample_hu
from .data import LabelledCT, load_real_case, phantom_case, shared_data_dir
from .partial import BLOOD
from .targets import class_targets

#: A recipe: `training.colorizer.TrainConfig` (its data section is read here; not imported, which would be a cycle).
Recipe = Any

# Contrast phases for phantoms: HU overrides of the phantom's tissue table, as (low, high) ranges drawn uniformly.
# Arterial: aorta/heart up to ~700 HU (a CT angiography's bolus), overlapping cancellous and cortical bone;
# portal-venous: vessels ~140-220 HU and enhanced parenchyma. Values from typical clinical protocols (120 kVp).
CONTRAST_PHASES: dict[str, dict[str, tuple[float, float]]] = {
    "non_contrast": {"blood": (35, 50)},
    "arterial": {"blood": (250, 700), "kidney": (120, 200), "spleen": (90, 140), "liver": (60, 80)},
    "portal_venous": {"blood": (140, 220), "kidney": (140, 200), "spleen": (100, 130), "liver": (95, 120)},
}


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


#: A third item in a ``real_train`` entry: the CT already shows contrast, so it gets no synthetic enhancement.
CONTRAST_FLAG = "contrast"


def real_cases(pairs: list[list[str]]) -> list[LabelledCT]:
    """The labelled CTs of ``[[ct, labels], ...]`` entries (a third item, `CONTRAST_FLAG`, is read by
    `contrast_flags`)."""
    if not pairs:
        return []
    data = shared_data_dir()
    for entry in pairs:
        if len(entry) not in (2, 3) or (len(entry) == 3 and entry[2] != CONTRAST_FLAG):
            raise InputError(f"a real CT entry is [ct, labels] or [ct, labels, {CONTRAST_FLAG}], got {entry}")
    return [load_real_case(data, entry[0], entry[1]) for entry in pairs]


def contrast_flags(pairs: list[list[str]]) -> list[bool]:
    """True for the ``real_train`` entries marked as contrast-enhanced CT."""
    return [len(entry) == 3 for entry in pairs]


def partial_cases(entries: list[list[str]], config: ColorizerConfig, aorta: bool = False) -> list[Reduced]:
    """The ``real_partial`` entries ``[[ct, derivation], ...]`` or ``[ct, derivation, lesion mask]`` at the network's
    resolution, their labels derived from the HU by `training.partial.partial_class_map` (with the descending aorta
    where ``aorta``). Where the CT is not in the shared data but its prepared case is (`prepared_partial_path`, as the
    offline GPU bundle carries the chest CTs, too large for it), that case is read instead."""
    data = shared_data_dir()
    out = []
    for entry in entries:
        if len(entry) not in (2, 3):
            raise InputError(f"a real_partial entry is [ct, derivation] or [ct, derivation, lesion mask], got {entry}")
        prepared = prepared_partial_path(data, entry, config, aorta)
        if not (data / "ct" / entry[0]).exists() and prepared.is_file():
            out += _load_cases(prepared)[0]
        else:
            out.append(derive_partial_case(data, entry, config, aorta))
    return out


def derive_partial_case(data: Path, entry: list[str], config: ColorizerConfig, aorta: bool) -> Reduced:
    """One ``real_partial`` entry's case, derived from its CT in ``data/ct``."""
    from ..io import read_volume
    from .partial import partial_class_map

    ct = read_volume(data / "ct" / entry[0])
    lesion = np.asarray(read_volume(data / "ct" / entry[2]).array) > 0 if len(entry) == 3 else None
    classes = partial_class_map(ct, entry[1], config.classes, lesion, aorta)
    spacing, (hu, classes) = _network_view(ct, config, ct.array, classes)
    return reduce_classes(entry[0].split(".")[0], hu, spacing, classes, config, partial=True)


#: Where prepared partial-label cases are read from, under the shared data folder (`partial_cases`).
PREPARED_DIR = "prepared"


def prepared_partial_path(data: Path, entry: list[str], config: ColorizerConfig, aorta: bool) -> Path:
    """``data/prepared/<key>.safetensors``: the key digests the entry, the model's colour classes, pixel size and
    orientation, the derived aorta and the code of `_DATA_CODE`, so a prepared case is only ever read by the code that
    would derive the same one."""
    section = {
        "format": _CACHE_FORMAT,
        "entry": list(entry),
        "aorta": aorta,
        "classes": list(config.classes),
        "chroma_mm": config.chroma_mm,
        "canonical": config.canonical,
    }
    digest = hashlib.sha256(json.dumps(section, sort_keys=True).encode())
    digest.update(_code_digest())
    return data / PREPARED_DIR / f"{entry[0].split('.')[0]}-{digest.hexdigest()[:16]}.safetensors"


def write_prepared_partial(data: Path, entry: list[str], config: ColorizerConfig, aorta: bool, folder: Path) -> Path:
    """Derive one ``real_partial`` entry's case from ``data/ct`` and write it to ``folder`` (a shared data folder's
    `PREPARED_DIR`) under `prepared_partial_path`'s name; kept where that file is already there."""
    path = folder / prepared_partial_path(data, entry, config, aorta).name
    if not path.is_file():
        case = derive_partial_case(data, entry, config, aorta)
        _save_cases(path, [case], [f"{case.name} (partial labels)"])
    return path


def _network_view(ct, config: ColorizerConfig, *arrays: np.ndarray) -> tuple[tuple[float, float, float], list]:
    """A CT's (Z, Y, X) arrays as the network sees them: in the radiological orientation for a model with
    ``canonical`` (`AxialView`, as `engines.colorize` shows them at inference), else as stored; with their spacing."""
    if config.canonical:
        return AxialView.of(ct).arrays(ct.spacing, *arrays)
    return tuple(float(v) for v in ct.spacing), list(arrays)


@dataclass
class Reduced:
    """A case at the network's resolution: HU (Z, h, w) float32, soft class targets (Z, K, h, w) uint8 (area
    fraction x 255 of each colour class in the pixel), loss weights (Z, h, w) float32, and which synthetic contrast
    phase its HU may be given: enhancement for real non-contrast CT (`ENHANCEMENT`), the reverse for real contrast CT
    (`DE_ENHANCEMENT`)."""

    name: str
    hu: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    real: bool = False  # a real CT: sampled `TrainConfig.real_weight` times as often as a phantom
    partial: bool = False  # labels derived from HU: sampled `TrainConfig.partial_weight` times as often
    contrast: bool = False  # a real CT that shows contrast (`CONTRAST_FLAG`)
    blood: torch.Tensor | None = None  # (Z, h, w) uint8 share x 255 of the partial labels' blood pool (`partial.BLOOD`)

    @property
    def enhance(self) -> bool:
        return self.real and not self.contrast

    @property
    def deenhance(self) -> bool:
        return self.real and self.contrast


def class_weights(class_map: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-voxel loss weight: sqrt(median class size / class size) clipped to 0.5..4, so that small structures
    (adrenals, vessels) count without drowning the large ones; 0 for voxels without a class (index >= n_classes,
    `partial.IGNORE`)."""
    counts = np.bincount(class_map.ravel(), minlength=n_classes)[:n_classes]
    present = np.flatnonzero(counts)
    table = np.zeros(max(n_classes, int(class_map.max()) + 1), np.float32)
    table[:n_classes] = 1.0
    table[present] = np.clip(np.sqrt(np.median(counts[present]) / counts[present]), 0.5, 4.0)
    return table[class_map]


def reduce_case(case: LabelledCT, config: ColorizerConfig, real: bool = False, contrast: bool = False) -> Reduced:
    """A labelled CT at the network's resolution; a real one (``real``) gets synthetic enhancement if it is
    non-contrast, synthetic de-enhancement if it shows contrast (``contrast``)."""
    classes = class_targets(case.ct.array, case.labels, case.label_names, config.classes)
    spacing, (hu, classes) = _network_view(case.ct, config, case.ct.array, classes)
    reduced = reduce_classes(case.name, hu, spacing, classes, config, real=real)
    reduced.contrast = contrast
    return reduced


def reduce_classes(
    name: str,
    hu_full: np.ndarray,
    spacing: tuple[float, float, float],
    classes: np.ndarray,
    config: ColorizerConfig,
    real: bool = False,
    partial: bool = False,
) -> Reduced:
    """A CT (HU, spacing) and its voxels' class indices into ``config.classes`` (any larger index: no class, no loss)
    at the network's resolution."""
    factor = config.factor_for(float(np.mean(spacing[1:])))
    z, h, w = hu_full.shape
    h2, w2 = h - h % factor, w - w % factor  # area reduction needs whole blocks; the cut edge is air
    classes = classes[:, :h2, :w2]
    hu = downsample_hu(torch.from_numpy(hu_full[:, :h2, :w2].astype(np.float32)), factor)
    target = torch.empty((z, len(config.classes), h2 // factor, w2 // factor), dtype=torch.uint8)
    class_t = torch.from_numpy(classes)
    for k in range(len(config.classes)):
        share = downsample_hu((class_t == k).float(), factor)
        target[:, k] = (share * 255.0).round_().to(torch.uint8)
    weight = downsample_hu(torch.from_numpy(class_weights(classes, len(config.classes))), factor)
    blood = None
    if partial and (classes == BLOOD).any():
        enhanced = classes == BLOOD
        if "aorta" in config.classes:  # the derived aorta, enhanced with the pool (`Sampler._enhance_pool`)
            enhanced |= classes == config.classes.index("aorta")
        blood = (downsample_hu(torch.from_numpy(enhanced).float(), factor) * 255.0).round_().to(torch.uint8)
    return Reduced(name, hu, target, weight, real=real, partial=partial, blood=blood)


#: The modules whose code shapes the prepared data: a change to any of them makes a new cache key, so a cache never
#: outlives the code that wrote it.
_DATA_CODE = (
    "training/prepare.py",
    "training/data.py",
    "training/partial.py",
    "training/targets.py",
    "phantom.py",
    "color.py",
    "models/colorizer.py",
    "engines/orientation.py",
    "engines/geometry.py",
    "io/__init__.py",
    "io/dicom.py",
    "io/nifti.py",
)
#: The cache file's format; raised when `_save_cases` or `_load_cases` change.
_CACHE_FORMAT = 1


def data_key(train: Recipe, config: ColorizerConfig) -> str:
    """A hex digest of everything the prepared data depend on: the recipe's data section (phantoms, real and partial
    CTs, the derived aorta), the model's colour classes, pixel size and orientation, the shared files' sizes and the
    code of `_DATA_CODE`. Seeds, steps, augmentation and the loss are not in it: every arm and seed of a comparison
    shares one preparation."""
    files = [name for entry in train.real_train for name in entry[:2]]
    files += [name for entry in train.real_partial for name in entry[:1] + entry[2:3]]
    sizes = {}
    data = shared_data_dir() if files else None
    for name in files:
        path = data / "ct" / name
        if path.is_dir():
            sizes[name] = sum(f.stat().st_size for f in sorted(path.iterdir()) if f.is_file())
        elif path.is_file():
            sizes[name] = path.stat().st_size
    digest = hashlib.sha256()
    section = {
        "format": _CACHE_FORMAT,
        "phantoms": train.phantoms,
        "real_train": train.real_train,
        "real_partial": train.real_partial,
        "partial_aorta": train.partial_aorta,
        "classes": list(config.classes),
        "chroma_mm": config.chroma_mm,
        "canonical": config.canonical,
        "sizes": sizes,
    }
    digest.update(json.dumps(section, sort_keys=True).encode())
    digest.update(_code_digest())
    return digest.hexdigest()[:24]


@functools.lru_cache(maxsize=1)
def _code_digest() -> bytes:
    """The digest of `_DATA_CODE` as this process first read it: the code it runs, whatever is edited on disk later."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for module in _DATA_CODE:
        digest.update((package / module).read_bytes())
    return digest.digest()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/napari-ctcolor/training-data`` (``~/.cache/...`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "napari-ctcolor" / "training-data"


def _save_cases(path: Path, cases: list[Reduced], names: list[str]) -> None:
    tensors, meta = {}, []
    for k, case in enumerate(cases):
        tensors[f"{k}.hu"], tensors[f"{k}.target"], tensors[f"{k}.weight"] = case.hu, case.target, case.weight
        if case.blood is not None:
            tensors[f"{k}.blood"] = case.blood
        meta.append({"name": case.name, "real": case.real, "partial": case.partial, "contrast": case.contrast})
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"cases": json.dumps(meta), "train_cases": json.dumps(names)},
        )


def _load_cases(path: Path) -> tuple[list[Reduced], list[str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        cases = []
        for k, info in enumerate(json.loads(meta["cases"])):
            blood = f.get_tensor(f"{k}.blood") if f"{k}.blood" in f.keys() else None
            cases.append(
                Reduced(
                    info["name"],
                    f.get_tensor(f"{k}.hu"),
                    f.get_tensor(f"{k}.target"),
                    f.get_tensor(f"{k}.weight"),
                    real=info["real"],
                    partial=info["partial"],
                    contrast=info["contrast"],
                    blood=blood,
                )
            )
    return cases, json.loads(meta["train_cases"])


def prepare_training_data(
    train: Recipe, config: ColorizerConfig, cache_dir: Path | None = None, log=print
) -> tuple[list[Reduced], list[str]]:
    """The recipe's training cases at the network's resolution and the names of the cases they came from (the model
    card's ``train_cases``). With ``cache_dir``, read from ``cache_dir/<data_key>.safetensors`` when it is there,
    else prepared and written there (atomically: two processes preparing the same key write the same file)."""
    t0 = time.time()
    path = Path(cache_dir) / f"{data_key(train, config)}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            cases, names = _load_cases(path)
        except (SafetensorError, OSError, KeyError, ValueError) as exc:  # damaged: prepared again, and replaced
            log(f"training data: the cache {path} is unreadable ({type(exc).__name__}); preparing them again")
        else:
            log(f"training data: {len(cases)} cases from the cache {path} ({time.time() - t0:.0f} s)")
            return cases, names
    phantoms, real = phantom_cases(train.phantoms), real_cases(train.real_train)
    reduced = [reduce_case(c, config) for c in phantoms] + [
        reduce_case(c, config, real=True, contrast=contrast)
        for c, contrast in zip(real, contrast_flags(train.real_train), strict=True)
    ]
    partial = partial_cases(train.real_partial, config, train.partial_aorta)
    names = [c.name for c in phantoms + real] + [f"{p.name} (partial labels)" for p in partial]
    reduced += partial
    log(f"training data: {len(reduced)} cases, {sum(r.hu.shape[0] for r in reduced)} slices ({time.time() - t0:.0f} s)")
    if path is not None:
        _save_cases(path, reduced, names)
        _prune(path.parent)
    return reduced, names


#: Prepared recipes kept in a cache folder (each is 0.7 GB for the shipped recipe); the least recently written go.
CACHE_KEEP = 4


def _prune(folder: Path) -> None:
    files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in files[CACHE_KEEP:]:
        old.unlink(missing_ok=True)
