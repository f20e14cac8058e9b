"""NIfTI (nibabel) and MHA/NRRD (SimpleITK) reading and writing, checked against SimpleITK's reading."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from napari_ctcolor.errors import InputError
from napari_ctcolor.io import Volume, read_volume, write_nifti, write_vector_nifti

from conftest import CT_DIR, require_shared, rotated_volume


@pytest.mark.parametrize("name", ["totalseg-body-3mm.nii.gz", "totalseg-abdomen-dicom-labels.nii.gz"])
def test_nifti_geometry_and_values_match_simpleitk(name):
    path = require_shared(CT_DIR / name)
    vol = read_volume(path)
    ref = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref))
    np.testing.assert_allclose(vol.spacing[::-1], ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(vol.origin, ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(vol.direction.flatten(), ref.GetDirection(), atol=1e-6)


def test_nifti_round_trip_keeps_array_and_affine_exactly(tmp_path):
    path = require_shared(CT_DIR / "totalseg-body-3mm.nii.gz")
    first = read_volume(path)
    write_nifti(first, tmp_path / "copy.nii.gz")
    second = read_volume(tmp_path / "copy.nii.gz")
    np.testing.assert_array_equal(second.array, first.array)
    assert second.array.dtype == first.array.dtype
    np.testing.assert_array_equal(nib.load(tmp_path / "copy.nii.gz").affine, nib.load(path).affine)
    np.testing.assert_array_equal(second.affine, first.affine)


def test_oblique_volume_round_trips_through_nifti_and_matches_simpleitk_points(tmp_path):
    vol = rotated_volume()
    write_nifti(vol, tmp_path / "oblique.nii")
    back = read_volume(tmp_path / "oblique.nii")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)  # NIfTI stores float32
    ref = sitk.ReadImage(str(tmp_path / "oblique.nii"))
    for index in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        np.testing.assert_allclose((back.affine @ [*index, 1])[:3], ref.TransformIndexToPhysicalPoint(index), atol=1e-4)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_formats_read_through_simpleitk(tmp_path, suffix):
    vol = rotated_volume()
    sitk.WriteImage(vol.to_sitk(), str(tmp_path / f"v{suffix}"))
    back = read_volume(tmp_path / f"v{suffix}")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-9)


def test_volume_to_and_from_sitk_is_lossless():
    vol = rotated_volume()
    back = Volume.from_sitk(vol.to_sitk())
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.spacing == vol.spacing and back.origin == vol.origin
    np.testing.assert_array_equal(back.direction, vol.direction)


def test_four_d_and_color_nifti_are_input_errors(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(InputError, match="4D image"):
        read_volume(tmp_path / "4d.nii.gz")
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    with pytest.raises(InputError, match="colour"):
        read_volume(tmp_path / "rgb.nii.gz")


def test_text_named_nii_is_an_input_error(tmp_path):
    (tmp_path / "notes.nii").write_text("this is not an image\n" * 40, encoding="utf-8")
    with pytest.raises(InputError, match="notes.nii"):
        read_volume(tmp_path / "notes.nii")


def test_a_nifti_without_any_orientation_reads_as_simpleitk_reads_it_and_says_its_position_is_unknown(tmp_path):
    """qform_code = sform_code = 0 (an ANALYZE-style header: voxel sizes only). nibabel's fallback centres the grid
    and flips x; SimpleITK puts it at the origin along LPS. `ctcolor info` reports SimpleITK's geometry (1e-6 mm)
    and says the position is unknown, as for a DICOM slice without one."""
    import json

    from conftest import ctcolor

    data = (np.arange(6 * 7 * 8, dtype=np.int16).reshape(8, 7, 6) - 1000).astype(np.int16)
    image = nib.Nifti1Image(data, None)
    image.header.set_zooms((0.8, 0.9, 2.5))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    path = tmp_path / "analyze-style.nii.gz"
    nib.save(image, path)
    done = ctcolor("info", str(path), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    reference = sitk.ReadImage(str(path))
    np.testing.assert_allclose(info["origin"], reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(info["direction"], reference.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(info["spacing"][::-1], reference.GetSpacing(), atol=1e-6)
    assert info["position_known"] is False
    assert "position     unknown" in ctcolor("info", str(path)).stdout
    np.testing.assert_array_equal(read_volume(path).array, sitk.GetArrayFromImage(reference))


def test_a_displacement_field_is_written_as_simpleitk_writes_it_byte_for_byte(tmp_path):
    """`write_vector_nifti` streams the voxels behind SimpleITK's header: the uncompressed file is the one SimpleITK
    writes for the same field on an oblique, anisotropic grid, byte for byte, and the .gz reads back as that image."""
    rng = np.random.default_rng(5)
    direction = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    grid = Volume(np.zeros((7, 9, 11), np.int16), (2.5, 0.8, 0.7), (-10.0, 20.0, -300.5), direction)
    field = rng.standard_normal((7, 9, 11, 3)).astype(np.float32)
    reference = sitk.GetImageFromArray(field, isVector=True)
    reference.SetSpacing(grid.spacing[::-1])
    reference.SetOrigin(grid.origin)
    reference.SetDirection(direction.flatten().tolist())
    sitk.WriteImage(reference, str(tmp_path / "itk.nii"), useCompression=False)
    write_vector_nifti(field, grid, tmp_path / "ours.nii")
    assert (tmp_path / "ours.nii").read_bytes() == (tmp_path / "itk.nii").read_bytes()
    read = sitk.ReadImage(str(write_vector_nifti(field.astype(np.float64), grid, tmp_path / "ours.nii.gz")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), field)
    assert read.GetNumberOfComponentsPerPixel() == 3 and np.allclose(read.GetDirection(), direction.flatten())
