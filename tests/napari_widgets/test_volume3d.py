"""`napari._volume.surface_field`: the field a lit iso surface of the 3D view is drawn from (no viewer needed)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
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


ROUNDS = 3
_SWITCH_PRESETS = """
import sys, time
import faulthandler
import napari
from qtpy.QtWidgets import QApplication

faulthandler.enable()
viewer = napari.Viewer(show=True)
ct = viewer.open(sys.argv[1], plugin="napari-ctcolor")[0]
app = QApplication.instance()


def settle(pred):
    start = time.time()
    while not pred():
        app.processEvents()
        time.sleep(0.02)
        assert time.time() - start < 300
    for _ in range(5):
        app.processEvents()


settle(lambda: ct.data.shape[0] > 1)
viewer.dims.ndisplay = 3  # napari's own iso rendering of the grey CT first, as the report's sessions did
ct.rendering, ct.interpolation3d = "iso", "linear"
viewer.screenshot(canvas_only=True, flash=False)
ct.rendering, viewer.dims.ndisplay = "mip", 2
_, widget = viewer.window.add_plugin_dock_widget("napari-ctcolor", "Colorize volume")
widget.device.value = "cpu"
widget.run_button.native.click()
settle(lambda: not widget.busy)
order = ["bone", "CTA", "soft tissue", "CTA", "bone", "off"]
for turn in range(int(sys.argv[2])):
    for preset in order if turn % 2 == 0 else order[::-1]:
        widget.view_3d.value = preset
        settle(lambda: not widget.busy_3d)
        for angle in (30, 60):  # the view turned, each turn drawn
            viewer.camera.angles = (0.0, angle, 90.0)
            viewer.screenshot(canvas_only=True, flash=False)
    print("turn", turn, sorted(layer.name for layer in viewer.layers if layer.visible), flush=True)
viewer.close()
"""


@pytest.mark.slow  # one viewer process: a colorize of 20 slices, then 18 preset switches drawn under Mesa
def test_switching_3d_presets_back_and_forth_never_crashes_the_viewer(dicom_series):
    """The colorize dock's 3D presets bone, CTA, soft tissue, CTA, bone, off and back, three times (18 switches), the
    view turned and drawn after each, in a viewer of its own process (a crash kills the process, not the test run).
    Removing and adding the 3D layers crashed napari under Mesa's software OpenGL on the fifth switch (a segmentation
    fault in glDrawElements, exit -11, 2026-11-28); the dock now reuses and hides them (`_colorize_3d.View3D._put_3d`).
    Ten rounds took 2.2 minutes of the suite; the crash this guards against came at the fifth switch."""
    done = subprocess.run(
        [sys.executable, "-c", _SWITCH_PRESETS, str(dicom_series), str(ROUNDS)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    turns = [line for line in done.stdout.splitlines() if line.startswith("turn ")]
    assert len(turns) == ROUNDS, done.stdout
    assert all("3D" not in line for line in turns[::2]) and all("3D" in line for line in turns[1::2]), turns
