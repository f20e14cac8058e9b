"""The anatomy stage: the network's kept classes made anatomically consistent (`engines.anatomy`) inside the body
(`engines.body`), at the network's resolution."""

from __future__ import annotations

import torch

from ...io import Volume
from .. import anatomy as _anatomy
from ..body import body_mask
from .chroma import quantise

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
    if outside is not None:
        top[:, 0][outside], prob[:, 0][outside] = classes.index("air"), 255
        prob[:, 1:].masked_fill_(outside[:, None], 0)
