"""`napari._volume.surface_field`: the field a lit iso surface of the 3D view is drawn from (no viewer needed)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_ctcolor.napari._volume import AIR_HU, BONE_SURFACE_HU, MIN_BONE_ML, surface_field


def test_a_bone_keeps_its_place_and_a_speck_under_the_limit_goes():
    # 2 mm voxels, soft tissue at 40 HU: a bone ball of 20 mm radius (cortex 1000 HU), a 0.3 ml calcification
    # (4 mm radius, 800 HU) 30 mm away, and air outside the body.
    z, y, x = np.mgrid[:40, :60, :60].astype(float) * 2.0
    hu = np.full(z.shape, 40.0, dtype=np.float32)
    hu[(z - 40) ** 2 + (y - 60) ** 2 + (x - 40) ** 2 < 20**2] = 1000.0
    speck = (z - 40) ** 2 + (y - 60) ** 2 + (x - 96) ** 2 < 4**2
    hu[speck] = 800.0
    hu[:, :4] = AIR_HU
    spacing = (2.0, 2.0, 2.0)
    assert speck.sum() * 8.0 / 1000.0 < MIN_BONE_ML

    field = surface_field(hu, spacing, BONE_SURFACE_HU, MIN_BONE_ML)
    assert field.dtype == np.float32 and field.shape == hu.shape and 0.0 <= field.min() and field.max() <= 1.0
    assert field[ndimage.binary_dilation(speck, iterations=2)].max() < 0.5  # the speck is gone
    # The ball's surface stays at its radius (within a voxel): 0.5 is crossed between 18 and 22 mm from its centre.
    profile = field[20, 30, 20:40]  # from the centre outwards along x, 2 mm a voxel
    crossing = np.argmax(profile < 0.5) * 2.0
    assert 18.0 <= crossing <= 22.0 and profile[0] == 1.0
    # Across the surface the field rises about linearly over SURFACE_RAMP_VOXELS (3): vispy's normals from
    # differences 1.5 voxels apart do not saturate.
    assert 0.05 < profile[int(crossing / 2) - 1] - profile[int(crossing / 2)] < 0.5
    # Without a limit the speck stays.
    assert surface_field(hu, spacing, BONE_SURFACE_HU)[speck].max() > 0.5
