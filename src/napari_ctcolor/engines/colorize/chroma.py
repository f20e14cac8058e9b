"""`Chroma`, a volume's colour before composition (the kept colour classes of each network pixel and what they name),
and `Colorized`, the colour volume that carries it."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ...io import ColorVolume
from ...palettes import Palette
from . import anatomy as _anatomy
from .groups import (
    BLOOD_FADE_HU,
    GROUP_FLOOR,
    HU_GROUPS,
    MARROW_GROUP_HU,
    ORGAN_FADE_HU,
    PLAIN_FADE_HU,
    hu_group_of,
    hu_group_weights,
)

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
            voxel (`enclosure.gate_topology`): [0] the voxels that count as marrow (and the cortex around it), [1]
            those no bone encloses, below `MARROW_MIN_HU`; None: neither (plain HU weights).
        blood_fade_hu: where contrast blood's `HU_GROUPS` weight falls for this scan (`blood_fade`).
    """

    top: torch.Tensor
    prob: torch.Tensor
    classes: tuple[str, ...]
    factor: int
    pad: tuple[tuple[int, int], tuple[int, int]]
    model: str
    enclosure: np.ndarray | None = None
    blood_fade_hu: tuple[float, float] = field(default_factory=lambda: BLOOD_FADE_HU)
    _legend: tuple[np.ndarray, list[tuple[str, float, float]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def ab(self, palette: Palette, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """(n, 2, h, w) float32 a*, b* of slices [start, stop) at the network's resolution under ``palette``."""
        table = class_table(palette, self.classes)
        prob = self.prob[start:stop].float()
        prob = prob / prob.sum(dim=1, keepdim=True).clamp_min(1.0)
        ab = table[self.top[start:stop].long()]  # (n, k, h, w, 2)
        return (ab * prob[..., None]).sum(dim=1).movedim(-1, 1)

    def ab_groups(
        self, palette: Palette, start: int = 0, stop: int | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """(n, 4, 3, h, w) float32: for each of the `HU_GROUPS` (bone, blood, organ, plain), the probability-weighted
        a*, b* of its kept classes and its probability (a*·p, b*·p, p); summed over the groups, (a*, b*) is `ab`.
        Computed on ``device`` (default the CPU): only the slices' uint8 classes and probabilities are copied there."""
        device = self.top.device if device is None else device
        table = class_table(palette, self.classes).to(device)
        prob = self.prob[start:stop].to(device).float()
        prob = prob / prob.sum(dim=1, keepdim=True).clamp_min(1.0)
        top = self.top[start:stop].to(device).long()
        terms = torch.cat((table[top] * prob[..., None], prob[..., None]), dim=-1).movedim(-1, 2)  # (n, k, 3, h, w)
        group = hu_group_of(self.classes).to(device)[top][:, :, None].expand_as(terms)
        out = terms.new_zeros((terms.shape[0], len(HU_GROUPS), *terms.shape[2:]))
        return out.scatter_add_(1, group, terms)

    def network_pixel(self, y, x):
        """The network pixel (row, column) that covers CT voxel column (y, x); integers or index tensors."""
        (top, _), (left, _) = self.pad
        return (y + top) // self.factor, (x + left) // self.factor

    def hu_groups(self, hu: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """What weighs each voxel's `HU_GROUPS` (`hu_group_weights`), for ``hu``, the (n, Y, X) float HU of the slices
        from ``start``, on its device: the voxel's HU, raised to `MARROW_GROUP_HU` in the marrow, and bool where the
        bone gives way (`enclosure.gate_topology`). Only the packed bits are copied to ``hu``'s device, and unpacked
        there."""
        if self.enclosure is None:
            return hu, torch.zeros(hu.shape, dtype=torch.bool, device=hu.device)
        bits = torch.from_numpy(self.enclosure[:, start : start + hu.shape[0]]).to(hu.device)
        marrow, no_bone = unpack_bits(bits, hu.shape[-1])
        return torch.where(marrow, hu.clamp(min=MARROW_GROUP_HU), hu), no_bone

    def class_at(self, z: int, y: int, x: int, hu: float) -> tuple[str, float]:
        """The most probable colour class at CT voxel (z, y, x) of HU ``hu`` and its probability in the network pixel
        (the classes re-weighted by the HU as in the composition: `HU_GROUPS`, `hu_groups`)."""
        row, col = self.network_pixel(y, x)
        top, prob = self.top[z, :, row, col].long(), self.prob[z, :, row, col].float()
        marrow, no_bone = (0, 0) if self.enclosure is None else self.enclosure[:, z, y, x // 8] >> (7 - x % 8) & 1
        hu = max(float(hu), MARROW_GROUP_HU) if marrow else float(hu)
        fit = hu_group_weights(torch.tensor(hu), torch.tensor(bool(no_bone)), self.blood_fade_hu)
        fit = fit[hu_group_of(self.classes)[top]]
        best = int((prob * fit).argmax())
        return self.classes[int(top[best])], float(prob[best]) / 255.0

    def tissue_at(self, z: int, y: int, x: int, hu: float) -> tuple[str, float]:
        """The tissue (`anatomy.family`: bone, contrast_blood, soft_tissue, ...) of `class_at`'s class and the summed
        probability of the kept classes of that tissue in the network pixel."""
        tissue = _anatomy.family(self.class_at(z, y, x, hu)[0])
        row, col = self.network_pixel(y, x)
        kept = zip(self.top[z, :, row, col].tolist(), self.prob[z, :, row, col].tolist(), strict=True)
        return tissue, sum(p for k, p in kept if p > 0 and _anatomy.family(self.classes[k]) == tissue) / 255.0

    def most_probable(self, hu: np.ndarray) -> np.ndarray:
        """(Z, Y, X) uint8 label map on the CT grid of ``hu`` (the CT's HU): 1 + the index of each voxel's most probable
        class, 0 where it is air (nothing to show).

        Most probable given the voxel's HU: the kept classes of its network pixel re-weighted by the `HU_GROUPS`
        weights of its HU (`hu_groups`: the marrow's raised), as the composition colours it, so that a thin rib's
        cortex in a pixel the network mostly called muscle is named bone. At or below `PLAIN_FADE_HU`'s start every
        weight is 1: the pixel's most probable class.
        """
        from ...threads import cpu_threads
        from .fused import most_probable

        rows, cols = self.network_pixel(np.arange(hu.shape[1]), np.arange(hu.shape[2]))
        group_of = hu_group_of(self.classes).numpy()
        air = self.classes.index("air") if "air" in self.classes else -1
        fades = (*PLAIN_FADE_HU, *ORGAN_FADE_HU, *self.blood_fade_hu, GROUP_FLOOR)
        out = np.empty(hu.shape, dtype=np.uint8)
        for start in range(0, hu.shape[0], _LABEL_CHUNK):
            stop = min(hu.shape[0], start + _LABEL_CHUNK)
            chunk = np.nan_to_num(np.asarray(hu[start:stop], dtype=np.float32))
            enclosure = None if self.enclosure is None else self.enclosure[:, start:stop]
            top, prob = self.top[start:stop].numpy(), self.prob[start:stop].numpy()
            args = (chunk, enclosure, MARROW_GROUP_HU, top, prob, rows, cols, group_of, fades, air, out[start:stop])
            most_probable(*args, cpu_threads())
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
        first, values = self._at_centres(hu)
        blood = np.isin(first, named)
        if blood.sum() * float(np.prod(spacing)) * self.factor**2 / 1000.0 < ENHANCED_MIN_ML:
            return None
        return float(np.percentile(values[blood], percentile))

    def class_hu(self, hu: np.ndarray) -> dict[str, float]:
        """The median HU, read at each network pixel's centre in the CT ``hu``, of the pixels whose most probable class
        is each class (classes that win somewhere only)."""
        first, values = self._at_centres(hu)
        return {self.classes[k]: float(np.median(values[first == k])) for k in np.unique(first).tolist()}

    def legend_figures(self, hu: np.ndarray) -> list[tuple[str, float, float]]:
        """(class, `class_shares` share, `class_hu` median HU) of each class most probable somewhere inside the CT
        ``hu``, most common first: what a legend lists. Kept for the last ``hu`` asked: a front end asks once in a
        worker, then at every recomposition in its main thread (0.3 s on 275 slices of 512², 2 cores, 2026-11-27)."""
        if self._legend is None or self._legend[0] is not hu:
            median_hu = self.class_hu(hu)  # classes that win only in the padding have none
            shares = sorted(self.class_shares().items(), key=lambda item: -item[1])
            self._legend = hu, [(name, share, median_hu[name]) for name, share in shares if name in median_hu]
        return self._legend[1]

    def _at_centres(self, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(most probable class, HU) at each network pixel's centre voxel in the CT ``hu``, both (Z, h', w')."""
        (top, _), (left, _) = self.pad
        rows = np.arange((self.factor // 2 - top) % self.factor, hu.shape[1], self.factor)
        cols = np.arange((self.factor // 2 - left) % self.factor, hu.shape[2], self.factor)
        return self.first_class(rows, cols), np.asarray(hu)[:, rows][:, :, cols]

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


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``np.packbits(mask, axis=-1)`` on the mask's device: (..., X) bool -> (..., ceil(X / 8)) uint8."""
    if mask.device.type == "cpu":  # numpy's own: no uint8 and product temporaries
        return torch.from_numpy(np.packbits(mask.numpy(), axis=-1))
    width = mask.shape[-1]
    padded = F.pad(mask.to(torch.uint8), (0, -width % 8))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=mask.device)
    return (padded.unflatten(-1, (-1, 8)) * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    """``np.unpackbits(bits, axis=-1, count=width).view(bool)`` on the bits' device: (..., B) uint8 -> (..., width)."""
    if bits.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, count=width).view(bool))
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return ((bits[..., None] >> shifts) & 1).flatten(-2)[..., :width].bool()


@functools.lru_cache(maxsize=16)
def class_table(palette: Palette, classes: tuple[str, ...]) -> torch.Tensor:
    """(K, 2) a*, b* of the classes under the palette, computed once per palette (not per slice chunk)."""
    return torch.from_numpy(palette.class_ab(classes))


#: Slices per call of `Chroma.most_probable`'s kernel (its float32 HU copy).
_LABEL_CHUNK = 8
#: Classes kept per network pixel (`Chroma`).
TOP_K = 4


def compact(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, K, h, w) probabilities -> the `TOP_K` (uint8 indices, uint8 probabilities x 255), renormalised."""
    values, indices = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
    return indices.to(torch.uint8), quantise(values)


def quantise(values: torch.Tensor) -> torch.Tensor:
    """(n, k, h, w) probabilities -> uint8 x 255, renormalised over k."""
    values = values / values.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return (values * 255.0).round_().to(torch.uint8)
