"""Seeded procedural CT phantom: an axial torso from the lower chest to the upper abdomen, in HU, with labels.

The phantom is the plugin's sample data, the demo's default input and a generator of labelled training data. The
anatomy is built from smooth analytic shapes (ellipsoids deformed by low-frequency waves, tubes swept along
polylines, branching vessel trees, height fields), evaluated on the voxel grid and painted back to front. White
noise is added and the image goes through a Gaussian like a soft reconstruction kernel, which also correlates the
noise.

Geometry (LPS, direction = identity): array x (columns) runs toward the patient's left, y (rows) toward posterior and
z (slices) toward superior, so slice 0 is the most caudal. In-plane sizes are in mm: an adult torso of about
300 x 210 mm centred on x = y = 0, lying supine on the couch. Along z, the vertebral levels T6 to L1 (8 levels) span
``torso_length_mm``, by default the field of view, so that even a short stack shows lungs, heart, liver, spleen and
kidneys (levels are compressed when the stack is shorter than the ~20 cm they span in an adult).

Labels use TotalSegmentator v2 structure names. Ids are compact (1..N) per phantom, in the order of `STRUCTURES`,
and only structures that reach the field of view are listed, so look them up by name (`Phantom.mask`).

Variation: every structure draws its jitter from its own random stream (seed, structure name), so adding a structure
leaves the others unchanged. ``variation`` scales the jitter of positions and sizes (0 gives every seed the same
anatomy), ``hu`` overrides tissue values (e.g. a contrast phase), and ``noise_hu``, ``blur_mm``, ``spacing`` and
``torso_length_mm`` vary the acquisition.

Example::

    from napari_ctcolor.phantom import make_phantom

    ph = make_phantom(seed=0)
    ph.volume.array.shape, ph.volume.array.dtype   # (40, 192, 192), int16 HU
    ph.volume.array[ph.mask("liver")].mean()       # about 60 HU
    sorted(ph.label_names.values())[:3]            # ['aorta', 'autochthon_left', 'autochthon_right']
"""

from __future__ import annotations

import operator
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import InputError
from .io.volume import Volume

# Mean attenuation of each tissue in HU: non-contrast adult CT at 120 kVp, typical literature values. One table so
# that a config or a contrast phase can override it (``make_phantom(hu={"blood": 180})``).
HU: dict[str, float] = {
    "air": -1000.0,
    "lung": -850.0,  # parenchyma; a +-20 HU gravity gradient (denser posteriorly) is added
    "fat": -100.0,
    "skin": 30.0,
    "muscle": 50.0,
    "blood": 40.0,  # heart, aorta, IVC and lung vessels without contrast
    "liver": 60.0,
    "spleen": 50.0,
    "kidney": 35.0,
    "pancreas": 40.0,
    "bile": 10.0,
    "gut_wall": 40.0,  # stomach, oesophagus and colon wall
    "gastric_fluid": 15.0,
    "stool": -40.0,
    "cortical_bone": 900.0,
    "cancellous_bone": 250.0,
    "posterior_elements": 350.0,  # core of the thin vertebral arches and processes
    "disc": 80.0,
    "cartilage": 120.0,
    "csf": 10.0,
    "spinal_cord": 35.0,
    "fissure": -600.0,  # interlobar pleura, partial-volumed into lung
    "table_shell": 200.0,  # carbon-fibre couch skin
    "table_core": -900.0,  # its foam core
}

# Structures the phantom can label, in TotalSegmentator v2 id order; a phantom's compact ids follow this order.
STRUCTURES: tuple[str, ...] = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "liver",
    "stomach",
    "pancreas",
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "esophagus",
    "colon",
    *(f"vertebrae_L{i}" for i in range(5, 0, -1)),
    *(f"vertebrae_T{i}" for i in range(12, 0, -1)),
    "heart",
    "aorta",
    "inferior_vena_cava",
    "spinal_cord",
    "autochthon_left",
    "autochthon_right",
    "iliopsoas_left",
    "iliopsoas_right",
    *(f"rib_left_{i}" for i in range(1, 13)),
    *(f"rib_right_{i}" for i in range(1, 13)),
    "sternum",
    "costal_cartilages",
)
_ID = {name: i + 1 for i, name in enumerate(STRUCTURES)}  # working ids while painting; compacted at the end
_LUNG_LOBES = tuple(name for name in STRUCTURES if name.startswith("lung_"))

_LEVELS = (6.0, 14.0)  # vertebral levels (T1 = 1 ... T12 = 12, L1 = 13) at the ends of the torso section
_SKIN_MM = 1.5
_RIB_ZONE_MM = 7.0  # ribs and intercostal muscle between the muscle wall and the pleura


@dataclass
class Phantom:
    """A synthetic CT with its label map.

    Attributes:
        volume: HU, int16, (Z, Y, X), LPS with identity direction; ``meta`` has modality, series description, window.
        labels: uint8 (Z, Y, X) on the same grid, 0 = unlabelled.
        label_names: label id -> TotalSegmentator v2 structure name, ids compact from 1.
    """

    volume: Volume
    labels: np.ndarray
    label_names: dict[int, str]

    def label_id(self, name: str) -> int:
        """The id of structure ``name`` in this phantom (KeyError naming the present structures if absent)."""
        for label, known in self.label_names.items():
            if known == name:
                return label
        raise KeyError(f"{name!r} is not labelled in this phantom; present: {', '.join(self.label_names.values())}")

    def mask(self, name: str) -> np.ndarray:
        """Boolean (Z, Y, X) mask of structure ``name``."""
        return self.labels == self.label_id(name)


def make_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] = (40, 192, 192),
    spacing: tuple[float, float, float] = (3.0, 1.8, 1.8),
    *,
    variation: float = 1.0,
    noise_hu: float = 15.0,
    blur_mm: float = 0.8,
    torso_length_mm: float | None = None,
    centre_z_mm: float = 0.0,
    table: bool = True,
    hu: Mapping[str, float] | None = None,
) -> Phantom:
    """A seeded synthetic torso CT (lower chest to upper abdomen) with TotalSegmentator-named labels.

    Args:
        seed: a non-negative integer; the same seed gives byte-identical arrays, other seeds move and resize the
            organs a little (and draw other noise).
        shape: (Z, Y, X) voxels. The torso is about 300 x 210 mm in-plane, so keep Y * spacing and X * spacing above
            ~320 mm to see all of it (512 x 512 at 0.675 mm covers the default field).
        spacing: (z, y, x) voxel size in mm.
        variation: scale of the anatomical jitter of positions and sizes (0 = one canonical anatomy for every seed,
            which then only changes the noise).
        noise_hu: standard deviation of the image noise in HU (0 = none).
        blur_mm: in-plane Gaussian sigma (mm) of the reconstruction kernel (0 = none). As in a real reconstruction it
            blurs the anatomy and correlates the noise. Slices are sampled at their centres (no slice profile yet).
        torso_length_mm: z length (mm) of the section from T6 to L1. None: the section fills the stack, centred on
            it. Given: the section is centred on z = 0, so its size stays fixed whatever the slice spacing or count,
            and ``centre_z_mm`` moves the field of view along the patient.
        centre_z_mm: z (LPS, mm) of the volume centre; x and y are centred on 0.
        table: draw the patient couch under the back.
        hu: overrides of entries of `HU` (e.g. a contrast phase: ``{"blood": 180}``).

    Returns:
        A Phantom: ``volume`` (HU int16, window 40/400), ``labels`` (uint8) and ``label_names``.

    Raises:
        InputError: for a negative seed, a bad shape/spacing, negative noise/blur/variation or an unknown tissue.

    Example::

        ph = make_phantom(seed=3, shape=(60, 512, 512), spacing=(2.0, 0.675, 0.675))
        ph.volume.spacing   # (2.0, 0.675, 0.675)
    """
    try:
        seed = operator.index(seed)
    except TypeError:
        raise InputError(f"phantom seed must be an integer, got {seed!r}") from None
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if seed < 0:
        raise InputError(f"phantom seed must not be negative, got {seed}")
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"phantom shape must be three positive voxel counts (Z, Y, X), got {shape}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"phantom spacing must be three positive numbers in mm (z, y, x), got {spacing}")
    if min(noise_hu, blur_mm, variation) < 0:
        raise InputError("noise_hu, blur_mm and variation must not be negative")
    if torso_length_mm is not None and not torso_length_mm > 0:
        raise InputError(f"torso_length_mm must be positive, got {torso_length_mm}")
    unknown = sorted(set(hu or {}) - set(HU))
    if unknown:
        raise InputError(f"unknown tissue(s) in hu overrides: {', '.join(unknown)}; known: {', '.join(HU)}")

    tissue_hu = {**HU, **{k: float(v) for k, v in (hu or {}).items()}}
    origin_zyx = -(np.array(shape) - 1) / 2 * np.array(spacing) + np.array([centre_z_mm, 0.0, 0.0])
    canvas = _Canvas(shape, spacing, origin_zyx, tissue_hu["air"])
    _Torso(canvas, seed, variation, tissue_hu, table, torso_length_mm).build()

    # White noise through the same kernel as the anatomy, scaled to come out at noise_hu.
    sigma = (0.0, blur_mm / spacing[1], blur_mm / spacing[2]) if blur_mm > 0 else None
    image = canvas.hu
    if noise_hu > 0:
        noise = _rng(seed, "noise").standard_normal(shape, dtype=np.float32)
        noise *= np.float32(noise_hu / (_kernel_norm(sigma) if sigma else 1.0))
        image += noise
        del noise
    if sigma:
        image = ndimage.gaussian_filter(image, sigma, truncate=3.0)
    array = np.clip(np.rint(image, out=image), -1024, 3071, out=image).astype(np.int16)

    # Compact the ids to 1..N in STRUCTURES order, keeping the structures that reached the field of view.
    present = np.flatnonzero(np.bincount(canvas.labels.ravel(), minlength=len(STRUCTURES) + 1)[1:]) + 1
    lut = np.zeros(256, np.uint8)
    lut[present] = np.arange(1, len(present) + 1)
    volume = Volume(
        array,
        spacing=spacing,
        origin=tuple(origin_zyx[::-1]),
        meta={"modality": "CT", "series_description": f"ctcolor phantom (seed {seed})", "window": (40.0, 400.0)},
    )
    return Phantom(volume, lut[canvas.labels], {int(lut[i]): STRUCTURES[i - 1] for i in present})


def _rng(seed: int, key: str) -> np.random.Generator:
    """An independent generator per (seed, structure): adding a structure later leaves the others unchanged."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _kernel_norm(sigma) -> float:
    """L2 norm of the Gaussian kernel of ``sigma`` (voxels): the factor by which it scales white noise's std."""
    half = [int(3 * sg + 0.5) + 1 if sg > 0 else 0 for sg in sigma]
    impulse = np.zeros([2 * n + 1 for n in half], np.float32)
    impulse[tuple(half)] = 1
    return float(np.sqrt(np.sum(ndimage.gaussian_filter(impulse, sigma, mode="constant", truncate=3.0) ** 2)))


class _Canvas:
    """The voxel grid being painted: mm coordinates, an HU image (float32) and a label map (working ids)."""

    def __init__(self, shape, spacing, origin_zyx, background_hu: float) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.origin = np.asarray(origin_zyx, dtype=np.float64)
        self.z, self.y, self.x = (
            (self.origin[a] + self.spacing[a] * np.arange(shape[a])).astype(np.float32) for a in range(3)
        )
        self.hu = np.full(shape, background_hu, dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Slices of the voxels whose centres lie in the mm box [lo, hi] (z, y, x); None when it misses the grid."""
        i0 = np.maximum(np.ceil((np.asarray(lo) - self.origin) / self.spacing), 0).astype(int)
        i1 = np.minimum(np.floor((np.asarray(hi) - self.origin) / self.spacing) + 1, self.shape).astype(int)
        if np.any(i1 <= i0):
            return None
        return tuple(slice(a, b) for a, b in zip(i0, i1, strict=True))

    def coords(self, box):
        """Broadcastable mm coordinates (z[:, None, None], y[None, :, None], x[None, None, :]) of a box."""
        return self.z[box[0], None, None], self.y[None, box[1], None], self.x[None, None, box[2]]

    def paint(self, box, mask, hu, name: str | None = None, over: Sequence[str] | None = None) -> None:
        """Set HU (a number or an array broadcastable to the box) and the label (None = unlabelled) where ``mask``.

        ``over`` restricts painting to voxels that currently carry one of those labels ("" = unlabelled).
        """
        if box is None:
            return
        labels = self.labels[box]
        mask = np.broadcast_to(mask, labels.shape)
        if over is not None:
            allowed = np.zeros(256, bool)
            allowed[[_ID.get(n, 0) for n in over]] = True
            mask = mask & allowed[labels]
        self.hu[box][mask] = np.broadcast_to(hu, mask.shape)[mask] if np.ndim(hu) else hu
        labels[mask] = _ID[name] if name else 0


@dataclass
class _Blob:
    """An ellipsoid deformed by a few low-frequency waves: inside where ``rho < 1``.

    centre (z, y, x) mm; semi (x, y, z) mm along its own axes; ``rotation`` (3x3, xyz) has its axes as columns.
    """

    centre: np.ndarray
    semi: np.ndarray
    rotation: np.ndarray
    waves: np.ndarray  # (k, 5): frequency vector (3), phase, amplitude, in units of the semi-axes

    @classmethod
    def make(cls, rng, centre, semi, yaw=0.0, tilt=0.0, wobble=0.08, n_waves=4) -> _Blob:
        """yaw: degrees about +z (turning +x toward +y); tilt: degrees about +y (turning +x toward -z)."""
        cy, sy = np.cos(np.radians(yaw)), np.sin(np.radians(yaw))
        ct, st = np.cos(np.radians(tilt)), np.sin(np.radians(tilt))
        rotation = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]]) @ np.array([[ct, 0, st], [0, 1, 0], [-st, 0, ct]])
        directions = rng.normal(size=(n_waves, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        waves = np.column_stack(
            [
                directions * rng.uniform(1.2, 2.6, (n_waves, 1)),
                rng.uniform(0, 2 * np.pi, n_waves),
                wobble * rng.uniform(0.5, 1.0, n_waves) / np.sqrt(n_waves / 2),
            ]
        )
        return cls(np.asarray(centre, float), np.asarray(semi, float), rotation, waves)

    def rho(self, canvas: _Canvas, box, grow_mm: float = 0.0) -> np.ndarray:
        """Normalised radius on ``box`` (< 1 inside); ``grow_mm`` inflates every semi-axis."""
        z, y, x = canvas.coords(box)
        offset = (x - np.float32(self.centre[2]), y - np.float32(self.centre[1]), z - np.float32(self.centre[0]))
        u = [
            sum(np.float32(self.rotation[j, i] / (self.semi[i] + grow_mm)) * offset[j] for j in range(3))
            for i in range(3)
        ]
        radius = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
        for fx, fy, fz, phase, amplitude in self.waves.astype(np.float32):
            radius -= amplitude * np.sin(fx * u[0] + fy * u[1] + fz * u[2] + phase)
        return radius

    def inside(self, canvas: _Canvas, grow_mm: float = 0.0):
        """(box, mask) of the blob, or (None, None) when it misses the grid."""
        half_xyz = np.sqrt(((self.rotation * (self.semi + grow_mm)) ** 2).sum(axis=1))
        half = half_xyz[::-1] * (1 + np.abs(self.waves[:, 4]).sum()) + 1
        box = canvas.box(self.centre - half, self.centre + half)
        return (box, self.rho(canvas, box, grow_mm) < 1) if box else (None, None)


def _sweep(canvas: _Canvas, tubes: Sequence[tuple[np.ndarray, np.ndarray]]):
    """Depth (mm, > 0 inside) into the union of tubes, each swept along a polyline with a linearly varying radius.

    tubes: [(points (k, 3) z, y, x mm, radii (k,) mm), ...]. Returns (box, depth) on the union's bounding box, or
    (None, None) when it misses the grid.
    """
    segments = [
        (pts[i], pts[i + 1], rad[i], rad[i + 1])
        for pts, rad in ((np.asarray(p, float), np.asarray(r, float)) for p, r in tubes)
        for i in range(len(pts) - 1)
    ]
    reach = [max(ra, rb) for _, _, ra, rb in segments]
    lo = [np.minimum(a, b) - r for (a, b, _, _), r in zip(segments, reach, strict=True)]
    hi = [np.maximum(a, b) + r for (a, b, _, _), r in zip(segments, reach, strict=True)]
    box = canvas.box(np.min(lo, axis=0), np.max(hi, axis=0))
    if box is None:
        return None, None
    depth = np.full([s.stop - s.start for s in box], -np.inf, np.float32)
    for (a, b, ra, rb), seg_lo, seg_hi in zip(segments, lo, hi, strict=True):
        seg = canvas.box(seg_lo, seg_hi)
        if seg is None:
            continue
        z, y, x = canvas.coords(seg)
        v = (b - a).astype(np.float32)
        wz, wy, wx = z - np.float32(a[0]), y - np.float32(a[1]), x - np.float32(a[2])
        t = np.clip((wz * v[0] + wy * v[1] + wx * v[2]) / np.float32(max(v @ v, 1e-9)), 0, 1)
        dist = np.sqrt((wz - t * v[0]) ** 2 + (wy - t * v[1]) ** 2 + (wx - t * v[2]) ** 2)
        local = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(seg, box, strict=True))
        np.maximum(depth[local], np.float32(ra) + t * np.float32(rb - ra) - dist, out=depth[local])
    return box, depth


def _paint_segments(canvas: _Canvas, a, b, ra, rb, hu: float, where: np.ndarray, chunk: int = 256) -> None:
    """Blend ``hu`` into the image over many thin tapered capsules a -> b ((n, 3) z, y, x mm; radii ra -> rb mm) by
    their anti-aliased coverage, only on voxels whose label ``l`` has ``where[l]``. Vectorised over the segments."""
    shape = np.array(canvas.shape)
    pixel = np.float32(canvas.spacing[1:].min())
    coverage = np.zeros(canvas.hu.size, np.float32)
    touched = []
    for c in range(0, len(a), chunk):
        sa, sb, sra, srb = a[c : c + chunk], b[c : c + chunk], ra[c : c + chunk], rb[c : c + chunk]
        reach = np.maximum(sra, srb)[:, None]
        i0 = np.clip(np.ceil((np.minimum(sa, sb) - reach - canvas.origin) / canvas.spacing), 0, shape).astype(np.int64)
        i1 = np.clip(np.floor((np.maximum(sa, sb) + reach - canvas.origin) / canvas.spacing) + 1, 0, shape)
        extent = np.maximum(i1.astype(np.int64) - i0, 0)
        count = extent.prod(axis=1)
        if count.sum() == 0:
            continue
        # Enumerate every voxel of every segment's bounding box; seg[i] is the segment of voxel i.
        seg = np.repeat(np.arange(len(sa)), count)
        local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        kz, rest = np.divmod(local, (extent[:, 1] * extent[:, 2])[seg])
        ky, kx = np.divmod(rest, extent[seg, 2])
        index = i0[seg] + np.stack([kz, ky, kx], axis=1)
        w = (index * canvas.spacing + canvas.origin - sa[seg]).astype(np.float32)
        v = (sb - sa).astype(np.float32)[seg]
        t = np.clip((w * v).sum(1) / np.maximum((v * v).sum(1), 1e-6), 0, 1)
        depth = sra[seg] + t * (srb - sra)[seg] - np.sqrt(((w - t[:, None] * v) ** 2).sum(1))
        inside = depth > -pixel / 2
        flat = np.ravel_multi_index(index[inside].T, canvas.shape)
        np.maximum.at(coverage, flat, np.clip(depth[inside] / pixel + 0.5, 0, 1).astype(np.float32))
        touched.append(flat)
    if not touched:
        return
    flat = np.concatenate(touched)
    flat = flat[where[canvas.labels.ravel()[flat]]]
    image = canvas.hu.reshape(-1)
    old = image[flat]
    image[flat] = old + coverage[flat] * (np.float32(hu) - old)  # repeated voxels write the same value


def _vessel_tree(rng, root, points: np.ndarray, radius: float, leaf: int = 3, min_radius: float = 0.7):
    """A branching tree from ``root`` that supplies ``points`` (n, 3) mm: each node heads for the centroid of its
    territory, splits it across its widest axis (at a random quantile) and hands each part to a child whose radius
    follows Murray's law (r^3 proportional to the territory). Returns segments [(a, b, r_a, r_b), ...]."""
    segments = []
    stack = [(np.asarray(root, float), points, radius)]
    while stack:
        start, pts, r = stack.pop()
        centre = pts.mean(axis=0)
        if len(pts) <= leaf or r < min_radius * 1.26:
            segments.append((start, centre, r, r * 0.8))
            continue
        node = start + (centre - start) * rng.uniform(0.35, 0.6)
        segments.append((start, node, r, r * 0.97))
        along = pts[:, np.argmax(np.ptp(pts, axis=0))]
        k = int(rng.uniform(0.3, 0.7) * (len(pts) - 1))
        near = along <= np.partition(along, k)[k]
        for part in (pts[near], pts[~near]):
            if len(part):
                stack.append((node, part, r * (len(part) / len(pts)) ** (1 / 3)))
    return segments


def _smooth_noise(rng: np.random.Generator, shape, spacing, cell_mm: float) -> np.ndarray:
    """A smooth random field (float32, unit variance at the lattice points) on a grid of ``shape`` and ``spacing``
    (mm): normal values on a lattice of ``cell_mm``, interpolated linearly along each axis."""
    field = rng.standard_normal([int(n * s / cell_mm) + 2 for n, s in zip(shape, spacing, strict=True)])
    field = field.astype(np.float32)
    for axis, (n, s) in enumerate(zip(shape, spacing, strict=True)):
        position = np.arange(n) * (s / cell_mm)
        index = position.astype(int)
        frac = (position - index).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        lo, hi = np.take(field, index, axis=axis), np.take(field, index + 1, axis=axis)
        field = lo + (hi - lo) * frac
    return field


def _waves(theta, k, amplitude, phase):
    """1 + a sum of angular harmonics ``k``: a smooth, positive relative modulation around the body."""
    return np.clip(1 + (amplitude * np.cos(np.multiply.outer(theta, k) + phase)).sum(-1), 0.5, None)


def _vertebra(level: int) -> str:
    return f"vertebrae_T{level}" if level <= 12 else f"vertebrae_L{level - 12}"


class _Torso:
    """Paints the anatomy onto a canvas, back to front.

    Positions are written in a canonical body frame: x, y in mm from the body centre (scaled by the body's size) and
    z as a vertebral level (T1 = 1 ... T12 = 12, L1 = 13; fractions lie inside a level). `P` maps them to the grid.
    """

    def __init__(self, canvas: _Canvas, seed: int, variation: float, hu, table: bool, length_mm: float | None):
        self.cv, self.seed, self.variation, self.hu, self.table = canvas, seed, variation, hu, table
        z_top = float(canvas.z[-1]) + canvas.spacing[0] / 2
        z_bottom = float(canvas.z[0]) - canvas.spacing[0] / 2
        self.z_mid = (z_top + z_bottom) / 2 if length_mm is None else 0.0  # z of the section's middle
        self.h = (length_mm or z_top - z_bottom) / (_LEVELS[1] - _LEVELS[0])  # mm per vertebral level
        self.level_mid = sum(_LEVELS) / 2 + self.jitter(self.rng("frame"), 0.25)
        self.level_range = (self.level(z_top), self.level(z_bottom))  # levels at the top and bottom of the grid

        body = self.rng("body")
        self.a = 150 * (1 + self.jitter(body, 0.04))  # half width, mm
        self.b = 105 * (1 + self.jitter(body, 0.04))  # half depth (AP), mm
        self.sx, self.sy = self.a / 150, self.b / 105
        self.cx, self.cy = self.jitter(body, 4.0), self.jitter(body, 4.0)
        self.fat_mm = 12 * (1 + self.jitter(body, 0.25))
        self.scoliosis = self.jitter(self.rng("spine"), 3)  # lateral drift of the spine, mm per 10 levels
        # Low-frequency angular harmonics (k, amplitude, phase) of the outline (mm: static and changing along z) and
        # of the relative thickness of the fat and the muscle layers.
        k = np.arange(2, 6)
        self.outline_waves = [(k, variation * body.normal(0, 2.5, 4) / np.sqrt(k), body.uniform(0, 7, 4)) for _ in "sz"]
        self.layer_waves = [(k, variation * body.normal(0, 0.1, 4), body.uniform(0, 7, 4)) for _ in "fm"]

    # -- frame ---------------------------------------------------------------------------------------------------

    def rng(self, key: str) -> np.random.Generator:
        # Without variation every seed shares one anatomy, details (organ wobble, vessel trees) included.
        return _rng(self.seed if self.variation > 0 else 0, key)

    def jitter(self, rng: np.random.Generator, sd: float) -> float:
        """A normal draw of ``sd`` scaled by ``variation``, clipped at 2.5 sd (always consumes one draw)."""
        return float(np.clip(rng.normal(), -2.5, 2.5) * sd * self.variation)

    def Z(self, level):
        """z (mm) of vertebral level(s)."""
        return self.z_mid - (np.asarray(level, float) - self.level_mid) * self.h

    def level(self, z):
        """Vertebral level(s) at z (mm)."""
        return self.level_mid + (self.z_mid - z) / self.h

    def P(self, x, y, level) -> np.ndarray:
        """Canonical x, y (mm) and vertebral level(s) -> grid point(s) (z, y, x) mm, shape (..., 3)."""
        x, y, level = np.broadcast_arrays(*(np.asarray(v, float) for v in (x, y, level)))
        return np.stack([self.Z(level), self.cy + y * self.sy, self.cx + x * self.sx], axis=-1)

    def outline(self, theta) -> tuple[np.ndarray, np.ndarray]:
        """Body outline radius (mm) at polar angle ``theta`` (0 = posterior, +pi/2 = left) as (static, slope): at
        height z the radius is static + slope * s, with s = -1 at L1 and +1 at T6."""
        c, s = np.cos(theta), np.sin(theta)
        n = np.where(c > 0, 3.0, 2.3)  # a flatter back (lying on the couch) than front
        radius = (np.abs(s / self.a) ** n + np.abs(c / self.b) ** n) ** (-1 / n)
        (k, amp0, ph0), (_, amp1, ph1) = self.outline_waves
        kt = np.multiply.outer(theta, k)
        static = radius + (amp0 * np.cos(kt + ph0)).sum(-1) - 4.0 * np.exp(-((theta / 0.12) ** 2))  # spinal groove
        slope = (amp1 * np.cos(kt + ph1)).sum(-1) - 5.0 * np.clip(-c, 0, None) ** 2  # the belly bulges caudally
        return static, slope

    def s(self, z):
        """Position along the torso section: -1 at L1, +1 at T6; held at +-1.5 beyond (the outline's z trend)."""
        return np.clip((np.asarray(z) - self.z_mid) / (self.h * (_LEVELS[1] - _LEVELS[0]) / 2), -1.5, 1.5)

    def fat(self, theta):
        """Subcutaneous fat thickness (mm): thicker at the flanks and the belly."""
        c, s = np.cos(theta), np.sin(theta)
        return self.fat_mm * (0.75 + 0.55 * s**2 + 0.3 * np.clip(-c, 0, None)) * _waves(theta, *self.layer_waves[0])

    def muscle(self, theta):
        """Body-wall muscle thickness outside the rib zone (mm): pectoral/rectus in front, latissimus at the back."""
        c, s = np.cos(theta), np.sin(theta)
        return (5.0 + 4.0 * s**2 + 5.0 * np.clip(-c, 0, None) ** 4 + 3.0 * c**8) * _waves(theta, *self.layer_waves[1])

    def wall_point(self, theta, depth_mm, level) -> np.ndarray:
        """Grid point(s) (z, y, x) at polar angle ``theta``, ``depth_mm`` under the skin, at vertebral ``level``."""
        z = self.Z(level)
        static, slope = self.outline(theta)
        r = static + self.s(z) * slope - depth_mm
        return np.stack([z, self.cy + r * np.cos(theta), self.cx + r * np.sin(theta)], axis=-1)

    def cavity(self, box) -> np.ndarray:
        """Inside the pleural/peritoneal cavity (deeper than the body wall) on ``box``."""
        return self.depth[box] > self.cavity_mm[box[1:]]

    def above_diaphragm(self, box, margin_mm: float = 0.0) -> np.ndarray:
        z, _, _ = self.cv.coords(box)
        return z > self.diaphragm_z[box[1:]] + np.float32(margin_mm)

    # -- anatomy, painted back to front --------------------------------------------------------------------------

    def build(self) -> None:
        self.body()
        self.thorax()
        self.abdomen()
        self.tubes()
        self.back_muscles()
        self.spine()
        self.ribs()
        self.lung_vessels()

    def body(self) -> None:
        """Skin, subcutaneous fat, the muscle wall and the fat inside it; the couch; the diaphragm height field."""
        cv, h = self.cv, self.hu
        dy, dx = cv.y[:, None] - np.float32(self.cy), cv.x[None, :] - np.float32(self.cx)
        theta = np.arctan2(dx, dy).astype(np.float64)
        r = np.hypot(dx, dy)
        static, slope = self.outline(theta)
        self.theta = theta
        fat = (_SKIN_MM + self.fat(theta)).astype(np.float32)
        self.cavity_mm = fat + (self.muscle(theta) + _RIB_ZONE_MM).astype(np.float32)  # where the pleura starts
        widest = static + np.maximum(slope * self.s(cv.z[0]), slope * self.s(cv.z[-1]))  # outline over all slices

        outside = np.full(r.shape, h["air"], np.float32)
        if self.table:
            outside = self.couch(dx, dy, widest, outside)
        cv.hu[:] = outside

        # Depth under the skin (mm) and the tissue layers, computed inside the body's bounding box only.
        rows, cols = np.nonzero(widest > r)
        self.depth = np.full(cv.shape, -1.0, np.float32)
        box = (slice(None), slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        s = self.s(cv.z)[:, None, None].astype(np.float32)
        depth = self.depth[box]
        depth[:] = (static - r).astype(np.float32)[box[1:]] + s * slope.astype(np.float32)[box[1:]]
        layer = (depth >= 0).view(np.uint8) + (depth >= _SKIN_MM) + (depth >= fat[box[1:]])
        layer += depth >= self.cavity_mm[box[1:]]
        tissue = np.array([0, h["skin"], h["fat"], h["muscle"], h["fat"]], np.float32)[layer]  # fat inside the wall
        np.copyto(cv.hu[box], tissue, where=layer > 0)

        # Diaphragm: two domes (the right one higher) falling off toward the chest wall, most steeply at the back
        # (the costophrenic recesses). A height field in vertebral levels: lungs above it, abdomen below.
        rng = self.rng("diaphragm")
        xr, yr, lr = -55 + self.jitter(rng, 8), -5 + self.jitter(rng, 8), 9.0 + self.jitter(rng, 0.3)
        xl, yl, ll = 60 + self.jitter(rng, 8), self.jitter(rng, 8), 9.5 + self.jitter(rng, 0.3)
        xc, yc = dx / self.sx, dy / self.sy
        dome = np.minimum(
            lr + 0.8 * (((xc - xr) / 95) ** 2 + ((yc - yr) / 110) ** 2),
            ll + 0.8 * (((xc - xl) / 90) ** 2 + ((yc - yl) / 105) ** 2),
        )
        q = np.clip(r / np.maximum(static - self.cavity_mm, 1), 0, 1.2)
        recess = (0.1 + 1.0 * np.sin(theta) ** 2 + 2.4 * np.clip(np.cos(theta), 0, None) ** 1.5) * q**8
        self.diaphragm_z = self.Z(np.minimum(dome + recess, 13.2)).astype(np.float32)

    def couch(self, dx, dy, back, outside):
        """A shallow carbon-fibre cradle 1 mm under the back: a foam core between two 2.5 mm shells, anti-aliased
        (the shells are about a pixel thick) by averaging four sub-rows per pixel."""
        lowest = float(np.max(np.where(np.abs(self.theta) < 0.6, back * np.cos(self.theta), -np.inf)))
        top = lowest + 1.0 - 0.0006 * dx**2  # the cradle rises toward the sides
        h, step = self.hu, self.cv.spacing[1]
        table = np.zeros_like(outside)
        for offset in (-0.375, -0.125, 0.125, 0.375):
            t = dy + offset * step - top
            shell = (t > 0) & ((t < 2.5) | ((t > 11.5) & (t < 14)))
            table += np.where(shell, h["table_shell"], np.where((t > 0) & (t < 14), h["table_core"], outside)) / 4
        return np.where(np.abs(dx) < 230, table, outside).astype(np.float32)

    def thorax(self) -> None:
        """Lungs (five lobes split by their fissures), mediastinal fat, and the heart in its pericardial fat."""
        cv, h = self.cv, self.hu
        box = cv.box((float(self.diaphragm_z.min()), -1e9, -1e9), (1e9, 1e9, 1e9))
        if box is None:
            return
        # Work on the lung voxels only (a third of the chest), as flat arrays.
        where = np.nonzero(self.cavity(box) & self.above_diaphragm(box))
        z, y, x = (axis[sl][i] for axis, sl, i in zip((cv.z, cv.y, cv.x), box, where, strict=True))
        xc, yc, level = (x - self.cx) / self.sx, (y - self.cy) / self.sy, self.level(z)
        left = xc > 0
        # Oblique fissures: the lower lobes lie behind a surface that runs forward as it descends.
        rng = self.rng("fissures")
        front = [15 + self.jitter(rng, 6) for _ in "rl"]
        slope = [26 + self.jitter(rng, 3) for _ in "rl"]
        fissure = np.where(left, front[1], front[0]) - np.where(left, slope[1], slope[0]) * (level - 7)
        fissure -= 0.3 * (np.abs(xc) - 40)
        lower = yc > fissure
        upper_right = z > self.Z(7.2 + self.jitter(rng, 0.2))  # the horizontal fissure
        lobe = np.select(
            [left & lower, left, lower, upper_right],
            [_ID[f"lung_{n}"] for n in ("lower_lobe_left", "upper_lobe_left", "lower_lobe_right", "upper_lobe_right")],
            _ID["lung_middle_lobe_right"],
        )
        lung_hu = h["lung"] + 20 * (y - self.cy) / self.b  # the dependent (posterior) lung is denser
        line = np.exp(-(((yc - fissure) * self.sy / 0.5) ** 2))  # the pleura, ~1 mm, partial-volumed
        cv.hu[box][where] = lung_hu + line * (h["fissure"] - h["lung"])
        cv.labels[box][where] = lobe

        # Mediastinum: a band of fat from the sternum to the spine, narrow at the anterior junction; lungs only.
        _, y, x = cv.coords(box)
        xc, yc = (x - self.cx) / self.sx, (y - self.cy) / self.sy
        band = (np.abs(xc - 5) < 6 + 14 * np.clip((yc + 60) / 50, 0, 1)) & (yc < 30)
        cv.paint(box, band, h["fat"], over=_LUNG_LOBES)

        rng = self.rng("heart")
        heart = _Blob.make(
            rng,
            self.P(30 + self.jitter(rng, 5), -36 + self.jitter(rng, 5), 7.4 + self.jitter(rng, 0.25)),
            (68 * self.sx * (1 + self.jitter(rng, 0.06)), 47 * self.sy * (1 + self.jitter(rng, 0.06)), 2.3 * self.h),
            yaw=-35 + self.jitter(rng, 6),  # the long axis points to the left front, where the apex lies
            wobble=0.06,
        )
        box, fat = heart.inside(cv, grow_mm=3.5)
        if box is not None:
            cv.paint(box, fat, h["fat"], over=_LUNG_LOBES)
            inside = (heart.rho(cv, box) < 1) & self.above_diaphragm(box, 2.0) & self.cavity(box)
            cv.paint(box, inside, h["blood"], "heart")

    def organ(self, blob: _Blob, hu: float, name: str | None, grow_mm: float = 0.0, over=None) -> None:
        """Paint an abdominal organ: the blob within the peritoneal cavity, under the diaphragm."""
        box, inside = blob.inside(self.cv, grow_mm)
        if box is not None:
            self.cv.paint(box, inside & self.cavity(box) & ~self.above_diaphragm(box, -1.5), hu, name, over=over)

    def abdomen(self) -> None:
        """Liver, gallbladder, stomach, spleen, kidneys in their fat, pancreas: all under the diaphragm."""
        cv, h, P, jitter = self.cv, self.hu, self.P, self.jitter

        rng = self.rng("liver")
        right_lobe = _Blob.make(
            rng,
            P(-62 + jitter(rng, 5), 8 + jitter(rng, 5), 10.6 + jitter(rng, 0.3)),
            (82 * self.sx, 95 * self.sy, 2.8 * self.h * (1 + jitter(rng, 0.08))),
            tilt=-10,  # the right lobe reaches lowest laterally
        )
        left_lobe = _Blob.make(
            rng,
            P(15 + jitter(rng, 6), -52 + jitter(rng, 4), 10.8 + jitter(rng, 0.3)),
            (62 * self.sx, 30 * self.sy, 1.6 * self.h),
            yaw=-15,
        )
        self.organ(right_lobe, h["liver"], "liver")
        self.organ(left_lobe, h["liver"], "liver")

        rng = self.rng("gallbladder")
        centre = P(-42 + jitter(rng, 5), -45 + jitter(rng, 5), 13.4 + jitter(rng, 0.3))
        self.organ(_Blob.make(rng, centre, (14, 20, 1.0 * self.h), yaw=60, wobble=0.05), h["bile"], "gallbladder")

        # Stomach: a J-shaped tube from the fundus under the left dome to the pylorus. The patient lies supine, so gas
        # rises anteriorly above a coronal gas-fluid level.
        rng = self.rng("stomach")
        points = P(
            np.array([52, 50, 45, 30, 5, -20]) + jitter(rng, 5),
            np.array([15, 0, -25, -42, -50, -40]) + jitter(rng, 5),
            np.array([10.1, 10.9, 11.8, 12.8, 13.6, 14.1]) + jitter(rng, 0.25),
        )
        box, depth = _sweep(cv, [(points, np.array([34, 36, 30, 24, 17, 12]) * (1 + jitter(rng, 0.12)))])
        if box is not None:
            _, y, _ = cv.coords(box)
            lumen = np.where(y < self.cy + (-20 + jitter(rng, 8)) * self.sy, h["air"], h["gastric_fluid"])
            inside = (depth > 0) & self.cavity(box) & ~self.above_diaphragm(box, -1.5)
            cv.paint(box, inside, np.where(depth < 3.5, h["gut_wall"], lumen), "stomach")

        rng = self.rng("spleen")
        spleen = _Blob.make(
            rng,
            P(92 + jitter(rng, 5), 42 + jitter(rng, 6), 11.2 + jitter(rng, 0.3)),
            (50 * (1 + jitter(rng, 0.12)), 22, 1.4 * self.h),
            yaw=-55 + jitter(rng, 8),  # along the posterolateral chest wall
            wobble=0.1,
        )
        self.organ(spleen, h["spleen"], "spleen")

        for side, name in ((1, "kidney_left"), (-1, "kidney_right")):
            rng = self.rng(name)
            level = (12.6 if side > 0 else 13.1) + jitter(rng, 0.3)  # the liver pushes the right one down
            centre = P(side * (66 + jitter(rng, 4)), 52 + jitter(rng, 4), level)
            semi = (24 * (1 + jitter(rng, 0.08)), 19, 1.7 * self.h * (1 + jitter(rng, 0.08)))
            # The hilum faces anteromedially; the upper pole leans medially.
            kidney = _Blob.make(rng, centre, semi, yaw=side * 35, tilt=side * 12, wobble=0.05)
            self.organ(kidney, h["fat"], None, grow_mm=7.0)  # perirenal fat
            self.organ(kidney, h["kidney"], name)
            hilum = centre + 20 * np.array([0.0, -0.55, -side * 0.83])  # (z, y, x): anterior and medial
            sinus = _Blob.make(rng, hilum, (8, 6, 0.6 * self.h), yaw=side * 35, wobble=0.05)
            self.organ(sinus, h["fat"], None, over=[name])  # renal sinus fat

        rng = self.rng("pancreas")
        points = P(
            np.array([80, 48, 12, -22]) + jitter(rng, 4),  # tail at the splenic hilum ... head in the duodenal loop
            np.array([28, 8, -8, -6]) + jitter(rng, 4),
            np.array([12.4, 13.0, 13.5, 14.1]) + jitter(rng, 0.3),
        )
        box, depth = _sweep(cv, [(points, np.array([9, 10, 11, 13.0]))])
        if box is not None:
            cv.paint(box, (depth > 0) & self.cavity(box) & ~self.above_diaphragm(box), h["pancreas"], "pancreas")

    def tubes(self) -> None:
        """Colon flexures, inferior vena cava, aorta and oesophagus."""
        cv, h, P = self.cv, self.hu, self.P
        rng = self.rng("colon")
        # Splenic flexure into the transverse colon, and the hepatic flexure: canonical x, y, levels, radii.
        splenic = P([95, 98, 82, 45], [40, 5, -38, -62], np.array([11.6, 12.6, 13.8, 15.0]) + self.jitter(rng, 0.3))
        hepatic = P([-82, -70, -45], [20, -15, -50], np.array([13.9, 14.5, 15.2]) + self.jitter(rng, 0.3))
        flexures = [(splenic, [15, 18, 20, 20]), (hepatic, [18, 20, 20])]
        box, depth = _sweep(cv, flexures)
        if box is not None:
            _, y, _ = cv.coords(box)
            # Gas anteriorly; below it stool mottled with gas bubbles.
            bubbles = _smooth_noise(rng, depth.shape, cv.spacing, 4.0) > 0.9
            content = np.where(y < self.cy - 20 * self.sy, h["air"], np.where(bubbles, h["air"] * 0.7, h["stool"]))
            inside = (depth > 0) & self.cavity(box) & ~self.above_diaphragm(box, -1.5)
            cv.paint(box, inside, np.where(depth < 2.5, h["gut_wall"], content), "colon", over=["", "colon"])

        vessels = {
            # name: canonical x, y (mm), levels, radii (mm), tissue, what it may replace (None = anything)
            "inferior_vena_cava": (
                [-22, -24, -24, -20, -10], [14, 12, 6, -8, -18], [15.5, 13, 11, 9.5, 8.6], [11, 11, 12, 12, 12],
                "blood", ["", "liver", *_LUNG_LOBES],  # runs through the liver and ends in the right atrium
            ),
            "aorta": (
                [28, 27, 20, 11, 6, 5], [20, 22, 20, 14, 10, 9], [6.0, 8.0, 10.0, 11.8, 13.0, 15.0],
                [12.5, 12, 11.5, 11, 10, 10], "blood", None,  # descending: left-anterior of the spine, then in front
            ),
            "esophagus": (
                [3, 5, 10, 20, 34], [16, 14, 8, 0, -5], [6.0, 8.0, 9.5, 10.3, 10.9], [7.5, 7.5, 8, 8.5, 9],
                "gut_wall", None,  # behind the left atrium, through the hiatus into the cardia
            ),
        }  # fmt: skip
        for name, (x, y, levels, radii, tissue, over) in vessels.items():
            rng = self.rng(name)
            points = P(np.array(x) + self.jitter(rng, 3), np.array(y) + self.jitter(rng, 3), levels)
            box, depth = _sweep(cv, [(points, np.array(radii, float) * (1 + self.jitter(rng, 0.08)))])
            if box is not None:
                cv.paint(box, (depth > -3) & (depth <= 0), h["fat"], over=_LUNG_LOBES)  # its mediastinal fat
                cv.paint(box, depth > 0, h[tissue], name, over=over)

    def back_muscles(self) -> None:
        """Autochthonous back muscles either side of the spinous processes, growing caudally; psoas from T12."""
        cv, h = self.cv, self.hu
        box = cv.box((-1e9, self.cy + 45 * self.sy, self.cx - 90), (1e9, 1e9, self.cx + 90))
        if box is not None:
            z, y, x = cv.coords(box)
            grow = 1 + 0.05 * (self.level(z) - 7)
            under_fat = self.depth[box] > (_SKIN_MM + self.fat(self.theta[box[1:]]) + 2).astype(np.float32)
            for side, name in ((1, "autochthon_left"), (-1, "autochthon_right")):
                rng = self.rng(name)
                x0 = self.cx + side * (26 + self.jitter(rng, 2)) * self.sx
                y0 = self.cy + (77 + self.jitter(rng, 2)) * self.sy
                rho = ((x - x0) / (21 * grow)) ** 2 + ((y - y0) / (16 * grow)) ** 2
                cv.paint(box, (rho < 1) & under_fat, h["muscle"], name)
        for side, name in ((1, "iliopsoas_left"), (-1, "iliopsoas_right")):
            x0 = side * (24 + self.jitter(self.rng(name), 2))
            points = self.P([x0, x0 + side * 4, x0 + side * 8], [32, 30, 26], [12.6, 13.8, 15.0])
            box, depth = _sweep(self.cv, [(points, np.array([2.0, 8.0, 13.0]))])
            if box is not None:
                cv.paint(box, depth > 0, h["muscle"], name, over=["", name])

    def vertebra_geometry(self, n: int):
        """Vertebra ``n``: (x centre, y of the body centre, body half-width, body half-depth, y of the canal centre),
        canonical mm. Bodies grow caudally; the lumbar lordosis brings them forward."""
        xc = self.scoliosis * (n - 10) / 10
        ax, ay = 16 + 0.9 * (n - 7), 13 + 0.5 * (n - 7)
        yv = 42 - 2.0 * max(n - 11, 0)
        return xc, yv, ax, ay, yv + ay + 7.5

    def spine(self) -> None:
        """The vertebrae in the field of view: bodies (cortical shell, cancellous core), discs, posterior elements
        (pedicles, laminae, spinous and transverse processes), and the spinal canal with the cord."""
        cv, h, P = self.cv, self.hu, self.P
        levels = range(max(int(self.level_range[0] - 0.5), 1), min(int(self.level_range[1] + 1.5), 17) + 1)
        canal = []
        for n in levels:
            xc, yv, ax, ay, yc = self.vertebra_geometry(n)
            thoracic = n <= 12
            # Posterior elements as swept tubes; pedicle + lamina as a plate (two tubes, one above the other).
            tubes = []
            for side in (-1, 1):
                arch = (
                    [xc + side * ax * 0.55, xc + side * 9, xc + side * 7, xc],
                    [yv + ay * 0.55, yc, yc + 9, yc + 12],
                )
                tubes += [(P(*arch, n + dz), np.array([3.5, 3.5, 3.0, 3.0])) for dz in (-0.2, 0.15)]
                tip = (xc + side * 27, yc + 6) if thoracic else (xc + side * 30, yc - 4)
                tubes.append((P([xc + side * 9, tip[0]], [yc - 1, tip[1]], n - 0.1), np.array([4.5, 3.8])))
            # Thoracic spinous processes slope steeply down; lumbar ones are tall, horizontal plates.
            tubes.append((P([xc, xc], [yc + 11, yc + 27], [n, n + 0.7]), np.array([3.5, 3.0])))
            if not thoracic:
                tubes.append((P([xc, xc], [yc + 11, yc + 25], [n + 0.3, n + 0.3]), np.array([3.5, 3.0])))
            box, depth = _sweep(cv, tubes)
            if box is not None:
                tissue = np.where(depth < 1.2, h["cortical_bone"], h["posterior_elements"])
                cv.paint(box, depth > 0, tissue, _vertebra(n))

            # The body between its end plates, and the disc under it.
            x0, y0, hx, hy = self.cx + xc * self.sx, self.cy + yv * self.sy, ax * self.sx, ay * self.sy
            for top, bottom, name in ((n - 0.39, n + 0.39, _vertebra(n)), (n + 0.39, n + 0.61, None)):
                box = cv.box((float(self.Z(bottom)), y0 - hy, x0 - hx), (float(self.Z(top)), y0 + hy, x0 + hx))
                if box is None:
                    continue
                _, y, x = cv.coords(box)
                rho = np.sqrt(((x - x0) / hx) ** 2 + ((y - y0) / hy) ** 2)
                if name is None:
                    cv.paint(box, rho < 0.97, h["disc"])
                else:
                    shell = (1 - rho) * min(hx, hy) < 1.6
                    cv.paint(box, rho < 1, np.where(shell, h["cortical_bone"], h["cancellous_bone"]), name)
            canal.append((xc, yc, n))

        if len(canal) >= 2:
            box, depth = _sweep(cv, [(P(*np.array(canal).T), np.full(len(canal), 8.0))])
            if box is not None:
                cv.paint(box, depth > 0, h["csf"])
                cv.paint(box, depth > 3.5, h["spinal_cord"], "spinal_cord")

    def ribs(self) -> None:
        """Ribs from the vertebral bodies around the chest wall, dropping as they run forward; costal cartilages
        toward the sternum; the sternum."""
        cv, h, fat, muscle = self.cv, self.hu, self.fat, self.muscle
        rng = self.rng("ribs")
        # Polar angle (rad) of the anterior end of bony ribs 1..12: true ribs reach furthest, floating ribs are short.
        ends = [2.6, 2.6, 2.6, 2.6, 2.55, 2.5, 2.45, 2.35, 2.2, 2.05, 1.65, 1.2]
        cartilages = []
        for n in range(1, 13):
            xc, yv, ax, ay, yc = self.vertebra_geometry(n)
            for side, prefix in ((1, "rib_left_"), (-1, "rib_right_")):
                start = n - 0.3 + self.jitter(rng, 0.12)
                end = ends[n - 1] + self.jitter(rng, 0.05)
                theta = np.linspace(0.62, end, 12)  # from the rib's angle behind the lung, around the wall
                u = (theta - theta[0]) / (end - theta[0])
                levels = start + (2.4 + self.jitter(rng, 0.2)) * (end - theta[0]) * u**1.1
                arc = self.wall_point(side * theta, _SKIN_MM + fat(side * theta) + muscle(side * theta) + 4.5, levels)
                # Head on the vertebral body, neck to the transverse process, then the arc.
                neck = self.P(
                    [xc + side * ax * 0.8, xc + side * (ax + 14)],
                    [yv + ay * 0.5, yc + 3],
                    start - np.array([0.15, 0.05]),
                )
                radii = np.concatenate([[3.2, 3.5], 3.5 + 0.8 * u]) * (1 + self.jitter(rng, 0.08))
                box, depth = _sweep(cv, [(np.concatenate([neck, arc]), radii)])
                if box is not None:
                    tissue = np.where(depth < 1.3, h["cortical_bone"], h["cancellous_bone"])
                    cv.paint(box, depth > 0, tissue, prefix + str(n))
                if n <= 10:  # cartilage: 1-7 reach the sternum, 8-10 rise to join the costal margin
                    theta_c = np.linspace(end, 2.95 if n <= 7 else 2.75, 5)
                    depth_c = _SKIN_MM + fat(side * theta_c) + 0.6 * muscle(side * theta_c) + 4.5
                    levels_c = levels[-1] + np.linspace(0, 0.15 if n <= 7 else -0.8, 5)
                    cartilages.append((self.wall_point(side * theta_c, depth_c, levels_c), np.full(5, 5.0)))
        box, depth = _sweep(cv, cartilages)
        if box is not None:
            cv.paint(box, depth > 0, h["cartilage"], "costal_cartilages")

        # Sternum: a flat plate under the anterior fat, narrowing into the xiphoid process at its lower end.
        xiphoid = 9.6 + self.jitter(rng, 0.3)
        box = cv.box((float(self.Z(xiphoid + 0.6)), -1e9, self.cx - 25), (1e9, self.cy, self.cx + 25))
        if box is not None:
            z, y, x = cv.coords(box)
            level = self.level(z)
            narrow = np.clip((level - (xiphoid - 0.8)) / 1.4, 0, 1)  # 0 along the body of the sternum, 1 at the tip
            half_width, half_thick = 15 - 9 * narrow, 5.5 - 2.5 * narrow
            centre_y = self.wall_point(np.pi, _SKIN_MM + fat(np.pi) + 6.5, level)[..., 1]
            rho = np.sqrt(((x - self.cx) / half_width) ** 4 + ((y - centre_y) / half_thick) ** 2)  # flat sides
            shell = (1 - rho) * half_thick < 1.3
            cv.paint(box, rho < 1, np.where(shell, h["cortical_bone"], h["cancellous_bone"]), "sternum")

    def lung_vessels(self) -> None:
        """Pulmonary arteries (from the hila) and veins (to the left atrium): trees that fill each lobe."""
        cv = self.cv
        rng = self.rng("lung_vessels")
        # Sample each lobe on a ~4 mm lattice (jittered within its cells): the territories the trees supply.
        step = np.maximum(np.rint(4.0 / cv.spacing), 1).astype(int)
        cell_mm = step * cv.spacing
        coarse = cv.labels[:: step[0], :: step[1], :: step[2]]
        segments = []
        for name in _LUNG_LOBES:
            found = np.argwhere(coarse == _ID[name])
            if len(found) < 8:
                continue
            side = 1 if name.endswith("left") else -1
            lower = "lower" in name
            hilum = self.P(side * 40 + self.jitter(rng, 3), -4 + self.jitter(rng, 3), 6.3 + self.jitter(rng, 0.2))
            atrium = self.P(side * 25, 10 if lower else -15, 8.0 if lower else 7.0)
            # Murray's law: r^3 grows with the volume supplied; a 250 ml territory gets a 4 mm trunk.
            radius = 4.0 * (len(found) * np.prod(cell_mm) / 250e3) ** (1 / 3)
            for root in (hilum, atrium):
                pick = found[rng.choice(len(found), min(len(found), 40 + len(found) // 8), replace=False)]
                points = (pick + rng.uniform(0, 1, pick.shape)) * cell_mm + cv.origin
                segments += _vessel_tree(rng, root, points, radius)
        if segments:
            lung = np.zeros(256, bool)
            lung[[_ID[n] for n in _LUNG_LOBES]] = True
            a, b, ra, rb = (np.array(v) for v in zip(*segments, strict=True))
            _paint_segments(cv, a, b, ra, rb, self.hu["blood"], where=lung)
