"""The anatomy stage: the network's kept classes made anatomically consistent (`anatomy`) inside the body
(`engines.body`), at the network's resolution."""

from __future__ import annotations

import torch

from ...io import Volume
from ..body import body_mask
from . import anatomy as _anatomy
from .chroma import ENHANCED_HU, ENHANCED_MIN_ML, quantise

#: Slices per chunk of the anatomy step.
_ANATOMY_CHUNK = 32


def make_consistent(
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
        top[start:stop], prob[start:stop] = chunk_top.to(torch.uint8), quantise(chunk_prob)
    _anatomy.keep_main_pieces(top, small_hu, classes, spacing_z * pixel_mm2 / 1000.0 if top.shape[0] > 1 else None)
    if not_enhanced(top, small_hu, classes, spacing_z * pixel_mm2 / 1000.0):
        plain_blood(top, prob, small_hu, classes)
    if outside is not None:
        top[:, 0][outside], prob[:, 0][outside] = classes.index("air"), 255
        prob[:, 1:].masked_fill_(outside[:, None], 0)


#: Below this HU a CT without contrast holds plain blood or soft tissue where the network named contrast blood:
#: unenhanced blood is 30-60 HU, a 3 mm vertebra's marrow 100-190 HU (checked on the shared 3 mm body and the three
#: chest CTs, 2026-11-27).
PLAIN_BLOOD_MAX_HU = 100.0


def not_enhanced(top: torch.Tensor, small_hu: torch.Tensor, classes: tuple[str, ...], pixel_ml: float) -> bool:
    """Whether the blood the network names (the heart and the named vessels, first-ranked on at least
    `ENHANCED_MIN_ML`) has a median HU below `ENHANCED_HU` on the network's grid: a CT without contrast. As
    `Chroma.enhanced_blood_hu` decides it on the CT's own voxels, here before the enclosure and composition use the
    classes."""
    if "contrast_blood" not in classes:
        return False
    named = [k for k, name in enumerate(classes) if _anatomy.family(name) == "contrast_blood"]
    named = [k for k in named if classes[k] != "contrast_blood"]  # the tissue class is named by HU
    blood = torch.isin(top[:, 0], torch.tensor(named, dtype=top.dtype))
    if int(blood.sum()) * pixel_ml < ENHANCED_MIN_ML:
        return False  # too little named blood to tell (a head, a limb): the classes stay as the network gave them
    return float(small_hu[blood].median()) < ENHANCED_HU


def plain_blood(top: torch.Tensor, prob: torch.Tensor, small_hu: torch.Tensor, classes: tuple[str, ...]) -> None:
    """On a CT without contrast (`not_enhanced`) the tissue class ``contrast_blood`` names nothing. In place, wherever
    it is kept:

    - below `PLAIN_BLOOD_MAX_HU` its probability goes to soft tissue (which holds unenhanced blood at 30-60 HU), or
      fat below `anatomy.FAT_MAX_HU`, merged with that class where the pixel keeps it too; ranked lower than first,
      it never lifts that class over the pixel's first class (the excess goes to the first: a vertebra's fatty
      marrow stays vertebra), nor gives a third class anything (an aorta beside the spine does not turn bone);
    - from `PLAIN_BLOOD_MAX_HU` up (a 3 mm vertebra's marrow is 100-190 HU, an aorta's calcified wall brighter) its
      share goes to the pixel's other kept classes in proportion, so that a vertebra ranked second takes over from
      it and a calcified aorta stays aorta;
    - a pixel that keeps no other class takes the tissue of its HU (soft tissue, bone from
      `anatomy.CONTRAST_MIN_HU` up).

    The pixel's classes are then ranked again; the heart and the named vessels stay."""
    blood = classes.index("contrast_blood")
    where = top == blood
    if not bool(where.any()):
        return
    hu = small_hu[:, None].expand_as(top)
    tissue = torch.full_like(top, classes.index("soft_tissue"))
    tissue[hu < _anatomy.FAT_MAX_HU] = classes.index("fat")
    tissue[hu >= _anatomy.CONTRAST_MIN_HU] = classes.index("bone")
    shared = where & (hu >= PLAIN_BLOOD_MAX_HU)
    shared[:, 0] &= ((prob[:, 1:] > 0) & ~where[:, 1:]).any(dim=1)  # with no other class to share: its tissue
    merged_top = torch.where(where & ~shared, tissue, top)
    merged = prob.to(torch.float32)
    merged[shared] = 0.0  # quantise below renormalises: the other kept classes in proportion
    k = top.shape[1]
    for i in range(k):  # a class kept twice now: its two probabilities in the higher rank
        for j in range(i + 1, k):
            same = (merged_top[:, i] == merged_top[:, j]) & (merged[:, j] > 0)
            merged[:, i] += torch.where(same, merged[:, j], 0.0)
            merged[:, j] = torch.where(same, 0.0, merged[:, j])
    # A lower-ranked contrast blood given to soft tissue or fat never lifts that class over the pixel's first (a
    # vertebra's fatty marrow stays vertebra): the excess goes to the first class.
    capped = ~where[:, 0] & (where[:, 1:] & ~shared[:, 1:]).any(dim=1)
    excess = (merged[:, 1:] - merged[:, :1]).clamp_min(0.0) * capped[:, None]
    merged[:, 1:] -= excess
    merged[:, 0] += excess.sum(dim=1)
    order = merged.argsort(dim=1, descending=True, stable=True)
    top[:] = merged_top.gather(1, order)
    prob[:] = quantise(merged.gather(1, order))
