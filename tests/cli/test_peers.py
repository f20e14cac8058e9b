"""Classical peers (ANTs SyN, elastix B-spline, SimpleITK demons): field convention and folding, on analytic cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_ctcolor.errors import InputError
from napari_ctcolor.io import Volume
from napari_ctcolor.peers import PEERS, PeerUnavailable, folding_fraction_mm, run_peer

SPACING = (2.0, 1.7, 1.4)
SHIFT_MM = np.array([2.0, -2.5, 3.0])  # (z, y, x)


def _blobs(shape=(24, 40, 52), seed: int = 3) -> np.ndarray:
    """Smooth random blobs in HU-like units: structure at several scales for every method to lock onto."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(1.5, 2.5, 2.5))
    return (image / image.std() * 300.0).astype(np.float32)


def _volume(array: np.ndarray) -> Volume:
    return Volume(array, spacing=SPACING, origin=(10.0, -5.0, 3.0))


def test_folding_fraction_of_analytic_fields() -> None:
    _, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (6, 7, 8)], indexing="ij")
    spacing_xyz = np.array(SPACING[::-1], dtype=np.float32)
    zero = np.zeros((6, 7, 8, 3), np.float32)
    assert folding_fraction_mm(zero, SPACING) == 0.0
    # u_x = -2 x (in voxels): the map x -> -x reverses orientation everywhere, det J = -1.
    flip = zero.copy()
    flip[..., 0] = -2.0 * x * spacing_xyz[0]
    assert folding_fraction_mm(flip, SPACING) == 1.0
    # A uniform stretch by 1.5 along y keeps orientation.
    stretch = zero.copy()
    stretch[..., 1] = 0.5 * y * spacing_xyz[1]
    assert folding_fraction_mm(stretch, SPACING) == 0.0


@pytest.mark.parametrize("name", PEERS)
def test_peer_recovers_a_translation_in_the_itk_convention(name: str) -> None:
    """moving = fixed moved by SHIFT_MM, so every fixed point maps to the moving point SHIFT_MM further; sizes and
    spacings differ per axis, so a swapped axis would show."""
    fixed = _blobs()
    shift_voxels = SHIFT_MM / np.asarray(SPACING)
    moving = ndimage.shift(fixed, shift_voxels, order=3, mode="nearest")
    labels = (fixed > 150).astype(np.uint8)
    moving_labels = ndimage.shift(labels, shift_voxels, order=0, mode="nearest")
    try:
        result = run_peer(name, _volume(fixed), _volume(moving), _volume(moving_labels), quick=False)
    except PeerUnavailable as exc:
        pytest.skip(str(exc))
    assert result.ddf_mm.shape == (*fixed.shape, 3)
    interior = result.ddf_mm[6:-6, 10:-10, 12:-12]
    median_xyz = np.median(interior.reshape(-1, 3), axis=0)
    np.testing.assert_allclose(median_xyz, SHIFT_MM[::-1], atol=0.75)
    assert folding_fraction_mm(result.ddf_mm, SPACING) == 0.0
    assert result.warped_labels.dtype == np.uint8 and set(np.unique(result.warped_labels)) <= {0, 1}

    def dice(a: np.ndarray, b: np.ndarray) -> float:
        inner = (slice(None), slice(8, -8), slice(8, -8))
        a, b = a[inner], b[inner]
        return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())

    assert dice(result.warped_labels, labels) > dice(moving_labels, labels) + 0.1
    assert result.seconds > 0


def test_peers_refuse_two_grids_and_unknown_names() -> None:
    fixed = _volume(_blobs())
    other = Volume(fixed.array, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(InputError, match="one grid"):
        run_peer("SimpleITK demons", fixed, other)
    with pytest.raises(InputError, match="unknown peer"):
        run_peer("FSL FNIRT", fixed, fixed)
