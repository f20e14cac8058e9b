"""CPU kernel for the local NCC (numba): `metrics.local_ncc`'s boxes in two fused passes that read each image once.

torch's version pools five whole-volume images (a, b, a², b², ab) along each axis in turn; on popi's 512 x 512 x 141
chest that took 2.7 s a call on 2 cores (2026-11-29), twice per registration (before and after). Here the first pass
makes, slice by slice, the five box means across x then y at the sampled rows and columns straight from a and b, and
the second takes them across z at the sampled slices and averages the correlation over the mask. The boxes are the
same (clipped at the border, centred on every `IC_STRIDE`-th voxel); the sums run in float64.
Written by hand because no library computes a masked, strided local correlation in one pass.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def _plane_means(a, b, half, stride, means):  # pragma: no cover - compiled
    """``means`` (Z, Ys, Xs, 5) float32: per slice, the means of a, b, a², b² and ab over the x-by-y box around each
    sampled row and column (clipped at the border)."""
    d0, d1, d2 = a.shape
    ys, xs = means.shape[1], means.shape[2]
    for z in numba.prange(d0):
        rows = np.zeros((d1, xs, 5))
        for y in range(d1):
            for xo in range(xs):
                lo, hi = max(xo * stride - half, 0), min(xo * stride + half + 1, d2)
                s0 = s1 = s2 = s3 = s4 = 0.0
                for x in range(lo, hi):
                    va, vb = np.float64(a[z, y, x]), np.float64(b[z, y, x])
                    s0 += va
                    s1 += vb
                    s2 += va * va
                    s3 += vb * vb
                    s4 += va * vb
                n = hi - lo
                rows[y, xo, 0], rows[y, xo, 1], rows[y, xo, 2] = s0 / n, s1 / n, s2 / n
                rows[y, xo, 3], rows[y, xo, 4] = s3 / n, s4 / n
        for yo in range(ys):
            lo, hi = max(yo * stride - half, 0), min(yo * stride + half + 1, d1)
            for xo in range(xs):
                for q in range(5):
                    total = 0.0
                    for y in range(lo, hi):
                        total += rows[y, xo, q]
                    means[z, yo, xo, q] = total / (hi - lo)


@numba.njit(parallel=True, cache=True, nogil=True)
def _correlations(means, mask, half, stride, epsilon, sums, counts):  # pragma: no cover - compiled
    """Per sampled slice ``zo``: the box means across z, the correlation at each sampled voxel inside ``mask`` (0
    where either box is constant: ``epsilon``), their sum into ``sums[zo]`` and their count into ``counts[zo]``."""
    d0 = means.shape[0]
    zs, ys, xs = sums.shape[0], means.shape[1], means.shape[2]
    for zo in numba.prange(zs):
        lo, hi = max(zo * stride - half, 0), min(zo * stride + half + 1, d0)
        total, count = 0.0, 0
        for yo in range(ys):
            for xo in range(xs):
                if not mask[zo * stride, yo * stride, xo * stride]:
                    continue
                m0 = m1 = m2 = m3 = m4 = 0.0
                for z in range(lo, hi):
                    m0 += means[z, yo, xo, 0]
                    m1 += means[z, yo, xo, 1]
                    m2 += means[z, yo, xo, 2]
                    m3 += means[z, yo, xo, 3]
                    m4 += means[z, yo, xo, 4]
                n = hi - lo
                m0, m1, m2, m3, m4 = m0 / n, m1 / n, m2 / n, m3 / n, m4 / n
                denominator = np.sqrt(max(m2 - m0 * m0, 0.0) * max(m3 - m1 * m1, 0.0))
                if denominator > epsilon:
                    total += (m4 - m0 * m1) / denominator
                count += 1
        sums[zo], counts[zo] = total, count


def local_ncc_cpu(a: np.ndarray, b: np.ndarray, mask: np.ndarray, window: int, stride: int, epsilon: float) -> float:
    """The mean local NCC of (Z, Y, X) float32 images ``a`` and ``b`` over the sampled voxels of ``mask``, as
    `metrics.local_ncc` defines it; 0.0 where the mask has no sampled voxel."""
    d0, d1, d2 = a.shape
    zs, ys, xs = (d0 - 1) // stride + 1, (d1 - 1) // stride + 1, (d2 - 1) // stride + 1
    means = np.empty((d0, ys, xs, 5), np.float32)
    _plane_means(a, b, window // 2, stride, means)
    sums, counts = np.zeros(zs), np.zeros(zs, np.int64)
    _correlations(means, mask, window // 2, stride, epsilon, sums, counts)
    count = int(counts.sum())
    return float(sums.sum() / count) if count else 0.0
