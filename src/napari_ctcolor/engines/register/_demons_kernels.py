"""CPU kernels for the refinement's demons iteration (numba): the scheme of `demons._Level.iterate` in a few fused
passes over memory instead of torch's dozens of whole-volume operations.

On the CPU, torch runs each of that iteration's steps as a whole-volume operation with temporaries: the sampling
grid, the warped image, its gradient, the force's terms, and for each of the six separable smoothing passes a padded
copy of the field. Each pass is bound by memory, not by arithmetic: on popi's 512 x 512 x 141 chest one iteration
took 16.5 s in torch and 8.2 s in SimpleITK's filter (2 cores, 2026-11-28). Here one kernel warps the moving image,
one makes the force and its metric from the warped image's gradient, and one smooths a field along one axis in place
of a line buffer, on numba's threads. The arithmetic is SimpleITK's filter's (`demons` lists it) in float32, where
that filter works in float64: one iteration agrees with it to float32 rounding.
Written by hand because no library fuses these steps (`_field_kernels` says the same of the network's fields).
`numba.njit(parallel=True, cache=True, nogil=True)`: compiled once per machine and cached on disk (`ctcolor warmup`),
and the GIL released while they run, so the viewer's main thread goes on.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True, nogil=True)
def warp(moving, field, to_voxels, warped, inside):  # pragma: no cover - compiled
    """``warped`` (Z, Y, X): ``moving`` (Z, Y, X) sampled linearly at each voxel moved by ``field`` (3, Z, Y, X), mm
    along the index axes (x, y, z), converted by ``to_voxels`` (3,: 1 / spacing x, y, z); the position is clamped to
    the image. ``inside``: the position lies within half a voxel of the image on every axis."""
    d0, d1, d2 = moving.shape
    for z in numba.prange(d0):
        for y in range(d1):
            for x in range(d2):
                px = np.float32(x) + field[0, z, y, x] * to_voxels[0]
                py = np.float32(y) + field[1, z, y, x] * to_voxels[1]
                pz = np.float32(z) + field[2, z, y, x] * to_voxels[2]
                inside[z, y, x] = -0.5 <= px <= d2 - 0.5 and -0.5 <= py <= d1 - 0.5 and -0.5 <= pz <= d0 - 0.5
                px = min(max(px, np.float32(0.0)), np.float32(d2 - 1))
                py = min(max(py, np.float32(0.0)), np.float32(d1 - 1))
                pz = min(max(pz, np.float32(0.0)), np.float32(d0 - 1))
                x0 = min(int(px), d2 - 2) if d2 > 1 else 0
                y0 = min(int(py), d1 - 2) if d1 > 1 else 0
                z0 = min(int(pz), d0 - 2) if d0 > 1 else 0
                tx, ty, tz = px - np.float32(x0), py - np.float32(y0), pz - np.float32(z0)
                x1, y1, z1 = min(x0 + 1, d2 - 1), min(y0 + 1, d1 - 1), min(z0 + 1, d0 - 1)
                c00 = moving[z0, y0, x0] * (1 - tx) + moving[z0, y0, x1] * tx
                c01 = moving[z0, y1, x0] * (1 - tx) + moving[z0, y1, x1] * tx
                c10 = moving[z1, y0, x0] * (1 - tx) + moving[z1, y0, x1] * tx
                c11 = moving[z1, y1, x0] * (1 - tx) + moving[z1, y1, x1] * tx
                c0 = c00 * (1 - ty) + c01 * ty
                c1 = c10 * (1 - ty) + c11 * ty
                warped[z, y, x] = c0 * (1 - tz) + c1 * tz


@numba.njit(cache=True, nogil=True)
def _derivative(warped, inside, z, y, x, dz, dy, dx, first, last, spacing):  # pragma: no cover - compiled
    """The warped image's derivative (mm) at (z, y, x) along the axis of the unit step (dz, dy, dx), as ITK's
    symmetric-forces demons takes it: central where both neighbours map into the moving image, one-sided over one
    voxel where only one does (``first`` or ``last``: the other lies beyond the grid's edge; or it maps outside), 0
    where neither does."""
    behind_ok = not first and inside[z - dz, y - dy, x - dx]
    ahead_ok = not last and inside[z + dz, y + dy, x + dx]
    if behind_ok and ahead_ok:
        return (warped[z + dz, y + dy, x + dx] - warped[z - dz, y - dy, x - dx]) / (np.float32(2.0) * spacing)
    if ahead_ok:
        return (warped[z + dz, y + dy, x + dx] - warped[z, y, x]) / spacing
    if behind_ok:
        return (warped[z, y, x] - warped[z - dz, y - dy, x - dx]) / spacing
    return np.float32(0.0)


@numba.njit(parallel=True, cache=True, nogil=True)
def force(fixed, fixed_gradient, warped, inside, spacing, k, threshold, update):  # pragma: no cover - compiled
    """``update`` (3, Z, Y, X): the symmetric demons force at each voxel (`demons._Level.iterate`), from the fixed
    image, its gradient (3, Z, Y, X, mm, channels x y z), the warped moving image and ``inside``; ``spacing`` (3,:
    x, y, z mm). Returns the mean squared difference over ``inside`` before the update."""
    d0, d1, d2 = fixed.shape
    squares = np.zeros(d0)
    counts = np.zeros(d0)
    for z in numba.prange(d0):
        total, count = 0.0, 0.0
        for y in range(d1):
            for x in range(d2):
                update[0, z, y, x] = update[1, z, y, x] = update[2, z, y, x] = np.float32(0.0)
                if not inside[z, y, x]:
                    continue
                difference = fixed[z, y, x] - warped[z, y, x]
                total += difference * difference
                count += 1.0
                gx = _derivative(warped, inside, z, y, x, 0, 0, 1, x == 0, x == d2 - 1, spacing[0])
                gy = _derivative(warped, inside, z, y, x, 0, 1, 0, y == 0, y == d1 - 1, spacing[1])
                gz = _derivative(warped, inside, z, y, x, 1, 0, 0, z == 0, z == d0 - 1, spacing[2])
                jx = (fixed_gradient[0, z, y, x] + gx) * np.float32(0.5)
                jy = (fixed_gradient[1, z, y, x] + gy) * np.float32(0.5)
                jz = (fixed_gradient[2, z, y, x] + gz) * np.float32(0.5)
                denominator = jx * jx + jy * jy + jz * jz + difference * difference / k
                if abs(difference) >= threshold and denominator > 1e-9:
                    scale = difference / denominator
                    update[0, z, y, x] = scale * jx
                    update[1, z, y, x] = scale * jy
                    update[2, z, y, x] = scale * jz
        squares[z] = total
        counts[z] = count
    return squares.sum() / max(counts.sum(), 1.0)


@numba.njit(parallel=True, cache=True, nogil=True)
def smooth_axis(field, kernel, axis):  # pragma: no cover - compiled
    """``field`` (3, Z, Y, X) convolved in place along ``axis`` (0 z, 1 y, 2 x) with the odd ``kernel``, the edge
    replicated; an axis of one voxel is left as it is."""
    _, d0, d1, d2 = field.shape
    radius = kernel.shape[0] // 2
    n = (d0, d1, d2)[axis]
    if n == 1:
        return
    if axis == 2:  # along each row: a copy of the row, then the taps
        for cz in numba.prange(3 * d0):
            c, z = cz // d0, cz % d0
            line = np.empty(d2, dtype=np.float32)
            for y in range(d1):
                for x in range(d2):
                    line[x] = field[c, z, y, x]
                for x in range(d2):
                    total = np.float32(0.0)
                    for t in range(kernel.shape[0]):
                        total += kernel[t] * line[min(max(x + t - radius, 0), d2 - 1)]
                    field[c, z, y, x] = total
    elif axis == 1:  # each slice's rows, smoothed across them
        for cz in numba.prange(3 * d0):
            _smooth_rows(field[cz // d0, cz % d0], kernel)
    else:  # for each y, the rows of every slice, smoothed across the slices
        for cy in numba.prange(3 * d1):
            _smooth_rows(field[cy // d1, :, cy % d1, :], kernel)


@numba.njit(cache=True, nogil=True)
def _smooth_rows(rows, kernel):  # pragma: no cover - compiled
    """``rows`` (N, X), a view, convolved in place across its rows with ``kernel``, the edge rows replicated; whole
    rows at a time, so that the inner loop runs along x, contiguous."""
    n, radius = rows.shape[0], kernel.shape[0] // 2
    source = rows.copy()
    for i in range(n):
        out = rows[i]
        out[:] = 0.0
        for t in range(kernel.shape[0]):
            row, w = source[min(max(i + t - radius, 0), n - 1)], kernel[t]
            for x in range(rows.shape[1]):
                out[x] += w * row[x]


@numba.njit(parallel=True, cache=True, nogil=True)
def add(field, update):  # pragma: no cover - compiled
    """``field += update`` (3, Z, Y, X), on numba's threads."""
    _, d0, d1, d2 = field.shape
    for cz in numba.prange(3 * d0):
        c, z = cz // d0, cz % d0
        for y in range(d1):
            for x in range(d2):
                field[c, z, y, x] += update[c, z, y, x]
