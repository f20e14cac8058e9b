"""Partial labels derived from HU and simple anatomy, for real CT that nobody labelled (the shared chest CTs).

A derivation gives some voxels a tissue colour class and leaves the rest without one (`IGNORE`): those carry no loss
in training. Derivation ``chest_non_contrast`` (`derive_chest`), for a non-contrast chest CT, axial slices, direction
with +z superior or inferior:

- body: the largest 3D component of HU > -500 after an in-plane opening (detaches the table), holes filled per slice.
  Outside it, every voxel takes its HU tissue class (`targets.tissue_class_index`), as the labelled patients' do.
- airways (class ``air``): the 3D component of air inside the body that holds the trachea, found in the most
  superior slice as the largest air section of 40-700 mm² within the middle third of the body's width, at the
  first air threshold of `AIRWAY_HU` at which that component reaches at least `AIRWAY_MIN_MM` down without exceeding
  `AIRWAY_MAX_ML` (a leak into lung); none found: no airway labels.
- lung parenchyma (class ``lung``): 3D components of HU < -400 inside the body, not airway, of at least 50 mL and
  median HU between -950 and -600 (stomach and bowel gas are below -950), closed in-plane (radius 3 pixels) so that
  the small vessels inside are lung, as they are in TotalSegmentator's lobes.
- bone (class ``bone``): HU >= `BONE_SEED_HU` inside the body (no soft tissue, blood or organ of a non-contrast CT
  reaches 200 HU: muscle, liver and blood stay below 80; cortical bone is 700-1900 HU, adult cancellous bone
  150-400), components under 0.3 mL dropped (vessel-wall and coronary calcifications), closed in-plane, holes filled
  per slice where HU > 100 (the cancellous marrow inside the cortex, not the spinal canal's cord at ~30 HU). Other
  voxels above 200 HU get no label.
- fat (class ``fat``): HU -190..-30 (adipose tissue, the range of body-composition CT studies) inside the body, not
  lung, airway or bone, nor within 2 pixels of air or lung (partial volume of their edges falls in the fat range),
  opened in-plane (single noisy voxels).
- muscle (class ``soft_tissue``, the tissue class the labelled patients' unnamed muscles take): HU -29..150 (skeletal
  muscle, same studies) in slices whose lung section is at least 30 % of the largest, more than 10 mm outside the
  convex hull of the lungs (not mediastinum, heart, great vessels, liver dome), not within one pixel of bone, and not
  in the paraspinal box (posterior to the lungs' centre, within 80 mm of the body's midline: the autochthonous back
  muscles, which the model names). Opened in-plane.

- mediastinal blood pool (`BLOOD`, no class of its own): the heart's chambers and the great vessels as a non-contrast CT
  shows them, 0..100 HU after a 1.5 mm in-plane Gaussian (noise), in slices whose lung section is at least
  `BLOOD_LUNG_SHARE` of the largest (above the liver dome), inside the convex hull of the lungs (between them), not
  lung, airway, fat or bone, nor the spinal canal that a vertebra's arch encloses, nor within 3 mm of bone; opened
  in-plane by a 4 mm disc (thin walls, the oesophagus's collapsed lumen), eroded in-plane by 2 mm (the myocardium's and
  vessel walls' rim and the partial volume at fat), pieces under 2 mL dropped. It carries no loss as it is; training
  gives it a synthetic contrast phase (`training.colorizer.CHEST_BLOOD_HU`) in a share of the samples and then trains it
  as ``contrast_blood``, so that a dense blood pool in the chest is not learned as bone (the labels above call every
  body voxel above 200 HU bone). It takes the myocardium too where the wall is thicker than the erosion, and the
  oesophagus where it is wide: the enhanced chambers of a real CTA are brighter than their wall, here the whole pool is.

- descending aorta (class ``aorta``, `_descending_aorta`): the tube in front of and to the left of the spine. Seeds:
  round pieces of the blood pool (equivalent radius `AORTA_SEED_MM`, solidity >= 0.85, axis ratio >= 0.6) at most
  10 mm in front of the lungs' centre, 5 mm right to 40 mm left of the body's midline and within 12 mm of bone; the
  longest run of such slices is kept. From it the aorta is followed slice by slice, up into the arch and down to where
  the lungs end (slices whose lung section is at least `AORTA_LUNG_SHARE` of the largest: below, the crura and the
  stomach touch it): a disc of the run's radius, or down to `AORTA_MIN_MM` as the aorta narrows (by at most 0.5 mm a
  slice, or 1 mm per 5 mm of thick slices), centred by mean shift on the voxels of blood HU (not lung or bone), at
  least `AORTA_FILL` full of them, and moving at most 1 mm plus 0.3 mm per mm of slice. The disc, less 3 mm next to
  bone, is labelled aorta in every training sample and is enhanced with the blood pool, where the training config asks
  for it (``partial_aorta``, on in the shipped recipes). Checked by eye on chest-popi
  (the descending aorta from the lungs' bases to the arch, 172 mm) and chest-lung2 (its calcified descending aorta up
  to the arch, 115 mm), and against the procedural phantom's aorta (tests/training/test_partial_labels.py). It
  teaches a blood tube against a thoracic vertebra, where the held-out contrast patient's aorta was named vertebra
  (issue 61).

A lesion mask given with the CT (a ``real_partial`` entry's third item, such as chest-lung2's tumour) is left without a
label, and out of the blood pool: a round mass in the lung is neither blood nor a tissue the model should learn from
HU alone.

Everything else (heart and vessel walls, abdominal organs below the diaphragm, calcifications) gets no label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.measure import label, regionprops
from skimage.morphology import convex_hull_image, disk

from ..errors import InputError
from ..io import Volume
from .targets import TISSUE_CLASSES, tissue_class_index

#: Class index of a voxel without a derived label: it carries no loss.
IGNORE = 255
#: HU above which a non-contrast CT shows only bone (and calcifications, removed by size): see the module docstring.
BONE_SEED_HU = 200.0
BONE_MIN_ML = 0.3
#: Airway thresholds, tried in turn on the HU (the first) and on the HU smoothed 1 mm in-plane (all): the first whose
#: trachea component reaches `AIRWAY_MIN_MM` down from the top slice without exceeding `AIRWAY_MAX_ML` (a leak into the
#: lung) is kept. Noise lifts much of the trachea's lumen from -1000 to about -920 HU (chest-popi: fragments at -950,
#: smoothing joins them); smoothing narrows a small glottis (chest-lung1, 5 mm slices: only the raw HU connect it).
#: Lung parenchyma is -700 to -880.
AIRWAY_HU = (-950.0, -925.0, -900.0)
AIRWAY_MIN_MM = 50.0
AIRWAY_MAX_ML = 300.0
FAT_HU = (-190.0, -30.0)
MUSCLE_HU = (-29.0, 150.0)
#: Class index of a voxel in the mediastinal blood pool (`derive_chest`'s ``blood``): no loss unless training
#: enhances it (`training.colorizer.Sampler`), which then trains it as contrast blood.
BLOOD = 254
BLOOD_HU = (0.0, 100.0)
BLOOD_LUNG_SHARE = 0.4
#: Derived mask -> the colour class it trains.
MASK_CLASSES = {"airway": "air", "lung": "lung", "bone": "bone", "fat": "fat", "muscle": "soft_tissue"}
#: The descending aorta's seeds (`_aorta_seeds`): equivalent radius of a blood-pool piece in mm (the pool is eroded by
#: 2 mm, so a 16-36 mm aorta), and the share of blood-HU voxels a followed disc must hold (`_follow_aorta`).
AORTA_SEED_MM = (6.0, 16.0)
AORTA_MIN_MM, AORTA_FILL = 6.0, 0.9
#: The descending aorta is followed in slices whose lung section is at least this share of the largest (the chest and
#: the posterior recesses of the lungs beside the upper abdomen).
AORTA_LUNG_SHARE = 0.1


def _per_slice(fn, mask: np.ndarray) -> np.ndarray:
    return np.stack([fn(s) for s in mask])


def _ml(voxels: int, spacing: Sequence[float]) -> float:
    return voxels * float(np.prod(spacing)) / 1000.0


def _body(hu: np.ndarray) -> np.ndarray:
    tissue = ndimage.binary_opening(hu > -500.0, structure=np.ones((1, 5, 5), bool))
    components, n = ndimage.label(tissue)
    if n == 0:
        raise InputError("no body in the CT (nothing above -500 HU)")
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return _per_slice(ndimage.binary_fill_holes, components == int(sizes.argmax()))


def _airways(hu: np.ndarray, body: np.ndarray, spacing: Sequence[float], superior: int) -> np.ndarray:
    """The air connected to the trachea (empty when no trachea is found in the most superior slice)."""
    pixel_mm2 = spacing[1] * spacing[2]
    smooth = ndimage.gaussian_filter(hu, (0.0, 1.0 / spacing[1], 1.0 / spacing[2]))  # noise: 1 mm in-plane
    for image, threshold in ((hu, AIRWAY_HU[0]), *((smooth, t) for t in AIRWAY_HU)):
        air = (image < threshold) & body
        top, n = ndimage.label(air[superior])
        cols = np.flatnonzero(body[superior].any(axis=0))
        if n == 0 or cols.size == 0:
            continue
        third = (cols[-1] - cols[0]) / 3.0
        best, best_area = 0, 0.0
        for k, (sy, sx) in enumerate(ndimage.find_objects(top), start=1):
            area = float((top[sy, sx] == k).sum()) * pixel_mm2
            centre_x = (sx.start + sx.stop) / 2.0
            if 40.0 <= area <= 700.0 and cols[0] + third <= centre_x <= cols[-1] - third and area > best_area:
                best, best_area = k, area
        if not best:
            continue
        components, _ = ndimage.label(air)
        airway = components == components[superior][top == best][0]
        length_mm = np.count_nonzero(airway.any(axis=(1, 2))) * spacing[0]
        if length_mm >= AIRWAY_MIN_MM and _ml(int(airway.sum()), spacing) <= AIRWAY_MAX_ML:
            return airway
    return np.zeros_like(body)


def _lungs(hu: np.ndarray, body: np.ndarray, airway: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    near_airway = ndimage.binary_dilation(airway, iterations=1)
    components, n = ndimage.label((hu < -400.0) & body & ~near_airway)
    lung = np.zeros_like(body)
    if n == 0:
        return lung
    sizes = np.bincount(components.ravel())
    for k in np.flatnonzero(sizes):
        if k == 0 or _ml(int(sizes[k]), spacing) < 50.0:
            continue
        median = float(np.median(hu[components == k]))
        if -950.0 < median < -600.0:
            lung |= components == k
    return ndimage.binary_closing(lung, structure=disk(3)[None]) & body


def derive_chest(ct: Volume, lesion: np.ndarray | None = None, aorta: bool = False) -> dict[str, np.ndarray]:
    """The derived masks of a non-contrast chest CT (module docstring): ``body``, ``airway``, ``lung``, ``bone``,
    ``fat``, ``muscle``, ``blood`` (the pool) and with ``aorta`` the descending aorta, each (Z, Y, X) bool; the airway,
    lung, bone, fat and muscle are disjoint, the aorta lies partly in the pool. ``lesion`` (bool, the CT's shape):
    voxels no derived mask holds."""
    hu = np.asarray(ct.array, dtype=np.float32)
    spacing = tuple(float(s) for s in ct.spacing)
    superior = -1 if float(np.asarray(ct.direction)[2, 2]) > 0 else 0
    body = _body(hu)
    airway = _airways(hu, body, spacing, superior)
    lung = _lungs(hu, body, airway, spacing) & ~airway

    seed = (hu >= BONE_SEED_HU) & body
    components, _ = ndimage.label(seed)
    sizes = np.bincount(components.ravel())
    keep = sizes * np.prod(spacing) / 1000.0 >= BONE_MIN_ML
    keep[0] = False
    bone = ndimage.binary_closing(keep[components], structure=disk(1)[None])
    bone = (bone | _per_slice(ndimage.binary_fill_holes, bone)) & (hu > 100.0) & body & ~lung & ~airway

    edge = ndimage.binary_dilation((hu < -400.0) | lung | airway, structure=disk(2)[None])
    fat = (hu >= FAT_HU[0]) & (hu <= FAT_HU[1]) & body & ~edge & ~bone
    fat = ndimage.binary_opening(fat, structure=disk(1)[None])

    muscle = np.zeros_like(body)
    lung_area = lung.sum(axis=(1, 2))
    if lung_area.max() > 0:
        pixel_mm = (spacing[1], spacing[2])
        near_bone = ndimage.binary_dilation(bone, structure=disk(1)[None])
        soft = (hu >= MUSCLE_HU[0]) & (hu <= MUSCLE_HU[1]) & body & ~near_bone
        yy, xx = np.mgrid[: hu.shape[1], : hu.shape[2]]
        for z in np.flatnonzero(lung_area >= 0.3 * lung_area.max()):
            hull = convex_hull_image(lung[z])
            outside = ndimage.distance_transform_edt(~hull, sampling=pixel_mm) > 10.0
            mid_x = float(xx[body[z]].mean())
            lung_y = float(yy[lung[z]].mean())
            posterior = (yy > lung_y) if float(np.asarray(ct.direction)[1, 1]) > 0 else (yy < lung_y)
            paraspinal = posterior & (np.abs(xx - mid_x) * spacing[2] < 80.0)
            muscle[z] = soft[z] & outside & ~paraspinal
        muscle = ndimage.binary_opening(muscle, structure=disk(1)[None])
    masks = {"body": body, "airway": airway, "lung": lung, "bone": bone, "fat": fat, "muscle": muscle}
    masks["blood"] = _blood_pool(hu, body, lung, airway, bone, spacing)
    if lesion is not None:
        for name in masks.keys() - {"body"}:
            masks[name] &= ~lesion
    if aorta:
        masks["aorta"] = _descending_aorta(hu, masks, spacing, ct.direction)
    return masks


def _blood_pool(
    hu: np.ndarray, body: np.ndarray, lung: np.ndarray, airway: np.ndarray, bone: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """The mediastinal blood pool of a non-contrast chest CT (module docstring), (Z, Y, X) bool."""
    pixel_mm = float(np.mean(spacing[1:]))
    blood = np.zeros_like(body)
    lung_area = lung.sum(axis=(1, 2))
    if lung_area.max(initial=0) == 0:
        return blood
    near_bone = ndimage.binary_dilation(bone, structure=disk(max(1, round(3.0 / pixel_mm)))[None])
    canal = _per_slice(ndimage.binary_fill_holes, near_bone)
    smooth = ndimage.gaussian_filter(hu, (0.0, 1.5 / spacing[1], 1.5 / spacing[2]))  # noise (chest-popi: +-40 HU)
    candidate = (smooth >= BLOOD_HU[0]) & (smooth <= BLOOD_HU[1]) & body & ~lung & ~airway & ~canal
    for z in np.flatnonzero(lung_area >= BLOOD_LUNG_SHARE * lung_area.max()):
        blood[z] = candidate[z] & convex_hull_image(lung[z])
    blood = ndimage.binary_opening(blood, structure=disk(max(1, round(2.0 / pixel_mm)))[None])
    blood = ndimage.binary_erosion(blood, structure=disk(max(1, round(2.0 / pixel_mm)))[None])
    components, n = ndimage.label(blood)
    if n == 0:
        return blood
    sizes = np.bincount(components.ravel())
    keep = sizes * float(np.prod(spacing)) / 1000.0 >= 2.0
    keep[0] = False
    return keep[components]


def _disc(shape: tuple[int, int], centre: np.ndarray, radius_px: np.ndarray) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return ((yy - centre[0]) / radius_px[0]) ** 2 + ((xx - centre[1]) / radius_px[1]) ** 2 <= 1.0


def _aorta_seeds(
    masks: dict[str, np.ndarray], spacing: Sequence[float], direction: np.ndarray
) -> dict[int, tuple[np.ndarray, float]]:
    """Slice -> (centre (y, x) in pixels, radius in mm) of each round blood-pool piece where the descending aorta lies
    (module docstring)."""
    pixel = np.asarray(spacing[1:], dtype=float)
    left = 1.0 if float(direction[0, 0]) > 0 else -1.0  # +x towards the patient's left (LPS)
    back = 1.0 if float(direction[1, 1]) > 0 else -1.0  # +y towards the back
    seeds = {}
    for z in np.flatnonzero(masks["blood"].any(axis=(1, 2))):
        mid_x = float(np.nonzero(masks["body"][z])[1].mean())
        lung_y = float(np.nonzero(masks["lung"][z])[0].mean())
        to_bone = ndimage.distance_transform_edt(~masks["bone"][z], sampling=pixel)
        for piece in regionprops(label(masks["blood"][z])):
            radius = float(np.sqrt(piece.area * pixel.prod() / np.pi))
            y, x = piece.centroid
            if not (
                AORTA_SEED_MM[0] <= radius <= AORTA_SEED_MM[1]
                and piece.solidity >= 0.85
                and piece.axis_minor_length >= 0.6 * piece.axis_major_length
                and back * (y - lung_y) * pixel[0] >= -10.0
                and -5.0 <= left * (x - mid_x) * pixel[1] <= 40.0
                and to_bone[piece.coords[:, 0], piece.coords[:, 1]].min() <= 12.0
            ):
                continue
            seeds[int(z)] = (np.array([y, x]), radius)
    return seeds


def _seed_run(seeds: dict[int, tuple[np.ndarray, float]], spacing: Sequence[float]) -> list[int]:
    """The longest run of seed slices whose centres follow one another (gaps up to 10 mm, shifts up to 3 mm plus
    0.3 mm per mm of height)."""
    pixel = np.asarray(spacing[1:], dtype=float)
    slices = sorted(seeds)
    runs = [[slices[0]]]
    for a, b in zip(slices[:-1], slices[1:], strict=True):
        shift = float(np.hypot(*((seeds[a][0] - seeds[b][0]) * pixel)))
        if (b - a) * spacing[0] <= max(10.0, spacing[0]) and shift <= 3.0 + 0.3 * (b - a) * spacing[0]:
            runs[-1].append(b)
        else:
            runs.append([b])
    return max(runs, key=len)


def _follow_aorta(
    blood_hu: np.ndarray, centre: np.ndarray, radius: float, largest: float, spacing: Sequence[float]
) -> tuple[np.ndarray, float] | None:
    """The aorta's disc in one slice (module docstring), from the neighbouring slice's centre and radius; None where
    no disc of at least `AORTA_MIN_MM` fits."""
    pixel = np.asarray(spacing[1:], dtype=float)
    for r in np.arange(min(radius + 0.5, largest), AORTA_MIN_MM - 0.1, -0.5):
        if r < radius - max(0.5, spacing[0] / 5.0):  # narrowing faster than the aorta does: another vessel
            break
        at = centre
        for _ in range(3):
            inside = _disc(blood_hu.shape, at, (r + 1.0) / pixel) & blood_hu
            if not inside.any():
                break
            at = np.array(np.nonzero(inside)).mean(axis=1)
        moved = float(np.hypot(*((at - centre) * pixel)))
        if moved <= 1.0 + 0.3 * spacing[0] and blood_hu[_disc(blood_hu.shape, at, r / pixel)].mean() >= AORTA_FILL:
            return at, float(r)
    return None


def _descending_aorta(hu: np.ndarray, masks: dict[str, np.ndarray], spacing: Sequence[float], direction) -> np.ndarray:
    """The descending aorta of a non-contrast chest CT (module docstring), (Z, Y, X) bool; empty where none is found."""
    aorta = np.zeros_like(masks["body"])
    seeds = _aorta_seeds(masks, spacing, np.asarray(direction))
    if not seeds:
        return aorta
    pixel = np.asarray(spacing[1:], dtype=float)
    run = _seed_run(seeds, spacing)
    largest = float(np.median([seeds[z][1] for z in run]))
    outside = masks["body"] & ~masks["lung"] & ~masks["bone"]
    fine = ndimage.gaussian_filter(hu, (0.0, 1.5 / spacing[1], 1.5 / spacing[2]))
    coarse = ndimage.gaussian_filter(hu, (0.0, 2.5 / spacing[1], 2.5 / spacing[2]))  # a noisy lumen (chest-popi)
    blood_hu = outside & (((fine >= BLOOD_HU[0]) & (fine <= BLOOD_HU[1])) | ((coarse >= -20.0) & (coarse <= 120.0)))
    lung_area = masks["lung"].sum(axis=(1, 2))
    chest = lung_area >= AORTA_LUNG_SHARE * lung_area.max()  # below, the crura and the stomach touch the aorta
    found = {z: (seeds[z][0], largest) for z in run}
    for step, start in ((1, run[0]), (-1, run[0])):
        last, z = found[start], start + step
        while 0 <= z < hu.shape[0] and chest[z]:
            disc = found.get(z) or _follow_aorta(blood_hu[z], *last, largest, spacing)
            if disc is None and not (step > 0 and z < run[-1]):  # a gap inside the run is bridged
                break
            if disc is not None:
                found[z] = last = disc
            z += step
    near_bone = ndimage.binary_dilation(masks["bone"], structure=disk(max(1, round(3.0 / pixel[0])))[None])
    for z, (centre, radius) in found.items():
        aorta[z] = _disc(hu.shape[1:], centre, radius / pixel) & blood_hu[z] & ~near_bone[z]
    return aorta


#: Derivation name (the second item of a ``real_partial`` config entry) -> function.
DERIVATIONS = {"chest_non_contrast": derive_chest}


def partial_class_map(
    ct: Volume, derivation: str, classes: Sequence[str], lesion: np.ndarray | None = None, aorta: bool = False
) -> np.ndarray:
    """(Z, Y, X) uint8 index into ``classes`` of each voxel's derived colour class, `IGNORE` where none is derived.

    Outside the body a voxel takes its HU tissue class; inside, a derived mask's class (`MASK_CLASSES`), then the
    blood pool (`BLOOD`), then with ``aorta`` the descending aorta (``aorta``, or the pool for a model without that
    class). ``lesion``: voxels left unlabelled.
    """
    if derivation not in DERIVATIONS:
        raise InputError(f"unknown label derivation {derivation!r}; known: {', '.join(DERIVATIONS)}")
    if lesion is not None and lesion.shape != ct.shape:
        raise InputError(f"the lesion mask's shape {lesion.shape} is not the CT's {ct.shape}")
    masks = DERIVATIONS[derivation](ct, lesion, aorta)
    index = {name: k for k, name in enumerate(classes)}
    tissue_lut = np.asarray([index[t] for t in TISSUE_CLASSES], dtype=np.uint8)
    out = np.full(ct.shape, IGNORE, dtype=np.uint8)
    outside = ~masks["body"]
    out[outside] = tissue_lut[tissue_class_index(np.asarray(ct.array)[outside])]
    for name, cls in MASK_CLASSES.items():
        out[masks[name]] = index[cls]
    out[masks["blood"]] = BLOOD
    if aorta:
        out[masks["aorta"]] = index.get("aorta", BLOOD)
    return out
