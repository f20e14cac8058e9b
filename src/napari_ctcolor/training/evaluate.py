"""Colorizer evaluation: CIEDE2000 to the targets, luminance fidelity, hue agreement, flicker, contrast vs bone.

All metrics run the production path (`engines.colorize.predict_chroma` + `compose_chroma`) on whole volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from skimage.color import deltaE_ciede2000

from ..color import compose_rgb, grey_to_lightness, load_palette, srgb_to_lab
from ..engines.colorize import compose_chroma, predict_chroma, upsample_chroma
from ..models.colorizer import Colorizer
from ..windowing import PRESETS, window
from .data import LabelledCT
from .targets import ab_targets

VESSELS = ("aorta", "heart", "inferior_vena_cava", "portal_vein_and_splenic_vein", "pulmonary_vein")
HUE_TOLERANCE_DEG = 30.0
MIN_CHROMA = 10.0  # hue is only defined for colours with at least this chroma (a*, b* units)


def _hue(ab: np.ndarray) -> np.ndarray:
    return np.degrees(np.arctan2(ab[..., 1], ab[..., 0]))


def _hue_diff(h1, h2) -> np.ndarray:
    return np.abs((h1 - h2 + 180.0) % 360.0 - 180.0)


def evaluate_case(
    model: Colorizer, case: LabelledCT, palette_name: str = "anatomical", display: str = "abdomen"
) -> dict[str, Any]:
    """Metrics of one labelled CT (see module docstring); structure-wise dE00 for structures of >= 200 voxels."""
    palette = load_palette(palette_name)
    ct = case.ct
    win = PRESETS[display]
    with torch.no_grad():
        chroma = predict_chroma(ct, model, device="cpu")
    out = compose_chroma(ct, chroma, win, 1.0, device="cpu").rgb
    grey = window(ct.array, *win)
    target_ab = ab_targets(ct.array, case.labels, case.label_names, palette, ct.spacing[1:])
    target = compose_rgb(grey, target_ab)
    lab_out, lab_target = srgb_to_lab(out), srgb_to_lab(target)

    shown = (grey > 0) & (grey < 1)  # where the display can carry colour at all
    de = deltaE_ciede2000(lab_out[shown], lab_target[shown])
    d_lightness = np.abs(lab_out[..., 0] - grey_to_lightness(grey))

    pred_ab = upsample_chroma(chroma, 0, ct.shape[0], ct.shape[1:], torch.device("cpu")).numpy()
    body = ct.array > -500
    coloured = body & (np.hypot(target_ab[..., 0], target_ab[..., 1]) >= MIN_CHROMA)
    hue_ok = _hue_diff(_hue(pred_ab[coloured]), _hue(target_ab[coloured])) < HUE_TOLERANCE_DEG

    # Flicker: mean |a*b*(z+1) - a*b*(z)| of the output over that of the target, inside the shown region.
    both = shown[1:] & shown[:-1]
    flicker_out = np.abs(np.diff(lab_out[..., 1:], axis=0))[both].mean() if both.any() else 0.0
    flicker_target = np.abs(np.diff(lab_target[..., 1:], axis=0))[both].mean() if both.any() else 0.0

    per_structure = {}
    de_volume = np.zeros(ct.shape, np.float32)
    de_volume[shown] = de
    for label, name in sorted(case.label_names.items()):
        mask = (case.labels == label) & shown
        if mask.sum() >= 200:
            per_structure[name] = round(float(de_volume[mask].mean()), 2)
    unlabelled = (case.labels == 0) & shown
    if unlabelled.any():
        per_structure["(unlabelled tissue)"] = round(float(de_volume[unlabelled].mean()), 2)

    result = {
        "case": case.name,
        "dE00_mean": round(float(de.mean()), 2),
        "dE00_labelled_mean": round(float(de_volume[(case.labels > 0) & shown].mean()), 2),
        "max_abs_dL": round(float(d_lightness.max()), 3),
        "hue_agreement": round(float(hue_ok.mean()) if hue_ok.size else float("nan"), 3),
        "flicker_ratio": round(float(flicker_out / flicker_target) if flicker_target else float("nan"), 3),
        "dE00_per_structure": per_structure,
    }
    result.update(_contrast_vs_bone(case, pred_ab, target_ab, palette))
    return result


def _contrast_vs_bone(case: LabelledCT, pred_ab: np.ndarray, target_ab: np.ndarray, palette) -> dict[str, float]:
    """Share of enhanced-vessel voxels (> 150 HU) given blood hue, and of bone voxels given bone hue.

    A voxel "gets blood hue" when its hue is nearer the palette's aorta hue than the vertebrae's, and the reverse for
    bone; only voxels with HU > 150, where HU alone cannot tell them apart, count. The same share for the smoothed
    targets (``*_target``) is the ceiling: at thin cortices and ribs, partial volume mixes bone with muscle colour.
    """
    blood_hue = _hue(np.asarray(palette.ab("aorta")))
    bone_hue = _hue(np.asarray(palette.ab("vertebrae_L1")))
    names = case.label_names
    vessel_ids = [i for i, n in names.items() if n in VESSELS]
    bone_ids = [i for i, n in names.items() if n.startswith(("vertebrae_", "rib_", "sternum"))]
    dense = case.ct.array > 150
    out = {}
    for key, ids, own, other in [
        ("contrast_vessels_blood_hue", vessel_ids, blood_hue, bone_hue),
        ("bone_bone_hue", bone_ids, bone_hue, blood_hue),
    ]:
        mask = np.isin(case.labels, ids) & dense
        if mask.sum() >= 50:
            for suffix, ab in (("", pred_ab), ("_target", target_ab)):
                hue = _hue(ab[mask])
                out[key + suffix] = round(float((_hue_diff(hue, own) < _hue_diff(hue, other)).mean()), 3)
    return out


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over cases of the scalar metrics, and the worst luminance error."""
    keys = ["dE00_mean", "dE00_labelled_mean", "hue_agreement", "flicker_ratio"]
    summary = {k: round(float(np.nanmean([r[k] for r in results])), 3) for k in keys}
    summary["max_abs_dL"] = max(r["max_abs_dL"] for r in results)
    for k in (
        "contrast_vessels_blood_hue",
        "contrast_vessels_blood_hue_target",
        "bone_bone_hue",
        "bone_bone_hue_target",
    ):
        values = [r[k] for r in results if k in r]
        if values:
            summary[k] = round(float(np.mean(values)), 3)
    return summary
