"""What a reader measures on a CT and reads in the image's corner, Qt-free: a line's length in mm, the HU statistics
and area of a region drawn on one slice, and the corner text (patient, series, slice position, window).

Coordinates come as the viewer has them: world points (z, y, x) LPS in mm for lengths and areas, and the same points
in the CT's voxel index (k, j, i) for the voxels a region holds. A voxel belongs to a region when its centre lies
inside the outline (scikit-image's polygon rasterisation, as PACS viewers count an ROI's pixels); the area is the
outline's own (polygon or ellipse), not the voxels' count times their size, so it does not step with the grid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..windowing import Window

#: Points along an ellipse's outline when its voxels are counted (a polygon this fine is within 0.1 % of its area).
ELLIPSE_POINTS = 128
PLANE_OF_AXIS = {0: "axial", 1: "coronal", 2: "sagittal"}  # the plane a slice axis (k, j, i) cuts


@dataclass(frozen=True)
class RegionStats:
    """HU statistics of a region drawn on one slice.

    Attributes:
        mean, sd, minimum, maximum: of the voxels whose centres lie inside the outline (HU); sd is the sample
            standard deviation (n - 1), NaN for one voxel.
        voxels: how many voxels that is.
        area_mm2: the outline's area in the slice's plane.
    """

    mean: float
    sd: float
    minimum: float
    maximum: float
    voxels: int
    area_mm2: float

    def text(self) -> str:
        """One line as a PACS labels an ROI: mean +- SD, min/max, area."""
        sd = "-" if np.isnan(self.sd) else f"{self.sd:.1f}"
        return (
            f"mean {self.mean:.1f} HU, SD {sd}, min {self.minimum:.0f}, max {self.maximum:.0f}, "
            f"area {self.area_mm2 / 100:.2f} cm² ({self.voxels} voxels)"
        )


def path_length_mm(world: np.ndarray) -> float:
    """The length of a line or path through the world points (n, 3), in mm (world coordinates are mm)."""
    points = np.asarray(world, dtype=np.float64)
    return float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum())


def ellipse_outline(corners: np.ndarray, points: int = ELLIPSE_POINTS) -> np.ndarray:
    """The outline of the ellipse inscribed in a box given by its four corners (in order, as napari keeps an
    ellipse), as ``points`` points in the corners' coordinates."""
    corners = np.asarray(corners, dtype=np.float64)
    centre = corners.mean(axis=0)
    half_a = (corners[1] - corners[0]) / 2  # along one side
    half_b = (corners[3] - corners[0]) / 2  # along the other
    angles = np.linspace(0.0, 2 * np.pi, points, endpoint=False)[:, None]
    return centre + np.cos(angles) * half_a + np.sin(angles) * half_b


def outline_area_mm2(world: np.ndarray) -> float:
    """The area of a closed planar outline of world points (n, 3) in mm²: half the norm of the summed cross
    products (the shoelace formula in the outline's own plane, whatever its orientation)."""
    points = np.asarray(world, dtype=np.float64)
    relative = points - points[0]
    return float(np.linalg.norm(np.cross(relative[:-1], relative[1:]).sum(axis=0)) / 2)


def region_stats(hu: np.ndarray, outline_index: np.ndarray, outline_world: np.ndarray) -> RegionStats:
    """The HU statistics of the voxels of ``hu`` (k, j, i) inside a closed outline drawn on one slice.

    Args:
        hu: the CT's voxels.
        outline_index: the outline's points in voxel index coordinates (n, 3); the slice is the axis along which
            they spread least (all on one slice, as napari draws a shape on the displayed plane).
        outline_world: the same points in world mm, for the area.

    Raises:
        InputError: the outline is not on one slice of the CT, lies outside it, or holds no voxel centre.
    """
    from skimage.draw import polygon

    index = np.asarray(outline_index, dtype=np.float64)
    axis = int(np.argmin(np.ptp(index, axis=0)))
    if np.ptp(index[:, axis]) > 0.5:
        raise InputError(
            "the region is not drawn on one slice of the CT; draw it in an axial, coronal or sagittal view"
        )
    position = int(round(float(index[:, axis].mean())))
    if not 0 <= position < hu.shape[axis]:
        raise InputError("the region lies outside the CT")
    plane = np.take(hu, position, axis=axis)
    rows, cols = (index[:, a] for a in range(3) if a != axis)
    inside = polygon(rows, cols, shape=plane.shape)
    values = plane[inside].astype(np.float64)
    if values.size == 0:
        raise InputError("the region holds no voxel of the CT: draw it larger or over the image")
    return RegionStats(
        mean=float(values.mean()),
        sd=float(values.std(ddof=1)) if values.size > 1 else float("nan"),
        minimum=float(values.min()),
        maximum=float(values.max()),
        voxels=int(values.size),
        area_mm2=outline_area_mm2(outline_world),
    )


@functools.lru_cache(maxsize=16)
def _header_identity(first_file: str) -> tuple[str, str, str]:
    """(patient's name, patient ID, study date) of a DICOM file's header; empty strings where absent."""
    import pydicom

    try:
        ds = pydicom.dcmread(
            first_file, stop_before_pixels=True, specific_tags=["PatientName", "PatientID", "StudyDate"]
        )
    except (OSError, pydicom.errors.InvalidDicomError):
        return "", "", ""
    name = str(ds.get("PatientName", "") or "").replace("^", " ").strip()
    date = str(ds.get("StudyDate", "") or "")
    date = f"{date[:4]}-{date[4:6]}-{date[6:]}" if len(date) == 8 and date.isdigit() else date
    return name, str(ds.get("PatientID", "") or "").strip(), date


def patient_line(meta: dict) -> str:
    """The corner's first line: the patient's name, ID and study date from the series' own header (a DICOM series
    read from disk); the file's name otherwise (NIfTI, MHA, NRRD hold no patient)."""
    first = meta.get("first_file")
    if first and Path(first).is_file():
        name, patient_id, date = _header_identity(str(first))
        parts = [name or "(no name)", f"ID {patient_id}" if patient_id else "", date]
        return "  ".join(part for part in parts if part)
    source = str(meta.get("source") or "")
    return Path(source).name if source else ""


def corner_text(meta: dict, axis: int | None, index: int, count: int, position_mm: float, window: Window) -> str:
    """The corner overlay's lines: patient, series, the slice shown (plane, number ``index + 1`` of ``count``, its
    position along the slice axis in LPS mm; none when ``axis`` is None: a 3D view) and the window (W/L, as
    radiologists say it)."""
    lines = [patient_line(meta), str(meta.get("series_description") or "").strip()]
    if axis is not None:
        plane = PLANE_OF_AXIS[axis].capitalize()
        lines.append(f"{plane} {index + 1}/{count}  {'zyx'[axis]} {position_mm:.1f} mm")
    lines.append(f"W {window.width:.0f}  L {window.centre:.0f}")
    return "\n".join(line for line in lines if line)
