"""Colorizer evaluation on labelled CT, through the production path (`predict_chroma` once, `compose_chroma` per
palette and window), for every shipped palette.

Metrics per case and palette:

- ``hue_within_25deg``: per structure group (liver, spleen, kidneys, contrast vessels, bone, muscle, fat, lung), the
  share of its voxels whose displayed hue is within 25 degrees of the palette hue of their colour class. Each group is
  read in a window that shows it mid-grey (centre = the group's median HU, width 400), and only its voxels that the
  window shows between 10 % and 90 % grey count: sRGB has no chroma at L* 0 or 100, so a voxel clipped to black or
  white (the cortex of a bone in its marrow's window) cannot carry colour. Voxels within one voxel of the group's
  border (in-plane) are left out: partial volume makes them legitimately a blend; so are voxels below -900 HU, air
  by definition, which must stay grey. A voxel shown with chroma below `MIN_CHROMA` has no hue and counts as a miss.
- ``dE00_mean``: CIEDE2000 between the output and the reference (each voxel's class colour, smoothed 1.5 mm), in the
  abdomen window, over voxels the window shows (grey strictly between black and white).
- ``air_max_chroma``: the largest C* where HU < -900, over the lung, abdomen and bone windows.
- ``flicker_ratio``: mean |a*b*(z+1) - a*b*(z)| of the output over that of the reference.
- ``max_abs_dL``: the largest |L*(output) - L*(windowed grey)| (8-bit rounding bounds it at about 0.27).

And, once per case, ``classes`` (`class_metrics`): how the most probable class names the labelled structures; and
``tissues`` (`tissue_metrics`): bone ivory, lung and fat hues, abdominal organs named above the diaphragm, dense
voxels named contrast blood.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from skimage.color import deltaE_ciede2000

from ..color import compose_rgb, grey_to_lightness, srgb_to_lab
from ..engines.body import body_mask
from ..engines.colorize import AIR_HU, compose_chroma, predict_chroma
from ..engines.colorize.anatomy import PELVIS, family
from ..models.colorizer import Colorizer
from ..palettes import PALETTE_NAMES, color_class, load_palette
from ..windowing import PRESETS, window
from .data import LabelledCT
from .targets import TISSUE_CLASSES, ab_targets, class_targets

HUE_TOLERANCE_DEG = 25.0
MIN_CHROMA = 3.0
GROUP_WINDOW_WIDTH = 400.0
MIN_GROUP_VOXELS = 200

_BONES = ("vertebrae_", "ribs", "sacrum", "hip", "femur", "humerus", "sternum", "clavicula", "scapula", "costal")
_VESSELS = ("aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery", "iliac_vena", "heart")
_MUSCLES = ("autochthon", "iliopsoas", "gluteus_")

#: Structure groups of the targets: name -> predicate on a voxel's reference colour class.
GROUPS: dict[str, Callable[[str], bool]] = {
    "liver": lambda c: c == "liver",
    "spleen": lambda c: c == "spleen",
    "kidneys": lambda c: c == "kidney",
    "contrast_vessels": lambda c: c in _VESSELS,
    "bone": lambda c: c.startswith(_BONES) or c == "bone",
    "muscle": lambda c: c.startswith(_MUSCLES),
    "fat": lambda c: c == "fat",
    "lung": lambda c: c == "lung",
}


def _hue(ab: np.ndarray) -> np.ndarray:
    return np.degrees(np.arctan2(ab[..., 1], ab[..., 0]))


def _hue_diff(h1, h2) -> np.ndarray:
    return np.abs((h1 - h2 + 180.0) % 360.0 - 180.0)


def _reference_classes(case: LabelledCT) -> tuple[np.ndarray, list[str]]:
    """Each voxel's reference colour class, whatever the model knows: (Z, Y, X) indices into the returned names
    (every labelled structure's colour class, then the tissue classes)."""
    names = sorted({color_class(n) for n in case.label_names.values()} | set(TISSUE_CLASSES))
    return class_targets(case.ct.array, case.labels, case.label_names, names), names


def _inner(mask: np.ndarray) -> np.ndarray:
    """The mask less its in-plane border voxels."""
    return ndimage.binary_erosion(mask, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool))


#: render(window, palette name) -> (Z, Y, X, 3) uint8 sRGB of the whole case.
Render = Callable[[tuple[float, float] | str, str], np.ndarray]


def evaluate_case(
    model: Colorizer, case: LabelledCT, palettes: Sequence[str] = PALETTE_NAMES, display: str = "abdomen"
) -> dict[str, Any]:
    """Metrics of one labelled CT for each palette (see the module docstring): the network once, then
    `compose_chroma` per palette and window."""
    with torch.no_grad():
        chroma = predict_chroma(case.ct, model, device="cpu", bf16=False)  # the card's figures: float32

    def render(win: tuple[float, float] | str, palette: str) -> np.ndarray:
        return compose_chroma(case.ct, chroma, win, 1.0, "cpu", palette).rgb

    result = color_metrics(case, model.config.classes, render, palettes, display)
    labels = chroma.most_probable(case.ct.array)
    result["classes"] = class_metrics(case, labels, chroma.classes)
    result["tissues"] = tissue_metrics(case.ct, labels, chroma.classes, render, vessel_mask(case))
    return result


def vessel_mask(case: LabelledCT) -> np.ndarray:
    """(Z, Y, X) bool: the labelled heart and vessels of a case (`tissue_metrics`'s ``vessels``)."""
    ids = [label for label, name in case.label_names.items() if color_class(name).startswith(_VESSELS)]
    return np.isin(case.labels, ids)


def evaluate_tissues(model: Colorizer, ct) -> dict[str, Any]:
    """`tissue_metrics` of an unlabelled CT through the production path (the network once, composed per window)."""
    with torch.no_grad():
        chroma = predict_chroma(ct, model, device="cpu", bf16=False)  # the card's figures: float32

    def render(win: tuple[float, float] | str, palette: str) -> np.ndarray:
        return compose_chroma(ct, chroma, win, 1.0, "cpu", palette).rgb

    return tissue_metrics(ct, chroma.most_probable(ct.array), chroma.classes, render)


def group_windows(case: LabelledCT) -> dict[str, tuple[float, float]]:
    """The window that shows each structure group of the case mid-grey: (median HU of its inner voxels, 400)."""
    hu = np.asarray(case.ct.array, dtype=np.float32)
    windows = {}
    for group, mask in _group_masks(case).items():
        if mask is not None:
            windows[group] = (float(np.median(hu[mask])), GROUP_WINDOW_WIDTH)
    return windows


def _group_masks(case: LabelledCT) -> dict[str, np.ndarray | None]:
    """Each group's inner voxels (in-plane border removed) in the body (tissue classes by HU would otherwise count
    the blankets as lung and the table as bone; lung: aerated lung, `_aerated_lung`), None when it has fewer than
    `MIN_GROUP_VOXELS`."""
    ref_index, ref_names = _reference_classes(case)
    masks = {}
    for group, member in GROUPS.items():
        ids = [k for k, n in enumerate(ref_names) if member(n)]
        mask = _inner(np.isin(ref_index, ids)) & (np.asarray(case.ct.array) >= AIR_HU) & case.body
        if group == "lung":
            mask &= _aerated_lung(np.asarray(case.ct.array, dtype=np.float32), case.body, case.ct.spacing)
        masks[group] = mask if mask.sum() >= MIN_GROUP_VOXELS else None
    return masks


def color_metrics(
    case: LabelledCT, classes: Sequence[str], render: Render, palettes: Sequence[str], display: str = "abdomen"
) -> dict[str, Any]:
    """The metrics of the module docstring for any colorizer, given how it renders the case (``render``); the
    expected colours are those of ``classes`` (the model's colour classes)."""
    ct = case.ct
    hu = np.asarray(ct.array, dtype=np.float32)
    air = hu < -900.0
    result: dict[str, Any] = {"case": case.name}
    hues = group_hues(case, classes, render, palettes)
    for palette_name in palettes:
        palette = load_palette(palette_name)
        groups = hues[palette_name]
        win = PRESETS[display]
        out = render(display, palette_name)
        grey = window(hu, *win)
        reference_ab = ab_targets(hu, case.labels, case.label_names, classes, palette, ct.spacing[1:])
        reference_ab[~case.body] = 0.0  # no colour outside the body
        lab_out, lab_ref = srgb_to_lab(out), srgb_to_lab(compose_rgb(grey, reference_ab))
        shown = (grey > 0) & (grey < 1)
        de = deltaE_ciede2000(lab_out[shown], lab_ref[shown])
        both = shown[1:] & shown[:-1]
        flicker_out = np.abs(np.diff(lab_out[..., 1:], axis=0))[both].mean() if both.any() else 0.0
        flicker_ref = np.abs(np.diff(lab_ref[..., 1:], axis=0))[both].mean() if both.any() else 0.0
        air_chroma = 0.0
        if air.any():
            for name in ("lung", "abdomen", "bone"):
                lab_air = srgb_to_lab(render(name, palette_name)[air])
                air_chroma = max(air_chroma, float(np.hypot(lab_air[:, 1], lab_air[:, 2]).max()))
        result[palette_name] = {
            "hue_within_25deg": groups,
            "dE00_mean": round(float(de.mean()), 2),
            "air_max_chroma": round(air_chroma, 2),
            "flicker_ratio": round(float(flicker_out / flicker_ref) if flicker_ref else float("nan"), 3),
            "max_abs_dL": round(float(np.abs(lab_out[..., 0] - grey_to_lightness(grey)).max()), 3),
        }
    return result


def group_hues(
    case: LabelledCT,
    classes: Sequence[str],
    render: Render,
    palettes: Sequence[str],
    groups: Sequence[str] = tuple(GROUPS),
) -> dict[str, dict[str, float | None]]:
    """Per palette, ``hue_within_25deg`` of each of the structure ``groups`` (module docstring); None for a group
    absent from the case."""
    hu = np.asarray(case.ct.array, dtype=np.float32)
    masks = {group: mask for group, mask in _group_masks(case).items() if group in groups}
    windows = group_windows(case)
    # The colour each voxel should have: its class's if the model has that class, else its tissue class's.
    expected_classes = class_targets(hu, case.labels, case.label_names, classes)
    out = {}
    for palette_name in palettes:
        expected_ab = load_palette(palette_name).class_ab(classes)[expected_classes]
        out[palette_name] = {}
        for group, mask in masks.items():
            if mask is None:
                out[palette_name][group] = None  # absent from this case
                continue
            grey = window(hu[mask], *windows[group])
            shown = (grey >= 0.1) & (grey <= 0.9)
            lab = srgb_to_lab(render(windows[group], palette_name)[mask][shown])
            chroma_out = np.hypot(lab[:, 1], lab[:, 2])
            close = _hue_diff(_hue(lab[:, 1:]), _hue(expected_ab[mask][shown])) <= HUE_TOLERANCE_DEG
            out[palette_name][group] = round(float((close & (chroma_out >= MIN_CHROMA)).mean()), 3)
    return out


#: Structures whose naming is checked (`class_metrics`): group -> (colour classes, the tissue classes that also
#: count as right: the plain colour the engine falls back to where it is unsure).
CLASS_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "aorta": (("aorta",), ("contrast_blood", "soft_tissue")),
    "heart": (("heart",), ("contrast_blood", "soft_tissue")),
    "liver": (("liver",), ("soft_tissue",)),
    "spleen": (("spleen",), ("soft_tissue",)),
    "kidneys": (("kidney",), ("soft_tissue", "contrast_blood")),
    "vertebrae": (("vertebrae_thoracic", "vertebrae_lumbar"), ("bone",)),
    "ribs": (("ribs",), ("bone",)),
}
#: Large organs whose class must not flicker between slices (`class_metrics`).
FLICKER_ORGANS = ("liver", "spleen", "kidney")


#: HU below which a voxel of the spinal canal is its content (cord, CSF, epidural fat), not its bony wall
#: partial-volumed in (`spinal_canal`); the canal's median on the shared patients: 7 (3 mm) and 23 HU (DICOM).
CANAL_MAX_HU = 150.0
#: Fewest canal voxels `class_metrics` reports on (the 3 mm patient's cord is about 1,500 voxels).
MIN_CANAL_VOXELS = 50


def spinal_canal(case: LabelledCT) -> np.ndarray:
    """(Z, Y, X) bool: the spinal canal's content: the labelled spinal cord and, in each axial slice, what a
    vertebra's label encloses (its holes filled), below `CANAL_MAX_HU`. A bone class there is the error a reader
    sees as an ivory canal."""
    names = {label: color_class(name) for label, name in case.label_names.items()}
    vertebra = np.isin(case.labels, [label for label, c in names.items() if c.startswith("vertebrae")])
    enclosed = np.stack([ndimage.binary_fill_holes(piece) for piece in vertebra]) & ~vertebra
    cord = np.isin(case.labels, [label for label, c in names.items() if c == "spinal_cord"])
    return (enclosed | cord) & (np.asarray(case.ct.array) < CANAL_MAX_HU)


def class_metrics(case: LabelledCT, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """How the most probable class (what the pointer, legend and class layer show, and ``ctcolor colorize --classes``
    writes: ``labels``, 0 for air, k for ``classes[k - 1]``) names the labelled anatomy.

    - ``right_or_tissue``: per `CLASS_GROUPS` group with at least `MIN_GROUP_VOXELS` inner voxels, the share named
      as the structure, or as its tissue class.
    - ``named``: per such group, the shares named ``right`` (the structure), ``tissue`` (its tissue class) and
      ``wrong`` (anything else), and of those wrong ones the share named as bone (any bone structure or the bone
      tissue: ``bone``) and as blood (the heart, a vessel or contrast blood: ``blood``), for the wrong names that
      cost most: bone on a vessel, blood on a bone; and ``spinal_canal``: the share of the canal's content
      (`spinal_canal`) named as bone.
    - ``absent_named``: share of body voxels (HU >= -900) named as a structure that is not labelled anywhere in the
      case (a femur in a chest CT).
    - ``flicker``: inside the `FLICKER_ORGANS` (inner voxels), P(class differs from the next slice's) minus
      P(class differs from the next row's); 0 when the class is as steady through the slices as within one.
    """
    hu = np.asarray(case.ct.array, dtype=np.float32)
    most = np.asarray(labels).astype(np.int16) - 1  # -1: air
    index = {name: k for k, name in enumerate(classes)}
    in_volume = set(np.unique(case.labels).tolist())
    label_class = {label: color_class(name) for label, name in case.label_names.items() if label in in_volume}
    present = set(label_class.values())
    out: dict[str, Any] = {"right_or_tissue": {}, "named": {}}
    bone = [k for k, c in enumerate(classes) if family(c) == "bone"]
    blood = [k for k, c in enumerate(classes) if family(c) == "contrast_blood"]
    for group, (members, tissues) in CLASS_GROUPS.items():
        ids = [label for label, c in label_class.items() if c in members]
        mask = _inner(np.isin(case.labels, ids)) & (hu >= AIR_HU)
        if mask.sum() < MIN_GROUP_VOXELS:
            out["right_or_tissue"][group] = out["named"][group] = None
            continue
        named = most[mask]
        right = np.isin(named, [index[c] for c in members if c in index])
        tissue = np.isin(named, [index[c] for c in tissues if c in index])
        wrong = ~right & ~tissue
        out["right_or_tissue"][group] = round(float((right | tissue).mean()), 3)
        out["named"][group] = {
            "right": round(float(right.mean()), 3),
            "tissue": round(float(tissue.mean()), 3),
            "wrong": round(float(wrong.mean()), 3),
            "bone": round(float((wrong & np.isin(named, bone)).mean()), 3),
            "blood": round(float((wrong & np.isin(named, blood)).mean()), 3),
        }
    canal = spinal_canal(case) & (hu >= AIR_HU)
    enough = canal.sum() >= MIN_CANAL_VOXELS
    out["named"]["spinal_canal"] = {"bone": round(float(np.isin(most[canal], bone).mean()), 3)} if enough else None
    body = hu >= AIR_HU
    absent = [k for k, c in enumerate(classes) if c not in TISSUE_CLASSES and c not in present]
    out["absent_named"] = round(float(np.isin(most[body], absent).mean()), 4)
    organs = [label for label, c in label_class.items() if c in FLICKER_ORGANS]
    inner = ndimage.binary_erosion(np.isin(case.labels, organs), iterations=2)
    through = (inner[1:] & inner[:-1]), (inner[:, 1:] & inner[:, :-1])
    if through[0].sum() >= MIN_GROUP_VOXELS:
        p_z = float((most[1:] != most[:-1])[through[0]].mean())
        p_y = float((most[:, 1:] != most[:, :-1])[through[1]].mean())
        out["flicker"] = round(p_z - p_y, 3)
    else:
        out["flicker"] = None
    return out


#: Bone ivory (`tissue_metrics`): bone voxels (HU >= BONE_HU) that the bone window shows between 40 % and 85 % grey
#: must have a hue in IVORY_HUE_DEG and C* >= IVORY_MIN_CHROMA under the anatomical palette.
BONE_HU, IVORY_HUE_DEG, IVORY_MIN_CHROMA, IVORY_GREY = 300.0, (60.0, 110.0), 8.0, (0.40, 0.85)
#: HU above which `tissue_metrics` checks that voxels are not named contrast blood (bone on non-contrast CT).
DENSE_HU = 250.0
#: HU of lung parenchyma and of fat for `tissue_metrics` (inner voxels only); lung counts in pieces of this size.
LUNG_HU, FAT_HU, LUNG_MIN_ML = (-900.0, -600.0), (-150.0, -60.0), 20.0
#: Abdominal organs that must not be named in the chest (`tissue_metrics`).
ABDOMINAL = ("liver", "spleen", "kidney", "small_bowel", "duodenum", "colon", "stomach")


def _aerated_lung(hu: np.ndarray, body: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The body's aerated lung by HU alone: `LUNG_HU` voxels in connected pieces of at least `LUNG_MIN_ML` after an
    opening (not the thin rims of bowel and stomach gas: on the upper-abdomen DICOM patient, whose slab holds no lung,
    the largest such piece is 0.5 mL)."""
    lung = ndimage.binary_opening((hu >= LUNG_HU[0]) & (hu <= LUNG_HU[1]) & body, iterations=1)
    labels, count = ndimage.label(lung)
    if count == 0:
        return lung
    sizes = np.bincount(labels.ravel()) * float(np.prod(spacing)) / 1000.0
    sizes[0] = 0.0
    return (sizes >= LUNG_MIN_ML)[labels]


def _lung_below(lung: np.ndarray, superior_sign: float) -> np.ndarray:
    """Voxels with aerated ``lung`` at the same (y, x) in a more inferior slice: above the diaphragm."""
    order = slice(None) if superior_sign > 0 else slice(None, None, -1)  # index 0 = most inferior
    seen = np.logical_or.accumulate(lung[order], axis=0)
    below = np.zeros_like(seen)
    below[1:] = seen[:-1]
    return below[order]


def tissue_metrics(
    ct, labels: np.ndarray, classes: Sequence[str], render: Render, vessels: np.ndarray | None = None
) -> dict[str, Any]:
    """What the HU alone can check, on any CT (labelled or not), inside the body (`body_mask`: not the table nor
    blankets): under the anatomical palette, the share of bone shown ivory (`BONE_HU`, `IVORY_HUE_DEG`) and of lung
    and fat within 25 degrees of their palette hues; the share of body voxels above the diaphragm (aerated lung below
    them in their column) whose most probable class (``labels`` as `class_metrics`) is an abdominal organ; and
    ``dense_contrast_blood``, the share of inner voxels above `DENSE_HU` named contrast blood: on non-contrast CT
    they are all bone (on contrast CT they include the enhanced blood, which is right there). ``vessels``: (Z, Y, X)
    bool, where a labelled CT has its heart and vessels (`vessel_mask`), left out of the bone: an arterial phase's
    blood reaches 300-700 HU and must not be ivory."""
    hu = np.asarray(ct.array, dtype=np.float32)
    body = body_mask(hu, ct.spacing)  # not the table (dense, but no bone)
    palette = load_palette("anatomical")
    out: dict[str, Any] = {}
    bone = _inner(hu >= BONE_HU) & body
    if vessels is not None:
        bone &= ~vessels
    grey = window(hu, *PRESETS["bone"])
    shown = bone & (grey >= IVORY_GREY[0]) & (grey <= IVORY_GREY[1])
    if shown.sum() >= MIN_GROUP_VOXELS:
        lab = srgb_to_lab(render("bone", "anatomical")[shown])
        hue, chroma = _hue(lab[:, 1:]) % 360.0, np.hypot(lab[:, 1], lab[:, 2])
        ivory = (hue >= IVORY_HUE_DEG[0]) & (hue <= IVORY_HUE_DEG[1]) & (chroma >= IVORY_MIN_CHROMA)
        out["bone_ivory"] = round(float(ivory.mean()), 3)
    else:
        out["bone_ivory"] = None
    lung = _aerated_lung(hu, body, ct.spacing)
    fat = _inner((hu >= FAT_HU[0]) & (hu <= FAT_HU[1])) & body
    for name, mask, win in (("lung", _inner(lung), "lung"), ("fat", fat, "abdomen")):
        grey = window(hu, *PRESETS[win])
        mask &= (grey >= 0.1) & (grey <= 0.9)
        if mask.sum() < MIN_GROUP_VOXELS:
            out[f"{name}_hue"] = None
            continue
        lab = srgb_to_lab(render(win, "anatomical")[mask])
        target = palette.class_ab([name])
        close = _hue_diff(_hue(lab[:, 1:]), _hue(target)) <= HUE_TOLERANCE_DEG
        out[f"{name}_hue"] = round(float((close & (np.hypot(lab[:, 1], lab[:, 2]) >= MIN_CHROMA)).mean()), 3)
    dense = _inner(hu > DENSE_HU) & body
    blood = [k + 1 for k, c in enumerate(classes) if c == "contrast_blood"]
    out["dense_contrast_blood"] = (
        round(float(np.isin(labels[dense], blood).mean()), 4) if dense.sum() >= MIN_GROUP_VOXELS else None
    )
    chest = _lung_below(lung, float(np.asarray(ct.direction)[2, 2])) & (hu >= AIR_HU) & body
    abdominal = [k + 1 for k, c in enumerate(classes) if c in ABDOMINAL]
    out["abdominal_above_diaphragm"] = (
        round(float(np.isin(labels[chest], abdominal).mean()), 4) if chest.sum() >= MIN_GROUP_VOXELS else None
    )
    return out


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per palette: means over cases of each metric (groups absent from a case are skipped); worst dL* and air C*."""
    summary: dict[str, Any] = {}
    palettes = [k for k in results[0] if k in PALETTE_NAMES]
    for palette in palettes:
        rows = [r[palette] for r in results]
        groups = {}
        for group in GROUPS:
            values = [r["hue_within_25deg"][group] for r in rows if r["hue_within_25deg"].get(group) is not None]
            groups[group] = round(float(np.mean(values)), 3) if values else None
        summary[palette] = {
            "hue_within_25deg": groups,
            "dE00_mean": round(float(np.mean([r["dE00_mean"] for r in rows])), 2),
            "flicker_ratio": round(float(np.nanmean([r["flicker_ratio"] for r in rows])), 3),
            "air_max_chroma": max(r["air_max_chroma"] for r in rows),
            "max_abs_dL": max(r["max_abs_dL"] for r in rows),
        }
    return summary


#: Exams of a labelled validation patient (`exam_metrics`; `training.exams`): its blood in each phase of
#: `exams.PHASES`; where its scan reaches the pelvis, the same scan ending at the kidneys' lowest labelled slice (a
#: chest-to-upper-abdomen exam); where it shows lung, a field of view of `CUT_FOV` of each slice's rows and columns.
CUT_FOV = 0.6
#: The `CLASS_GROUPS` an exam row reports.
EXAM_GROUPS = ("aorta", "heart", "vertebrae", "ribs")
#: The mediastinal blood pool's HU in the exams of an unlabelled chest CT (`chest_exam_metrics`).
POOL_HU = (300.0, 450.0, 600.0)


def exam_versions(case: LabelledCT) -> list[tuple[str, LabelledCT]]:
    """The exams of ``case`` (`exam_metrics`): its blood in each phase of `exams.PHASES`; where it reaches the
    pelvis, the scan ending at the kidneys' lowest slice (``above_pelvis``); where it shows lung, `CUT_FOV`."""
    from .exams import PHASES, crop_z, cut_fov, with_blood

    versions = [(phase, with_blood(case, phase)) for phase in PHASES]
    pelvic = [label for label, name in case.label_names.items() if color_class(name).startswith(PELVIS)]
    kidney = [label for label, name in case.label_names.items() if color_class(name) == "kidney"]
    superior = np.asarray(case.ct.direction)[2, 2] > 0
    if np.isin(case.labels, pelvic).any() and np.isin(case.labels, kidney).any():
        slices = np.flatnonzero(np.isin(case.labels, kidney).any(axis=(1, 2)))
        start, stop = (int(slices.min()), case.ct.shape[0]) if superior else (0, int(slices.max()) + 1)
        ct, (labels,) = crop_z(case.ct, start, stop, case.labels)
        versions.append(("above_pelvis", LabelledCT(f"{case.name}-above-pelvis", ct, labels, case.label_names)))
    if _aerated_lung(np.asarray(case.ct.array, np.float32), case.body, case.ct.spacing).any():
        ct, (labels,) = cut_fov(case.ct, CUT_FOV, case.labels)
        versions.append(("cut_fov", LabelledCT(f"{case.name}-cut-fov", ct, labels, case.label_names)))
    return versions


def named_classes(model: Colorizer, case: LabelledCT):
    """`class_metrics` of ``case`` through the production path (float32 on the CPU, as the cards' figures), and the
    chroma it was read from."""
    with torch.no_grad():
        chroma = predict_chroma(case.ct, model, device="cpu", bf16=False)
    return class_metrics(case, chroma.most_probable(case.ct.array), chroma.classes), chroma


def exam_metrics(model: Colorizer, case: LabelledCT) -> list[dict[str, Any]]:
    """One row per exam of ``case`` (`exam_versions`): how the most probable class names the aorta, heart, vertebrae
    and ribs (`class_metrics`'s ``named``), the share of the body named as a structure the exam does not show
    (``absent_named``), and the hues of the vessels, bone and lung (`group_hues`)."""
    rows = []
    for name, version in exam_versions(case):
        named, chroma = named_classes(model, version)

        def render(win, palette, ct=version.ct, chroma=chroma):
            return compose_chroma(ct, chroma, win, 1.0, "cpu", palette).rgb

        rows.append(
            {
                "exam": name,
                "named": {group: named["named"][group] for group in EXAM_GROUPS},
                "absent_named": named["absent_named"],
                "hue_within_25deg": group_hues(
                    version, model.config.classes, render, PALETTE_NAMES, ("contrast_vessels", "bone", "lung")
                ),
            }
        )
    return rows


def chest_pool(ct) -> np.ndarray:
    """(Z, Y, X) bool: the inner voxels of an unlabelled chest CT's mediastinal blood pool
    (`training.partial.derive_chest`), which its exams raise to `POOL_HU` (16 s on lung1, 2-core EPYC: made once)."""
    from .partial import derive_chest

    return _inner(derive_chest(ct)["blood"])


def pool_metrics(model: Colorizer, ct, pool: np.ndarray, values: Sequence[float] = POOL_HU) -> list[dict[str, Any]]:
    """One row per value of ``values``: the chest CT with its blood pool ``pool`` (`chest_pool`) at that HU, and the
    share of the pool named bone (``pool_bone``) and blood (``pool_blood``: the heart, a vessel or contrast blood)."""
    from .exams import with_pool

    rows = []
    for value in values:
        version = with_pool(ct, pool, value)
        with torch.no_grad():
            chroma = predict_chroma(version, model, device="cpu", bf16=False)
        named = np.asarray(chroma.most_probable(version.array)).astype(np.int16)[pool] - 1
        families = np.array([family(c) for c in chroma.classes] + ["air"])
        rows.append(
            {
                "exam": f"pool_{value:.0f}",
                "pool_bone": round(float((families[named] == "bone").mean()), 3),
                "pool_blood": round(float((families[named] == "contrast_blood").mean()), 3),
            }
        )
    return rows


def chest_exam_metrics(model: Colorizer, ct) -> list[dict[str, Any]]:
    """Exams of an unlabelled chest CT: its mediastinal blood pool (`training.partial.derive_chest`) raised to each of
    `POOL_HU`, the share of the pool's inner voxels named bone (``pool_bone``) and blood (``pool_blood``: the heart, a
    vessel or contrast blood); and a field of view of `CUT_FOV`, which cuts the chest wall: the share of aerated
    lung named lung (``lung_named``) and shown in the lung's hue (``lung_hue``, `tissue_metrics`)."""
    from .exams import cut_fov

    rows = pool_metrics(model, ct, chest_pool(ct))
    version, _ = cut_fov(ct, CUT_FOV)
    with torch.no_grad():
        chroma = predict_chroma(version, model, device="cpu", bf16=False)

    def render(win, palette):
        return compose_chroma(version, chroma, win, 1.0, "cpu", palette).rgb

    labels = chroma.most_probable(version.array)
    hu = np.asarray(version.array, dtype=np.float32)
    lung = _inner(_aerated_lung(hu, body_mask(hu, version.spacing), version.spacing))
    lung_class = chroma.classes.index("lung") + 1
    rows.append(
        {
            "exam": "cut_fov",
            "lung_named": round(float((np.asarray(labels)[lung] == lung_class).mean()), 3) if lung.any() else None,
            "lung_hue": tissue_metrics(version, labels, chroma.classes, render)["lung_hue"],
        }
    )
    return rows
