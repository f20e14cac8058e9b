"""The palettes: a colour per TotalSegmentator structure (or colour group, `color_class`) and HU tissue classes for
unlabelled voxels; the shipped ones (``napari_ctcolor/data/palette_<name>.json``) and a user's CSV over the
anatomical palette (`read_palette_csv`). Their colours enter the product as CIE a*, b* (`napari_ctcolor.color`)."""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from .color import lab_to_srgb, srgb_to_lab
from .errors import InputError

__all__ = ["PALETTE_NAMES", "Palette", "TissueClass", "color_class", "load_palette", "read_palette_csv"]

PALETTE_NAMES: tuple[str, ...] = ("anatomical", "dicom")


@dataclass(frozen=True)
class TissueClass:
    """A tissue class for voxels without a structure label, coloured from HU alone.

    Attributes:
        name: e.g. ``"fat"``.
        hu_range: (low, high) HU where the class has exactly its colour; between the ranges of neighbouring classes
            a*, b* blend linearly in HU, so targets have no step edges.
        rgb: sRGB 0-255, or None for no colour (a* = b* = 0, e.g. air).
    """

    name: str
    hu_range: tuple[float, float]
    rgb: tuple[int, int, int] | None

    @property
    def ab(self) -> tuple[float, float]:
        """(a*, b*) of the class colour; (0, 0) when it has none."""
        if self.rgb is None:
            return (0.0, 0.0)
        lab = srgb_to_lab(np.asarray(self.rgb, dtype=np.uint8))
        return (float(lab[1]), float(lab[2]))


@dataclass(frozen=True, eq=False)
class Palette:
    """Colours per TotalSegmentator v2 structure name, plus HU tissue classes for unlabelled voxels.

    Attributes:
        name: ``"anatomical"`` or ``"dicom"``.
        source: where the colours come from (citation).
        rgb: structure or colour-group name (`color_class`) -> sRGB (R, G, B) in 0..255.
        tissue_classes: ordered by HU.
    """

    name: str
    source: str
    rgb: Mapping[str, tuple[int, int, int]]
    tissue_classes: tuple[TissueClass, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The structure and group names, in the palette file's order (TotalSegmentator v2 label order, then the
        groups)."""
        return tuple(self.rgb)

    def lab(self, name: str) -> tuple[float, float, float]:
        """CIE (L*, a*, b*) of a structure's colour."""
        try:
            rgb = self.rgb[name]
        except KeyError:
            raise InputError(f"palette {self.name!r} has no structure {name!r}") from None
        lab = srgb_to_lab(np.asarray(rgb, dtype=np.uint8))
        return (float(lab[0]), float(lab[1]), float(lab[2]))

    def ab(self, name: str) -> tuple[float, float]:
        """(a*, b*) of a structure's colour: what the network is trained to predict for it."""
        return self.lab(name)[1:]

    def class_rgb(self, name: str) -> tuple[int, int, int] | None:
        """sRGB of a colour class (a structure, a group of structures, or a tissue class); None for no colour.

        A class the palette does not name takes the mean CIE Lab colour of the structures it groups (a user's CSV
        may give ``kidney_left`` and ``kidney_right`` but not ``kidney``), and no colour when it names none of them.
        """
        if name in self.rgb:
            return self.rgb[name]
        for tissue in self.tissue_classes:
            if tissue.name == name:
                return tissue.rgb
        members = [rgb for structure, rgb in self.rgb.items() if color_class(structure) == name]
        return _mean_rgb(members) if members else None

    def class_ab(self, classes: Sequence[str]) -> np.ndarray:
        """(K, 2) float32 a*, b* of each colour class (0, 0 for a class without colour): the colorizer's a*, b* are
        its class probabilities times this table."""
        table = np.zeros((len(classes), 2), dtype=np.float32)
        for k, name in enumerate(classes):
            rgb = self.class_rgb(name)
            if rgb is not None:
                table[k] = srgb_to_lab(np.asarray(rgb, dtype=np.uint8))[1:]
        return table


def _parse_rgb(value: Any, kinds: Mapping[str, Any], where: str) -> tuple[int, int, int]:
    """[R, G, B], "R,G,B" (DICOM's DicomRGBColor text) or the name of an entry of ``kinds`` -> (R, G, B) in 0..255."""
    if isinstance(value, str) and value in kinds:
        value = kinds[value]
    parts = value.split(",") if isinstance(value, str) else value
    try:
        rgb = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise InputError(f"{where}: colour must be three integers 0..255 or a kind name, got {value!r}")
    return rgb  # type: ignore[return-value]


def load_palette(name: str | os.PathLike | Palette = "anatomical") -> Palette:
    """A shipped palette by name, a user's palette from a CSV file, or a `Palette` passed through.

    Args:
        name: ``"anatomical"`` (default: photographic tissue colours as in cryosection photography), ``"dicom"``
            (the DICOM recommended display colours of the TotalSegmentator structure table), or the path of a CSV
            file (see `read_palette_csv`).

    Returns:
        The `Palette`, covering all 117 TotalSegmentator v2 structure names, the colour groups and the tissue
        classes.

    Raises:
        InputError: for an unknown palette name or a bad CSV file (the message names the line).
    """
    if isinstance(name, Palette):
        return name
    if str(name) in PALETTE_NAMES:
        return _shipped_palette(str(name))
    if str(name).lower().endswith(".csv"):
        return read_palette_csv(name)
    raise InputError(f"unknown palette {str(name)!r}; choose one of {', '.join(PALETTE_NAMES)} or a .csv file")


@cache
def _shipped_palette(name: str) -> Palette:
    """The palette in ``napari_ctcolor/data/palette_<name>.json``."""
    path = resources.files("napari_ctcolor") / "data" / f"palette_{name}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    where = f"palette_{name}.json"
    kinds = data.get("kinds", {})
    entries = {**data["structures"], **data.get("groups", {})}
    rgb = {s: _parse_rgb(c, kinds, f"{where} structure {s!r}") for s, c in entries.items()}
    classes = []
    for tc in data["tissue_classes"]:
        low, high = (float(h) for h in tc["hu_range"])
        color = None if tc["rgb"] is None else _parse_rgb(tc["rgb"], kinds, f"{where} tissue class {tc['name']!r}")
        classes.append(TissueClass(tc["name"], (low, high), color))
    bounds = [h for tc in classes for h in tc.hu_range]
    if bounds != sorted(bounds):
        raise InputError(f"{where}: tissue class HU ranges must be increasing and not overlap, got {bounds}")
    return Palette(name=data["name"], source=data["source"], rgb=MappingProxyType(rgb), tissue_classes=tuple(classes))


def _mean_rgb(colors: Sequence[tuple[int, int, int]]) -> tuple[int, int, int]:
    """The sRGB of the mean CIE Lab of ``colours``."""
    lab = srgb_to_lab(np.asarray(colors, dtype=np.uint8)).mean(axis=0)
    return tuple(int(c) for c in np.rint(np.clip(lab_to_srgb(lab), 0.0, 1.0) * 255.0))  # type: ignore[return-value]


def color_class(structure: str) -> str:
    """The colour class of a TotalSegmentator v2 structure: the structure itself, or the group it is coloured with.

    The colorizer does not tell apart what a local view of the CT cannot: left from right of paired organs and
    muscles (``kidney_left`` -> ``kidney``), vertebral levels (``vertebrae_T7`` -> ``vertebrae_thoracic``, S1 ->
    ``sacrum``), rib numbers (``ribs``), lung lobes (``lung``, the tissue class) and heart chambers (``heart``). Each
    group is a row of the DICOM structure table, so the ``dicom`` palette has its colour.
    """
    if structure.startswith("lung_") and "_lobe_" in structure:
        return "lung"
    if structure.startswith("heart_") or structure == "atrial_appendage_left":
        return "heart"
    if re.fullmatch(r"rib_(left|right)_\d+", structure):
        return "ribs"
    level = re.fullmatch(r"vertebrae_([CTLS])\d+", structure)
    if level:
        region = {"C": "vertebrae_cervical", "T": "vertebrae_thoracic", "L": "vertebrae_lumbar", "S": "sacrum"}
        return region[level[1]]
    side = re.fullmatch(r"(.+)_(left|right)", structure)
    return side[1] if side else structure


def read_palette_csv(path: str | os.PathLike) -> Palette:
    """A user's palette from a CSV file, on top of the anatomical palette.

    Two layouts are read: rows of ``name,R,G,B`` (an optional header row starting with ``name`` or ``structure``),
    or a table with ``Structure`` and ``DicomRGBColor`` ("R,G,B") columns such as TotalSegmentator's structure
    table. A name is a TotalSegmentator v2 structure, a colour group (`color_class`) or a tissue class (air, lung,
    fat, soft_tissue, contrast_blood, bone); R, G, B are integers 0..255. Everything the file does not name keeps
    its anatomical colour; a named structure also colours its group when the file does not name the group.

    Raises:
        InputError: naming the file and line, for an unreadable file, a malformed row or an unknown name.
    """
    base = _shipped_palette("anatomical")
    tissue_names = [t.name for t in base.tissue_classes]
    known = set(base.rgb) | {color_class(s) for s in base.rgb} | set(tissue_names)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the palette CSV ({type(exc).__name__})") from None
    header = [c.strip() for c in rows[0]] if rows else []
    colors: dict[str, tuple[int, int, int]] = {}
    table = "Structure" in header and "DicomRGBColor" in header
    if table:
        name_col, rgb_col = header.index("Structure"), header.index("DicomRGBColor")
        parsed = [
            (i, [r[name_col], *r[rgb_col].split(",")] if len(r) > max(name_col, rgb_col) else r)
            for i, r in enumerate(rows[1:], start=2)
        ]
    else:
        start = 1 if header and header[0].lower() in ("name", "structure") else 0
        parsed = [(i, r) for i, r in enumerate(rows[start:], start=start + 1)]
    for line, row in parsed:
        if not any(c.strip() for c in row):
            continue
        cells = [c.strip() for c in row]
        try:
            if len(cells) != 4:
                raise ValueError
            rgb = tuple(int(c) for c in cells[1:])
            if not all(0 <= c <= 255 for c in rgb):
                raise ValueError
        except ValueError:
            shown = ",".join(row)
            raise InputError(
                f"{path} line {line}: expected name,R,G,B with R, G, B integers 0..255, got {shown!r}"
            ) from None
        if cells[0] not in known:
            if table:  # a full structure table has rows for anatomy that is not a TotalSegmentator v2 class
                continue
            raise InputError(
                f"{path} line {line}: unknown name {cells[0]!r}; use TotalSegmentator v2 structure names, colour "
                "groups (kidney, ribs, ...) or tissue classes (air, lung, fat, soft_tissue, contrast_blood, bone)"
            )
        colors[cells[0]] = rgb  # type: ignore[assignment]
    if not colors:
        raise InputError(f"{path}: the palette CSV has no name,R,G,B rows")
    rgb_map = dict(base.rgb)
    rgb_map.update({n: c for n, c in colors.items() if n not in tissue_names})
    for group in {color_class(n) for n in colors} - set(colors) - set(tissue_names):
        # A group the file does not name takes the mean colour of its members that it does name.
        rgb_map[group] = _mean_rgb([c for n, c in colors.items() if color_class(n) == group])
    tissues = tuple(TissueClass(t.name, t.hu_range, colors.get(t.name, t.rgb)) for t in base.tissue_classes)
    return Palette(
        Path(path).stem, f"user palette {path} over the anatomical palette", MappingProxyType(rgb_map), tissues
    )
