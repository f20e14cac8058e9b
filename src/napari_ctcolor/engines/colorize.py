"""The colorize engine: a CT Volume -> an sRGB ColorVolume whose luminance is exactly the windowed CT.

Two phases, so the UI can change palette, chroma strength or window without re-running the network:

1. `predict_chroma`: the network's colour-class probabilities at its reduced in-plane resolution (16x fewer pixels
   than the CT for the default 4x reduction), kept compactly as the `TOP_K` most probable classes per pixel in 8 bits
   (`Chroma`), computed slice batches at a time (2D) or by sliding window (3D).
2. `compose_chroma`: streams slice chunks: a*, b* = probability-weighted palette a*, b*; upsampled to full
   resolution guided by the full-resolution CT (`guided_upsample`), so colour stops at boundaries; no colour where
   HU < -900 (air); then the windowed CT's grey composed into sRGB with the exact luminance, written into one
   preallocated uint8 array (on the CPU both in one numba pass per voxel, `fused.upsample_compose`). Peak memory
   stays near input + output + the kept classes + the bone enclosure bits: 2.9x an int16 CT of 512² slices
   (1x + 1.5x + 0.26x + 0.125x).

Each phase is written once, as a generator (`iter_predict_chroma`, `iter_compose_chroma`, `iter_colorize`) that
yields ``(done, total)`` slices after every batch and *returns* its result. The plain functions drain these
generators, calling ``progress`` and polling ``cancel`` between steps; the napari widget runs the same generators in
a ``thread_worker``, which emits ``yielded`` per step, aborts between steps on ``worker.quit()`` and emits
``returned`` with the result.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..color import Palette, compose_rgb, compose_rgb_torch, load_palette
from ..errors import InputError
from ..io import ColorVolume, Volume
from ..memory import check_memory, release_free_memory
from ..models.colorizer import Colorizer, context_indices, downsample_hu, prepare_input
from ..threads import cpu_threads
from ..weights import COLORIZER_DEFAULT, load_colorizer
from ..windowing import Window, parse_window, window, window_tensor
from . import anatomy as _anatomy
from .body import body_mask
from .device import cpu_bf16, resolve_device
from .fused import top_classes
from .orientation import AxialView
from .steps import Steps, blocking, offset_steps

_AIR_HU = -1024.0
# Slices per compose step: bounds the chunk's float temporaries (the fused CPU kernel's too: its float HU, clipped
# guide and a*, b*). glibc serves them from its heap, which keeps what they touched resident while the RGB output
# grows: 8 slices left 50-115 MB there at the peak of 600 slices of 512² (0.15-0.4x the int16 input), 2 slices
# 5-10 MB. 2 was also faster than 8 for the two-pass path (cache).
_COMPOSE_CHUNK = 2
_ROI_3D = (32, 96, 96)  # 3D model patch (d, h, w) at the network's resolution
_OVERLAP_3D = 0.5  # overlap of neighbouring 3D patches, blended with a Gaussian weight (MONAI's sliding window)
_MODEL_CACHE: dict[str, tuple[Colorizer, dict[str, Any]]] = {}


#: Contrast-enhanced blood (`Chroma.enhanced_blood_hu`): the heart and vessels the network names, at least
#: ENHANCED_MIN_ML of them, with a median of at least ENHANCED_HU. Unenhanced blood is 30-60 HU (up to about 70 at a
#: high haematocrit). Measured with every shipped and left-out model (2026-11-24): the portal-venous DICOM patient's
#: named blood 100-118 HU (the vessels' borders mix with the wall), the four non-contrast CTs' 28-47 HU.
ENHANCED_HU, ENHANCED_MIN_ML = 80.0, 5.0


@dataclass
class Chroma:
    """A volume's colour before composition: colour-class probabilities at the network's resolution.

    Only the `TOP_K` most probable classes of each pixel are kept, their probabilities renormalised and stored in
    8 bits: 8 bytes per network pixel (0.5 byte per CT voxel at the default 4x in-plane reduction) instead of 4 bytes
    per class, and the a*, b* they give differ from the full distribution's by well under one dE00 unit (the classes
    beyond the fourth carry almost no probability). That is what switching palettes without re-running the network
    needs. The bone enclosure bits (`enclosure`) add 2 bits per CT voxel.

    Attributes:
        top: (Z, TOP_K, h, w) uint8 class indices into ``classes``, most probable first.
        prob: (Z, TOP_K, h, w) uint8 probabilities x 255 of those classes (their sum is 255 up to rounding).
        classes: the model's colour classes.
        factor: in-plane reduction factor.
        pad: ((top, bottom), (left, right)) full-resolution padding added before the network, removed after.
        model: model name.
        enclosure: (2, Z, Y, ceil(X / 8)) uint8, bits packed along X (``np.packbits(..., axis=-1)``), one per CT
            voxel (`enclosure_masks`): [0] the voxels that count as marrow (and the cortex around it), [1] those no
            bone encloses, below `MARROW_MIN_HU`; None: neither (plain HU weights).
        blood_fade_hu: where contrast blood's `HU_GROUPS` weight falls for this scan (`blood_fade`).
    """

    top: torch.Tensor
    prob: torch.Tensor
    classes: tuple[str, ...]
    factor: int
    pad: tuple[tuple[int, int], tuple[int, int]]
    model: str
    enclosure: np.ndarray | None = None
    blood_fade_hu: tuple[float, float] = field(default_factory=lambda: _BLOOD_FADE_HU)

    def ab(self, palette: Palette, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(n, 2, h, w) float32 a*, b* of slices [start, stop) at the network's resolution under ``palette``."""
        table = _class_table(palette, self.classes)
        prob = self.prob[start:stop].float()
        prob = prob / prob.sum(dim=1, keepdim=True).clamp_min(1.0)
        ab = table[self.top[start:stop].long()]  # (n, k, h, w, 2)
        return (ab * prob[..., None]).sum(dim=1).movedim(-1, 1)

    def ab_groups(self, palette: Palette, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(n, 4, 3, h, w) float32: for each of the `HU_GROUPS` (bone, blood, organ, plain), the probability-weighted
        a*, b* of its kept classes and its probability (a*·p, b*·p, p); summed over the groups, (a*, b*) is `ab`."""
        table = _class_table(palette, self.classes)
        prob = self.prob[start:stop].float()
        prob = prob / prob.sum(dim=1, keepdim=True).clamp_min(1.0)
        top = self.top[start:stop].long()
        terms = torch.cat((table[top] * prob[..., None], prob[..., None]), dim=-1).movedim(-1, 2)  # (n, k, 3, h, w)
        group = _hu_group_of(self.classes)[top][:, :, None].expand_as(terms)
        out = terms.new_zeros((terms.shape[0], len(HU_GROUPS), *terms.shape[2:]))
        return out.scatter_add_(1, group, terms)

    def network_pixel(self, y, x):
        """The network pixel (row, column) that covers CT voxel column (y, x); integers or index tensors."""
        (top, _), (left, _) = self.pad
        return (y + top) // self.factor, (x + left) // self.factor

    def hu_groups(self, hu: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """What weighs each voxel's `HU_GROUPS` (`hu_group_weights`), for ``hu``, the (n, Y, X) float HU of the slices
        from ``start``, on its device: the voxel's HU, raised to `MARROW_GROUP_HU` in the marrow, and bool where the
        bone gives way (`enclosure_masks`). Only the packed bits are unpacked on the CPU."""
        if self.enclosure is None:
            return hu, torch.zeros(hu.shape, dtype=torch.bool, device=hu.device)
        bits = np.unpackbits(self.enclosure[:, start : start + hu.shape[0]], axis=-1, count=hu.shape[-1])
        marrow, no_bone = (torch.from_numpy(b).to(hu.device) for b in bits.view(bool))
        return torch.where(marrow, hu.clamp(min=MARROW_GROUP_HU), hu), no_bone

    def class_at(self, z: int, y: int, x: int, hu: float) -> tuple[str, float]:
        """The most probable colour class at CT voxel (z, y, x) of HU ``hu`` and its probability in the network pixel
        (the classes re-weighted by the HU as in the composition: `HU_GROUPS`, `hu_groups`)."""
        row, col = self.network_pixel(y, x)
        top, prob = self.top[z, :, row, col].long(), self.prob[z, :, row, col].float()
        marrow, no_bone = (0, 0) if self.enclosure is None else self.enclosure[:, z, y, x // 8] >> (7 - x % 8) & 1
        hu = max(float(hu), MARROW_GROUP_HU) if marrow else float(hu)
        fit = hu_group_weights(torch.tensor(hu), torch.tensor(bool(no_bone)), self.blood_fade_hu)
        fit = fit[_hu_group_of(self.classes)[top]]
        best = int((prob * fit).argmax())
        return self.classes[int(top[best])], float(prob[best]) / 255.0

    def most_probable(self, hu: np.ndarray) -> np.ndarray:
        """(Z, Y, X) uint8 label map on the CT grid of ``hu`` (the CT's HU): 1 + the index of each voxel's most probable
        class, 0 where it is air (nothing to show).

        Most probable given the voxel's HU: the kept classes of its network pixel re-weighted by the `HU_GROUPS`
        weights of its HU (`hu_groups`: the marrow's raised), as the composition colours it, so that a thin rib's
        cortex in a pixel the network mostly called muscle is named bone. At or below `_PLAIN_FADE_HU`'s start every
        weight is 1: the pixel's most probable class.
        """
        rows, cols = self.network_pixel(torch.arange(hu.shape[1]), torch.arange(hu.shape[2]))
        group_of = _hu_group_of(self.classes)
        air = self.classes.index("air") if "air" in self.classes else -1
        out = np.empty(hu.shape, dtype=np.uint8)
        for start in range(0, hu.shape[0], _LABEL_CHUNK):
            stop = min(hu.shape[0], start + _LABEL_CHUNK)
            top = self.top[start:stop].index_select(2, rows).index_select(3, cols).long()  # (n, k, Y, X)
            prob = self.prob[start:stop].index_select(2, rows).index_select(3, cols).float()
            chunk = torch.from_numpy(np.nan_to_num(np.asarray(hu[start:stop], dtype=np.float32)))
            fit = hu_group_weights(*self.hu_groups(chunk, start), self.blood_fade_hu)
            score = prob * fit.movedim(-1, 1).gather(1, group_of[top])
            best = top.gather(1, score.argmax(dim=1, keepdim=True))[:, 0]  # the first of equal scores: the likelier
            labels = (best + 1).to(torch.uint8)
            labels[best == air] = 0
            out[start:stop] = labels.numpy()
        return out

    def first_class(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(Z, len(rows), len(cols)) uint8: the most probable class (an index into `classes`) of the network pixel
        that covers each CT voxel column (row, col)."""
        r, c = self.network_pixel(torch.as_tensor(rows), torch.as_tensor(cols))
        return self.top[:, 0].index_select(1, r).index_select(2, c).numpy()

    def enhanced_blood_hu(self, hu: np.ndarray, spacing: tuple[float, float, float]) -> float | None:
        """The median `named_blood_hu` when the blood is contrast-enhanced (at least `ENHANCED_HU`), else None."""
        median = self.named_blood_hu(hu, spacing)
        return median if median is not None and median >= ENHANCED_HU else None

    def named_blood_hu(
        self, hu: np.ndarray, spacing: tuple[float, float, float], percentile: float = 50.0
    ) -> float | None:
        """A ``percentile`` (the median by default) of the HU of the blood the network names (the pixels whose most
        probable class is the heart or a named vessel, read at each pixel's centre in the CT ``hu``) when it names at
        least `ENHANCED_MIN_ML`; else None."""
        named = [k for k, name in enumerate(self.classes) if _anatomy.family(name) == "contrast_blood"]
        named = [k for k in named if self.classes[k] != "contrast_blood"]  # the tissue class is named by HU
        (top, _), (left, _) = self.pad
        rows = np.arange((self.factor // 2 - top) % self.factor, hu.shape[1], self.factor)  # the pixels' centres
        cols = np.arange((self.factor // 2 - left) % self.factor, hu.shape[2], self.factor)
        blood = np.isin(self.first_class(rows, cols), named)
        if blood.sum() * float(np.prod(spacing)) * self.factor**2 / 1000.0 < ENHANCED_MIN_ML:
            return None
        return float(np.percentile(np.asarray(hu)[:, rows][:, :, cols][blood], percentile))

    def class_shares(self) -> dict[str, float]:
        """Share of network pixels whose most probable class is each class (classes that win somewhere only)."""
        counts = torch.bincount(self.top[:, 0].flatten().long(), minlength=len(self.classes)).double()
        shares = counts / counts.sum()
        return {self.classes[i]: float(shares[i]) for i in torch.nonzero(counts).flatten().tolist()}


@dataclass
class Colorized(ColorVolume):
    """The `ColorVolume` the colorize engine returns: the rgb plus the `Chroma` it was composed from, which names the
    class of each voxel (``ctcolor colorize --classes``, the widget's pointer) and lets a front end recompose it with
    another window, palette or strength without the network. A ColorVolume read from a file has no chroma."""

    chroma: Chroma | None = field(default=None, repr=False, compare=False)


@functools.lru_cache(maxsize=16)
def _class_table(palette: Palette, classes: tuple[str, ...]) -> torch.Tensor:
    """(K, 2) a*, b* of the classes under the palette, computed once per palette (not per slice chunk)."""
    return torch.from_numpy(palette.class_ab(classes))


@functools.lru_cache(maxsize=16)
def _hu_group_of(classes: tuple[str, ...]) -> torch.Tensor:
    """(K,) index into `HU_GROUPS` of each class: by its tissue family (`anatomy.family`), plain tissue by name."""
    group = {"bone": 0, "contrast_blood": 1}
    return torch.tensor([3 if name.startswith(_PLAIN) else group.get(_anatomy.family(name), 2) for name in classes])


#: Slices per chunk of `Chroma.most_probable` (its full-resolution class and probability temporaries).
_LABEL_CHUNK = 8
#: Classes kept per network pixel (`Chroma`).
TOP_K = 4
#: Range (HU) of the guided upsampling's weights: a network pixel whose mean HU differs from a CT voxel's by this
#: much counts exp(-1/2) as much. A boundary pixel half liver (60 HU), half fat (-100 HU) averages -20 HU: for a
#: liver voxel beside it, that pixel counts 7 % of a pure liver pixel; noise of 15-20 HU barely moves the weights.
GUIDE_SIGMA_HU = 35.0
#: Spatial reach of the guided upsampling in network pixels (Gaussian sigma over the 3 x 3 neighbourhood).
_GUIDE_SIGMA_PIXELS = 0.7
#: The guide's HU are clipped to this range: differences within dense bone or metal need not stop colour.
_GUIDE_CLIP_HU = (-1000.0, 1000.0)
#: No colour below -900 HU (air), full colour from -880 HU: aerated lung parenchyma sits at -850 to -900 HU.
AIR_HU, _AIR_FADE_HU = -900.0, 20.0


#: A network pixel (3.5 mm) mixes the classes of what it holds: a rib's thin cortex with the muscle around it, a
#: vertebra's rim with the vessel beside it; its colour lands between them (thin bone came out salmon, not ivory). Each
#: voxel therefore re-weights its network pixels' classes by whether its own HU fits their group: bone at any HU;
#: contrast-filled blood up to `_BLOOD_FADE_HU`, or up to what this scan's own blood shows (`blood_fade`: a CT
#: angiography's aorta and heart reach 500-700 HU, where cortical bone lies too, and there the network's probabilities
#: choose, not the HU); organs (liver, spleen, kidney, bowel, ...: an enhancing kidney cortex reaches 150-250 HU) up to
#: `_ORGAN_FADE_HU`; plain tissue (`_PLAIN`: muscle, fat, soft tissue, spinal cord, lung, air) up to `_PLAIN_FADE_HU`:
#: skeletal muscle is 40-60 HU and about 80 enhanced, so a 150 HU voxel in a pixel of vertebra and psoas is the
#: vertebra's cancellous bone. The weight falls linearly from the first HU to `_GROUP_FLOOR` at the second; a voxel that
#: fits none of its pixels' groups keeps their mix. At or below `_PLAIN_FADE_HU[0]` every weight is 1: the network's mix
#: is kept exactly (an osteoporotic vertebra's marrow or an enhancing kidney beside a rib keep the colour the network
#: gave them).
HU_GROUPS = ("bone", "blood", "organ", "plain")
_PLAIN = ("air", "lung", "fat", "soft_tissue", "spinal_cord", "autochthon", "iliopsoas", "gluteus_")
_PLAIN_FADE_HU = (110.0, 210.0)
_ORGAN_FADE_HU = (200.0, 300.0)
_BLOOD_FADE_HU = (400.0, 600.0)
#: Blood may be as bright as the brightest blood the network names in this scan (`Chroma.named_blood_hu`, its
#: `BLOOD_PERCENTILE`: the arteries of an arterial phase, not its less enhanced veins) plus `BLOOD_FADE_ABOVE_HU`: its
#: fade starts there (between `BLOOD_FADE_MIN_HU` and `BLOOD_FADE_MAX_HU`) and ends `_BLOOD_FADE_HU`'s width higher;
#: `_BLOOD_FADE_HU` when the network names too little blood to tell. Unenhanced blood is 30-60 HU, so in a
#: non-contrast scan a 300-600 HU voxel is bone whatever its pixel's mix (the shipped model, unsure between the hips
#: and the iliac vessels beside them, named 26 % of the non-contrast 3 mm patient's dense pelvic voxels contrast blood
#: with a fixed 400-600 HU fade); a CTA whose aorta is at 600 HU keeps blood up to about 700. With the median instead
#: of the 90th percentile, the aorta of the 600 HU exams was named bone on 56-72 % of its voxels (the veins' 60-120 HU
#: pulled the median down). Checked on the exam rows of the model cards (`training.exams`: each labelled patient's
#: blood at 40-600 HU) and on the unlabelled chest CT's blood pool at 300-600 HU (2026-11-26).
BLOOD_PERCENTILE, BLOOD_FADE_ABOVE_HU, BLOOD_FADE_MIN_HU, BLOOD_FADE_MAX_HU = 90.0, 100.0, 240.0, 800.0


def blood_fade(named_hu: float | None) -> tuple[float, float]:
    """The HU over which contrast blood's weight falls (`HU_GROUPS`), given the `BLOOD_PERCENTILE` of the HU of the
    scan's named blood (`Chroma.named_blood_hu`; None: too little named to tell)."""
    if named_hu is None:
        return _BLOOD_FADE_HU
    low = min(max(named_hu + BLOOD_FADE_ABOVE_HU, BLOOD_FADE_MIN_HU), BLOOD_FADE_MAX_HU)
    return (low, low + _BLOOD_FADE_HU[1] - _BLOOD_FADE_HU[0])


_GROUP_FLOOR = 1e-3


#: Marrow: cancellous bone and marrow (a vertebral body at 80-190 HU, a rib's at 30-250) lie in the HU of muscle,
#: organs and enhanced blood, so a voxel's own HU cannot tell them apart, and its 3.5 mm network pixel often holds
#: the muscle or liver beside a thin bone as well; conversely an unenhanced aorta (30-60 HU) beside a vertebra shares
#: pixels with it. What tells them apart is that bone's cortex encloses its marrow (`enclosure_masks`), in the
#: voxel's axial slice, within a hole no larger than `MARROW_MAX_MM2` (a lumbar vertebral body is 1200-1800 mm²; the
#: pelvic ring and the thoracic cage enclose far more):
#: - From `MARROW_MIN_HU` up, a voxel in a hole of the mask HU >= `CORTEX_HU`, less its pieces that nowhere reach
#:   `CORTEX_PEAK_HU`, whose network pixel keeps a bone class, is marrow, and so is the partial-volumed cortex around
#:   it (up to `MARROW_GROUP_HU`: the pieces that border such a hole): their `HU_GROUPS` are weighed as at
#:   `MARROW_GROUP_HU`, so plain tissue and organs give way to the bone, and contrast blood keeps its weight (an
#:   aneurysm's thrombus inside a calcified wall stays aorta). An enhancing kidney's cortex (150-300 HU) encloses its
#:   medulla but peaks below bone's compact cortex: a portal-venous phantom's kidney lost 0.24 of its voxels to bone
#:   with the cortex rule and no peak, none with a peak of 300 to 600 HU.
#: - Below `MARROW_MIN_HU` (where the spinal canal's cord and fluid, fat and unenhanced blood lie), bone is named only
#:   inside a rim of at least `RIM_HU`, which a coarse grid's partial-volumed cortex still reaches (fatty marrow in a
#:   long bone, an osteoporotic vertebral body); elsewhere the bone group gives way. In a small bony hole, fatty
#:   marrow is marrow (`FATTY_MARROW_HU`).
#: Measured with the leave-one-out models on their held-out patients (issue 24, 2026-11-25; named right or tissue):
#: on the DICOM patient, vertebrae / ribs 0.886 / 0.723 before, the marrow's cortex at 200 HU 0.912 / 0.763, at
#: 150 HU 0.935 / 0.794, at 100 HU 0.910 / 0.757, and with the cortex around the marrow 0.945 / 0.843 (peak 600 HU:
#: ribs 0.832); closing the cortex's gaps first gained little for ribs (0.817 at 200 HU) and cost 5 ms per 512²
#: slice; raising the marrow to 600 HU (blood giving way too) named aorta beside the spine bone (aorta 0.970 ->
#: 0.957). On the 3 mm patient (3 mm voxels: 46 % of its vertebrae's voxels below 150 HU lie in no hole of the
#: 150 HU mask), the unenhanced aorta 0.843 -> 0.968 with the rim rule (rim 100, 120 and 150 HU alike), its
#: vertebrae 0.980 -> 0.968 (rim 150 HU: 0.948; the rule from 40 HU: aorta 0.887).
CORTEX_HU, RIM_HU, MARROW_MIN_HU, MARROW_MAX_MM2, MARROW_GROUP_HU = 150.0, 100.0, 60.0, 2500.0, 300.0
CORTEX_PEAK_HU = 400.0
#: A rib's marrow is often fatty, below `MARROW_MIN_HU`, where the spinal canal's cord and fluid lie too; a rib's
#: marrow cavity in one slice is a few tens of mm², the canal's 150-300 mm². So in a bony hole of at most
#: `SMALL_MARROW_MM2`, marrow counts from `FATTY_MARROW_HU` up: the held-out DICOM patient's ribs 0.843 -> 0.892 named
#: right or tissue (holes up to 200 mm² alike; from -30 HU 0.890, from 0 HU 0.883), its spinal cord named bone on
#: 3.1 % of its voxels before and after (holes up to 300 mm² alike), every other class row unchanged.
FATTY_MARROW_HU, SMALL_MARROW_MM2 = -100.0, 100.0


def _box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding box of a (Y, X) ``mask`` and a one-voxel margin, None if it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2)


def _holes(dense: np.ndarray, pixel_mm2: float) -> np.ndarray:
    """(Y, X) float32: the area in mm² of the hole of one slice's ``dense`` mask that holds each voxel, 0 outside
    the holes no larger than `MARROW_MAX_MM2`: the connected components of the rest that do not touch the slice's
    edge (`scipy.ndimage.label`: a third of the time of ``binary_fill_holes``, and their areas come with it). Only
    the mask's bounding box and a one-voxel margin are labelled: everything outside it is one component open to the
    edge, so the holes are the same."""
    from scipy import ndimage

    out = np.zeros(dense.shape, dtype=np.float32)
    box = _box(dense)
    if box is None:
        return out
    parts, count = ndimage.label(~dense[box])
    area = (np.bincount(parts.ravel(), minlength=count + 1) * pixel_mm2).astype(np.float32)
    area[area > MARROW_MAX_MM2] = 0.0
    area[0] = 0.0  # the mask itself
    area[np.concatenate((parts[0], parts[-1], parts[:, 0], parts[:, -1]))] = 0.0  # open to the edge
    out[box] = area[parts]
    return out


def _bony_enclosure(hu: np.ndarray, pixel_mm2: float) -> tuple[np.ndarray, np.ndarray]:
    """``(holes, rims)`` of one slice's HU: (Y, X) float32 the area of the hole (`_holes`) of the bony part of the
    mask HU >= `CORTEX_HU` (its 8-connected pieces that reach `CORTEX_PEAK_HU`: an enhancing kidney's cortex, which
    encloses its medulla, does not) that holds each voxel, 0 outside them, and (Y, X) bool those pieces that border a
    hole: the cortex around a marrow."""
    from scipy import ndimage

    holes, rims = np.zeros(hu.shape, dtype=np.float32), np.zeros(hu.shape, dtype=bool)
    box = _box(hu >= CORTEX_HU)
    if box is None:
        return holes, rims
    part = hu[box]
    pieces, count = ndimage.label(part >= CORTEX_HU, structure=np.ones((3, 3), dtype=bool))
    peaked = np.zeros(count + 1, dtype=bool)
    peaked[pieces[part >= CORTEX_PEAK_HU]] = True
    peaked[0] = False
    holes[box] = _holes(peaked[pieces], pixel_mm2)
    inner = holes[box] > 0
    if inner.any():
        grown = inner.copy()  # the holes grown by their 4 neighbours (30x faster than ndimage.binary_dilation)
        grown[1:] |= inner[:-1]
        grown[:-1] |= inner[1:]
        grown[:, 1:] |= inner[:, :-1]
        grown[:, :-1] |= inner[:, 1:]
        borders = np.zeros(count + 1, dtype=bool)
        borders[pieces[grown]] = True  # a hole's 4-neighbours are all bony: only peaked pieces
        borders[0] = False
        rims[box] = borders[pieces]
    return holes, rims


def enclosure_masks(hu: np.ndarray, pixel_mm2: float, bone_pixel: np.ndarray) -> np.ndarray:
    """(2, Y, X) bool for one (Y, X) slice of HU (see `CORTEX_HU`): [0] marrow (fatty too in a hole of at most
    `SMALL_MARROW_MM2`) and the cortex around it, below `MARROW_GROUP_HU`, [1] below `MARROW_MIN_HU`, not marrow and
    inside no rim of bone; ``pixel_mm2`` the area of one CT pixel, ``bone_pixel`` (Y, X) whether each voxel's network
    pixel keeps a bone class (elsewhere neither applies: the HU weights would not change)."""
    out = np.zeros((2, *hu.shape), dtype=bool)
    marrow = bone_pixel & (hu >= MARROW_MIN_HU) & (hu < MARROW_GROUP_HU)
    fatty = bone_pixel & (hu >= FATTY_MARROW_HU) & (hu < MARROW_MIN_HU)
    if marrow.any() or fatty.any():
        holes, rims = _bony_enclosure(hu, pixel_mm2)
        enclosed = holes > 0
        out[0] = marrow & (enclosed | rims) | fatty & enclosed & (holes <= SMALL_MARROW_MM2)
    low = bone_pixel & (hu < MARROW_MIN_HU) & ~out[0]
    if low.any():
        out[1] = low & (_holes(hu >= RIM_HU, pixel_mm2) == 0)
    return out


def hu_group_weights(
    hu: torch.Tensor, no_bone: torch.Tensor | None = None, blood: tuple[float, float] = _BLOOD_FADE_HU
) -> torch.Tensor:
    """(..., 4) weights of the `HU_GROUPS` for voxels of HU ``hu`` (...); bone's is 1, or the floor where ``no_bone``
    (bool, as ``hu``: `Chroma.hu_groups`); blood's falls over ``blood`` (`Chroma.blood_fade_hu`)."""

    def falling(low: float, high: float) -> torch.Tensor:
        return ((high - hu) / (high - low)).clamp(0.0, 1.0) * (1.0 - _GROUP_FLOOR) + _GROUP_FLOOR

    bone = torch.ones_like(hu) if no_bone is None else 1.0 - no_bone.to(hu.dtype) * (1.0 - _GROUP_FLOOR)
    fits = (bone, falling(*blood), falling(*_ORGAN_FADE_HU), falling(*_PLAIN_FADE_HU))
    return torch.stack(fits, dim=-1)


def _compact(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, K, h, w) probabilities -> the `TOP_K` (uint8 indices, uint8 probabilities x 255), renormalised."""
    values, indices = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
    return indices.to(torch.uint8), _quantise(values)


def _quantise(values: torch.Tensor) -> torch.Tensor:
    """(n, k, h, w) probabilities -> uint8 x 255, renormalised over k."""
    values = values / values.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return (values * 255.0).round_().to(torch.uint8)


def get_colorizer(model: str | os.PathLike | Colorizer = COLORIZER_DEFAULT) -> tuple[Colorizer, dict[str, Any]]:
    """A colorizer and its card, by shipped name or file (cached), or a model object passed through."""
    if isinstance(model, Colorizer):
        return model.eval(), {"name": "custom"}
    key = str(model)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_colorizer(model)
    return _MODEL_CACHE[key]


def _network_padding(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) full-resolution padding: a multiple of ``multiple`` (the reduction factor times the U-Net's
    total stride) and at least two of them, so that the U-Net's deepest level keeps 2 x 2 pixels for its
    instance norm (a one-pixel level has no statistics)."""
    total = max(-(-size // multiple) * multiple, 2 * multiple) - size
    return total // 2, total - total // 2


#: Finer pixels than this are not CT (clinical CT: 0.2 mm and up): a wrong spacing in the file's header.
MIN_PIXEL_MM = 0.05


def _check_volume(volume: Volume) -> None:
    if volume.array.dtype.kind not in "iuf":
        raise InputError(f"cannot colorize an array of type {volume.array.dtype}")


def _hu_slices(volume: Volume, start: int, stop: int) -> np.ndarray:
    """float32 HU of slices [start, stop); NaN (unreconstructed voxels in some NIfTI) becomes air, +-inf clips."""
    hu = np.asarray(volume.array[start:stop], dtype=np.float32)
    if volume.array.dtype.kind == "f":
        np.nan_to_num(hu, copy=False, nan=_AIR_HU, posinf=np.finfo(np.float32).max, neginf=_AIR_HU)
    return hu


def _spatial_weights(
    factor: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """(3, factor) distance weights of the network pixels at offsets -1, 0, +1 from the pixel that holds a voxel,
    for each position of the voxel inside its pixel (Gaussian, `_GUIDE_SIGMA_PIXELS`, in network pixels)."""
    inside = (torch.arange(factor, dtype=dtype, device=device) + 0.5) / factor - 0.5
    offsets = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype, device=device)[:, None]
    return torch.exp(-0.5 * ((offsets - inside) / _GUIDE_SIGMA_PIXELS) ** 2)


def guided_upsample(
    ab: torch.Tensor,
    guide: torch.Tensor,
    factor: int,
    groups: torch.Tensor | None = None,
    group_hu: torch.Tensor | None = None,
    no_bone: torch.Tensor | None = None,
    blood_fade_hu: tuple[float, float] = _BLOOD_FADE_HU,
) -> torch.Tensor:
    """Joint bilateral upsampling (Kopf et al., SIGGRAPH 2007) of a*, b* by an integer factor, guided by HU.

    Each full-resolution voxel takes the a*, b* of the 3 x 3 network pixels around it, weighted by distance
    (Gaussian, `_GUIDE_SIGMA_PIXELS`) and by how close each pixel's mean HU is to the voxel's own HU (Gaussian,
    `GUIDE_SIGMA_HU`). A fat voxel beside the liver takes the colour of the fat pixels near it, not that of the
    boundary pixel, whose colour (like its HU) is a blend; so colour stops at the boundary instead of bleeding 3.5 mm
    across it. In uniform tissue it is a smooth spatial interpolation. With ``groups``, each pixel's classes are also
    re-weighted by the voxel's HU (`HU_GROUPS`, `hu_group_weights`): within a pixel, dense voxels take the bone's
    colour rather than the mix.

    Written here because neither MONAI nor kornia upsamples guided by another image (kornia's joint bilateral blur
    works at one resolution, where the low-resolution colour has already spread across the boundary). The voxels
    are handled as factor x factor blocks of their network pixel, so every neighbour is a shifted network-resolution
    array broadcast over the block, never gathered at full resolution.

    Args:
        ab: (n, 2, h, w) a*, b* at the network's resolution.
        guide: (n, h * factor, w * factor) HU at full resolution (padded as the network's input was).
        factor: in-plane reduction factor of the network.
        groups: optional (n, 4, 3, h, w) `Chroma.ab_groups` of the same pixels (``ab`` is their sum).
        group_hu, no_bone: with ``groups``, optional (n, h * factor, w * factor) HU and bool that weigh them
            (`Chroma.hu_groups`); default ``guide`` and none.
        blood_fade_hu: where contrast blood's weight falls (`Chroma.blood_fade_hu`).

    Returns:
        (n, 2, h * factor, w * factor) a*, b*.
    """
    n, _, h, w = ab.shape
    if factor == 1 and groups is None:
        return ab
    # (n, factor, factor, h, w): voxel (i, j) of every block, so the inner loops run along whole network rows.
    raw = guide.reshape(n, h, factor, w, factor).permute(0, 2, 4, 1, 3).contiguous()
    blocks = raw.clamp(*_GUIDE_CLIP_HU)
    guide_low = blocks.mean(dim=(1, 2))
    # Neighbours by shifting the edge-padded network-resolution arrays (the edges clamp).
    guide_pad = F.pad(guide_low[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    if groups is None:
        ab_pad = F.pad(ab, (1, 1, 1, 1), mode="replicate")
    else:
        groups_pad = F.pad(groups.flatten(1, 2), (1, 1, 1, 1), mode="replicate").unflatten(1, groups.shape[1:3])

        def blocked(a: torch.Tensor) -> torch.Tensor:
            return a.reshape(n, h, factor, w, factor).permute(0, 2, 4, 1, 3)

        fit = hu_group_weights(
            raw if group_hu is None else blocked(group_hu),
            None if no_bone is None else blocked(no_bone),
            blood_fade_hu,
        ).movedim(-1, 1)[:, :, None]  # (n, G, 1, factor, factor, h, w)
    if factor > 1:
        spatial = _spatial_weights(factor, ab.dtype, ab.device)
    else:  # no upsampling: the voxel's own network pixel only
        spatial = torch.tensor([[0.0], [1.0], [0.0]], dtype=ab.dtype, device=ab.device)
    scale = -0.5 / GUIDE_SIGMA_HU**2
    total = torch.zeros((n, 2, factor, factor, h, w), dtype=ab.dtype, device=ab.device)
    weight_sum = torch.zeros_like(blocks)
    for dy in range(3):
        for dx in range(3):
            near = guide_pad[:, None, None, dy : dy + h, dx : dx + w]
            # A small floor keeps a voxel unlike all nine pixels (a thin vessel) defined: then it is spatial only.
            weight = (blocks - near).square_().mul_(scale).exp_().add_(1e-4)
            weight.mul_((spatial[dy][:, None] * spatial[dx][None, :])[:, :, None, None])
            if groups is None:
                total.addcmul_(ab_pad[:, :, None, None, dy : dy + h, dx : dx + w], weight[:, None])
                weight_sum += weight
            else:  # (a*·p, b*·p, p) of the groups that fit the voxel's HU
                fitted = (groups_pad[:, :, :, None, None, dy : dy + h, dx : dx + w] * fit).sum(dim=1)
                total.addcmul_(fitted[:, :2], weight[:, None])
                weight_sum.addcmul_(fitted[:, 2], weight)
    total /= weight_sum[:, None]
    return total.permute(0, 1, 4, 2, 5, 3).reshape(n, 2, h * factor, w * factor)


def upsample_chroma(chroma: Chroma, palette: Palette, hu: torch.Tensor, start: int) -> torch.Tensor:
    """a*, b* of the slices whose HU are ``hu`` (n, Y, X), starting at slice ``start``, at full resolution.

    The palette's a*, b* at the network's resolution, upsampled guided by ``hu`` and re-weighted by it
    (`guided_upsample` with the `HU_GROUPS`), faded to none where HU < `AIR_HU`. Returns (n, Y, X, 2) float32 on
    ``hu``'s device.
    """
    (top, bottom), (left, right) = chroma.pad
    height, width = hu.shape[-2:]
    stop = start + hu.shape[0]
    groups = chroma.ab_groups(palette, start, stop).to(hu.device)
    ab = groups[:, :, :2].sum(dim=1)
    guide = F.pad(hu[:, None], (left, right, top, bottom), mode="replicate")[:, 0]
    group_hu, no_bone = (
        F.pad(a.to(hu.dtype)[:, None], (left, right, top, bottom), mode="replicate")[:, 0]
        for a in chroma.hu_groups(hu, start)
    )
    ab = guided_upsample(ab, guide, chroma.factor, groups, group_hu, no_bone > 0.5, chroma.blood_fade_hu)
    ab = ab[:, :, top : top + height, left : left + width]
    air = ((hu - AIR_HU) / _AIR_FADE_HU).clamp_(0.0, 1.0)
    return (ab * air[:, None]).movedim(1, -1)


def _upsample_compose_cpu(
    chroma: Chroma, palette: Palette, hu: torch.Tensor, start: int, win: Window, strength: float, out: np.ndarray
) -> None:
    """`upsample_chroma` and `compose_rgb` of the slices whose HU are ``hu`` (n, Y, X, CPU) in one pass per voxel
    (`fused.upsample_compose`), written into ``out`` (n, Y, X, 3) uint8. Only the network-resolution inputs are made
    here, edge-padded by one pixel: the palette's a*, b* and its `HU_GROUPS` terms (`fused.class_terms`), and each
    network pixel's mean clipped HU."""
    from .fused import class_terms, upsample_compose

    (top, bottom), (left, right) = chroma.pad
    factor = chroma.factor
    stop = start + hu.shape[0]
    threads = cpu_threads()
    table = _class_table(palette, chroma.classes).numpy()
    group_of = _hu_group_of(chroma.classes).numpy()
    ab_pad, groups_pad = class_terms(
        chroma.top[start:stop].numpy(), chroma.prob[start:stop].numpy(), table, group_of, threads
    )
    guide = F.pad(hu[:, None].clamp(*_GUIDE_CLIP_HU), (left, right, top, bottom), mode="replicate")
    guide_low = F.avg_pool2d(guide, factor) if factor > 1 else guide
    if factor > 1:
        spatial = _spatial_weights(factor)
    else:  # no upsampling: the voxel's own network pixel only, as `guided_upsample` returns a*, b* unchanged
        spatial = torch.tensor([[0.0], [1.0], [0.0]])
    upsample_compose(
        hu.numpy(),
        None if chroma.enclosure is None else chroma.enclosure[:, start:stop],
        MARROW_GROUP_HU,
        ab_pad,
        groups_pad,
        (*_PLAIN_FADE_HU, *_ORGAN_FADE_HU, *chroma.blood_fade_hu, _GROUP_FLOOR),
        F.pad(guide_low, (1, 1, 1, 1), mode="replicate")[:, 0].numpy(),
        spatial.numpy(),
        (top, left),
        factor,
        GUIDE_SIGMA_HU,
        _GUIDE_CLIP_HU,
        (AIR_HU, _AIR_FADE_HU),
        (win.centre, win.width),
        strength,
        out,
        threads,
    )


@contextlib.contextmanager
def _inference(device: torch.device, bf16: bool | None = None) -> Iterator[None]:
    """No autograd, and bf16 autocast on CUDA and on CPUs where it is faster (`cpu_bf16`): the network's chroma
    needs no more precision; luminance never passes through the network.

    Entered around each step, never across a ``yield``: grad mode and autocast are thread-local state, and a
    generator that is abandoned mid-way (worker.quit()) would otherwise leave them set or unwind them in another
    thread.
    """
    if device.type == "cuda":
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        enabled = device.type == "cpu" and (cpu_bf16() if bf16 is None else bf16)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)
    with torch.inference_mode(), autocast:
        yield


def iter_predict_chroma(
    volume: Volume,
    model: str | os.PathLike | Colorizer = COLORIZER_DEFAULT,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    anatomy: bool = True,
    bf16: bool | None = None,
) -> Steps[Chroma]:
    """Run the colorizer on a CT volume (HU): its a*, b* at the network's resolution, as a `Chroma` made anatomically
    consistent by `anatomy` (``anatomy=False`` keeps the network's own probabilities).

    A generator of ``(done, Z)`` steps: a 2D model advances ``batch_size`` slices per step, a 3D model
    ``batch_size // 4`` sliding-window patches per step, reported as the matching fraction of Z. Nothing runs until
    the first ``next()``. `predict_chroma` runs it to the end, calling ``progress(done, Z)`` after each step and
    polling ``cancel()`` before each (`Cancelled`). ``bf16``: None runs the CPU network in bfloat16 where that is
    faster on this CPU (`cpu_bf16`), False in float32, True in bfloat16.
    """
    _check_volume(volume)
    net, card = get_colorizer(model)
    config = net.config
    device = resolve_device(device)
    if device.type != "cpu":  # a copy: the cached (or caller's) model stays on the CPU for other callers
        net = copy.deepcopy(net).to(device)
    if device.type == "cuda" and config.dims == 2:  # channels_last exists for 4D tensors only
        net = net.to(memory_format=torch.channels_last)
    pixel_mm = float(np.mean(volume.spacing[1:]))
    if pixel_mm < MIN_PIXEL_MM:  # the network's grid is padded to multiples of chroma_mm / pixel_mm pixels
        raise InputError(
            f"{volume.meta.get('source') or 'the image'}: pixels of {pixel_mm:.3g} mm are finer than any CT's "
            f"(at least {MIN_PIXEL_MM} mm); check its voxel spacing"
        )
    factor = config.factor_for(pixel_mm)
    multiple = factor * config.net_multiple
    z, height, width = volume.shape
    pad = (_network_padding(height, multiple), _network_padding(width, multiple))
    # CPU, 2D: 8 slices per batch were faster than 16 (13.8 against 17.8 ms per 512² slice, cache) and keep the
    # network's temporaries smaller; 3D: 16, i.e. 4 patches per step.
    batch = (64 if device.type == "cuda" else 8 if config.dims == 2 else 16) if batch_size is None else batch_size
    if batch < 1:
        raise InputError(f"batch size must be >= 1, got {batch}")

    def small_slices(start: int, stop: int) -> torch.Tensor:
        """(n, h, w) HU of slices [start, stop), padded (edge values) and area-reduced on the device."""
        hu = torch.from_numpy(_hu_slices(volume, start, stop)).to(device)
        hu = F.pad(hu[:, None], (*pad[1], *pad[0]), mode="replicate")[:, 0]
        return downsample_hu(hu, factor)

    low = ((height + sum(pad[0])) // factor, (width + sum(pad[1])) // factor)
    k = min(TOP_K, len(config.classes))
    top = torch.empty((z, k, *low), dtype=torch.uint8)
    prob = torch.empty((z, k, *low), dtype=torch.uint8)
    small_hu = torch.empty((z, *low), dtype=torch.float32)  # for the anatomy step (`_make_consistent`)
    if config.dims == 2:
        view = AxialView.of(volume) if config.canonical else AxialView()
        neighbours = context_indices(z, config.context)
        if view.reverse_z:  # each slice's neighbours in inferior-to-superior order, as the network saw them
            neighbours = neighbours.flip(1)

        def predict_batch(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(class indices, probabilities, small HU) of slices [start, stop) on the CPU. A function, so that the
            batch's tensors (the logits: 20 MB for 8 slices of 512²) are freed when it returns, not kept in the
            generator's frame through the anatomy step and past the hand-back of free memory below."""
            lo, hi = int(neighbours[start:stop].min()), int(neighbours[start:stop].max()) + 1
            with _inference(device, bf16):
                small = small_slices(lo, hi)
                x = view.to_view(prepare_input(small[neighbours[start:stop] - lo], config))
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                logits = view.from_view(net(x))
                if device.type == "cpu":  # one numba pass from the logits (`fused.top_classes`), bfloat16 as its bits
                    bits = logits.view(torch.int16).numpy().view(np.uint16) if logits.dtype == torch.bfloat16 else None
                    found = top_classes(logits.float().numpy() if bits is None else bits, k, torch.get_num_threads())
                    indices, values = torch.from_numpy(found[0]), torch.from_numpy(found[1])
                else:
                    indices, values = _compact(logits.float().softmax(dim=1))
                return indices.cpu(), values.cpu(), small[start - lo : stop - lo].float().cpu()

        for start in range(0, z, batch):
            stop = min(z, start + batch)
            top[start:stop], prob[start:stop], small_hu[start:stop] = predict_batch(start, stop)
            yield stop, z
    else:
        view = AxialView.of(volume) if config.canonical else AxialView()
        with _inference(device, bf16):
            small = small_slices(0, z)
            small_hu[:] = small.float().cpu()
            x = view.volume_to_view(prepare_input(small[None], config))  # (1, windows, Z, h, w) in the view
        del small
        if view == AxialView():
            yield from _sliding_window_3d(net, x, max(1, batch // 4), top, prob, bf16)
        else:  # filled in the view's order, then moved back: (Z, k, h, w) uint8, a few MB
            top_view = torch.empty((z, k, *x.shape[-2:]), dtype=torch.uint8)
            prob_view = torch.empty_like(top_view)
            yield from _sliding_window_3d(net, x, max(1, batch // 4), top_view, prob_view, bf16)
            top[:] = view.volume_from_view(top_view.movedim(0, 1)).movedim(1, 0)
            prob[:] = view.volume_from_view(prob_view.movedim(0, 1)).movedim(1, 0)
        del x
    if anatomy:
        _make_consistent(top, prob, small_hu, config.classes, volume, factor)
    del small_hu
    if device.type == "cpu":  # the network's freed temporaries, before the compose phase allocates the RGB output
        release_free_memory()
    chroma = Chroma(top, prob, config.classes, factor, pad, str(card.get("name", "custom")))
    chroma.enclosure = _enclosure_bits(volume, chroma)
    chroma.blood_fade_hu = blood_fade(chroma.named_blood_hu(volume.array, volume.spacing, BLOOD_PERCENTILE))
    return chroma


def _enclosure_bits(volume: Volume, chroma: Chroma) -> np.ndarray:
    """`Chroma.enclosure` of ``volume``: `enclosure_masks` of each slice, packed along X. Slices run in
    `threads.cpu_threads` threads (``ndimage.label`` releases the GIL: 2.2 instead of 4.0 ms per 512² slice on 2
    cores)."""
    from concurrent.futures import ThreadPoolExecutor

    z, height, width = volume.shape
    rows, cols = (i.numpy() for i in chroma.network_pixel(torch.arange(height), torch.arange(width)))
    bone = (_hu_group_of(chroma.classes) == 0).numpy()
    top, prob = chroma.top.numpy(), chroma.prob.numpy()
    pixel_mm2 = float(volume.spacing[1] * volume.spacing[2])
    out = np.empty((2, z, height, -(-width // 8)), dtype=np.uint8)

    def one(k: int) -> None:
        kept = (bone[top[k]] & (prob[k] > 0)).any(axis=0)  # (h, w)
        masks = enclosure_masks(_hu_slices(volume, k, k + 1)[0], pixel_mm2, kept[rows][:, cols])
        out[:, k] = np.packbits(masks, axis=-1)

    with ThreadPoolExecutor(cpu_threads()) as pool:
        list(pool.map(one, range(z)))
    return out


#: Slices per chunk of the anatomy step.
_ANATOMY_CHUNK = 32


def _make_consistent(
    top: torch.Tensor, prob: torch.Tensor, small_hu: torch.Tensor, classes: tuple[str, ...], volume: Volume, factor: int
) -> None:
    """`anatomy`'s steps on the kept classes (`TOP_K` per pixel), in place, chunk by chunk: smoothed along z,
    restricted to the body region, named by tissue where unsure; air outside the body (`body.body_mask`: the table,
    which the network sees as tissue, gets no colour). The z smoothing reads each chunk's neighbours as the
    network gave them: the rows after the chunk are not yet rewritten, and the few before it were saved before the
    previous chunk rewrote them (a copy of the whole output would add a quarter of the int16 CT's size)."""
    spacing_z, pixel_y, pixel_x = volume.spacing
    pixel_mm2 = pixel_y * pixel_x * factor * factor  # one network pixel
    outside = None
    if "air" in classes:  # the table and anything else outside the body take no colour and no name
        outside = torch.from_numpy(~body_mask(small_hu.numpy(), (spacing_z, pixel_y * factor, pixel_x * factor)))
    superior = _anatomy.slice_superior_mm(volume.shape[0], spacing_z, volume.origin, volume.direction)
    body = ~outside.numpy() if outside is not None else None
    region = _anatomy.body_region(small_hu.numpy(), pixel_mm2, superior, body)
    allowed = region.allowed(classes) & _anatomy.above_pelvis(top, prob, classes, pixel_mm2, superior)
    if body is None:
        body = small_hu.numpy() > _anatomy.LUNG_HU[1]
    lateral = _anatomy.lateral_mm(body, (pixel_y * factor, pixel_x * factor), volume.direction)
    kernel = _anatomy.z_smoothing_kernel(spacing_z) if volume.shape[0] > 1 else None
    radius = 0 if kernel is None else len(kernel) // 2
    z = top.shape[0]
    saved_top, saved_prob = top[:0], prob[:0]  # the original rows just before the chunk (rewritten by the last one)
    for start in range(0, z, _ANATOMY_CHUNK):
        stop = min(z, start + _ANATOMY_CHUNK)
        lo, hi = max(0, start - radius), min(z, stop + radius)
        block_top, block_prob = torch.cat([saved_top, top[start:hi]]), torch.cat([saved_prob, prob[start:hi]])
        skip = None if outside is None else outside[start:stop]  # named air below: no work there
        if kernel is not None:  # the block's ends are the volume's ends or a whole radius away: its clamping is right
            chunk_prob = _anatomy.smooth_along_z(
                block_top, block_prob, small_hu[lo:hi], kernel, start - lo, stop - lo, skip
            )
        else:
            chunk_prob = block_prob[start - lo : stop - lo].float().div_(255.0)
        chunk_top, chunk_prob = _anatomy.consistent_top(
            block_top[start - lo : stop - lo],
            chunk_prob,
            small_hu[start:stop],
            classes,
            allowed[start:stop],
            skip,
            None if lateral is None else lateral[start:stop],
        )
        keep = slice(max(stop - radius, 0) - lo, stop - lo)
        saved_top, saved_prob = block_top[keep].clone(), block_prob[keep].clone()
        top[start:stop], prob[start:stop] = chunk_top.to(torch.uint8), _quantise(chunk_prob)
    _anatomy.keep_main_pieces(top, small_hu, classes, spacing_z * pixel_mm2 / 1000.0 if top.shape[0] > 1 else None)
    if outside is not None:
        top[:, 0][outside], prob[:, 0][outside] = classes.index("air"), 255
        prob[:, 1:].masked_fill_(outside[:, None], 0)


def _sliding_window_3d(
    net: Colorizer, x: torch.Tensor, patches_per_step: int, top: torch.Tensor, prob: torch.Tensor, bf16: bool | None
) -> Steps[None]:
    """MONAI's Gaussian-blended sliding window (as `monai.inferers.sliding_window_inference` with replicate padding),
    one step per batch of patches so that progress and cancellation work inside a volume.

    The volume is swept in slabs of `_ROI_3D` depth along z, each with half a patch of context on either side, and
    only a slab's own slices are kept (`_compact`, into ``top`` and ``prob``): blending all classes of a whole
    volume at once would take 4 bytes per class and pixel (1.5 GB for 600 slices of 512x512 and 39 classes).

    Args:
        x: (1, C, Z, h, w) network input on the device.
        top, prob: (Z, TOP_K, h, w) uint8 outputs, filled slab by slab.
    """
    from monai.data.utils import compute_importance_map, dense_patch_slices

    z = x.shape[2]
    depth, halo = _ROI_3D[0], _ROI_3D[0] // 2
    importance = compute_importance_map(_ROI_3D, mode="gaussian", sigma_scale=0.125, device=x.device)
    for slab_start in range(0, z, depth):
        slab_stop = min(z, slab_start + depth)
        lo, hi = max(0, slab_start - halo), min(z, slab_stop + halo)
        slab = x[:, :, lo:hi]
        size = slab.shape[2:]
        # Inputs smaller than the patch are padded (split as MONAI does); patch sides are multiples of the strides.
        pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(_ROI_3D, size, strict=True)]
        slab = F.pad(slab, [p for pair in reversed(pad) for p in pair], mode="replicate")
        padded = slab.shape[2:]
        interval = [r if r == s else max(int(r * (1 - _OVERLAP_3D)), 1) for r, s in zip(_ROI_3D, padded, strict=True)]
        patches = dense_patch_slices(padded, _ROI_3D, interval)
        total = torch.zeros((len(net.config.classes), *padded), dtype=torch.float32, device=x.device)
        weight = torch.zeros((1, *padded), dtype=torch.float32, device=x.device)
        for start in range(0, len(patches), patches_per_step):
            chunk = patches[start : start + patches_per_step]
            with _inference(x.device, bf16):
                pred = net(torch.cat([slab[(slice(None), slice(None), *p)] for p in chunk])).float().softmax(dim=1)
                for p, probs in zip(chunk, pred, strict=True):
                    total[(slice(None), *p)] += probs * importance
                    weight[(slice(None), *p)] += importance
            done = slab_start + (slab_stop - slab_start) * (start + len(chunk)) // len(patches)
            yield done, z
        keep = slice(pad[0][0] + slab_start - lo, pad[0][0] + slab_stop - lo)
        crop = (keep, *(slice(before, before + s) for (before, _), s in zip(pad[1:], size[1:], strict=True)))
        mean = (total / weight)[(slice(None), *crop)].movedim(1, 0)  # (slab slices, K, h, w)
        indices, values = _compact(mean)
        top[slab_start:slab_stop], prob[slab_start:slab_stop] = indices.cpu(), values.cpu()


predict_chroma = blocking(iter_predict_chroma)


def iter_compose_chroma(
    volume: Volume,
    chroma: Chroma,
    window_spec: str | Window | tuple[float, float] | None = None,
    strength: float = 1.0,
    device: str | torch.device = "auto",
    palette: str | os.PathLike | Palette = "anatomical",
) -> Steps[Colorized]:
    """sRGB uint8 (Z, Y, X, 3) from the CT's windowed grey (luminance, exact) and the colour classes' a*, b* under
    ``palette`` ("anatomical", "dicom", a CSV file or a `Palette`), as a `Colorized`.

    A generator of ``(done, Z)`` steps, one per chunk of slices; `compose_chroma` runs it to the end (``progress``,
    ``cancel`` as `predict_chroma`)."""
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"chroma strength must be in [0, 1], got {strength}")
    win = parse_window(window_spec, volume)
    palette = load_palette(palette)
    device = resolve_device(device)
    z, height, width = volume.shape
    if chroma.top.shape[0] != z:
        raise InputError(f"chroma has {chroma.top.shape[0]} slices, the volume {z}")
    # The uint8 output plus one chunk's float temporaries (guided upsampling and composition, ~100 bytes per voxel):
    # refuse before allocating.
    check_memory(z * height * width * 3 + _COMPOSE_CHUNK * height * width * 100, volume.meta.get("source", "volume"))
    rgb = np.empty((z, height, width, 3), dtype=np.uint8)
    fused = device.type == "cpu" and strength > 0.0  # strength 0 is the plain grey: compose_rgb's exact codes
    for start in range(0, z, _COMPOSE_CHUNK):
        stop = min(z, start + _COMPOSE_CHUNK)
        with torch.inference_mode():
            hu = torch.from_numpy(_hu_slices(volume, start, stop)).to(device)
            if fused:
                _upsample_compose_cpu(chroma, palette, hu, start, win, strength, rgb[start:stop])
            elif device.type == "cpu":
                ab = upsample_chroma(chroma, palette, hu, start)
                rgb[start:stop] = compose_rgb(window(hu.numpy(), *win), ab.numpy(), chroma=strength)
            else:
                ab = upsample_chroma(chroma, palette, hu, start)
                rgb[start:stop] = compose_rgb_torch(window_tensor(hu, *win), ab, chroma=strength).cpu().numpy()
        yield stop, z
    settings = {"window": [win.centre, win.width], "model": chroma.model, "chroma": strength, "palette": palette.name}
    color = Colorized.on_grid_of(volume, rgb, **settings)
    color.chroma = chroma
    return color


compose_chroma = blocking(iter_compose_chroma)


def compose_plane(
    volume: Volume,
    chroma: Chroma,
    axis: int,
    index: int,
    window_spec: str | Window | tuple[float, float] | None = None,
    strength: float = 1.0,
    device: str | torch.device = "auto",
    palette: str | os.PathLike | Palette = "anatomical",
) -> np.ndarray:
    """One plane of the colour volume, exactly as `compose_chroma` composes it in the whole volume, at a small part of
    its cost (what the viewer shows first when the window changes): the axial slice ``index`` (``axis`` 0, (Y, X, 3)),
    the coronal row (1, (Z, X, 3)) or the sagittal column (2, (Z, Y, 3)), uint8.

    A row or column is composed from the band of network pixels around it (the one that holds it and one on each
    side: all the guided upsampling reads), cut on the network's pixel grid so each kept pixel's mean HU is that of
    the whole volume; the voxels' arithmetic is then the same.
    """
    if axis == 0:
        one = Volume(volume.array[index : index + 1], volume.spacing, volume.origin, volume.direction, volume.meta)
        return compose_chroma(
            one,
            replace(
                chroma,
                top=chroma.top[index : index + 1],
                prob=chroma.prob[index : index + 1],
                enclosure=_enclosure_band(chroma.enclosure, 0, index, index + 1),
            ),
            window_spec,
            strength,
            device,
            palette,
        ).rgb[0]
    if axis not in (1, 2) or not 0 <= index < volume.shape[axis]:
        raise InputError(f"no plane {index} along axis {axis} of a volume of shape {volume.shape}")
    factor, size = chroma.factor, volume.shape[axis]
    pads = list(chroma.pad)
    before, _ = pads[axis - 1]
    row = (index + before) // factor
    first, last = max(row - 1, 0), min(row + 2, chroma.top.shape[axis + 1])  # network pixels kept
    start, stop = max(first * factor - before, 0), min(last * factor - before, size)  # the voxels they cover
    pads[axis - 1] = (max(before - first * factor, 0), max(last * factor - before - size, 0))
    band = [slice(None)] * 3
    band[axis] = slice(start, stop)
    low = [slice(None)] * 4
    low[axis + 1] = slice(first, last)
    part = Volume(volume.array[tuple(band)], volume.spacing, volume.origin, volume.direction, volume.meta)
    sub = replace(
        chroma,
        top=chroma.top[tuple(low)],
        prob=chroma.prob[tuple(low)],
        pad=tuple(pads),
        enclosure=_enclosure_band(chroma.enclosure, axis, start, stop),
    )
    rgb = compose_chroma(part, sub, window_spec, strength, device, palette).rgb
    return rgb[:, index - start] if axis == 1 else rgb[:, :, index - start]


def _enclosure_band(bits: np.ndarray | None, axis: int, start: int, stop: int) -> np.ndarray | None:
    """`Chroma.enclosure` of the voxels [start, stop) along ``axis`` (0 slices, 1 rows, 2 columns: re-packed)."""
    if bits is None:
        return None
    if axis < 2:
        return bits[:, start:stop] if axis == 0 else bits[:, :, start:stop]
    first = start // 8
    unpacked = np.unpackbits(bits[..., first : -(-stop // 8)], axis=-1)
    return np.packbits(unpacked[..., start - 8 * first : stop - 8 * first], axis=-1)


def iter_colorize(
    volume: Volume,
    model: str | os.PathLike | Colorizer = COLORIZER_DEFAULT,
    window: str | Window | tuple[float, float] | None = None,
    chroma: float = 1.0,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    palette: str | os.PathLike | Palette = "anatomical",
) -> Steps[Colorized]:
    """Colorize a CT: the network's colour classes under a palette, with the windowed CT as exact luminance.

    A generator of ``(done, 2 * Z)`` steps (network, then compose) that returns the `Colorized`; `colorize` runs it
    to the end.

    Example::

        ct = read_volume("../shared/data/ct/totalseg-abdomen-dicom")
        colour = colorize(ct, window="abdomen")   # ColorVolume, rgb uint8 (20, 512, 512, 3)

    Args:
        volume: CT in HU.
        model: shipped name ("colorizer-2d", "colorizer-3d") or a .safetensors file, or a Colorizer.
        window: display window: preset name, "CENTRE,WIDTH", (centre, width), or None for the DICOM default.
        chroma: colour strength in [0, 1]; 0 gives the grey CT.
        device: "auto" (cuda, then mps, then cpu), "cpu", "cuda".
        batch_size: slices per network batch (2D) or windows per batch x 4 (3D).
        palette: "anatomical" (cryosection-like), "dicom" (DICOM recommended display colours), a CSV file of
            name,R,G,B, or a `Palette`.
        progress: (`colorize` only) called as progress(done, total) with total = 2 * slices (network, then
            compose).
        cancel: (`colorize` only) polled between batches; when it returns True, `Cancelled` is raised.
    """
    z = volume.shape[0]
    # Check the cheap settings before the network runs, not after.
    parse_window(window, volume)
    palette = load_palette(palette)
    if not 0.0 <= chroma <= 1.0:
        raise InputError(f"chroma strength must be in [0, 1], got {chroma}")
    chroma_ab = yield from offset_steps(iter_predict_chroma(volume, model, device, batch_size), 0, 2 * z)
    return (yield from offset_steps(iter_compose_chroma(volume, chroma_ab, window, chroma, device, palette), z, 2 * z))


colorize = blocking(iter_colorize)
