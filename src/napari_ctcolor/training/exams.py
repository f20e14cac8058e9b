"""The same patient as other exams would show them: synthetic contrast phases, fields of view and scan ranges.

A colour rule or a network tuned on two patients as they were scanned can fail on the third exam of the same
anatomy: a CT angiography's 450 HU aorta, a field of view that cuts the chest wall, a scan that ends above the
pelvis. These versions of the shared CTs put every validation row through those exams (the model cards'
``exams``, tests/models/test_exam_matrix.py through ``ctcolor colorize --classes``):

- `with_blood`: a labelled CT whose vessels and heart take other HU (`PHASES`): each structure's voxels are moved
  by the difference between the wanted HU and their median, texture and noise kept, in proportion to a mask blurred by
  half a voxel in-plane (the partial volume at its wall). Only the blood changes: the organs keep the phase the
  patient was scanned in (the DICOM patient's enhanced liver and kidneys in its non-contrast version).
- `with_pool`: an unlabelled chest CT whose mediastinal blood pool (`training.partial`'s derivation) is raised to a
  given HU, the same way.
- `cut_fov`: the central part of each slice, as a small reconstruction field of view gives it.
- `crop_z`: a range of slices (the scan of a chest or upper abdomen, ending above the pelvis).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..io import Volume
from ..palettes import color_class
from .data import LabelledCT

#: HU of the blood in each synthetic exam (120 kVp): non-contrast blood 35-50 HU; portal-venous vessels 140-220;
#: arterial and CT angiography aorta and left heart 250-700 (the issue's CTA: aorta median 354, 90th percentile 513).
PHASES: dict[str, dict[str, float]] = {
    "non_contrast": {
        "aorta": 40, "heart": 40, "inferior_vena_cava": 40, "portal_vein_and_splenic_vein": 40, "iliac_artery": 40,
        "iliac_vena": 40,
    },
    "portal_venous": {
        "aorta": 160, "heart": 150, "inferior_vena_cava": 130, "portal_vein_and_splenic_vein": 170,
        "iliac_artery": 160, "iliac_vena": 120,
    },
    **{
        f"arterial_{hu}": {"aorta": hu, "heart": hu, "iliac_artery": hu, "inferior_vena_cava": 90,
                           "portal_vein_and_splenic_vein": 120, "iliac_vena": 60}
        for hu in (300, 450, 600)
    },
}  # fmt: skip


def _shifted(hu: np.ndarray, mask: np.ndarray, value: float) -> np.ndarray:
    """``hu`` with the voxels of ``mask`` moved to a median of ``value``, in proportion to the mask blurred by half a
    voxel in-plane (its partial-volumed wall moves part of the way)."""
    inner = ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3), bool))
    current = float(np.median(hu[inner if inner.any() else mask]))
    share = ndimage.gaussian_filter(mask.astype(np.float32), (0.0, 0.5, 0.5))
    return hu + (value - current) * share


def with_blood(case: LabelledCT, phase: str) -> LabelledCT:
    """The labelled CT as the exam ``phase`` (`PHASES`) would show its blood; structures it lacks are skipped."""
    hu = np.asarray(case.ct.array, dtype=np.float32)
    for structure, value in PHASES[phase].items():
        ids = [label for label, name in case.label_names.items() if color_class(name) == structure]
        mask = np.isin(case.labels, ids)
        if mask.sum() >= 8:
            hu = _shifted(hu, mask, value)
    return LabelledCT(f"{case.name}-{phase}", case.ct.with_array(hu), case.labels, case.label_names)


def with_pool(ct: Volume, pool: np.ndarray, value: float) -> Volume:
    """An unlabelled chest CT whose mediastinal blood pool ``pool`` ((Z, Y, X) bool, `partial.derive_chest`'s
    ``blood``) shows a median of ``value`` HU."""
    return ct.with_array(_shifted(np.asarray(ct.array, dtype=np.float32), pool, value))


def cut_fov(volume: Volume, keep: float, *arrays: np.ndarray) -> tuple[Volume, list[np.ndarray]]:
    """The central ``keep`` share of each slice's rows and columns (a smaller field of view, cutting what lies
    outside it), with the same crop of each (Z, Y, X) array in ``arrays``."""
    _, rows, cols = volume.shape
    y0, x0 = round(rows * (1 - keep) / 2), round(cols * (1 - keep) / 2)
    y1, x1 = y0 + round(rows * keep), x0 + round(cols * keep)
    image = volume.to_sitk()[x0:x1, y0:y1, :]
    return Volume.from_sitk(image, dict(volume.meta)), [a[:, y0:y1, x0:x1] for a in arrays]


def crop_z(volume: Volume, start: int, stop: int, *arrays: np.ndarray) -> tuple[Volume, list[np.ndarray]]:
    """Slices ``start:stop`` (array order) of the volume and of each (Z, Y, X) array in ``arrays``."""
    image = volume.to_sitk()[:, :, start:stop]
    return Volume.from_sitk(image, dict(volume.meta)), [a[start:stop] for a in arrays]
