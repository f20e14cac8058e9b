"""The 3D Slicer module's logic on real MRML nodes (Kitware's ``slicer-core``): geometry both ways, the colour and
the registration equal to ``ctcolor``'s, and the grid transform node checked by Slicer's own hardening against
SimpleITK applying the CLI's displacement field."""

from __future__ import annotations

import py_compile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_ctcolor.errors import InputError
from napari_ctcolor.io import ColorVolume, read_volume, write_nifti

from conftest import CT_DIR, assert_same_colors, assert_same_registration, ctcolor, require_shared, rotated_volume

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install 'napari-ctcolor[slicer]') is not installed")
logic = pytest.importorskip("napari_ctcolor.slicer.logic")

CUT = CT_DIR / "totalseg-body-3mm-30slices.nii.gz"


def assert_same_grid(node, volume) -> None:
    """The node's IJKToRAS and voxel counts are those of ``volume``'s grid."""
    np.testing.assert_allclose(logic.node_ijk_to_ras(node), logic.ijk_to_ras(volume), atol=1e-9)
    assert node.GetImageData().GetDimensions() == volume.shape[::-1]


def test_an_oblique_flipped_volume_round_trips_node_volume_node_unchanged():
    volume = rotated_volume()  # oblique, left-handed, anisotropic
    scene = slicer.vtkMRMLScene()
    node = logic.node_from_volume(volume, scene, "oblique")
    back = logic.volume_from_node(node)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)
    again = logic.node_from_volume(back, scene, "again")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(again), volume.array)
    assert_same_grid(again, volume)
    # Slicer's own view of a voxel's position: IJK (i, j, k) -> RAS equals our LPS position with x, y negated.
    ras = logic.node_ijk_to_ras(node) @ (3, 2, 1, 1)
    lps = volume.affine @ (3, 2, 1, 1)
    np.testing.assert_allclose(ras[:3], (-lps[0], -lps[1], lps[2]), atol=1e-9)


def test_colorize_node_with_window_auto_takes_the_contrast_window_of_the_enhanced_blood():
    """A volume node carries no DICOM header that says contrast was given: ``window="auto"`` composes the shared
    contrast series in the contrast window of the enhanced blood its HU show (`app.window.opening_window`), as
    ``ctcolor colorize --window auto``; the node's L* is that window's grey within the luminance bound, and not the
    default window's."""
    from napari_ctcolor.app.window import opening_window
    from napari_ctcolor.color import grey_to_lightness, srgb_to_lab
    from napari_ctcolor.windowing import default_window, window

    from conftest import LUMINANCE_BOUND

    series = read_volume(require_shared(CT_DIR / "totalseg-abdomen-dicom"))
    scene = slicer.vtkMRMLScene()
    node = logic.node_from_volume(series, scene, "CTA")
    color = logic.colorize_node(node, window="auto", device="cpu")
    lightness = srgb_to_lab(slicer.util.arrayFromVolume(color))[..., 0]
    hu = np.asarray(series.array, np.float32)
    contrast = opening_window(series.with_array(hu))
    assert contrast.limits[0] == -250.0  # the contrast window's lower edge
    error = np.abs(lightness - grey_to_lightness(window(hu, *contrast)))
    assert error.max() <= LUMINANCE_BOUND
    plain = np.abs(lightness - grey_to_lightness(window(hu, *default_window(series))))
    assert plain.max() > 10 * LUMINANCE_BOUND


@pytest.mark.numeric
def test_colorize_node_equals_the_cli_on_the_same_grid(tmp_path):
    require_shared(CUT)
    scene = slicer.vtkMRMLScene()
    node = logic.node_from_volume(read_volume(CUT), scene, "CT")
    color = logic.colorize_node(node, window=(40, 400), palette="dicom", device="cpu")
    assert color.IsA("vtkMRMLVectorVolumeNode") and color.GetScene() is scene
    assert color.GetName() == "CT colorized"
    rgb = slicer.util.arrayFromVolume(color)
    out = tmp_path / "colour.nii.gz"
    done = ctcolor("colorize", str(CUT), "-o", str(out), "--window", "40,400", "--palette", "dicom", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert_same_colors(rgb, reference)  # this process's engine and a ctcolor process: the run-to-run tolerance
    assert_same_grid(color, read_volume(CUT))


@pytest.mark.numeric
def test_register_nodes_equals_the_cli_and_slicer_hardening_reproduces_the_cli_field(tmp_path):
    require_shared(CUT)
    ct = read_volume(CUT)
    image = ct.to_sitk()
    shifted = sitk.Resample(image, image, sitk.TranslationTransform(3, (5.0, -4.0, 2.0)), sitk.sitkLinear, -1024.0)
    moving = ct.with_array(sitk.GetArrayFromImage(shifted).astype(np.int16))
    moving_path = write_nifti(moving, tmp_path / "moving.nii.gz")
    scene = slicer.vtkMRMLScene()
    fixed_node = logic.node_from_volume(ct, scene, "fixed")
    moving_node = logic.node_from_volume(moving, scene, "moving")
    # The network alone (as the CLI below): the comparison is of the front ends, not of the card's defaults.
    result = logic.register_nodes(fixed_node, moving_node, affine=False, refine=0, device="cpu")
    assert result.metrics["ncc_after"] > result.metrics["ncc_before"]
    assert not result.metrics["affine"] and result.metrics["refine_iterations"] == 0  # both passed through
    for node in (result.warped, result.checkerboard, result.jacobian):
        assert node.GetScene() is scene
        assert_same_grid(node, ct)
    assert result.transform.IsA("vtkMRMLGridTransformNode")

    out = str(tmp_path / "out")
    done = ctcolor("register", str(CUT), str(moving_path), "-o", out, "--device", "cpu", "--no-affine", "--refine", "0")
    assert done.returncode == 0, done.stderr
    cli = {
        name: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{name}.nii.gz")))
        for name in ("warped", "jacobian", "checkerboard")
    }
    nodes = {name: slicer.util.arrayFromVolume(getattr(result, name)) for name in cli}
    assert_same_registration(nodes, cli)  # this process's engine and a ctcolor process: the run-to-run tolerance

    # Slicer applies and hardens the transform node on the moving node (it resamples onto a grid of its choice);
    # SimpleITK applies the CLI's ddf.nii.gz, read with its own header, on that same grid.
    moving_node.SetAndObserveTransformNodeID(result.transform.GetID())
    slicer.vtkSlicerTransformLogic.hardenTransform(moving_node)
    hardened = logic.volume_from_node(moving_node)
    field = sitk.ReadImage(str(tmp_path / "out" / "ddf.nii.gz"))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    reference = sitk.Resample(moving.to_sitk(), hardened.to_sitk(), transform, sitk.sitkLinear, -1024.0)
    reference = sitk.GetArrayFromImage(reference).astype(np.float64)
    # Compare where the hardened grid lies inside the fixed grid (2 voxels in): outside it ITK's field is zero and
    # VTK's grid transform extrapolates.
    index = np.indices(hardened.shape)[::-1].reshape(3, -1)
    points = hardened.affine[:3, :3] @ index + hardened.affine[:3, 3:]
    in_fixed = np.linalg.solve(ct.affine[:3, :3], points - ct.affine[:3, 3:])
    size = np.array(ct.shape[::-1])[:, None]
    inside = np.all((in_fixed >= 2) & (in_fixed <= size - 3), axis=0).reshape(hardened.shape)
    difference = np.abs(hardened.array.astype(np.float64) - reference)[inside]
    share, worst, mean = inside.mean(), difference.max(), difference.mean()
    print(f"hardened vs SimpleITK: {share:.0%} of voxels, max {worst:.2f} HU, mean {mean:.2f} HU")
    # The target: within 1 HU (the hardened volume keeps int16: up to one unit of rounding, measured max 1.00, mean
    # 0.50); a wrong sign or axis convention gives tens of HU.
    assert inside.mean() > 0.5 and difference.max() <= 1.0 + 1e-3


def test_bad_nodes_are_one_line_errors_and_add_nothing():
    scene = slicer.vtkMRMLScene()
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    rgb = logic.node_from_volume(
        ColorVolume(np.zeros((4, 5, 6, 3), np.uint8), (1, 1, 1), (0, 0, 0), np.eye(3)), scene, "rgb"
    )
    other_scene = slicer.vtkMRMLScene()
    elsewhere = logic.node_from_volume(rotated_volume(), other_scene, "elsewhere")
    ct = logic.node_from_volume(rotated_volume(), scene, "ct")
    sheared = logic.node_from_volume(rotated_volume(), scene, "sheared")
    shear = logic.node_ijk_to_ras(sheared)
    shear[0, 1] += 0.5 * np.linalg.norm(shear[:3, 1])
    sheared.SetIJKToRASMatrix(logic._vtk_matrix(shear))
    count = scene.GetNumberOfNodes()
    for call, message in [
        (lambda: logic.colorize_node(empty, device="cpu"), "empty: the volume node has no image data"),
        (lambda: logic.colorize_node(rgb, device="cpu"), "rgb: a vector \\(colour\\) volume cannot be read as a CT"),
        (lambda: logic.register_nodes(ct, elsewhere, device="cpu"), "elsewhere: the fixed and moving nodes are in"),
        (lambda: logic.register_nodes(ct, rgb, device="cpu"), "rgb: a vector"),
        (lambda: logic.colorize_node(sheared, device="cpu"), "sheared: direction cosines are not orthonormal"),
    ]:
        with pytest.raises(InputError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert scene.GetNumberOfNodes() == count


def test_the_scripted_module_compiles_and_its_logic_is_the_tested_one():
    module = Path(logic.__file__).parent / "slicer_module" / "CTColor.py"
    py_compile.compile(str(module), doraise=True)  # Slicer's Qt classes are not in slicer-core: compile only
    source = module.read_text(encoding="utf-8")
    assert "from napari_ctcolor.slicer.logic import colorize_node, register_nodes" in source
    for name in ("class CTColor(", "class CTColorWidget(", "class CTColorLogic(", "class CTColorTest("):
        assert name in source


def _moved_by_hand(scene, node, matrix: np.ndarray):
    """Put ``node`` under a new linear transform node (as the Transforms module does), ``matrix`` to its parent."""
    import vtk

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved by hand")
    vtk_matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtk_matrix.SetElement(r, c, float(matrix[r, c]))
    transform.SetMatrixTransformToParent(vtk_matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    return transform


def test_volumes_moved_by_hand_are_colorized_and_registered_where_the_scene_shows_them():
    """A volume under a linear transform (moved by hand in the Transforms module): its colour comes under the same
    transform, so it shows where the CT shows; a registration takes both volumes where the scene shows them. The fixed
    CT moved 40 mm to the right and turned 10 degrees, the moving one the same CT with that placement written into its
    own grid: in the scene they coincide, so the registration finds one scan twice (NCC before 1 within 1e-6) and its
    outputs lie on the fixed volume's world grid (1e-6 mm), under no transform. A non-linear parent is refused."""
    volume = read_volume(require_shared(CUT))
    scene = slicer.vtkMRMLScene()
    fixed = logic.node_from_volume(volume, scene, "fixed")
    angle = np.deg2rad(10.0)
    to_parent = np.eye(4)
    to_parent[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    to_parent[0, 3] = 40.0
    transform = _moved_by_hand(scene, fixed, to_parent)

    color = logic.colorize_node(fixed, window=(40, 400), device="cpu")
    assert color.GetTransformNodeID() == transform.GetID()
    np.testing.assert_allclose(logic.node_ijk_to_ras(color), logic.node_ijk_to_ras(fixed), atol=1e-9)

    world = to_parent @ logic.node_ijk_to_ras(fixed)
    moving = logic.node_from_volume(volume, scene, "moving")
    moving.SetIJKToRASMatrix(logic._vtk_matrix(world))
    result = logic.register_nodes(fixed, moving, device="cpu")
    assert result.metrics["ncc_before"] > 1 - 1e-6
    for node in (result.warped, result.checkerboard, result.jacobian):
        assert node.GetParentTransformNode() is None
        np.testing.assert_allclose(logic.node_ijk_to_ras(node), world, atol=1e-6)
    assert result.transform.GetParentTransformNode() is None

    bent = logic.grid_transform_node(np.zeros((*volume.shape, 3)), volume, scene, "bent")
    moving.SetAndObserveTransformNodeID(bent.GetID())
    with pytest.raises(InputError, match="moving: the volume is under a non-linear transform \\(bent\\)") as info:
        logic.register_nodes(fixed, moving, device="cpu")
    assert "\n" not in str(info.value)
