"""The README's pictures, taken from the real viewer: the plugin's widgets driven as a user would, then screenshots.

    xvfb-run -a -s "-screen 0 1600x1200x24" python examples/screenshots.py [--data ../shared/data] [--out docs/images]

Needs the shared CTs in ``ct/``. Writes canvas screenshots: ``colorized-axial.png``, ``colorized-coronal.png``,
``3d-bone.png`` and ``3d-soft-tissue.png`` (the TotalSegmentator 3 mm CT colorized with the shipped ``colorizer-2d``
in the abdomen window, and its 3D views without table and air); ``contrast-abdomen-axial.png`` (the contrast-enhanced
upper-abdomen DICOM series, in the contrast window it opens in); ``chest-axial.png`` (a contrast chest CT no model
was trained on, mediastinal window); and ``checkerboard.png``, ``difference.png`` and ``jacobian.png`` (a registration
of the 30-slice cut to a smoothly deformed copy of itself, up to 6 mm, with the shipped CT weights).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _wait(app, widget) -> None:
    while widget.busy:
        app.processEvents()
        time.sleep(0.05)
    app.processEvents()


def _deformed(ct, amplitude_mm: float = 6.0, seed: int = 5):
    """``ct`` resampled through a smooth displacement (wavelengths ~150 mm), with SimpleITK."""
    import SimpleITK as sitk

    from napari_ctcolor.io import Volume

    index = np.indices(ct.shape)[::-1].reshape(3, -1)
    points = (ct.affine[:3, :3] @ index + ct.affine[:3, 3:]).T.reshape(*ct.shape, 3)
    rng = np.random.default_rng(seed)
    field = np.zeros((*ct.shape, 3))
    for c in range(3):
        k = rng.normal(size=3) * 2 * np.pi / 150.0
        field[..., c] = amplitude_mm * np.sin(points @ k + rng.uniform(0, 2 * np.pi))
    image = sitk.GetImageFromArray(field, isVector=True)
    image.CopyInformation(ct.to_sitk())
    moved = sitk.Resample(ct.to_sitk(), ct.to_sitk(), sitk.DisplacementFieldTransform(image), sitk.sitkLinear, -1024)
    return Volume(sitk.GetArrayFromImage(moved).astype(np.int16), ct.spacing, ct.origin, ct.direction, dict(ct.meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"))
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_ctcolor.io import read_volume, write_nifti
    from napari_ctcolor.napari._view import show_plane

    ct_dir = Path(args.data) / "ct"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication([])

    def shot(viewer, name: str) -> None:
        app.processEvents()
        viewer.screenshot(str(out / name), canvas_only=True, flash=False)
        print(out / name)

    # Colorize volume: the lower-chest-to-pelvis CT, abdomen window.
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 1000)
    ct = viewer.open(str(ct_dir / "totalseg-body-3mm.nii.gz"), plugin="napari-ctcolor")[0]
    _, widget = viewer.window.add_plugin_dock_widget("napari-ctcolor", "Colorize volume")
    widget.window.value = "abdomen"
    widget.run()
    _wait(app, widget)
    show_plane(viewer, "axial")
    viewer.dims.set_point(0, ct.data_to_world((70, 0, 0))[0])  # the kidneys' level
    shot(viewer, "colorized-axial.png")
    show_plane(viewer, "coronal")
    viewer.dims.set_point(1, ct.data_to_world((0, 55, 0))[1])  # through the kidneys and the spine
    shot(viewer, "colorized-coronal.png")
    widget.view_3d.value = "bone"
    shot(viewer, "3d-bone.png")
    widget.view_3d.value = "soft tissue"
    shot(viewer, "3d-soft-tissue.png")
    viewer.close()

    # A contrast-enhanced upper abdomen (it opens in its contrast window) and a contrast chest CT never trained on.
    for source, name, window in (
        (ct_dir / "totalseg-abdomen-dicom", "contrast-abdomen-axial.png", None),
        (ct_dir / "chest-lung1-5mm.nrrd", "chest-axial.png", "mediastinum"),
    ):
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(1500, 1000)
        ct = viewer.open(str(source), plugin="napari-ctcolor")[0]
        _, widget = viewer.window.add_plugin_dock_widget("napari-ctcolor", "Colorize volume")
        if window is not None:
            widget.window.value = window
        widget.run()
        _wait(app, widget)
        show_plane(viewer, "axial")
        viewer.dims.set_point(0, ct.data_to_world((ct.data.shape[0] // 2, 0, 0))[0])
        viewer.reset_view()
        shot(viewer, name)
        viewer.close()

    # Register & checkerboard: the 30-slice cut against a deformed copy of itself.
    with tempfile.TemporaryDirectory() as tmp:
        fixed = read_volume(ct_dir / "totalseg-body-3mm-30slices.nii.gz")
        moving_path = write_nifti(_deformed(fixed), Path(tmp) / "deformed.nii.gz")
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(1500, 1000)
        fixed_layer = viewer.open(str(ct_dir / "totalseg-body-3mm-30slices.nii.gz"), plugin="napari-ctcolor")[0]
        moving_layer = viewer.open(str(moving_path), plugin="napari-ctcolor")[0]
        _, widget = viewer.window.add_plugin_dock_widget("napari-ctcolor", "Register & checkerboard")
        widget.fixed.value, widget.moving.value = fixed_layer, moving_layer
        widget.run()
        _wait(app, widget)
        viewer.dims.set_point(0, fixed_layer.data_to_world((15, 0, 0))[0])
        moving_layer.visible = False
        viewer.reset_view()
        shot(viewer, "checkerboard.png")
        for name in ("difference", "Jacobian"):
            for layer in viewer.layers:
                layer.visible = layer.name in (fixed_layer.name, name)
            shot(viewer, f"{name.lower()}.png")
        viewer.close()


if __name__ == "__main__":
    main()
