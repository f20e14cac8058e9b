"""Anatomical consistency of the colorizer's class probabilities, applied before they are kept (`Chroma`).

The 2D network colours each axial slice on its own and names a structure wherever one is most probable, however
unsure. A radiologist reads a wrong name as a wrong answer, and a colour that changes from slice to slice as noise.
Four steps, each at the network's resolution (16x fewer pixels than the CT), on the classes kept per pixel:

1. **One colour through the volume**: the probabilities are smoothed along z with a Gaussian of `Z_SMOOTH_MM`
   (not across slices thicker than that: a 5 mm slice keeps its own), weighted by HU likeness, so the smoothing stops
   where the CT changes along z as the guided upsampling does in-plane.
2. **Anatomy that fits the body region**: each slice's position relative to the lungs, found from HU alone
   (`body_region`), rules out structures that cannot be there: no femur, bladder or gluteal muscle beside the lungs, no
   liver or bowel well above the diaphragm, no heart below the lung bases (`REGION_RULES`); no pelvic structure on or
   above the most inferior slices where the network is sure of a large liver, spleen or kidney section (`above_pelvis`:
   the volume's own order of what it shows; an upper-abdomen series shows no lung to place it, and a
   chest-to-upper-abdomen CT angiography ends well below its lung bases); no spleen right of the body's midline, no
   gallbladder left of it and no heart far right of it (`LATERAL_MM`). Their probability goes to zero.
3. **"Tissue" when unsure**: where no named structure reaches `CONFIDENT` (ruled-out probability counting as
   doubt), the structures' probability moves to tissue classes (fat, soft tissue, contrast blood or bone): each
   structure's to its own tissue family, checked against the HU, so the voxel takes a plain tissue colour and the
   pointer says "bone" or "soft_tissue" rather than a guess. A pixel that holds a rib's edge and muscle keeps both
   bone and soft tissue, and each CT voxel's own HU chooses between them (`colorize.HU_GROUPS`) as it does between
   named structures; a pixel mostly lung or air takes that tissue entirely. Before that, fat's probability in a
   pixel denser than fat can be (`FAT_RAMP_HU`) goes to the denser tissue the pixel's other classes favour: a
   non-contrast kidney is not fat, whatever the network says.
4. **One piece per organ, no islands**: an organ that is one connected piece in any CT (two for the kidneys) keeps
   its name only on its largest piece(s), and no structure keeps its name on a piece smaller than `MIN_PIECE_ML`
   (`keep_main_pieces`); elsewhere the pixels take their tissue's name.

Written here rather than taken from a library: these are rules about this model's classes and the CT's HU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np
import torch
from scipy import ndimage

from ...threads import use_threads
from .fused import LIKENESS_STEP_HU, likeness_table

#: Gaussian width (mm) of the probabilities' smoothing along z; not applied when a slice is thicker than this.
Z_SMOOTH_MM = 3.0
#: HU range of that smoothing's weights (`smooth_along_z`): a neighbour this much denser or lighter counts exp(-1/2).
Z_SMOOTH_HU = 35.0
#: A named structure keeps its name where its probability reaches this; below it the voxel is named by tissue.
CONFIDENT = 0.35
#: Lung parenchyma at the network's resolution (HU): aerated lung, not bowel gas (below -950) nor soft tissue.
LUNG_HU = (-950.0, -500.0)
#: A slice "has lung" when its lung area is at least LUNG_SLICE_CM2 and this share of the largest slice's. Bowel gas
#: mixed with its wall at the network's resolution reaches the lung HU range too, but on the 3 mm CT (3 mm pixels)
#: covered at most 13 cm² of a slice, where the lung bases covered 22-54 cm².
LUNG_SLICE_SHARE, LUNG_SLICE_CM2 = 0.1, 20.0

TISSUES = ("air", "lung", "fat", "soft_tissue", "contrast_blood", "bone")
_BONE = ("vertebrae_", "ribs", "sacrum", "hip", "femur", "sternum", "costal_cartilages")
_VESSELS = ("heart", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery", "iliac_vena")
#: Fallback HU thresholds (`consistent_top`): the midpoints between the palettes' tissue ranges (fat | soft tissue,
#: soft tissue | contrast blood).
FAT_MAX_HU, CONTRAST_MIN_HU = -30.0, 140.0
#: Fat in a network pixel whose mean HU is within this ramp moves to a denser tissue in proportion (`consistent_top`),
#: all of it above the ramp: fat (-150..-50 HU) mixed with soft tissue (40 HU) averages -30 HU at half fat and
#: 20 HU at 15 %. The network calls a non-contrast kidney (10-20 HU) fat; a ramp rather than a step keeps a pixel's
#: colour from jumping between slices where its HU hovers at one threshold.
FAT_RAMP_HU = (-30.0, 20.0)

PELVIS = ("urinary_bladder", "prostate", "sacrum", "hip", "femur", "iliac_artery", "iliac_vena", "gluteus_")
ABDOMEN = (
    "liver", "spleen", "kidney", "gallbladder", "stomach", "pancreas", "adrenal_gland", "small_bowel", "duodenum",
    "colon", "portal_vein_and_splenic_vein",
)  # fmt: skip

#: (class prefixes, relation, mm): the classes are ruled out on slices whose height above the lung bases (the most
#: inferior slice with lung; negative below it) satisfies the relation, or, for "above_dome", whose height above the
#: slice of largest lung area exceeds mm. Margins are generous: checked against the labelled CTs (tests).
REGION_RULES: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (PELVIS, "above_base", -60.0),  # nothing pelvic within 60 mm below the lung bases, or higher
    (ABDOMEN, "above_dome", 30.0),  # no abdominal organ 30 mm above the largest lung section
    (("vertebrae_lumbar",), "above_dome", 20.0),
    (("heart",), "below_base", 0.0),  # the heart sits on the diaphragm, above the lung bases
    (("sternum",), "below_base", 30.0),
    (("vertebrae_thoracic",), "below_base", 80.0),
    (("ribs",), "below_base", 150.0),
)
#: Ruled out when the scan shows no lung at all (an abdomen or pelvis series).
NO_LUNG_RULES = ("heart", "sternum")
#: The organs whose sure section (probability >= `ORGAN_SURE`) of at least this many cm² places a slice above the
#: pelvis (`above_pelvis`): the pelvis (iliac crest, iliac vessels, L4 and below) lies below the kidneys' lower poles
#: and the liver's and spleen's lower tips. On the 3 mm patient the iliac arteries begin 15 mm below the kidneys'
#: lowest slice and 24 mm below the liver's; the liver's axial section reaches 150-250 cm² (the DICOM patient's slab:
#: 200-236 cm² on every slice), the spleen's 45 cm², each kidney's 20-25 cm². On the labelled CTs' 62 pelvic slices
#: the model trained without that patient was sure of at most 33 cm² of liver, the shipped model of 0.5 cm²
#: (2026-11-25); the spleen and kidney figures are checked on the same slices by tests/engines/test_anatomy.py with the
#: shipped and both leave-one-out models.
ABOVE_PELVIS_CM2 = {"liver": 100.0, "spleen": 20.0, "kidney": 10.0}
ORGAN_SURE = 0.5
#: Where organs lie across the body in any CT (`lateral_mm`): (least, most) mm from the slice's midline towards the
#: patient's left (the midline: the median left-right position of the slice's body). On the labelled CTs the spleen
#: lies 38 mm or more left of the midline and the gallbladder 54 mm or more right of it. The heart's right border (the
#: right atrium) lies 3-5 cm right of the midline, beyond 7 cm only in a large cardiomegaly. The model trained without
#: the 3 mm patient named 15 % of that patient's liver spleen, and 3 % heart, 66-126 mm right of the midline. A
#: mirrored anatomy (situs inversus) loses only the names.
LATERAL_MM = {"spleen": (0.0, np.inf), "gallbladder": (-np.inf, 0.0), "heart": (-80.0, np.inf)}


@dataclass(frozen=True)
class Region:
    """Where each slice lies relative to the lungs (mm along the patient's head-foot axis; None without lungs)."""

    slices: int
    above_base: np.ndarray | None  # (Z,) height above the most inferior lung slice
    above_dome: np.ndarray | None  # (Z,) height above the slice of largest lung area

    def allowed(self, classes: tuple[str, ...]) -> torch.Tensor:
        """(Z, K) bool: which classes may be named on each slice."""
        out = torch.ones((self.slices, len(classes)), dtype=torch.bool)
        for k, name in enumerate(classes):
            if self.above_base is None:
                if name.startswith(NO_LUNG_RULES):
                    out[:, k] = False
                continue
            for prefixes, relation, mm in REGION_RULES:
                if not name.startswith(prefixes):
                    continue
                if relation == "above_base":
                    out[:, k] &= torch.from_numpy(~(self.above_base > mm))
                elif relation == "below_base":
                    out[:, k] &= torch.from_numpy(~(self.above_base < -mm))
                else:
                    out[:, k] &= torch.from_numpy(~(self.above_dome > mm))
        return out


def above_pelvis(
    top: torch.Tensor, prob: torch.Tensor, classes: tuple[str, ...], pixel_mm2: float, slice_superior_mm: np.ndarray
) -> torch.Tensor:
    """(Z, K) bool: which classes may be named on each slice given the organs the network is sure of: no `PELVIS`
    class on or above the most inferior slice that, with a neighbour, shows a sure section of an organ that lies above
    the pelvis (`ABOVE_PELVIS_CM2`). The whole volume's order decides, not each slice alone: a CT angiography's lowest
    slices, through the liver's and the kidneys' lower parts, are above the pelvis although their own liver section
    is small. One slice alone does not place it (a stray section).

    Args:
        top, prob: (Z, k, h, w) kept classes, most probable first (probabilities x 255 as uint8, or float).
        pixel_mm2: one network pixel's area; slice_superior_mm: (Z,) each slice's LPS S position (`slice_superior_mm`).
    """
    z = top.shape[0]
    allowed = torch.ones((z, len(classes)), dtype=torch.bool)
    sure = prob[:, 0].float() >= ORGAN_SURE * (255.0 if prob.dtype == torch.uint8 else 1.0)
    passing = np.zeros(z, dtype=bool)
    for name, cm2 in ABOVE_PELVIS_CM2.items():
        if name in classes:
            area_cm2 = ((top[:, 0] == classes.index(name)) & sure).sum(dim=(1, 2)).numpy() * pixel_mm2 / 100.0
            passing |= area_cm2 >= cm2
    confirmed = passing.copy()
    if z > 1:
        neighbour = np.zeros(z, dtype=bool)
        neighbour[1:] |= passing[:-1]
        neighbour[:-1] |= passing[1:]
        confirmed &= neighbour
    if not confirmed.any():
        return allowed
    above = torch.from_numpy(np.asarray(slice_superior_mm) >= float(np.asarray(slice_superior_mm)[confirmed].min()))
    pelvic = torch.tensor([name.startswith(PELVIS) for name in classes])
    allowed[above[:, None] & pelvic[None, :]] = False
    return allowed


#: Organs that are one connected piece in any CT (two for the paired kidneys): where the network names one in
#: several pieces, only the largest (two) keep the name (`keep_main_pieces`), as nnU-Net's post-processing keeps a
#: class's largest component. On the labelled CTs, each left out of training in turn, the stray pieces lay in other
#: structures: 85 % of the liver-named voxels of the left-out 3 mm patient (psoas and gluteal muscles), and 65,000
#: voxels of the left-out DICOM patient's spleen named liver.
PIECES = {
    "liver": 1, "spleen": 1, "gallbladder": 1, "stomach": 1, "pancreas": 1, "heart": 1, "urinary_bladder": 1,
    "prostate": 1, "kidney": 2,
}  # fmt: skip
#: A named structure keeps its name only on connected pieces of at least this volume (ml, at the network's
#: resolution; smaller pieces take their tissue's name, `keep_main_pieces`). On the two labelled patients, each run
#: through the model trained without it and through the shipped model, the named pieces under 0.5 ml held the
#: structure they named on 11-48 % of their voxels, those of 1 ml or more on 76-93 %; on the chest CT no model was
#: trained on (lung1), such islands named kidney, adrenal gland, small bowel and duodenum beside the oesophagus at the
#: heart's level. Only the most probable class is checked: a voxel whose HU hands it to a pixel's second class
#: (`colorize.HU_GROUPS`) may still show that class outside its pieces (a few voxels of heart at lung1's apices).
MIN_PIECE_ML = 0.5


def keep_main_pieces(
    top: torch.Tensor, small_hu: torch.Tensor, classes: tuple[str, ...], voxel_ml: float | None
) -> None:
    """Rename, in place, the pixels whose most probable class is a named structure on a connected piece (3D, faces
    and edges) smaller than `MIN_PIECE_ML`, or a `PIECES` organ outside its largest piece(s), to their tissue: bone
    for a bone, else by HU (soft tissue; fat below `FAT_MAX_HU`; for the heart and vessels contrast blood from
    `CONTRAST_MIN_HU`). ``top``: (Z, k, h, w) kept classes, most probable first; ``voxel_ml``: one pixel's volume,
    None for a lone slice, which has no extent through the plane to weigh (only the `PIECES` rule applies).
    Their probabilities stay, so the pixel keeps its confidence under its tissue's name. A class may then appear
    twice among a pixel's kept ones (the sum of both is what the composition and the names use).

    Written with scikit-image's labelling of equal-valued regions: one pass over the volume for every class."""
    from skimage.measure import label

    tables = _tables(classes)
    if tables is None:
        return
    first = top[:, 0].numpy()
    named = tables.named[first]
    if not named.any():
        return
    pieces = label(np.where(named, first.astype(np.int32) + 1, 0), background=0, connectivity=2)
    sizes = np.bincount(pieces.ravel())
    piece_class = np.zeros(len(sizes), dtype=np.int64)
    piece_class[pieces.ravel()] = first.ravel()
    stray = sizes * voxel_ml < MIN_PIECE_ML if voxel_ml is not None else np.zeros(len(sizes), dtype=bool)
    for name, count in PIECES.items():
        if name in classes:
            ids = np.flatnonzero(piece_class[1:] == classes.index(name)) + 1
            stray[ids[np.argsort(sizes[ids])[::-1][count:]]] = True
    stray[0] = False
    mask = stray[pieces]
    if not mask.any():
        return
    hu, was = small_hu.numpy()[mask], first[mask]
    tissue = np.where(hu < FAT_MAX_HU, tables.fat, tables.soft)
    families = tables.family_of[was]
    tissue[(families == TISSUES.index("contrast_blood")) & (hu >= CONTRAST_MIN_HU)] = tables.blood
    tissue[families == TISSUES.index("bone")] = tables.tissue[TISSUES.index("bone")]
    first[mask] = tissue


def body_region(
    small_hu: np.ndarray, pixel_mm2: float, slice_superior_mm: np.ndarray, body: np.ndarray | None = None
) -> Region:
    """Each slice's height above the lung bases and above the largest lung section, from HU at any resolution.

    Args:
        small_hu: (Z, h, w) HU.
        pixel_mm2: area of one pixel of ``small_hu``.
        slice_superior_mm: (Z,) each slice's position along the patient's superior direction (LPS S), mm.
        body: (Z, h, w) bool the patient's body (`body.body_mask`: with the lungs that a field of view cutting the
            chest wall leaves open to the edge); None: the holes of the tissue above the lung HU, slice by slice.
    """
    lung = (small_hu >= LUNG_HU[0]) & (small_hu <= LUNG_HU[1])
    if body is None:  # air outside the body is open
        body = np.stack([ndimage.binary_fill_holes(s > LUNG_HU[1]) for s in small_hu])
    area_cm2 = (lung & body).sum(axis=(1, 2)) * pixel_mm2 / 100.0
    has_lung = (area_cm2 >= LUNG_SLICE_CM2) & (area_cm2 >= LUNG_SLICE_SHARE * area_cm2.max(initial=0.0))
    if not has_lung.any():
        return Region(len(small_hu), None, None)
    base = float(slice_superior_mm[has_lung].min())
    dome = float(slice_superior_mm[int(np.argmax(area_cm2))])
    return Region(len(small_hu), slice_superior_mm - base, slice_superior_mm - dome)


def lateral_mm(body: np.ndarray, pixel_mm: tuple[float, float], direction) -> np.ndarray | None:
    """(Z, h, w) float32: each pixel's distance (mm) from its slice's midline towards the patient's left (LPS +x),
    the midline being the median left-right position of the slice's ``body`` pixels; NaN on slices without body.
    None when the slices' rows and columns hardly run left-right (not an axial series).

    Args:
        body: (Z, h, w) bool, the body at any in-plane resolution.
        pixel_mm: (row, column) spacing of ``body``'s pixels.
        direction: the volume's 3 x 3 direction (columns: the x, y, z index axes in LPS).
    """
    towards_left = np.asarray(direction, dtype=np.float64)[0, :2]  # L component of the column and row index axes
    if np.hypot(*towards_left) < 0.5:
        return None
    rows, cols = np.arange(body.shape[1]), np.arange(body.shape[2])
    left = (towards_left[0] * pixel_mm[1] * cols[None, :] + towards_left[1] * pixel_mm[0] * rows[:, None]).astype(
        np.float32
    )
    out = np.full(body.shape, np.nan, dtype=np.float32)
    for s, mask in enumerate(body):
        if mask.any():
            out[s] = left - np.median(left[mask])
    return out


def slice_superior_mm(shape_z: int, spacing_z: float, origin, direction) -> np.ndarray:
    """(Z,) the LPS S coordinate (mm) of each slice's first voxel: origin S + direction[S, k] * k * spacing."""
    return float(origin[2]) + float(np.asarray(direction)[2, 2]) * spacing_z * np.arange(shape_z)


def family(name: str) -> str:
    """The tissue a class belongs to: bone, contrast_blood (vessels and heart), lung, fat, air or soft_tissue."""
    if name in TISSUES:
        return name
    if name.startswith(_BONE):
        return "bone"
    return "contrast_blood" if name.startswith(_VESSELS) else "soft_tissue"


@dataclass(frozen=True)
class _Tables:
    named: np.ndarray  # (K,) bool: a named structure, not a tissue class
    family_of: np.ndarray  # (K,) the tissue family of each class, an index into `tissue`
    tissue: np.ndarray  # (F,) index of each family's tissue class
    soft: int
    fat: int
    blood: int


@functools.lru_cache(maxsize=8)
def _tables(classes: tuple[str, ...]) -> _Tables | None:
    if any(t not in classes for t in TISSUES) or all(name in TISSUES for name in classes):
        return None
    return _Tables(
        named=np.array([name not in TISSUES for name in classes]),
        family_of=np.array([TISSUES.index(family(n)) for n in classes], dtype=np.int64),
        tissue=np.array([classes.index(t) for t in TISSUES], dtype=np.int64),
        soft=classes.index("soft_tissue"),
        fat=classes.index("fat"),
        blood=classes.index("contrast_blood"),
    )


def consistent_top(
    top: torch.Tensor,
    prob: torch.Tensor,
    small_hu: torch.Tensor,
    classes: tuple[str, ...],
    allowed: torch.Tensor,
    skip: torch.Tensor | None = None,
    lateral: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2 and 3 of the module docstring on the kept classes of n slices: ``top`` (n, k, h, w) class indices,
    ``prob`` (n, k, h, w) float probabilities, their (n, h, w) HU and (n, K) ``allowed``. Returns the new (top,
    prob), most probable first (top in ``top``'s dtype, prob float32); pixels where ``skip`` ((n, h, w) bool) keep
    their classes with zero probabilities. ``lateral``: (n, h, w) mm from the midline towards the patient's left
    (`lateral_mm`), for the `LATERAL_MM` rule; None: no such rule.

    Per pixel, on its k kept classes (not all K: the classes beyond them carry almost no probability):

    1. ruled-out classes lose their probability: those not ``allowed`` on the slice, and a `LATERAL_MM` organ
       where it cannot lie across the body;
    2. fat's probability, in a pixel denser than fat (`FAT_RAMP_HU`: none of it moves at the ramp's start, all of
       it at its end), moves to the tissue class of the family that the pixel's other classes favour: a kidney
       pixel's to soft tissue, a fatty vertebra's to bone; a vessel below `CONTRAST_MIN_HU`, and a pixel with
       nothing else, to soft tissue. It goes into that class's entry where it is kept, else into fat's entry
       (renamed) when all of fat moved, else into the pixel's weakest entry (replaced);
    3. where no named structure reaches `CONFIDENT` of all that the pixel's kept classes held before step 1 (a
       ruled-out class's probability is doubt, not support for the structures left: the network's second guess
       after an impossible first is not a name), the structures' probability moves to tissue classes in proportion
       to what the network said for each tissue family's structures, ruled-out ones included (a rib pixel split
       between ribs, heart and liver keeps bone, contrast blood and soft tissue in those shares, for each CT voxel's
       HU to choose from, `colorize.HU_GROUPS`; a humerus beside the lungs that the network calls femur is bone): a
       vessel's below `CONTRAST_MIN_HU` to soft tissue, soft tissue's below `FAT_MAX_HU` to fat. A pixel whose
       probability lies mostly in lung or air (all of what the network said, tissue classes included) moves all of
       it there, as does a pixel with no structure kept; the parenchyma keeps the lung's colour untinted. Measured
       against moving all of it to the family with the most probability (the leave-one-out rows, issue 24): ribs
       named right or bone 0.729 -> 0.745 and 0.895 -> 0.927 (held-out and trained-on DICOM patient), kidneys
       0.922 -> 0.943 (held-out 3 mm patient), bone's hue on that patient 0.815 -> 0.801 (BENCHMARKS.md).

    One numba pass per pixel (`_consistent`): in tensor ops (a few dozen passes over (n, k, h, w) arrays) the same
    took 0.86 s on a 282-slice 1 mm series, against 0.09 s.
    """
    tables = _tables(classes)
    top_np = np.ascontiguousarray(top.numpy())
    out_top = np.empty_like(top_np)
    out_prob = np.empty(top_np.shape, dtype=np.float32)
    use_threads(torch.get_num_threads())
    _consistent(
        top_np,
        np.ascontiguousarray(prob.numpy(), dtype=np.float32),
        np.ascontiguousarray(small_hu.numpy(), dtype=np.float32),
        np.ascontiguousarray(allowed.numpy(), dtype=np.bool_),
        _skip_mask(skip, small_hu.shape),
        np.full(small_hu.shape, np.nan, np.float32) if lateral is None else np.ascontiguousarray(lateral, np.float32),
        np.array([LATERAL_MM.get(name, (-np.inf, np.inf)) for name in classes], dtype=np.float32),
        tables is not None,
        *_kernel_tables(tables, len(classes)),
        np.array([*FAT_RAMP_HU, CONTRAST_MIN_HU, FAT_MAX_HU, CONFIDENT], dtype=np.float32),
        out_top,
        out_prob,
    )
    return torch.from_numpy(out_top), torch.from_numpy(out_prob)


def _skip_mask(skip: torch.Tensor | None, shape: tuple[int, ...]) -> np.ndarray:
    if skip is None:
        return np.zeros(shape, dtype=np.bool_)
    return np.ascontiguousarray(skip.numpy(), dtype=np.bool_)


def _kernel_tables(tables: _Tables | None, count: int) -> tuple:
    if tables is None:  # no tissue classes: only the ruled-out classes are removed
        zeros = np.zeros(count, dtype=np.int64)
        return np.zeros(count, dtype=np.bool_), zeros, np.zeros(len(TISSUES), dtype=np.int64), 0, 0, 0
    return tables.named, tables.family_of, tables.tissue, tables.soft, tables.fat, tables.blood


_AIR, _LUNG, _FAT = (TISSUES.index(t) for t in ("air", "lung", "fat"))


@numba.njit(parallel=True, cache=True, nogil=True)
def _consistent(
    top, prob, hu, allowed, skip, lateral, across, has_tables, named, family_of, tissue, soft, fat, blood, limits,
    out_top, out_prob,
):  # fmt: skip
    n, k, height, width = top.shape
    families = tissue.shape[0]
    ramp_low, ramp_high, contrast_min, fat_max, confident = limits[0], limits[1], limits[2], limits[3], limits[4]
    for job in numba.prange(n * height):
        s, y = job // height, job % height
        t = np.empty(k, dtype=np.int64)
        p = np.empty(k, dtype=np.float32)
        mass = np.empty(families, dtype=np.float32)
        named_mass = np.empty(families, dtype=np.float32)
        for x in range(width):
            if skip[s, y, x]:
                for j in range(k):
                    out_top[s, j, y, x] = top[s, j, y, x]
                    out_prob[s, j, y, x] = 0.0
                continue
            h = hu[s, y, x]
            for f in range(families):
                mass[f] = 0.0
            said = np.float32(0.0)
            side = lateral[s, y, x]  # NaN (no body on the slice, or no side rule) passes both tests below
            for j in range(k):
                t[j] = top[s, j, y, x]
                p[j] = prob[s, j, y, x]
                said += p[j]
                mass[family_of[t[j]]] += p[j]  # by all that the network said, ruled-out classes included
                if not allowed[s, t[j]] or side < across[t[j], 0] or side > across[t[j], 1]:
                    p[j] = 0.0
            if has_tables:
                # Fat in a pixel denser than fat: to the denser tissue the other classes favour.
                share = min(max((h - ramp_low) / (ramp_high - ramp_low), np.float32(0.0)), np.float32(1.0))
                has_fat = False
                for j in range(k):
                    has_fat = has_fat or t[j] == fat
                if share > 0 and has_fat:
                    best, target = np.float32(-1.0), tissue[0]
                    for f in range(families):
                        if f != _AIR and f != _LUNG and f != _FAT and mass[f] > best:
                            best, target = mass[f], tissue[f]
                    if best <= 0 or (target == blood and h < contrast_min):
                        target = soft
                    moved = np.float32(0.0)
                    for j in range(k):
                        if t[j] == fat:
                            moved += p[j] * share
                            p[j] *= np.float32(1.0) - share
                    if moved > 0:
                        slot = -1
                        for j in range(k):
                            if slot < 0 and t[j] == target:
                                slot = j
                        if slot < 0:
                            for j in range(k):
                                if slot < 0 and t[j] == fat and p[j] == 0:
                                    slot = j
                        if slot < 0:
                            slot = k - 1
                        if t[slot] != target:
                            p[slot] = 0.0
                            t[slot] = target
                        p[slot] += moved
            total = np.float32(0.0)
            for j in range(k):
                total += p[j]
            for j in range(k):
                p[j] /= max(total, np.float32(1e-12))
            if has_tables:
                # "Tissue" when unsure.
                largest = np.float32(0.0)
                structures = np.float32(0.0)
                for j in range(k):
                    if named[t[j]]:
                        largest = max(largest, p[j])
                        structures += p[j]
                # Confidence among all that the network said: what the rules ruled out counts as doubt, not as
                # support for the structures left (its top guess impossible, the network's second guess is no name).
                if largest * total / max(said, np.float32(1e-12)) < confident:
                    moved = structures if total > 0 else np.float32(1.0)
                    # Each structure family's share of what the network said for the named structures, ruled-out
                    # ones included (a humerus beside the lungs that the network calls femur is still bone).
                    for f in range(families):
                        named_mass[f] = 0.0
                    named_total = np.float32(0.0)
                    for j in range(k):
                        if named[top[s, j, y, x]]:
                            named_mass[family_of[top[s, j, y, x]]] += prob[s, j, y, x]
                            named_total += prob[s, j, y, x]
                    best, target = mass[0], 0
                    for f in range(1, families):
                        if mass[f] > best:
                            best, target = mass[f], f
                    if named_total <= 0 or target == _AIR or target == _LUNG:
                        # A pixel mostly air or lung (or with nothing named kept) takes that tissue entirely.
                        for f in range(families):
                            named_mass[f] = 0.0
                        named_mass[target], named_total = np.float32(1.0), np.float32(1.0)
                    for j in range(k):
                        if named[t[j]]:
                            p[j] = 0.0
                    for f in range(families):
                        if named_mass[f] <= 0 or moved <= 0:
                            continue
                        target = tissue[f]
                        if target == blood and h < contrast_min:
                            target = soft
                        if target == soft and h < fat_max:
                            target = fat
                        slot = -1
                        for j in range(k - 1, -1, -1):
                            if t[j] == target:
                                slot = j
                        if slot < 0:  # a named entry's place (each family here has one; emptied above)
                            for j in range(k):
                                if slot < 0 and named[t[j]] and p[j] == 0:
                                    slot = j
                        if slot < 0:
                            slot = k - 1
                        t[slot] = target
                        p[slot] += moved * named_mass[f] / named_total
            # Most probable first (insertion sort: stable, k is 4).
            for j in range(1, k):
                pj, tj = p[j], t[j]
                i = j
                while i > 0 and p[i - 1] < pj:
                    p[i] = p[i - 1]
                    t[i] = t[i - 1]
                    i -= 1
                p[i] = pj
                t[i] = tj
            for j in range(k):
                out_top[s, j, y, x] = t[j]
                out_prob[s, j, y, x] = p[j]


def z_smoothing_kernel(spacing_z: float) -> torch.Tensor | None:
    """1D Gaussian of `Z_SMOOTH_MM` in slices (odd length, sum 1), None when a slice is thicker than that."""
    sigma = Z_SMOOTH_MM / spacing_z
    if sigma < 1.0:
        return None
    radius = int(np.ceil(2.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def smooth_along_z(
    top: torch.Tensor,
    prob: torch.Tensor,
    hu: torch.Tensor,
    kernel: torch.Tensor,
    start: int = 0,
    stop: int | None = None,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kept classes' probabilities smoothed along z for slices [start, stop): ``top``, ``prob`` (Z, k, h, w)
    (float, or uint8 probabilities x 255), ``hu`` (Z, h, w) -> (stop - start, k, h, w) float32 new probabilities of
    those slices' own kept classes (summing to 1). Beyond the first and last slice the edge slice repeats. Pixels
    where ``skip`` ((stop - start, h, w) bool; outside the body, where the caller names nothing) get zeros.

    Each neighbour slice counts by the Gaussian ``kernel`` (length 2r + 1) and by its HU's likeness
    (`Z_SMOOTH_HU`): a joint bilateral filter, so a rib or a vessel crossing the slice keeps its own class where the
    next slice shows soft tissue, and the class of a uniform organ stops changing from slice to slice. A neighbour's
    probability of a class counts where that class is among its kept ones (classes beyond them carry almost none).

    One numba pass per pixel (`_smooth_z`) straight on the stored arrays: in tensor ops, 1 mm slices (13 neighbours)
    x 4 x 4 class comparisons took as long as the network.
    """
    stop = top.shape[0] if stop is None else stop
    out = np.empty((stop - start, *prob.shape[1:]), dtype=np.float32)
    use_threads(torch.get_num_threads())
    _smooth_z(
        top.numpy(),
        prob.numpy(),
        np.ascontiguousarray(hu.numpy(), dtype=np.float32),
        kernel.numpy().astype(np.float32),
        likeness_table(Z_SMOOTH_HU),
        start,
        _skip_mask(skip, (stop - start, *hu.shape[1:])),
        out,
    )
    return torch.from_numpy(out)


@numba.njit(parallel=True, cache=True, nogil=True)
def _smooth_z(top, prob, hu, kernel, likeness, start, skip, out):
    n, k, height, width = out.shape
    last = top.shape[0] - 1
    r = kernel.shape[0] // 2
    steps = likeness.shape[0] - 1
    limit = np.float32(steps - 1)  # the table ends at 0: no branch at its end
    per_hu = np.float32(1.0 / LIKENESS_STEP_HU)
    for job in numba.prange(n * height):
        z, y = start + job // height, job % height
        total = np.zeros(k, dtype=np.float32)
        centre = np.empty(k, dtype=top.dtype)
        for x in range(width):
            if skip[z - start, y, x]:
                for c in range(k):
                    out[z - start, c, y, x] = 0.0
                continue
            centre_hu = hu[z, y, x]
            for c in range(k):
                centre[c] = top[z, c, y, x]
                total[c] = 0.0
            for offset in range(-r, r + 1):
                zz = min(max(z + offset, 0), last)
                d = min(abs(hu[zz, y, x] - centre_hu) * per_hu, limit)
                i = int(d)
                weight = (likeness[i] + (d - np.float32(i)) * (likeness[i + 1] - likeness[i])) * kernel[offset + r]
                for b in range(k):
                    neighbour = top[zz, b, y, x]
                    for c in range(k):
                        if centre[c] == neighbour:
                            total[c] += weight * np.float32(prob[zz, b, y, x])
            mass = np.float32(0.0)
            for c in range(k):
                mass += total[c]
            mass = max(mass, np.float32(1e-30))
            for c in range(k):
                out[z - start, c, y, x] = total[c] / mass
