"""Guided upsampling of the network's a*, b* to the CT's resolution (torch, any device): colour stops at boundaries,
and each voxel re-weighs its pixels' classes by its own HU (`groups.HU_GROUPS`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...palettes import Palette
from .chroma import Chroma
from .groups import BLOOD_FADE_HU, hu_group_weights

#: Range (HU) of the guided upsampling's weights: a network pixel whose mean HU differs from a CT voxel's by this
#: much counts exp(-1/2) as much. A boundary pixel half liver (60 HU), half fat (-100 HU) averages -20 HU: for a
#: liver voxel beside it, that pixel counts 7 % of a pure liver pixel; noise of 15-20 HU barely moves the weights.
GUIDE_SIGMA_HU = 35.0
#: Spatial reach of the guided upsampling in network pixels (Gaussian sigma over the 3 x 3 neighbourhood).
_GUIDE_SIGMA_PIXELS = 0.7
#: The guide's HU are clipped to this range: differences within dense bone or metal need not stop colour.
GUIDE_CLIP_HU = (-1000.0, 1000.0)
#: No colour below -900 HU (air), full colour from -880 HU: aerated lung parenchyma sits at -850 to -900 HU.
AIR_HU, AIR_FADE_HU = -900.0, 20.0


def spatial_weights(
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
    blood_fade_hu: tuple[float, float] = BLOOD_FADE_HU,
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
    blocks = raw.clamp(*GUIDE_CLIP_HU)
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
        spatial = spatial_weights(factor, ab.dtype, ab.device)
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
    groups = chroma.ab_groups(palette, start, stop, hu.device)
    ab = groups[:, :, :2].sum(dim=1)
    guide = F.pad(hu[:, None], (left, right, top, bottom), mode="replicate")[:, 0]
    group_hu, no_bone = (
        F.pad(a.to(hu.dtype)[:, None], (left, right, top, bottom), mode="replicate")[:, 0]
        for a in chroma.hu_groups(hu, start)
    )
    ab = guided_upsample(ab, guide, chroma.factor, groups, group_hu, no_bone > 0.5, chroma.blood_fade_hu)
    ab = ab[:, :, top : top + height, left : left + width]
    air = ((hu - AIR_HU) / AIR_FADE_HU).clamp_(0.0, 1.0)
    return (ab * air[:, None]).movedim(1, -1)
