"""The registration network and what its model card says about running it: intensity normalisation, axes, working
grid, pre-alignment, refinement, symmetry, bfloat16 and quality limits."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ...errors import InputError
from ...models.symnet import SYMNet
from ...weights import find_weights, load_symnet
from ..orientation import check_axes
from .metrics import INTER_SUBJECT_LIMITS, QUALITY_LIMITS
from .network import MAX_NETWORK_VOXELS, OFFICIAL_NORMALISATION, Normalisation
from .refine import RefineSettings

#: The official checkpoint saw nibabel's array of the neurite-OASIS volumes as stored: axes i, j, k pointing to the
#: patient's left, inferior and anterior (their affine, e.g. ``image_A_full_size.nii.gz``, is LIA).
OFFICIAL_AXES = ("L", "I", "A")


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
            float32, on CUDA without TF32 convolutions too (`float32_convolutions`).
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
        card_normalisation(card, name),
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


def card_normalisation(card: dict[str, Any], name: str) -> Normalisation:
    spec = card.get("inputs", {}).get("normalisation", {})
    if spec.get("mode") == "minmax":
        return OFFICIAL_NORMALISATION
    window = spec.get("window_hu")
    if spec.get("mode") != "window" or not isinstance(window, list) or len(window) != 2 or window[0] >= window[1]:
        raise InputError(f"{name}: its model card does not give the intensity normalisation (inputs.normalisation)")
    return "window", (float(window[0]), float(window[1]))
