"""Weights: finding, verifying (sha256 from the model card) and loading shipped or user weight files.

Shipped weights are ``weights/<name>.safetensors`` with the model card ``weights/<name>.json`` beside it. Only
safetensors are loaded here: no pickle, so a weight file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import InputError
from .io.write import atomic_path
from .models.symnet import SYMNet, load_symnet_checkpoint, symnet_from_state_dict

COLORIZER_DEFAULT = "colorizer-2d"


def weights_dirs() -> list[Path]:
    """Where named weights are looked up: $CTCOLOR_WEIGHTS_DIR, then the weights shipped with the package."""
    dirs = []
    if os.environ.get("CTCOLOR_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["CTCOLOR_WEIGHTS_DIR"]))
    here = Path(__file__).resolve().parent
    dirs += [here / "_weights", here.parents[1] / "weights"]  # packaged copy (wheel), then the source checkout
    return [d for d in dirs if d.is_dir()]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_weights(name_or_path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(safetensors file, model card or None) for a shipped name such as "colorizer-2d" or a file path."""
    candidate = Path(name_or_path)
    if candidate.suffix or candidate.exists() or os.sep in str(name_or_path):
        if not candidate.is_file():
            raise InputError(f"{candidate}: weights file not found")
        card = candidate.with_suffix(".json")
        return candidate, card if card.is_file() else None
    for folder in weights_dirs():
        path = folder / f"{name_or_path}.safetensors"
        if path.is_file():
            card = path.with_suffix(".json")
            return path, card if card.is_file() else None
    looked = ", ".join(map(str, weights_dirs())) or "nowhere"
    raise InputError(f"no weights named {name_or_path!r} (looked in {looked})")


def read_card(card: Path) -> dict[str, Any]:
    try:
        return json.loads(card.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{card}: unreadable model card ({type(exc).__name__})") from None


def load_state(path: Path, card: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, checked against the card's sha256 when there is one."""
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path}: only .safetensors weights are loaded (pickled .pt/.pth files can run code)")
    if card and card.get("sha256") and sha256(path) != card["sha256"]:
        raise InputError(f"{path}: sha256 does not match its model card; the file is damaged or was replaced")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})".splitlines()[0]) from None


def load_colorizer(name_or_path: str | os.PathLike = COLORIZER_DEFAULT) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A colorizer in eval mode on the CPU, and its model card (or metadata when it has no card)."""
    from .models.colorizer import Colorizer, ColorizerConfig  # MONAI: imported only by the colorizer's users

    path, card_path = find_weights(name_or_path)
    card = read_card(card_path) if card_path else {}
    state, metadata = load_state(path, card)
    config_dict = card.get("architecture", {}).get("config") or json.loads(metadata.get("config", "null") or "null")
    if not config_dict:
        raise InputError(f"{path}: no colorizer config in its model card or metadata")
    model = Colorizer(ColorizerConfig.from_dict(config_dict))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit the colorizer config ({str(exc).splitlines()[0]})") from None
    card.setdefault("name", path.stem)
    return model.eval(), card


def load_symnet(name_or_path: str | os.PathLike) -> tuple[SYMNet, dict[str, Any]]:
    """SYMNet (eval mode, CPU) and its model card, from safetensors weights (by name or path, sha256 checked against
    the card) or an official ``.pth`` checkpoint (no card: ``{}``).

    ``.pth`` files are read by `load_symnet_checkpoint` with ``torch.load(weights_only=True)``: tensors only, no code.
    """
    if str(name_or_path).lower().endswith((".pth", ".pt")):
        return load_symnet_checkpoint(Path(name_or_path)), {}
    path, card_path = find_weights(name_or_path)
    if path.suffix.lower() != ".safetensors":
        raise InputError(f"{path}: SYMNet weights are a .safetensors file with its card or an official .pth checkpoint")
    card = read_card(card_path) if card_path else {}
    state, _ = load_state(path, card)
    return symnet_from_state_dict(state, source=str(path)), card


def save_weights(model: torch.nn.Module, card: dict[str, Any], folder: Path, name: str) -> Path:
    """Write ``folder/name.safetensors`` and its card ``folder/name.json`` (with the file's sha256); atomic."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"config": json.dumps(card.get("architecture", {}).get("config", {}))}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    card = {**card, "name": name, "sha256": sha256(path)}
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return path


def update_card_metrics(weights: Path, metrics: dict[str, Any], **fields: Any) -> Path:
    """Replace the ``metrics`` of the model card beside ``weights``, and any other top-level ``fields`` given (the
    description of the engine around the weights, which changes without retraining: ``--eval-only``); atomic.
    Returns the card."""
    card = Path(weights).with_suffix(".json")
    updated = {**read_card(card), **fields, "metrics": metrics}
    with atomic_path(card) as tmp:
        tmp.write_text(json.dumps(updated, indent=2) + "\n", encoding="utf-8")
    return card
