"""The colorize engine's numba kernels (CPU): guided upsampling and the luminance-exact composition in one pass per
voxel (`upsample_compose`), and the network's most probable classes straight from its logits (`top_classes`).

`colorize.upsample_chroma` followed by `color.compose_rgb` makes about ten full-resolution float32 temporaries per
slice (weights, a*, b*, grey, linear RGB, quantisation indices), each written and read back from memory: on two cores
those passes cost more than the network. This kernel computes, for each CT voxel in registers, what the two do:

1. the window's grey, its f(Y) and Y from `compose_rgb`'s tables; black, white and air carry no colour (in an
   abdomen window most of a slice: the air around the body, lung, bone), and skip step 2;
2. a*, b* from the 3 x 3 network pixels around it, weighted by distance and by HU likeness (`guided_upsample`,
   the likeness from a table instead of an exp); above 110 HU each pixel's bone, blood, organ and plain tissue
   classes are re-weighted by the voxel's HU (`colorize.HU_GROUPS`, the marrow's raised); faded to none in air
   (`AIR_HU`) and scaled by the chroma strength;
3. (L*, a*, b*) to linear RGB; out of gamut: chroma scaled to the first exit along the hue (the Cmax table,
   bilinear), then desaturated towards grey at constant Y (`compose_rgb`'s algorithm);
4. the sRGB code from the 65536-entry table.

The arithmetic is that of the numpy/torch path in float32, only in another order (no temporaries), so its colours
agree with `compose_rgb(window(hu), upsample_chroma(...))` within one 8-bit code and L* stays within the same
derived bound (tests/engines/test_colorize.py). Written by hand because the fusion is the point: no library composes a
guided upsampling with a gamut mapping. `numba.njit(parallel=True, cache=True)`: compiled once per machine and
cached on disk; rows of voxels are spread over `numba.set_num_threads` threads (torch's count).
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

from ...color import compose_tables
from ...threads import use_threads

__all__ = [
    "LIKENESS_STEP_HU",
    "class_terms",
    "likeness_table",
    "most_probable",
    "top_classes",
    "upsample_compose",
]


@numba.njit(inline="always")
def _finv(f, f0, kappa):
    m = max(f, f0)
    return m * m * m + (f - m) / kappa


@numba.njit(inline="always")
def _linear_rgb(fy, lum, a, b, m, f0, kappa):
    x = _finv(fy + a * np.float32(1.0 / 500.0), f0, kappa)
    z = _finv(fy - b * np.float32(1.0 / 200.0), f0, kappa)
    return (
        m[0, 0] * x + m[0, 1] * lum + m[0, 2] * z,
        m[1, 0] * x + m[1, 1] * lum + m[1, 2] * z,
        m[2, 0] * x + m[2, 1] * lum + m[2, 2] * z,
    )


@numba.njit(inline="always")
def _code(value, codes, q_steps):
    k = int(value * np.float32(q_steps) + np.float32(0.5))
    return codes[min(max(k, 0), q_steps)]


@numba.njit(inline="always")
def _srgb(level, a, b, tables):
    """Steps 3 and 4 for one voxel: grey ``level`` and a*, b* -> its three sRGB codes, returned as a tuple of
    scalars: a view of the output per voxel (``out[s, y, x]``) would count references to the output's memory on every
    call, an atomic operation both threads contend for (returning the codes made the kernel 15-25 % faster, same
    codes, 2026-11-29)."""
    fy_table, lum_table, cmax, codes, m = tables[0], tables[1], tables[2], tables[3], tables[4]
    q_steps, gamut_top, f0, kappa, rows_l, steps_h = tables[6:]
    tiny = np.float32(1e-30)
    fy, lum = fy_table[level], lum_table[level]
    r, gg, bb = _linear_rgb(fy, lum, a, b, m, f0, kappa)
    if min(r, gg, bb) < 0.0 or max(r, gg, bb) > gamut_top:  # along the hue to the gamut boundary, then to grey
        light = min(max(fy * np.float32(116.0) - np.float32(16.0), np.float32(0.0)), np.float32(100.0))
        li = np.float32(2.0) * light + np.float32(8.0) * min(light, np.float32(10.0))
        row = min(np.float32(math.floor(li)), np.float32(rows_l - 2))
        li -= row
        hj = (np.float32(math.atan2(b, a)) + np.float32(math.pi)) * np.float32(steps_h / (2 * math.pi))
        col = min(np.float32(math.floor(hj)), np.float32(steps_h - 1))
        hj -= col
        i, j = int(row), int(col)
        upper = cmax[i, j] + hj * (cmax[i, j + 1] - cmax[i, j])
        lower = cmax[i + 1, j] + hj * (cmax[i + 1, j + 1] - cmax[i + 1, j])
        limit = upper + li * (lower - upper)
        c = max(np.float32(math.sqrt(a * a + b * b)), tiny)
        scale = min(limit / c, np.float32(1.0))
        r, gg, bb = _linear_rgb(fy, lum, a * scale, b * scale, m, f0, kappa)
        hi = max(max(r, gg, bb) - lum, tiny)
        lo = max(lum - min(r, gg, bb), tiny)
        t = min((np.float32(1.0) - lum) / hi, lum / lo, np.float32(1.0))
        r = min(max(lum + t * (r - lum), np.float32(0.0)), np.float32(1.0))
        gg = min(max(lum + t * (gg - lum), np.float32(0.0)), np.float32(1.0))
        bb = min(max(lum + t * (bb - lum), np.float32(0.0)), np.float32(1.0))
    return _code(r, codes, q_steps), _code(gg, codes, q_steps), _code(bb, codes, q_steps)


@numba.njit(cache=True)
def _grey_codes(tables):
    """(levels + 1, 3) uint8: the codes `_srgb` gives every grey level without colour (a lookup for the voxels
    that carry none, computed by the same arithmetic)."""
    levels = tables[5]
    out = np.empty((levels + 1, 3), dtype=np.uint8)
    for level in range(levels + 1):
        out[level, 0], out[level, 1], out[level, 2] = _srgb(level, np.float32(0.0), np.float32(0.0), tables)
    return out


@numba.njit(inline="always", cache=True)
def _falling(h, high, span, rise, floor):
    """A group's weight at HU h (`hu_group_weights`), in float32 and torch's order: ((high - h) / span) clamped to
    [0, 1], x rise + floor, where span is high - low and rise 1 - floor."""
    return min(max((high - h) / span, np.float32(0.0)), np.float32(1.0)) * rise + floor


@numba.njit(inline="always", cache=True)
def _fit(h, low, high, floor):
    """A group's weight at HU h: 1 up to ``low``, falling linearly to ``floor`` at ``high`` (`_falling`, the span and
    rise rounded in float32; `_most_probable` passes them rounded once from doubles, as torch does)."""
    return _falling(h, high, high - low, np.float32(1.0) - floor, floor)


@numba.njit(inline="always", cache=True)
def _mix(gp, s, c, ny, nx, w, wb, wo, wp):
    """Term c (0: a*·p, 1: b*·p, 2: p) of a pixel's four HU groups, each weighted by its fit."""
    return gp[s, c, ny, nx] * w + gp[s, 3 + c, ny, nx] * wb + gp[s, 6 + c, ny, nx] * wo + gp[s, 9 + c, ny, nx] * wp


@numba.njit(parallel=True, cache=True, nogil=True)
def _kernel(
    hu, enclosure, marrow_hu, ab_pad, gp, fades, guide_pad, spatial, offset, factor, likeness, clip, air, window,
    strength, tables, grey, out, rows, columns,
):  # fmt: skip
    levels = tables[5]
    plain_low, plain_high, organ_low, organ_high, blood_low, blood_high, floor = fades  # gp: groups_pad
    n = hu.shape[0]
    first_row, height = rows[0], rows[1] - rows[0]
    top, left = offset
    air_hu, air_fade = air
    low, inv_width = window
    like_steps = likeness.shape[0] - 1
    lim = np.float32(like_steps - 1)  # the table's last step ends at 0: no branch at its end
    slope = np.empty_like(likeness)
    slope[:-1] = likeness[1:] - likeness[:-1]
    slope[-1] = 0
    per_hu = np.float32(1.0 / LIKENESS_STEP_HU)
    for job in numba.prange(n * height):
        s, y = job // height, first_row + job % height
        py = y + top
        by, iy = py // factor, py % factor
        sy0, sy1, sy2 = spatial[0, iy], spatial[1, iy], spatial[2, iy]  # this row's distance weights
        for x in range(columns[0], columns[1]):
            h = hu[s, y, x]
            # 1. the window's grey; black, white and air carry no colour: their codes come from the grey table
            value = min(max((h - low) * inv_width, np.float32(0.0)), np.float32(1.0))
            level = int(value * np.float32(levels) + np.float32(0.5))
            if not (0 < level < levels and h > air_hu):
                out[s, y, x, 0] = grey[level, 0]
                out[s, y, x, 1] = grey[level, 1]
                out[s, y, x, 2] = grey[level, 2]
                continue
            # 2. guided upsampling (the voxel's own HU, clipped, against each pixel's mean HU)
            px = x + left
            bx, ix = px // factor, px % factor
            g = min(max(h, clip[0]), clip[1])
            total_a = np.float32(0.0)
            total_b = np.float32(0.0)
            weight_sum = np.float32(0.0)
            # the HU groups' weights (bone, blood, organ, plain): all 1 up to plain_low, unless the bone gives way;
            # the marrow's as at marrow_hu (the enclosure bits, packed along x)
            byte, shift = x >> 3, 7 - (x & 7)
            hg = max(h, marrow_hu) if (enclosure[0, s, y, byte] >> shift) & 1 else h
            loose = (enclosure[1, s, y, byte] >> shift) & 1 == 1
            dense = hg > plain_low or loose
            fit_bone = floor if loose else np.float32(1.0)
            fit_blood = fit_organ = fit_plain = np.float32(1.0)
            if dense:
                fit_blood = _fit(hg, blood_low, blood_high, floor)
                fit_organ = _fit(hg, organ_low, organ_high, floor)
                fit_plain = _fit(hg, plain_low, plain_high, floor)
            for dx in range(3):
                sx = spatial[dx, ix]
                for dy in range(3):
                    sw = sx * (sy0 if dy == 0 else sy1 if dy == 1 else sy2)
                    d = min(abs(g - guide_pad[s, by + dy, bx + dx]) * per_hu, lim)
                    k = int(d)
                    like = likeness[k] + (d - np.float32(k)) * slope[k]
                    w = (like + np.float32(1e-4)) * sw
                    ny, nx = by + dy, bx + dx
                    if dense:  # (a*·p, b*·p, p) of the bone, blood, organ and plain groups as they fit the HU
                        ws, wb, wo, wp = w * fit_bone, w * fit_blood, w * fit_organ, w * fit_plain
                        total_a += _mix(gp, s, 0, ny, nx, ws, wb, wo, wp)
                        total_b += _mix(gp, s, 1, ny, nx, ws, wb, wo, wp)
                        weight_sum += _mix(gp, s, 2, ny, nx, ws, wb, wo, wp)
                    else:
                        total_a += ab_pad[s, 0, ny, nx] * w
                        total_b += ab_pad[s, 1, ny, nx] * w
                        weight_sum += w
            fade = min((h - air_hu) / air_fade, np.float32(1.0)) * strength
            # 3-4. linear RGB (mapped into the gamut along the hue when outside) and its sRGB codes
            codes = _srgb(level, total_a / weight_sum * fade, total_b / weight_sum * fade, tables)
            out[s, y, x, 0], out[s, y, x, 1], out[s, y, x, 2] = codes


#: Step (HU) of the likeness table: exp(-d² / 2 sigma²) interpolated linearly between steps of 0.25 HU differs from
#: the exact value by at most step² / 8 / sigma² (5e-6 for sigma 35 HU); beyond 8 sigma it is 0 (exactly, < 1e-13).
LIKENESS_STEP_HU = 0.25


def likeness_table(sigma_hu: float) -> np.ndarray:
    """exp(-d² / 2 sigma²) for d = 0, 0.25, ... 8 sigma HU, and a final 0 (float32): one lookup per neighbour instead
    of an exp (scalar exp dominated the kernel)."""
    d = np.arange(0.0, 8.0 * sigma_hu, LIKENESS_STEP_HU)
    return np.append(np.exp(-0.5 * (d / sigma_hu) ** 2), 0.0).astype(np.float32)


@functools.cache
def _grey_table() -> np.ndarray:
    return _grey_codes(_numba_tables())


@functools.cache
def _numba_tables() -> tuple:
    """`color.compose_tables` as the kernel takes them: a tuple of arrays and scalars."""
    tables = compose_tables()
    f32 = np.float32
    return (
        tables.fy,
        tables.lum,
        tables.cmax,
        tables.codes,
        tables.m_lab,
        tables.grey_levels,
        tables.q_steps,
        f32(tables.gamut_top),
        f32(tables.f_threshold),
        f32(tables.kappa),
        tables.cmax_rows,
        tables.cmax_hue_steps,
    )


def upsample_compose(
    hu: np.ndarray,
    enclosure: np.ndarray | None,
    marrow_hu: float,
    ab_pad: np.ndarray,
    groups_pad: np.ndarray,
    fades: tuple[float, float, float, float, float, float, float],
    guide_pad: np.ndarray,
    spatial: np.ndarray,
    offset: tuple[int, int],
    factor: int,
    sigma_hu: float,
    clip_hu: tuple[float, float],
    air: tuple[float, float],
    window: tuple[float, float],
    strength: float,
    out: np.ndarray,
    threads: int,
    rows: tuple[int, int] | None = None,
    columns: tuple[int, int] | None = None,
) -> None:
    """Compose slices of uint8 sRGB into ``out`` from their HU and the network's a*, b* (see the module notes).

    Args:
        hu: (n, Y, X) float32 HU.
        enclosure: (2, n, Y, ceil(X / 8)) uint8 bits packed along X (`colorize.Chroma.enclosure`): [0] marrow,
            whose HU groups are weighed as at ``marrow_hu`` or its own HU if higher, [1] where the bone group gives
            way; None: neither.
        ab_pad: (n, 2, h + 2, w + 2) float32 a*, b* at the network's resolution, edge-padded by one pixel.
        groups_pad: (n, 12, h + 2, w + 2) float32 (a*·p, b*·p, p) of the bone, blood, organ and plain classes of
            each pixel (`colorize.Chroma.ab_groups`), edge-padded the same way; ``ab_pad`` is their sum.
        fades: (plain low, plain high, organ low, organ high, blood low, blood high, floor): the HU over which the
            plain, organ and blood groups' weights fall from 1 to the floor (`colorize.HU_GROUPS`); bone keeps 1.
        guide_pad: (n, h + 2, w + 2) float32 mean clipped HU of each network pixel, edge-padded by one pixel.
        spatial: (3, factor) float32 distance weights of the neighbours -1, 0, +1 for each position in a pixel.
        offset: (top, left) full-resolution padding before the network (voxel (y, x) is (y + top, x + left) there).
        factor: in-plane reduction factor.
        sigma_hu: HU range of the likeness weights; clip_hu: the guide's HU clip.
        air: (HU below which there is no colour, HU over which colour fades in).
        window: (centre, width) in HU.
        strength: chroma strength in (0, 1].
        out: (n, Y, X, 3) uint8, written.
        threads: threads for the rows.
        rows, columns: (first, stop) of the rows and columns written (the others are left as they are); None: all.
            A plane across the slices needs one row or column of a band whose other rows only make the network
            pixels' mean HU.
    """
    f32 = np.float32
    use_threads(threads)
    tables = _numba_tables()
    centre, width = window
    _kernel(
        np.ascontiguousarray(hu, dtype=f32),
        _no_enclosure(hu.shape) if enclosure is None else np.ascontiguousarray(enclosure, dtype=np.uint8),
        f32(marrow_hu),
        np.ascontiguousarray(ab_pad, dtype=f32),
        np.ascontiguousarray(groups_pad, dtype=f32),
        tuple(f32(v) for v in fades),
        np.ascontiguousarray(guide_pad, dtype=f32),
        np.ascontiguousarray(spatial, dtype=f32),
        (int(offset[0]), int(offset[1])),
        int(factor),
        likeness_table(sigma_hu),
        (f32(clip_hu[0]), f32(clip_hu[1])),
        (f32(air[0]), f32(air[1])),
        (f32(centre - width / 2), f32(1.0 / width)),
        f32(strength),
        tables,
        _grey_table(),
        out,
        (0, hu.shape[1]) if rows is None else (int(rows[0]), int(rows[1])),
        (0, hu.shape[2]) if columns is None else (int(columns[0]), int(columns[1])),
    )


def _no_enclosure(shape: tuple[int, int, int]) -> np.ndarray:
    """Enclosure bits that are all clear, for (n, Y, X) slices."""
    return np.zeros((2, *shape[:2], -(-shape[2] // 8)), dtype=np.uint8)


def class_terms(
    top: np.ndarray, prob: np.ndarray, table: np.ndarray, group_of: np.ndarray, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """`upsample_compose`'s network-resolution inputs from the kept classes, edge-padded by one pixel, in one pass:
    ``ab_pad`` (n, 2, h + 2, w + 2), the probability-weighted a*, b* (`colorize.Chroma.ab`), and ``groups_pad``
    (n, 12, h + 2, w + 2), the (a*·p, b*·p, p) of each HU group (`colorize.Chroma.ab_groups`). In torch the same
    took several passes over (n, k, 3, h, w) temporaries, 4x as long (8 slices of 128², measured).

    Args:
        top: (n, k, h, w) uint8 class indices; prob: (n, k, h, w) uint8 probabilities x 255.
        table: (K, 2) float32 a*, b* of the classes; group_of: (K,) int64 HU group of each class.
        threads: threads for the rows.
    """
    use_threads(threads)
    n, _, height, width = top.shape
    ab_pad = np.empty((n, 2, height + 2, width + 2), dtype=np.float32)
    groups_pad = np.empty((n, 12, height + 2, width + 2), dtype=np.float32)
    _class_terms(top, prob, np.ascontiguousarray(table, dtype=np.float32), group_of, ab_pad, groups_pad)
    return ab_pad, groups_pad


@numba.njit(parallel=True, cache=True, nogil=True)
def _class_terms(top, prob, table, group_of, ab_pad, groups_pad):
    n, k, height, width = top.shape
    for job in numba.prange(n * (height + 2)):
        s, py = job // (height + 2), job % (height + 2)
        y = min(max(py - 1, 0), height - 1)
        for px in range(width + 2):
            x = min(max(px - 1, 0), width - 1)
            total = np.float32(0.0)
            for j in range(k):
                total += np.float32(prob[s, j, y, x])
            scale = np.float32(1.0) / max(total, np.float32(1.0))
            for c in range(12):
                groups_pad[s, c, py, px] = 0.0
            ab_pad[s, 0, py, px] = 0.0
            ab_pad[s, 1, py, px] = 0.0
            for j in range(k):
                c = top[s, j, y, x]
                p = np.float32(prob[s, j, y, x]) * scale
                g = 3 * group_of[c]
                a, b = table[c, 0] * p, table[c, 1] * p
                groups_pad[s, g, py, px] += a
                groups_pad[s, g + 1, py, px] += b
                groups_pad[s, g + 2, py, px] += p
                ab_pad[s, 0, py, px] += a
                ab_pad[s, 1, py, px] += b


def top_classes(logits: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes of each pixel from the network's (n, K, h, w) logits, in one pass: (n, k, h, w)
    uint8 class indices, most probable first, and uint8 probabilities x 255 renormalised over those k.

    ``logits``: float32, or the bits of bfloat16 logits as uint16 (a bfloat16 is the upper half of a float32: each
    class row is widened in the kernel, instead of a float32 copy of all the logits, 2 x the bfloat16's size).

    The softmax over all K classes followed by the top k and their renormalisation equals the softmax over the k
    largest logits (the normaliser cancels), so neither the full softmax nor torch's topk across the strided class
    axis (as costly as the network's last layers) is computed.
    """
    use_threads(threads)
    n, _, height, width = logits.shape
    top = np.empty((n, k, height, width), dtype=np.uint8)
    prob = np.empty((n, k, height, width), dtype=np.uint8)
    if logits.dtype == np.uint16:
        _top_classes(np.ascontiguousarray(logits), True, top, prob)
    else:
        _top_classes(np.ascontiguousarray(logits, dtype=np.float32), False, top, prob)
    return top, prob


@numba.njit(parallel=True, cache=True, nogil=True)
def _top_classes(logits, bf16, top, prob):
    n, classes, height, width = logits.shape
    k = top.shape[1]
    for job in numba.prange(n * height):
        s, y = job // height, job % height
        # A row at a time, class by class: each class's row of logits is read contiguously (a pixel at a time, the
        # 39 class planes were 39 strided streams).
        best = np.full((k, width), -np.inf, dtype=np.float32)
        index = np.zeros((k, width), dtype=np.int64)
        bits = np.empty(width, dtype=np.uint32)
        row = bits.view(np.float32)
        for c in range(classes):
            for x in range(width):
                if bf16:
                    bits[x] = np.uint32(logits[s, c, y, x]) << np.uint32(16)
                else:
                    row[x] = logits[s, c, y, x]
            for x in range(width):  # insertion into the sorted k best; the first of equal logits stays first
                value = row[x]
                if value > best[k - 1, x]:
                    j = k - 1
                    while j > 0 and value > best[j - 1, x]:
                        best[j, x] = best[j - 1, x]
                        index[j, x] = index[j - 1, x]
                        j -= 1
                    best[j, x] = value
                    index[j, x] = c
        for x in range(width):
            largest = best[0, x]
            total = np.float32(0.0)
            for j in range(k):
                best[j, x] = np.float32(math.exp(best[j, x] - largest))
                total += best[j, x]
            for j in range(k):
                top[s, j, y, x] = index[j, x]
                prob[s, j, y, x] = np.uint8(round(best[j, x] / total * np.float32(255.0)))


def most_probable(
    hu: np.ndarray,
    enclosure: np.ndarray | None,
    marrow_hu: float,
    top: np.ndarray,
    prob: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    group_of: np.ndarray,
    fades: tuple[float, float, float, float, float, float, float],
    air: int,
    out: np.ndarray,
    threads: int,
) -> None:
    """`colorize.Chroma.most_probable` of a chunk of slices in one pass per voxel, into ``out`` (n, Y, X) uint8: 1 +
    the class of the highest ``prob`` x `hu_group_weights` among its network pixel's kept classes (the first of equal
    scores), 0 for air. The weights are the torch path's float32 arithmetic in the same order, so the labels are the
    same (tests/engines/test_colorize.py); the torch path made (n, k, Y, X) int64 and float temporaries and took
    105 ms per 512² slice on 2 cores (2026-11-27).

    Args:
        hu: (n, Y, X) float32 HU, finite; enclosure: (2, n, Y, ceil(X / 8)) uint8 packed bits (`Chroma.enclosure`:
            marrow, where the bone gives way) or None; top, prob: (n, k, h, w) uint8 kept classes and probabilities;
        rows, cols: the network row of each CT row and column of each CT column; group_of: (K,) `HU_GROUPS` index
            of each class; fades: (plain low, plain high, organ low, organ high, blood low, blood high, floor).
    """
    use_threads(threads)
    f32 = np.float32
    _most_probable(
        np.ascontiguousarray(hu, dtype=f32),
        _no_enclosure(hu.shape) if enclosure is None else np.ascontiguousarray(enclosure, dtype=np.uint8),
        f32(marrow_hu),
        np.ascontiguousarray(top),
        np.ascontiguousarray(prob),
        np.ascontiguousarray(rows, dtype=np.int64),
        np.ascontiguousarray(cols, dtype=np.int64),
        np.ascontiguousarray(group_of, dtype=np.int64),
        tuple(f32(fades[i + 1]) for i in (0, 2, 4)),
        tuple(f32(fades[i + 1] - fades[i]) for i in (0, 2, 4)),  # each span as torch rounds it: once, from doubles
        (f32(1.0 - fades[6]), f32(fades[6])),
        int(air),
        out,
    )


@numba.njit(parallel=True, cache=True, nogil=True)
def _most_probable(hu, enclosure, marrow_hu, top, prob, rows, cols, group_of, highs, spans, floors, air, out):
    n, height, width = hu.shape
    k = top.shape[1]
    plain_high, organ_high, blood_high = highs
    plain_span, organ_span, blood_span = spans
    rise, floor = floors
    no_bone = np.float32(1.0) - rise  # 1 - 1 x (1 - floor), as torch computes it
    for job in numba.prange(n * height):
        s, y = job // height, job % height
        r = rows[y]
        fit = np.empty(4, dtype=np.float32)
        for x in range(width):
            h = hu[s, y, x]
            byte, shift = x >> 3, 7 - (x & 7)
            if (enclosure[0, s, y, byte] >> shift) & 1:
                h = max(h, marrow_hu)
            fit[0] = no_bone if (enclosure[1, s, y, byte] >> shift) & 1 else np.float32(1.0)
            fit[1] = _falling(h, blood_high, blood_span, rise, floor)
            fit[2] = _falling(h, organ_high, organ_span, rise, floor)
            fit[3] = _falling(h, plain_high, plain_span, rise, floor)
            c = cols[x]
            best, best_score = top[s, 0, r, c], np.float32(prob[s, 0, r, c]) * fit[group_of[top[s, 0, r, c]]]
            for j in range(1, k):
                score = np.float32(prob[s, j, r, c]) * fit[group_of[top[s, j, r, c]]]
                if score > best_score:
                    best, best_score = top[s, j, r, c], score
            out[s, y, x] = 0 if best == air else best + 1
