"""Converting between `Volume` and napari layers (world coordinates = (z, y, x) LPS mm)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np

from ..app.window import opening_window, opens_in_contrast
from ..errors import InputError
from ..io import ColorVolume, Volume

META_KEY = "ctcolor"
#: A layer's metadata key while the reader fills it from a worker (`_reader.read_ct`): it holds a one-voxel
#: placeholder until then, which no widget or writer takes.
READING_KEY = "ctcolor_reading"
#: A CT layer's metadata key for the contrast window chosen for it ((centre, width): `contrast_window`, when it opened
#: in it or the colorizer found enhanced blood), offered by name in the colorize widget's window menu.
CONTRAST_WINDOW_KEY = "ctcolor_contrast_window"
#: A direction this close to the identity (cosines) places a layer by ``scale`` and ``translate`` alone.
ORTHONORMAL_TOLERANCE = 1e-4


def placement(image: Volume | ColorVolume) -> dict[str, Any]:
    """Layer kwargs that place ``image``'s (Z, Y, X) array at its physical position in napari world coordinates.

    napari's world axes follow the array axes, so world = (z, y, x) LPS mm. With an identity direction that is
    just ``scale`` and ``translate``; otherwise the full ``affine`` (rotation/flip times spacing) is given.
    """
    spacing, origin = image.spacing, image.origin
    direction = np.asarray(image.direction, dtype=np.float64)
    if np.allclose(direction, np.eye(3), atol=ORTHONORMAL_TOLERANCE):
        return {"scale": tuple(float(s) for s in spacing), "translate": tuple(float(o) for o in origin[::-1])}
    # Reverse both the index axes and the world axes: napari sees (k, j, i) -> (z, y, x).
    rotation_zyx = direction[::-1, ::-1]
    affine = np.eye(4)
    affine[:3, :3] = rotation_zyx @ np.diag(np.asarray(spacing, dtype=np.float64))
    affine[:3, 3] = np.asarray(origin, dtype=np.float64)[::-1]
    return {"affine": affine}


def image_layer_data(volume: Volume, name: str | None = None) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari LayerDataTuple showing ``volume`` in its own units at its physical position."""
    window = opening_window(volume)
    meta = volume.meta
    name = name or meta.get("series_description") or stem(meta.get("source", "")) or "CT"
    kwargs = {
        "name": name,
        "colormap": "gray",
        "contrast_limits": window.limits,
        "interpolation2d": "linear",  # as PACS viewers show CT: voxels of 0.5-1.5 mm look blocky when magnified
        "metadata": {META_KEY: dict(meta)},
        **placement(volume),
    }
    if opens_in_contrast(volume):  # named in the colorize widget's menu
        kwargs["metadata"][CONTRAST_WINDOW_KEY] = tuple(window)
    return volume.array, kwargs, "image"


def rgb_layer_data(color: ColorVolume, name: str | None = None) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari LayerDataTuple showing an RGB ``colour`` volume at its physical position."""
    name = name or stem(str(color.settings.get("source", ""))) or "colour"
    kwargs = {
        "name": name,
        "rgb": True,
        "interpolation2d": "linear",
        "metadata": {META_KEY: dict(color.settings)},
        **placement(color),
    }
    return color.rgb, kwargs, "image"


def stem(source: str) -> str:
    """A file's or folder's name without the image suffixes we read."""
    name = Path(source).name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def world_matrix(attributes: dict[str, Any], ndim: int = 3) -> np.ndarray:
    """4x4 data (k, j, i) -> world (z, y, x) matrix from a layer's ``scale``, ``translate``, ``rotate``, ``affine``."""
    data_to_physical = np.eye(ndim + 1)
    rotate = np.asarray(attributes.get("rotate", np.eye(ndim)), dtype=np.float64)
    scale = np.asarray(attributes.get("scale", np.ones(ndim)), dtype=np.float64)
    data_to_physical[:ndim, :ndim] = rotate @ np.diag(scale)
    data_to_physical[:ndim, ndim] = np.asarray(attributes.get("translate", np.zeros(ndim)), dtype=np.float64)
    affine = attributes.get("affine")
    if affine is None:
        affine = np.eye(ndim + 1)
    affine = np.asarray(getattr(affine, "affine_matrix", affine), dtype=np.float64)
    return affine @ data_to_physical


def volume_from_layer(data: np.ndarray, attributes: dict[str, Any]) -> Volume:
    """The Volume a napari image layer shows (array and geometry taken from the layer's transforms).

    ``attributes`` is what napari passes to writers (``layer._get_state()``-like dict) or built from a layer with
    `layer_attributes`.
    """
    if READING_KEY in (attributes.get("metadata") or {}):
        raise InputError("the CT is still being read: wait until its layer shows it")
    data = np.asarray(data)
    if data.ndim == 2:
        matrix = _lift_2d(attributes)
        data = data[np.newaxis]
    elif data.ndim == 3:
        matrix = world_matrix(attributes, ndim=3)
    else:
        raise InputError(f"expected a 2D or 3D grey image layer, got data of shape {data.shape}")
    linear = matrix[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    rotation_zyx = linear / spacing
    meta = dict((attributes.get("metadata") or {}).get(META_KEY, {}))
    return Volume(
        data,
        spacing=tuple(spacing),
        origin=tuple(matrix[:3, 3][::-1]),
        direction=rotation_zyx[::-1, ::-1],
        meta=meta,
    )


def _lift_2d(attributes: dict[str, Any]) -> np.ndarray:
    matrix2 = world_matrix(attributes, ndim=2)
    matrix = np.eye(4)
    matrix[1:3, 1:3] = matrix2[:2, :2]
    matrix[1:3, 3] = matrix2[:2, 2]
    return matrix


def layer_attributes(layer) -> dict[str, Any]:
    """The attributes of a live layer that `volume_from_layer` needs."""
    return {
        "scale": np.asarray(layer.scale),
        "translate": np.asarray(layer.translate),
        "rotate": np.asarray(layer.rotate),
        "affine": np.asarray(layer.affine.affine_matrix),
        "metadata": layer.metadata,
    }


def put_image(
    viewer,
    name: str,
    data: np.ndarray,
    rgb: bool = False,
    kept: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    created: dict[str, Any] | None = None,
) -> tuple[Any, bool]:
    """Show ``data`` in the image layer ``name``, the one place the widgets put their results into the viewer.

    Where that layer exists as an image of the same kind (RGB or grey, as many dimensions), its data is replaced and
    ``kept``'s attributes (placement, contrast, colormap: what the result decides) are set again, in order; what the
    user set on it otherwise (opacity, visibility) stays. Otherwise a new layer is made with ``created``'s keyword
    arguments (its first visibility, opacity, interpolation) and then ``kept``'s attributes, where the layer of that
    name of another kind was (replaced), else on top. ``metadata`` is merged into the layer's. Returns (the layer,
    whether it is new)."""
    from napari.layers import Image

    kept, metadata = kept or {}, metadata or {}
    existing = next((layer for layer in viewer.layers if layer.name == name), None)
    if isinstance(existing, Image) and existing.rgb == rgb and existing.data.ndim == data.ndim:
        existing.data = data
        for key, value in kept.items():
            setattr(existing, key, value)
        existing.metadata = {**existing.metadata, **metadata}
        return existing, False
    index = None
    if existing is not None:  # same name, another kind of layer: replaced where it was
        index = list(viewer.layers).index(existing)
        viewer.layers.remove(existing)
    # What the constructor takes goes to it: each attribute set afterwards would slice the layer again.
    accepted = inspect.signature(Image.__init__).parameters
    later = {key: value for key, value in kept.items() if key not in accepted}
    first = {key: value for key, value in kept.items() if key in accepted}
    layer = Image(data, name=name, rgb=rgb, metadata=dict(metadata), **{**(created or {}), **first})
    for key, value in later.items():
        setattr(layer, key, value)
    if "contrast_limits_range" in later and "contrast_limits" in kept:
        layer.contrast_limits = kept["contrast_limits"]  # a new range may have clipped them
    if index is None:
        viewer.layers.append(layer)
    else:
        viewer.layers.insert(index, layer)
    return layer, True


def shape_width(image, share: float) -> float:
    """An outline width for a shapes layer placed as ``image`` is (its data units are the image's voxels): ``share``
    of the image's largest world extent in mm, so lines look alike on 0.7 mm and 3 mm voxels."""
    extent_mm = float(np.ptp(np.asarray(image.extent.world, dtype=float), axis=0).max())
    voxel_mm = np.linalg.norm(world_matrix(layer_attributes(image), image.ndim)[: image.ndim, : image.ndim], axis=0)
    return share * extent_mm / float(voxel_mm[-2:].min())


def set_contrast(layer, limits: tuple[float, float]) -> None:
    """Set a grey layer's contrast limits (a window), first widening its slider's range where they reach past it
    (napari would clip them: a lung window on a CT cropped to soft tissue)."""
    low, high = (float(v) for v in limits)
    range_low, range_high = layer.contrast_limits_range
    if low < range_low or high > range_high:
        layer.contrast_limits_range = (min(low, range_low), max(high, range_high))
    layer.contrast_limits = (low, high)
