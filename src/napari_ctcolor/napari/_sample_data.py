"""napari sample data: the built-in CT phantom (with labels) and pydicom's bundled real slice CT_small.dcm."""

from __future__ import annotations

from ..io import read_volume
from ..phantom import make_phantom
from ._layers import image_layer_data, placement
from ._view import show_layers_when_added


def phantom_ct():
    """The seeded torso phantom in HU and its TotalSegmentator-named label map."""
    phantom = make_phantom(seed=0)
    image = image_layer_data(phantom.volume, name="CT phantom")
    labels_kwargs = {
        "name": "CT phantom labels",
        "opacity": 0.4,
        "visible": False,
        "metadata": {"label_names": phantom.label_names},
        **placement(phantom.volume),
    }
    show_layers_when_added(2)
    return [image, (phantom.labels, labels_kwargs, "labels")]


def ct_small_path():
    """Path of pydicom's bundled CT_small.dcm, or None when this pydicom does not ship it."""
    try:
        from pydicom.data import get_testdata_file

        return get_testdata_file("CT_small.dcm", download=False)
    except Exception:  # noqa: BLE001 - optional sample: any failure just means it is not offered
        return None


def ct_small():
    """pydicom's bundled real CT slice (128x128, one slice)."""
    path = ct_small_path()
    if path is None:
        raise FileNotFoundError("pydicom's CT_small.dcm is not installed")
    volume = read_volume(path)
    show_layers_when_added(1)
    return [image_layer_data(volume, name="CT_small (pydicom)")]
