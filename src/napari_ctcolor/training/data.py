"""Labelled CT cases for training and evaluation: the shared real CTs and the procedural phantoms."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..engines.body import body_mask
from ..engines.geometry import resample_onto
from ..errors import InputError
from ..io import Volume, read_volume
from ..phantom import make_phantom


@dataclass
class LabelledCT:
    """A CT in HU with a label map on the same grid and the label names (TotalSegmentator v2)."""

    name: str
    ct: Volume
    labels: np.ndarray
    label_names: dict[int, str]

    @functools.cached_property
    def body(self) -> np.ndarray:
        """bool (Z, Y, X): the patient's body (`engines.body.body_mask`), without the table and blankets."""
        return body_mask(np.asarray(self.ct.array, dtype=np.float32), self.ct.spacing)


#: The model cards' word on reproducing weights (every training command writes it into "limits").
REPRODUCTION_NOTE = (
    "Reproduction: the training command gives these weights bit for bit only with the same torch version, thread "
    "count and CPU kind (its vector instructions choose the float kernels). Elsewhere float rounding differs in the "
    "last bits, and Adam, whose step does not shrink with the gradient, can move a parameter whose gradient is near "
    "zero by up to its step size: the same 4-step run with 1 and with 2 threads kept 99 % of the parameters within "
    "1e-6 and gave the same validation metrics (tests/models/test_colorizer_model.py)."
)


def load_config(cls: type, path: Path):
    """A training config dataclass from YAML; unknown keys and missing ``name``/``seed`` are input errors."""
    return config_from_dict(cls, read_config(path), path)


def read_config(path: Path) -> dict[str, Any]:
    """A training config file's YAML mapping (a whole recipe, or the keys a variant changes)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: unreadable training config ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a training config is a YAML mapping (name, seed, ...)")
    return raw


def config_from_dict(cls: type, raw: dict[str, Any], path: Path):
    """A training config dataclass from its mapping (read from ``path``, which the errors name)."""
    unknown = set(raw) - set(cls.__dataclass_fields__)
    if unknown:
        raise InputError(f"{path}: unknown config keys: {', '.join(sorted(unknown))}")
    required = {name for name, f in cls.__dataclass_fields__.items() if f.default is f.default_factory is MISSING}
    missing = required - set(raw)
    if missing:
        raise InputError(f"{path}: missing config keys: {', '.join(sorted(missing))}")
    return cls(**raw)


#: Where the shared data are when they lie elsewhere than beside the checkout (the offline GPU bundle sets it).
SHARED_DATA_ENV = "CTCOLOR_SHARED_DATA"


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (the project's real data; never committed), or ``CTCOLOR_SHARED_DATA``."""
    beside = Path(__file__).resolve().parents[3].parent / "shared" / "data"
    named = [Path(os.environ[SHARED_DATA_ENV])] if os.environ.get(SHARED_DATA_ENV) else []
    for candidate in (*named, beside, Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    raise InputError(f"{beside}: shared data folder not found")


def case_name(file_name: str) -> str:
    """A case's name, as measures and logs name it: its file or folder name without the extensions."""
    return file_name.split(".")[0]


def load_real_case(data_dir: Path, ct_name: str, labels_name: str) -> LabelledCT:
    """A shared CT and its labels, the labels resampled onto the CT grid in physical space (nearest)."""
    names_path = data_dir / "ct" / "totalseg-v2-label-names.json"
    names = {int(k): v for k, v in json.loads(names_path.read_text(encoding="utf-8")).items()}
    ct = read_volume(data_dir / "ct" / ct_name)
    labels = read_volume(data_dir / "ct" / labels_name)
    # The label files' direction can differ from the CT's (the DICOM one is flipped in y): never trust array order.
    on_ct = resample_onto(labels, ct, interpolator="nearest", default=0).astype(np.uint8)
    return LabelledCT(case_name(ct_name), ct, on_ct, names)


def phantom_case(seed: int, options: dict[str, Any] | None = None) -> LabelledCT:
    """A phantom as a LabelledCT; ``options`` are `make_phantom` keyword arguments."""
    phantom = make_phantom(seed=seed, **(options or {}))
    return LabelledCT(f"phantom-{seed}", phantom.volume, phantom.labels, phantom.label_names)
