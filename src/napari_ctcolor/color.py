"""Colour science for CT colorization: grey -> CIE L*, Lab <-> sRGB, luminance-exact gamut mapping (the palettes
are in `napari_ctcolor.palettes`).

The product's invariant (docs/architecture.md, "Luminance, precisely"): the CIE L* (D65) of every output sRGB pixel
equals the L* of the grey pixel (g, g, g) that the windowed CT shows, to within 1.0 after 8-bit quantisation. This
module is where that is made true:

- The network predicts only a*, b*; L* always comes from the CT grey ``g`` in [0, 1].
- Out-of-gamut colours lose chroma along their own hue (a*, b* scaled by s in [0, 1]); L* is never changed.
- Quantisation to uint8 rounds to the nearest code (to within 0.025 of a code); the worst L* error that this can
  cause anywhere in the sRGB cube is 0.274, found by checking all 2**24 codes (``tests/colour/test_color.py``), so with
  the float path's <= 0.03 every output pixel is within 0.31 of its grey's L*, well inside the 1.0 budget.

Conventions:

- Colour spaces: sRGB (IEC 61966-2-1) and CIE L*a*b* with the D65 2-degree white, exactly as scikit-image defines
  them (same matrix, white point and piecewise constants), so our numbers agree with ``skimage.color``.
- Numpy arrays and torch tensors are channel-last: Lab and RGB are (..., 3), a*b* is (..., 2), grey is (...).
- Grey and sRGB floats are in [0, 1]; L* in [0, 100]; a*, b* are unbounded (the network's range is about +-128).

Example (a slice of the shared CT, every voxel given the dicom palette's liver colour at its own lightness)::

    hu = read_volume("../shared/data/ct/totalseg-body-3mm.nii.gz").array[60]   # (Y, X) HU
    grey = np.clip((hu - (40 - 200)) / 400, 0, 1)                               # soft-tissue window 40/400
    ab = np.broadcast_to(palettes.load_palette("dicom").class_ab(["liver"])[0], (*hu.shape, 2))
    rgb = compose_rgb(grey, ab, chroma=0.8)                                     # (Y, X, 3) uint8
"""

from __future__ import annotations

import sys
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .errors import InputError
from .threads import cpu_threads

if TYPE_CHECKING:
    pass

__all__ = [
    "ComposeTables",
    "compose_rgb",
    "compose_tables",
    "gamut_map_ab",
    "grey_to_lightness",
    "lab_to_srgb",
    "lightness_to_grey",
    "srgb_to_lab",
]


# --------------------------------------------------------------------------------------------------------------------
# Constants: scikit-image's definitions (skimage.color.colorconv), copied so the torch path and our fast numpy path
# reproduce skimage to float precision.
# --------------------------------------------------------------------------------------------------------------------

XYZ_FROM_RGB = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)
RGB_FROM_XYZ = np.linalg.inv(XYZ_FROM_RGB)
WHITE_D65 = (0.95047, 1.0, 1.08883)  # skimage's D65, 2-degree observer (its historical ``lab_ref_white``)

_SRGB_LIN_THRESHOLD = 0.04045  # encoded sRGB value below which the transfer curve is linear
_SRGB_ENC_THRESHOLD = 0.0031308  # the same break point on the linear side
_LAB_T_THRESHOLD = 0.008856  # skimage's epsilon: Y/Yn below which L* is linear in Y
_LAB_F_THRESHOLD = 0.2068966  # skimage's break point on the f = cbrt(t) side
_LAB_KAPPA = 7.787  # slope of the linear part of f(t)
_LAB_F_OFFSET = 16.0 / 116.0

# The XYZ -> linear RGB matrix with the white point folded in, so that linear RGB = M @ (finv(fx), Y, finv(fz)).
M_LAB = RGB_FROM_XYZ * np.array([WHITE_D65[0], 1.0, WHITE_D65[2]])
_M_LAB32 = M_LAB.astype(np.float32)


def _torch():
    import torch

    return torch


def _is_tensor(x: Any) -> bool:
    """True for a torch.Tensor, without importing torch when it is not already loaded."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


# --------------------------------------------------------------------------------------------------------------------
# Grey -> L*
# --------------------------------------------------------------------------------------------------------------------


def _float_array(x) -> np.ndarray:
    """numpy array in float32 when ``x`` is float32, else float64."""
    x = np.asarray(x)
    return x.astype(np.float32 if x.dtype == np.float32 else np.float64, copy=False)


def srgb_decode(c):
    """Encoded sRGB in [0, 1] -> linear light (IEC 61966-2-1); numpy (float32 kept, else float64) or torch."""
    if _is_tensor(c):
        return _torch().where(c > _SRGB_LIN_THRESHOLD, ((c + 0.055) / 1.055).clamp_min(0.0) ** 2.4, c / 12.92)
    c = _float_array(c)
    return np.where(c > _SRGB_LIN_THRESHOLD, np.power(np.maximum((c + 0.055) / 1.055, 0.0), 2.4), c / 12.92)


def srgb_encode(lum):
    """Linear light in [0, 1] -> encoded sRGB; numpy (float32 kept, else float64) or torch."""
    if _is_tensor(lum):
        return _torch().where(
            lum > _SRGB_ENC_THRESHOLD, 1.055 * lum.clamp_min(_SRGB_ENC_THRESHOLD) ** (1 / 2.4) - 0.055, 12.92 * lum
        )
    lum = _float_array(lum)
    return np.where(
        lum > _SRGB_ENC_THRESHOLD, 1.055 * np.power(np.maximum(lum, _SRGB_ENC_THRESHOLD), 1 / 2.4) - 0.055, 12.92 * lum
    )


def lab_f(t):
    """CIE f(t) with skimage's constants: cube root above 0.008856, linear below; numpy or torch."""
    if _is_tensor(t):
        return _torch().where(t > _LAB_T_THRESHOLD, t.clamp_min(0.0) ** (1.0 / 3.0), _LAB_KAPPA * t + _LAB_F_OFFSET)
    return np.where(t > _LAB_T_THRESHOLD, np.cbrt(t), _LAB_KAPPA * t + _LAB_F_OFFSET)


def lab_finv(f):
    """Inverse of `lab_f` with skimage's constants: cube above 0.2068966, linear below; numpy or torch."""
    if _is_tensor(f):
        return _torch().where(f > _LAB_F_THRESHOLD, f * f * f, (f - _LAB_F_OFFSET) / _LAB_KAPPA)
    return np.where(f > _LAB_F_THRESHOLD, f * f * f, (f - _LAB_F_OFFSET) / _LAB_KAPPA)


def grey_to_lightness(g):
    """CIE L* (D65) of the display grey ``g`` shown as the sRGB colour (g, g, g).

    Args:
        g: grey in [0, 1] (values outside are clipped), any shape; a numpy array or scalar, or a torch tensor.

    Returns:
        L* in [0, 100], same shape: numpy float64 (float32 for float32 input), or a tensor of the input's floating
        dtype (float32 for integer tensors). Equals channel 0 of ``skimage.color.rgb2lab`` of (g, g, g).

    Example: ``grey_to_lightness(0.5)`` is 53.39: mid-grey on screen is lighter than half-way in L*.
    """
    if _is_tensor(g):
        g = g if g.is_floating_point() else g.float()
        return 116.0 * lab_f(srgb_decode(g.clamp(0.0, 1.0))) - 16.0
    return 116.0 * lab_f(srgb_decode(np.clip(_float_array(g), 0.0, 1.0))) - 16.0


def lightness_to_grey(lightness):
    """Inverse of `grey_to_lightness`: the grey g in [0, 1] whose (g, g, g) has CIE L* ``lightness`` (in [0, 100]).

    Accepts numpy or torch like `grey_to_lightness`; values outside [0, 100] are clipped.
    """
    if _is_tensor(lightness):
        lightness = lightness if lightness.is_floating_point() else lightness.float()
        lum = lab_finv((lightness.clamp(0.0, 100.0) + 16.0) / 116.0)
        return srgb_encode(lum.clamp(0.0, 1.0)).clamp(0.0, 1.0)
    lum = lab_finv((np.clip(_float_array(lightness), 0.0, 100.0) + 16.0) / 116.0)
    return np.clip(srgb_encode(np.clip(lum, 0.0, 1.0)), 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------------------
# Lab <-> sRGB
# --------------------------------------------------------------------------------------------------------------------


def check_channels(x, n: int, what: str) -> None:
    if x.ndim < 1 or x.shape[-1] != n:
        raise InputError(f"{what} must have shape (..., {n}) (channel-last), got {tuple(x.shape)}")


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIE Lab (D65, 2-degree) -> sRGB in [0, 1], on the CPU with scikit-image (``skimage.color.lab2rgb``).

    Args:
        lab: (..., 3) L* in [0, 100], a*, b*.

    Returns:
        (..., 3) float64 sRGB, clipped to [0, 1] (skimage clips; use `gamut_map_ab` first to keep L* exact).
    """
    from skimage.color import lab2rgb

    lab = np.asarray(lab)
    check_channels(lab, 3, "lab")
    return lab2rgb(lab.astype(np.float64, copy=False))


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB -> CIE Lab (D65, 2-degree) on the CPU with scikit-image (``skimage.color.rgb2lab``).

    Args:
        rgb: (..., 3) floats in [0, 1], or uint8 in [0, 255].

    Returns:
        (..., 3) float64 L* in [0, 100], a*, b*.
    """
    from skimage.color import rgb2lab

    rgb = np.asarray(rgb)
    check_channels(rgb, 3, "rgb")
    rgb = rgb / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64, copy=False)
    return rgb2lab(rgb)


# --------------------------------------------------------------------------------------------------------------------
# Luminance-exact gamut mapping
#
# At a fixed L* (so fixed Y and fy = f(Y)), the colours (L*, s*a*, s*b*), s > 0, share one hue, and their linear RGB
# is M @ (finv(fy + s*a*/500), Y, finv(fy - s*b*/200)): Y, hence L*, does not depend on s. A colour out of gamut is
# moved to the gamut boundary along that ray, s = Cmax(L*, hue) / C, where Cmax is the chroma at which the ray from
# the grey axis first leaves the sRGB gamut. Cmax comes from a table (0.1-0.5 L* x 0.5 degree of hue, bilinear), so the
# step is closed-form, with no per-pixel iteration. Colours already in gamut are never changed.
#
# Interpolating the table can land a hair outside the gamut (its faces are curved between nodes), and skimage's D65
# white (0.95047, 1, 1.08883) is not exactly the white of the sRGB matrix (0.950456, 1, 1.088754), so even
# a* = b* = 0 is up to 1e-4 outside [0, 1] near L* = 100. A last closed-form step removes any such residual by moving
# linear RGB towards (Y, Y, Y) just enough: that keeps Y exactly (the matrix's Y row sums to 1) and moves the hue by
# at most 0.5 degrees (0.43 measured on 10^6 random colours with |a*|, |b*| <= 128 where the mapped chroma is > 1).
#
# Near the yellow cusp (L* > ~93, hue ~95..110 degrees) a constant-L* slice of the sRGB gamut is not star-shaped: a
# ray can leave the gamut and re-enter it. We use the *first* exit from the grey axis, so a colour that lies in such
# a gap is moved inwards to the inner boundary.
# --------------------------------------------------------------------------------------------------------------------

# Pixels per step of the numpy compose: its float32 temporaries then stay in a 1 MB L2 cache. Whole 512 x 512 slices
# at once are 2-3x slower (each temporary is 1 MB and every step goes to main memory).
_CHUNK = 1 << 15

# Table rows: every 0.1 L* up to L* = 10 (near black the chroma limit bends sharply, e.g. for blue), then every 0.5.
# Row coordinate r(L*) = 2 L* + 8 min(L*, 10): 10 rows per L* below 10, 2 above; 281 rows for L* = 0..100.
CMAX_L_ROWS = 281
CMAX_H_STEPS = 720  # columns per 360 degrees of hue; one more column repeats the first, so no wrap-around is needed


def _finv_np(f: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`lab_finv` without a branch (2-4x faster in numpy): m**3 + (f - m) / kappa with m = max(f, F0).

    skimage's linear piece is the tangent of the cube at F0, so this equals the piecewise form to 5e-8. ``f`` is
    left unchanged; the result goes to ``out`` when given.
    """
    t = f.dtype.type
    m = np.maximum(f, t(_LAB_F_THRESHOLD))
    low = np.subtract(f, m)  # 0 above F0
    low *= t(1.0 / _LAB_KAPPA)
    out = np.multiply(m, m, out=out)
    out *= m
    out += low
    return out


_GREY_LEVELS = 16384  # grey lookup step: moves L* by at most 0.007 (half a level times the largest dL*/dg, 206)


@cache
def _grey_tables() -> tuple[np.ndarray, np.ndarray]:
    """f(Y) and Y (float32) of the greys g = k / 16384, k = 0..16384, computed in float64 with skimage's formulas."""
    lum = srgb_decode(np.arange(_GREY_LEVELS + 1) / _GREY_LEVELS)
    return lab_f(lum).astype(np.float32), lum.astype(np.float32)


def _lab_linear_np(fy: np.ndarray, lum: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Linear RGB of (L*, a*, b*) given f(Y) = fy and Y = lum: (n,) arrays -> (3, n), same dtype."""
    t = fy.dtype.type
    xyz = np.empty((3, fy.size), dtype=fy.dtype)
    f = np.multiply(a, t(1 / 500))
    f += fy
    _finv_np(f, out=xyz[0])
    np.multiply(b, t(-1 / 200), out=f)
    f += fy
    _finv_np(f, out=xyz[2])
    xyz[1] = lum
    return (_M_LAB32 if fy.dtype == np.float32 else M_LAB) @ xyz  # one BLAS call: 2x faster than 9 multiply-adds


# Channels up to 1 + 1e-4 count as in gamut: that admits the white-point tint (<= 8.1e-5, in blue) of a* = b* = 0
# near L* = 100 and is clipped at quantisation, which moves L* by at most 0.02 (a channel at 1 means Y >= 0.07).
GAMUT_TOP = 1.0 + 1e-4


def _in_gamut_np(rgb: np.ndarray) -> np.ndarray:
    """(3, n) linear RGB -> (n,) bool: every channel in [0, 1 + 1e-4]."""
    ok = rgb.min(axis=0) >= 0.0
    ok &= rgb.max(axis=0) <= GAMUT_TOP
    return ok


@cache
def cmax_table() -> np.ndarray:
    """(281, 721) float32 first-exit chroma Cmax(L*, hue); rows L* = 0, 0.1, ..., 10, 10.5, ..., 100, columns hue.

    Built once, in float32 (about 0.4 s): a scan in chroma steps of 4 finds the first step out of gamut along each
    ray (the in-gamut gaps near the yellow cusp are more than 10 wide), then 15 bisection steps refine it to 1e-4.
    """
    rows = np.arange(CMAX_L_ROWS, dtype=np.float64)
    light = np.repeat(np.where(rows <= 100, rows / 10.0, 10.0 + (rows - 100) / 2.0), CMAX_H_STEPS + 1)
    hue = np.tile(np.linspace(-np.pi, np.pi, CMAX_H_STEPS + 1), CMAX_L_ROWS)
    fy = ((light + 16.0) / 116.0).astype(np.float32)
    lum = _finv_np(fy)
    cos, sin = np.cos(hue).astype(np.float32), np.sin(hue).astype(np.float32)

    def inside(chroma, idx):
        return _in_gamut_np(_lab_linear_np(fy[idx], lum[idx], chroma * cos[idx], chroma * sin[idx]))

    step = 4.0
    hi = np.full(fy.size, np.inf, dtype=np.float32)
    for chroma in np.arange(0.0, 150.0, step, dtype=np.float32):  # sRGB's largest chroma in CIELAB is 134 (blue)
        todo = np.flatnonzero(np.isinf(hi))
        hi[todo[~inside(chroma, todo)]] = chroma
    lo = np.maximum(hi - np.float32(step), np.float32(0.0))
    everything = slice(None)
    for _ in range(15):
        mid = np.float32(0.5) * (lo + hi)
        ok = inside(mid, everything)
        lo = np.where(ok, mid, lo)
        hi = np.where(ok, hi, mid)
    return lo.reshape(CMAX_L_ROWS, CMAX_H_STEPS + 1)


def _boundary_scale_np(fy: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) f(Y), a*, b* (float32) -> s = min(1, Cmax(L*, hue) / C), bilinear in the Cmax table."""
    table = cmax_table()
    cols = table.shape[1]
    t = np.float32
    light = fy * t(116.0)
    light -= t(16.0)
    np.clip(light, 0.0, 100.0, out=light)
    li = np.minimum(light, t(10.0))
    li *= t(8.0)
    light *= t(2.0)
    li += light  # row coordinate 2 L* + 8 min(L*, 10)
    row = np.minimum(np.floor(li), t(CMAX_L_ROWS - 2))  # float32 throughout: mixed int/float ops are 4x slower
    li -= row  # now the weight of row + 1
    hj = np.arctan2(b, a)
    hj += t(np.pi)
    hj *= t(CMAX_H_STEPS / (2 * np.pi))
    col = np.minimum(np.floor(hj), t(CMAX_H_STEPS - 1))
    hj -= col
    row *= t(cols)
    row += col
    k = row.astype(np.int32)
    flat = table.ravel()
    top = np.take(flat, k)
    top += hj * (np.take(flat, k + 1) - top)
    k += cols
    bottom = np.take(flat, k)
    bottom += hj * (np.take(flat, k + 1) - bottom)
    bottom -= top
    bottom *= li
    top += bottom  # Cmax
    chroma = a * a
    chroma += b * b
    np.sqrt(chroma, out=chroma)
    np.maximum(chroma, t(1e-30), out=chroma)  # C = 0 gives s = 1, harmless: a* = b* = 0 stays grey
    top /= chroma
    return np.minimum(top, t(1.0), out=top)


def _desaturate_linear_np(rgb: np.ndarray, lum: np.ndarray) -> None:
    """In place: move (3, n) linear RGB towards (Y, Y, Y) just enough to lie in [0, 1]^3. Y is kept exactly.

    Y + t * (rgb - Y) has luminance Y for every t; the largest t <= 1 in gamut is set by the largest and smallest
    channels: t = min(1, (1 - Y) / (max - Y), Y / (Y - min)). Each ratio is >= 1 when that side is in gamut.
    """
    tiny = rgb.dtype.type(1e-30)
    hi = np.maximum(np.maximum(rgb[0], rgb[1]), rgb[2])
    lo = np.minimum(np.minimum(rgb[0], rgb[1]), rgb[2])
    hi -= lum
    np.maximum(hi, tiny, out=hi)
    t = np.divide(1.0 - lum, hi)
    lo = np.subtract(lum, lo, out=lo)
    np.maximum(lo, tiny, out=lo)
    np.minimum(t, np.divide(lum, lo), out=t)
    np.minimum(t, 1.0, out=t)
    rgb -= lum
    rgb *= t
    rgb += lum
    np.clip(rgb, 0.0, 1.0, out=rgb)  # float rounding only (<= 1e-7)


def _gamut_linear_np(fy: np.ndarray, lum: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n,) float32 f(Y), Y, a*, b* -> ((3, n) linear RGB in [0, 1]^3 with luminance Y, indices that were mapped)."""
    rgb = _lab_linear_np(fy, lum, a, b)
    bad = np.flatnonzero(~_in_gamut_np(rgb))
    if bad.size:
        fy_b, lum_b, a_b, b_b = fy[bad], lum[bad], a[bad], b[bad]
        s = _boundary_scale_np(fy_b, a_b, b_b)
        a_b *= s
        b_b *= s
        rgb_b = _lab_linear_np(fy_b, lum_b, a_b, b_b)
        _desaturate_linear_np(rgb_b, lum_b)
        for k in range(3):  # row by row: 3x faster than rgb[:, bad] = rgb_b
            rgb[k, bad] = rgb_b[k]
    return rgb, bad


def _as_float32_ab(shape: tuple[int, ...], ab) -> np.ndarray:
    ab = np.asarray(ab)
    if ab.shape != (*shape, 2):
        raise InputError(f"ab must have shape {(*shape, 2)} (the grey/L* shape plus a last axis of 2), got {ab.shape}")
    return ab.astype(np.float32, copy=False)


def gamut_map_ab(lightness: np.ndarray, ab: np.ndarray) -> np.ndarray:
    """Reduce the chroma of (L*, a*, b*) along its hue until it fits the sRGB gamut; L* is never changed (numpy).

    Args:
        lightness: (...) L* in [0, 100].
        ab: (..., 2) a*, b*; any magnitude (the network's +-128 included).

    Returns:
        (..., 2) float32 a*, b*. In-gamut colours are returned unchanged. Out-of-gamut ones land on the gamut boundary
        (its first crossing along the ray from grey; up to 1% inside it, 5% at the gamut's sharpest corners) with
        the hue atan2(b*, a*) kept to 0.5 degrees. (L*, a*, b*) is then in sRGB [0, 1 + 1e-4]^3 (1e-4: the
        white-point residual, see the notes above) and has L* equal to ``lightness`` to 1e-2 (float32).
    """
    lightness = np.asarray(lightness, dtype=np.float32)
    ab = _as_float32_ab(lightness.shape, ab)
    if not (np.isfinite(lightness).all() and np.isfinite(ab).all()):
        raise InputError("lightness and ab must be finite: found NaN or infinity")
    fy = ((np.clip(lightness, 0.0, 100.0) + 16.0) / 116.0).reshape(-1)
    lum = _finv_np(fy)
    a = ab[..., 0].reshape(-1)
    b = ab[..., 1].reshape(-1)
    rgb, bad = _gamut_linear_np(fy, lum, a, b)
    out = np.array(ab, dtype=np.float32).reshape(-1, 2)
    if bad.size:  # back to Lab for the mapped pixels only
        f = lab_f((XYZ_FROM_RGB @ rgb[:, bad].astype(np.float64)) / np.asarray(WHITE_D65)[:, None])
        out[bad, 0] = 500.0 * (f[0] - f[1])
        out[bad, 1] = 200.0 * (f[1] - f[2])
    return out.reshape(ab.shape)


# --------------------------------------------------------------------------------------------------------------------
# uint8 quantisation of linear light without a per-pixel power: a 65536-entry table of codes, indexed by the nearest
# multiple of 1/65535. The table holds round(255 * encode(k / 65535)); the table step moves the encoded value by at
# most 12.92 * 0.5 / 65535 * 255 = 0.025 of a code, so each code is within 0.525 of 255 * encode(y) (exact rounding
# would be within 0.5). The L* bound in `compose_rgb` is proven with that 0.525 (tests/colour/test_color.py).
# --------------------------------------------------------------------------------------------------------------------

_Q_STEPS = 65535
_Q_CODES = np.rint(255.0 * np.clip(srgb_encode(np.arange(_Q_STEPS + 1) / _Q_STEPS), 0.0, 1.0)).astype(np.uint8)


def _quantise_linear_np(lin: np.ndarray, out: np.ndarray) -> None:
    """(3, n) float32 linear light in [0, 1] -> uint8 sRGB codes written into ``out`` (n, 3) (see the notes above)."""
    idx = lin * np.float32(_Q_STEPS)
    idx += np.float32(0.5)
    idx = idx.astype(np.int32)
    for k in range(3):  # a take per channel straight into the interleaved output beats a transpose by 2x
        np.take(_Q_CODES, idx[k], out=out[:, k], mode="clip")


# --------------------------------------------------------------------------------------------------------------------
# compose: grey + a*b* -> uint8 sRGB with the luminance invariant
# --------------------------------------------------------------------------------------------------------------------


def check_chroma_strength(strength: float) -> float:
    """The chroma strength (the share of the colour's a*b* shown: 0 grey, 1 full colour) as a float; `InputError`
    outside [0, 1]. The one check of this setting: the CLI, the docks, the Slicer logic, batch and the engines call
    it."""
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"chroma strength must be in [0, 1], got {strength}")
    return strength


def compose_rgb(grey: np.ndarray, ab: np.ndarray, chroma: float = 1.0) -> np.ndarray:
    """Colour the display grey with a*, b* and return uint8 sRGB whose L* equals the grey's L* (numpy, CPU).

    Each pixel becomes (L*(g), chroma * a*, chroma * b*), moved along its hue into the sRGB gamut when it is outside
    (the algorithm of `gamut_map_ab`), converted to sRGB and rounded to the nearest uint8 code.

    Args:
        grey: (...) display grey in [0, 1] (the windowed CT; values outside are clipped).
        ab: (..., 2) a*, b* per pixel, any magnitude.
        chroma: strength in [0, 1]; 0 returns exactly the grey CT, R = G = B = round(255 * g).

    Returns:
        (..., 3) uint8 sRGB. On every pixel |L*(output) - L*(g, g, g)| <= 1.0 for any ab; by design <= 0.31 (8-bit
        rounding accounts for at most 0.274 of it).

    Raises:
        InputError: when ``grey`` is not floating point, ``ab``'s shape is not ``grey.shape + (2,)``, either holds
            NaN or infinity, or ``chroma`` is outside [0, 1].
    """
    chroma = check_chroma_strength(chroma)
    grey = np.asarray(grey)
    if not np.issubdtype(grey.dtype, np.floating):
        raise InputError(f"grey must be floating point in [0, 1] (the windowed CT), got dtype {grey.dtype}")
    ab = _as_float32_ab(grey.shape, ab)
    if not (np.isfinite(grey).all() and np.isfinite(ab).all()):
        raise InputError("grey and ab must be finite: found NaN or infinity")
    if chroma == 0.0:  # in the input's own precision, so that the codes are exactly round(255 * g)
        code = np.rint(np.clip(_float_array(grey), 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.repeat(code[..., None], 3, axis=-1)
    g = np.clip(grey, 0.0, 1.0).astype(np.float32, copy=False).reshape(-1)
    a = ab[..., 0].reshape(-1) * np.float32(chroma)  # copies: the mapping works in place on them
    b = ab[..., 1].reshape(-1) * np.float32(chroma)
    fy_table, lum_table = _grey_tables()
    level = g * np.float32(_GREY_LEVELS)
    level += np.float32(0.5)
    level = level.astype(np.int32)
    extreme = (level == 0) | (level == _GREY_LEVELS)  # black and white hold no colour; in CT: air and bone
    np.copyto(a, 0.0, where=extreme)
    np.copyto(b, 0.0, where=extreme)
    out = np.empty((g.size, 3), dtype=np.uint8)

    def piece(start: int) -> None:
        sl = slice(start, start + _CHUNK)
        rgb, _ = _gamut_linear_np(np.take(fy_table, level[sl]), np.take(lum_table, level[sl]), a[sl], b[sl])
        _quantise_linear_np(rgb, out[sl])

    starts = range(0, g.size, _CHUNK)
    if len(starts) > 1 and cpu_threads() > 1:
        # numpy releases the GIL inside its loops and BLAS calls, so cache-sized pieces run on all cores.
        list(_compose_pool().map(piece, starts))
    else:
        for start in starts:
            piece(start)
    return out.reshape(*grey.shape, 3)


class ComposeTables(NamedTuple):
    """The constants of `compose_rgb`, for a kernel that composes the same way in one pass (engines.colorize.fused)."""

    fy: np.ndarray  # (16385,) float32 f(Y) of the greys k / 16384
    lum: np.ndarray  # (16385,) float32 Y of those greys
    cmax: np.ndarray  # (281, 721) float32 first-exit chroma (`cmax_table`)
    codes: np.ndarray  # (65536,) uint8 sRGB codes of linear light k / 65535
    m_lab: np.ndarray  # (3, 3) float32 (finv(fx), Y, finv(fz)) -> linear RGB
    grey_levels: int = _GREY_LEVELS
    q_steps: int = _Q_STEPS
    gamut_top: float = GAMUT_TOP
    f_threshold: float = _LAB_F_THRESHOLD
    kappa: float = _LAB_KAPPA
    cmax_rows: int = CMAX_L_ROWS
    cmax_hue_steps: int = CMAX_H_STEPS


def compose_tables() -> ComposeTables:
    """The lookup tables and constants `compose_rgb` uses (built once)."""
    fy, lum = _grey_tables()
    return ComposeTables(fy, lum, cmax_table(), _Q_CODES, _M_LAB32)


@cache
def _compose_pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=cpu_threads(), thread_name_prefix="ctcolor-compose")
