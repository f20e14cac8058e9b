"""DICOM reading against SimpleITK's own reading of the same files, and against analytic edits of the real series."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, generate_uid

from napari_ctcolor.errors import InputError
from napari_ctcolor.io import read_volume

from conftest import CT_DIR, file_hashes, require_shared, write_headless
from make_bad_inputs import bad_inputs, non_image


def sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.fixture(scope="session")
def decoded_slices(dicom_series) -> list[Dataset]:
    """The shared series decoded to uncompressed datasets, in file-name order."""
    out = []
    for path in sorted(dicom_series.iterdir()):
        ds = pydicom.dcmread(path)
        ds.decompress()
        out.append(ds)
    return out


def write_series(folder: Path, datasets: list[Dataset], names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets):
        ds.save_as(folder / (names[i] if names else f"im{i:03d}.dcm"), enforce_file_format=True)
    return folder


def subset(decoded: list[Dataset], n: int, series_uid: str | None = None) -> list[Dataset]:
    """The first ``n`` slices along z (deep copies), optionally relabelled as another series."""
    ordered = sorted(decoded, key=lambda d: float(d.ImagePositionPatient[2]))[:n]
    out = [copy.deepcopy(d) for d in ordered]
    if series_uid is not None:
        for d in out:
            d.SeriesInstanceUID = series_uid
    return out


def test_dicom_series_hu_and_geometry_match_simpleitk(dicom_series):
    vol = read_volume(dicom_series)
    ref = sitk_series(dicom_series)
    assert vol.shape == (20, 512, 512)
    np.testing.assert_allclose(vol.spacing, (2.0, 0.9765625, 0.9765625), atol=1e-6)
    np.testing.assert_allclose(vol.origin, ref.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(vol.direction.flatten(), ref.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(vol.spacing[::-1], ref.GetSpacing(), atol=1e-6)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref))
    assert vol.array.min() == -1024 and vol.array.max() == 1839
    assert vol.meta["modality"] == "CT"
    assert vol.meta["window"] == (40.0, 300.0)
    assert vol.meta["transfer_syntax"] == "1.2.840.10008.1.2.4.90"
    assert not any("Patient" in k for k in vol.meta)


def test_labels_with_flipped_direction_overlay_ct_only_in_physical_space(dicom_series):
    labels_path = require_shared(CT_DIR / "totalseg-abdomen-dicom-labels.nii.gz")
    names = {
        int(k): v for k, v in json.loads((CT_DIR / "totalseg-v2-label-names.json").read_text(encoding="utf-8")).items()
    }
    ct = read_volume(dicom_series)
    labels = read_volume(labels_path)
    assert labels.direction[1, 1] == -1.0 and ct.direction[1, 1] == 1.0  # the Y flip this test is about

    resampled = sitk.Resample(labels.to_sitk(), ct.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    on_ct = sitk.GetArrayFromImage(resampled)
    liver = [i for i, n in names.items() if n == "liver"]
    vertebrae = [i for i, n in names.items() if n.startswith("vertebrae_")]
    liver_hu = ct.array[np.isin(on_ct, liver)].mean()
    vertebra_hu = ct.array[np.isin(on_ct, vertebrae)].mean()
    # This series is portal-venous (aorta ~180 HU), so enhanced liver parenchyma sits near 90 HU; 40..110 HU
    # covers liver in any phase and excludes fat, air and bone.
    assert 40 <= liver_hu <= 110, liver_hu
    assert vertebra_hu > 150, vertebra_hu
    # The same arrays overlaid by index (ignoring geometry) put the liver label elsewhere: the check can fail.
    naive_liver_hu = ct.array[np.isin(labels.array, liver)].mean()
    assert not 40 <= naive_liver_hu <= 110, naive_liver_hu


def test_slices_ordered_by_position_not_file_name_or_instance_number(decoded_slices, tmp_path):
    ordered = subset(decoded_slices, 6)
    expected = read_volume(write_series(tmp_path / "ordered", copy.deepcopy(ordered))).array
    scrambled = copy.deepcopy(ordered)
    for ds, instance in zip(scrambled, [3, 6, 1, 5, 2, 4], strict=True):
        ds.InstanceNumber = instance
    names = ["f.dcm", "a.dcm", "e.dcm", "b.dcm", "d.dcm", "c.dcm"]  # name order is not z order
    vol = read_volume(write_series(tmp_path / "scrambled", scrambled, names))
    np.testing.assert_array_equal(vol.array, expected)
    positions = [float(d.ImagePositionPatient[2]) for d in ordered]
    assert vol.origin[2] == pytest.approx(min(positions))


def test_rle_and_jpeg_lossless_series_read_like_uncompressed(decoded_slices, tmp_path):
    plain = subset(decoded_slices, 4)
    expected = read_volume(write_series(tmp_path / "plain", copy.deepcopy(plain)))

    rle = copy.deepcopy(plain)
    for ds in rle:
        ds.compress(RLELossless)
    rle_vol = read_volume(write_series(tmp_path / "rle", rle))
    assert rle_vol.meta["transfer_syntax"] == RLELossless
    np.testing.assert_array_equal(rle_vol.array, expected.array)

    # JPEG lossless (process 14) written by GDCM through SimpleITK, decoded by pylibjpeg-libjpeg on our side.
    jpeg_dir = tmp_path / "jpeg"
    jpeg_dir.mkdir()
    image = expected.to_sitk()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    series_uid = generate_uid()
    for z in range(image.GetDepth()):
        sl = image[:, :, z]
        sl.SetMetaData("0020|000e", series_uid)
        sl.SetMetaData("0008|0060", "CT")
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        writer.SetFileName(str(jpeg_dir / f"{z}.dcm"))
        writer.Execute(sl)
    syntax = pydicom.dcmread(jpeg_dir / "0.dcm", stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax in ("1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57"), syntax
    jpeg_vol = read_volume(jpeg_dir)
    np.testing.assert_array_equal(jpeg_vol.array, expected.array)


def test_pixel_padding_outside_field_of_view_becomes_air(decoded_slices, tmp_path):
    padded = subset(decoded_slices, 3)
    for ds in padded:
        raw = ds.pixel_array.astype(np.int16)
        raw[:40, :40] = -2000  # a scanner's padding code: -2000 stored = -3024 HU after rescale
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15  # signed 16 bit, as such scanners store
        ds.PixelData = raw.tobytes()
        ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue; its VR follows PixelRepresentation
    vol = read_volume(write_series(tmp_path / "padded", padded))
    assert np.all(vol.array[:, :40, :40] == -1024)
    assert vol.meta["padded_voxels"] == 3 * 40 * 40
    assert vol.array.min() >= -1024


def test_folder_with_several_series_reads_the_largest_ct_or_the_one_asked(decoded_slices, tmp_path):
    root = tmp_path / "study"
    write_series(root / "a", subset(decoded_slices, 7, "1.2.3.7"))
    write_series(root / "b", subset(decoded_slices, 4, "1.2.3.4"))
    mr = subset(decoded_slices, 9, "1.2.3.9")
    for ds in mr:
        ds.Modality = "MR"
    write_series(root / "c", mr)
    vol = read_volume(root)
    assert vol.shape[0] == 7 and vol.meta["series_uid"] == "1.2.3.7"
    assert vol.meta["series_count"] == 3
    assert read_volume(root, series_uid="1.2.3.4").shape[0] == 4
    mr_vol = read_volume(root, series_uid="1.2.3.9")
    assert mr_vol.meta["modality"] == "MR" and mr_vol.shape[0] == 9
    with pytest.raises(InputError, match="no series with UID 9.9"):
        read_volume(root, series_uid="9.9")


def test_integral_rescale_reads_as_int16_and_widens_to_int32_only_when_a_slice_does_not_fit(decoded_slices, tmp_path):
    slices = subset(decoded_slices, 3, "1.2.3.3")
    write_series(tmp_path / "ct", slices)
    vol = read_volume(tmp_path / "ct")
    assert vol.array.dtype == np.int16
    by_z = sorted(slices, key=lambda d: float(d.ImagePositionPatient[2]))
    for z, ds in enumerate(by_z):  # the stored values times the slope plus the intercept, exactly
        np.testing.assert_array_equal(vol.array[z], ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept))
    # A slope of 20 on the middle slice: its values leave int16, so the whole volume is int32, every slice exact.
    wide = subset(decoded_slices, 3, "1.2.3.4")
    wide[1].RescaleSlope = 20
    write_series(tmp_path / "wide", wide)
    vol = read_volume(tmp_path / "wide")
    assert vol.array.dtype == np.int32 and vol.array.max() > np.iinfo(np.int16).max
    by_z = sorted(wide, key=lambda d: float(d.ImagePositionPatient[2]))
    for z, ds in enumerate(by_z):
        expected = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.array[z], expected)


def test_single_file_with_and_without_preamble(decoded_slices, tmp_path):
    ds = subset(decoded_slices, 1)[0]
    with_preamble = tmp_path / "slice.dcm"
    ds.save_as(with_preamble, enforce_file_format=True)
    bare = tmp_path / "slice_no_preamble"
    bare.write_bytes(with_preamble.read_bytes()[132:])  # drop the 128-byte preamble and "DICM"
    a, b = read_volume(with_preamble), read_volume(bare)
    assert a.shape == b.shape == (1, 512, 512)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.array[0], ds.pixel_array.astype(np.int32) - 1024)
    assert a.spacing[0] == pytest.approx(float(ds.SliceThickness))


@pytest.mark.parametrize("source", ["CT_small", "shared"])
@pytest.mark.parametrize(
    "missing",
    [("PhotometricInterpretation",), ("PhotometricInterpretation", "SamplesPerPixel", "ImagePositionPatient")],
    ids=["photometric", "photometric-samples-position"],
)
def test_headless_ct_without_photometric_interpretation_reads_as_simpleitk_reads_it(request, tmp_path, source, missing):
    """PhotometricInterpretation and SamplesPerPixel are type 1, yet old CT files omit them (and the position); GDCM
    (SimpleITK) reads one sample per pixel as MONOCHROME2, and `ctcolor info` must agree with it: shape, spacing,
    origin and HU range (exact: integers)."""
    from pydicom.data import get_testdata_file

    from conftest import ctcolor

    if source == "CT_small":
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # signed 16 bit, 128 x 128, a real CT crop
    else:
        # 512 x 512, the shared series' first slice, decompressed (skipped without the shared data)
        ds = subset(request.getfixturevalue("decoded_slices"), 1)[0]
        # This de-identified series has an empty SOPClassUID; without a CT SOP class GDCM ignores the position.
        ds.SOPClassUID = pydicom.uid.CTImageStorage
    for keyword in missing:
        delattr(ds, keyword)
    path = write_headless(ds, tmp_path / "headless")
    before = file_hashes(path)
    reference = sitk.ReadImage(str(path))
    expected = sitk.GetArrayFromImage(reference)
    done = ctcolor("info", str(path), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["shape"] == list(expected.shape)
    np.testing.assert_allclose(info["spacing"][1:], reference.GetSpacing()[:2][::-1], rtol=1e-6)
    np.testing.assert_allclose(info["origin"], reference.GetOrigin(), atol=1e-4)
    assert (info["hu_min"], info["hu_max"]) == (expected.min(), expected.max())
    np.testing.assert_array_equal(read_volume(path).array, expected)
    assert "PhotometricInterpretation" not in pydicom.dcmread(path, force=True)  # the file is left as it was
    assert file_hashes(path) == before


def test_headless_three_sample_image_without_photometric_interpretation_is_refused_in_one_line(tmp_path):
    from pydicom.data import get_testdata_file

    from conftest import ctcolor

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PhotometricInterpretation
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), np.uint8).tobytes()
    path = write_headless(ds, tmp_path / "colour")
    done = ctcolor("info", str(path))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: {path}")
    assert "3 samples per pixel, PhotometricInterpretation missing" in done.stderr
    with pytest.raises(InputError, match="PhotometricInterpretation missing"):
        read_volume(path)  # the grey reader refuses it too


def test_missing_slice_warns_and_is_reported(decoded_slices, tmp_path):
    slices = subset(decoded_slices, 8)
    del slices[3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = read_volume(write_series(tmp_path / "gap", slices))
    assert any("irregular slice spacing" in str(w.message) for w in caught)
    assert vol.meta["irregular_spacing"] is True
    assert vol.meta["missing_slices"] == 1
    assert vol.spacing[0] == pytest.approx(2.0)


@pytest.mark.parametrize("defect", ["duplicate", "orientation", "tilt"])
def test_series_whose_geometry_is_not_a_box_is_refused(decoded_slices, tmp_path, defect):
    slices = subset(decoded_slices, 5)
    if defect == "duplicate":
        slices[2].ImagePositionPatient = list(slices[1].ImagePositionPatient)
        match = "share a position"
    elif defect == "orientation":
        slices[2].ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
        match = "inconsistent ImageOrientationPatient"
    else:  # gantry tilt: each slice shifted in y by tan(10 deg) * z
        for ds in slices:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y + 0.176 * (z - float(slices[0].ImagePositionPatient[2])), z]
        match = "gantry tilt"
    folder = write_series(tmp_path / defect, slices)
    with pytest.raises(InputError, match=match):
        read_volume(folder)


@pytest.mark.parametrize(
    ("modality", "sop_class"),
    [("RTSTRUCT", "1.2.840.10008.5.1.4.1.1.481.3"), ("SR", "1.2.840.10008.5.1.4.1.1.88.22")],
)
def test_non_image_dicom_is_an_input_error(tmp_path, modality, sop_class):
    path = tmp_path / f"{modality}.dcm"
    non_image(modality, sop_class).save_as(path, enforce_file_format=True)
    with pytest.raises(InputError, match=f"no pixel data \\(a {modality} object\\)"):
        read_volume(path)
    with pytest.raises(InputError, match="no DICOM image files"):
        read_volume(tmp_path)


def test_bad_inputs_raise_input_error_and_stay_unchanged(dicom_series, tmp_path):
    cases = bad_inputs(tmp_path, sorted(dicom_series.iterdir())[0])
    before = file_hashes(tmp_path)
    for what, path in cases.items():
        with pytest.raises(InputError) as info:
            read_volume(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, (what, message)
    assert file_hashes(tmp_path) == before


_CHILD_READ = """
import sys, pickle, warnings
from napari_ctcolor.errors import InputError
from napari_ctcolor.io import read_volume
from napari_ctcolor.io import prefetch
assert prefetch._can_fork(), "this process has not imported torch: the child read must be used"
out = {}
for path in sys.argv[2:]:
    said = []
    for how in (prefetch.read_volume_soon(path), lambda: read_volume(path)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                volume = how()
                said.append(([str(w.message) for w in caught], volume.array.tobytes(), str(volume.array.dtype),
                             volume.spacing, volume.origin, volume.direction.tolist(), repr(volume.meta)))
            except InputError as exc:
                said.append(([str(w.message) for w in caught], "error", str(exc)))
    out[path] = said
prefetch.read_volume_soon(sys.argv[2])  # started and abandoned (a user's Ctrl-C): nothing may be left behind
with open(sys.argv[1], "wb") as f:
    pickle.dump(out, f)
"""


def test_ctcolor_reads_the_series_in_a_child_process_exactly_as_in_its_own(decoded_slices, dicom_series, tmp_path):
    # `ctcolor colorize` reads its input in a forked child while it imports torch and MONAI (io.prefetch): the
    # Volume it gets must be the one read_volume gives, voxel for voxel with the same geometry and metadata, with the
    # same warnings (a missing slice), and a bad input must give read_volume's one-line error. Run in a fresh
    # interpreter without torch, as the CLI is.
    import pickle
    import subprocess
    import sys

    empty = tmp_path / "empty"
    empty.mkdir()
    slices = subset(decoded_slices, 8)
    del slices[3]
    gap = write_series(tmp_path / "gap", slices)
    shm = set(Path("/dev/shm").glob("ctcolor-*"))  # the prefetch's files (other tests' processes make their own)
    result = tmp_path / "result.pkl"
    paths = [str(dicom_series), str(gap), str(empty)]
    subprocess.run([sys.executable, "-c", _CHILD_READ, str(result), *paths], check=True)
    got = pickle.loads(result.read_bytes())  # written by the test's own script just above
    for path in paths:
        child, here = got[path]
        assert child == here, path
    assert any("irregular slice spacing" in m for m in got[str(gap)][0][0])
    assert got[str(empty)][0][1] == "error" and "no DICOM" in got[str(empty)][0][2]
    assert set(Path("/dev/shm").glob("ctcolor-*")) == shm  # no shared-memory file is left, even by the abandoned read


@pytest.mark.parametrize(
    "orientation",
    [[1, 0, 0, 0, 1, 0], [0.8660254, 0.5, 0, -0.5, 0.8660254, 0], [0, 1, 0, 0, 0, -1]],
    ids=["axial", "axial-turned-30", "sagittal"],
)
def test_acr_nema_position_and_orientation_read_as_simpleitk_reads_them(tmp_path, orientation):
    """An old file with its plane only in the retired Image Position (0020,0030) and Image Orientation (0020,0035),
    as `ctcolor info` reports it: GDCM's (SimpleITK's) origin and direction (1e-4 mm and 1e-6: the header's decimal
    strings read by two parsers), and a line that says where they came from; the file is left as it was."""
    from conftest import RETIRED_POSITION, ctcolor, write_acr_nema

    path = write_acr_nema(tmp_path / "acr-nema", orientation)
    before = file_hashes(path)
    reference = sitk.ReadImage(str(path))
    np.testing.assert_allclose(reference.GetOrigin(), RETIRED_POSITION, atol=1e-4)  # GDCM does read them
    done = ctcolor("info", str(path), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    np.testing.assert_allclose(info["origin"], reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(info["direction"], reference.GetDirection(), atol=1e-6)
    assert info["position_known"] and "(0020,0030)" in info["geometry_source"]
    text = ctcolor("info", str(path)).stdout
    assert "geometry     from the retired ACR-NEMA Image Position (0020,0030)" in text, text
    assert file_hashes(path) == before


def test_retired_position_beside_a_sop_class_is_read_where_gdcm_drops_it(tmp_path):
    """GDCM ignores the retired position of a file that names a SOP class and places it at (0, 0, 0) without a word;
    ctcolor reads the header's position and says where it came from."""
    from conftest import RETIRED_POSITION, write_acr_nema

    path = write_acr_nema(tmp_path / "acr-nema-ct", [1, 0, 0, 0, 1, 0], sop_class=True)
    assert sitk.ReadImage(str(path)).GetOrigin() == (0.0, 0.0, 0.0)
    volume = read_volume(path)
    np.testing.assert_allclose(volume.origin, RETIRED_POSITION, atol=1e-9)
    assert "(0020,0035)" in volume.meta["geometry_source"]


def test_a_slice_without_any_position_is_said_to_have_none(tmp_path):
    """No Image Position at all, patient or retired: the placeholder origin (0, 0, 0), as SimpleITK's, is flagged in
    `ctcolor info` and in the metadata napari's layer carries, never silent."""
    from pydicom.data import get_testdata_file

    from conftest import ctcolor

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.ImagePositionPatient
    path = write_headless(ds, tmp_path / "no-position")
    assert sitk.ReadImage(str(path)).GetOrigin() == (0.0, 0.0, 0.0)
    info = json.loads(ctcolor("info", str(path), "--json").stdout)
    assert info["origin"] == [0.0, 0.0, 0.0] and info["position_known"] is False
    assert "position     unknown" in ctcolor("info", str(path)).stdout
    assert read_volume(path).meta["position_known"] is False


@pytest.fixture(scope="module")
def enhanced(dicom_series, tmp_path_factory) -> dict[str, Path]:
    """The shared series as one Legacy Converted Enhanced CT file per way of stating its contrast."""
    from conftest import write_enhanced

    folder = tmp_path_factory.mktemp("enhanced")
    return {how: write_enhanced(dicom_series, folder / f"{how}.dcm", how) for how in ("agent", "usage", "none")}


@pytest.mark.parametrize("contrast", ["agent", "usage", "none"])
def test_enhanced_ct_keeps_its_windows_and_its_contrast(enhanced, dicom_series, contrast):
    """An Enhanced CT keeps its windows in its functional groups (Frame VOI LUT) and may state its contrast only as a
    Contrast/Bolus Usage item: `ctcolor info` reports the first window as the default, every window the header
    offers and the contrast, as for the series it was made from; voxels and geometry as SimpleITK reads the file
    (exact HU: integers; 1e-4 mm)."""
    from conftest import ctcolor

    path = enhanced[contrast]
    done = ctcolor("info", str(path), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    series = json.loads(ctcolor("info", str(dicom_series), "--json").stdout)
    assert info["window"] == series["window"] == [40, 300]
    assert info["windows"] == series["windows"] == [[40, 300], [300, 1500]]
    assert info.get("contrast") == ("APPLIED" if contrast != "none" else None)
    text = ctcolor("info", str(path)).stdout
    assert "centre 300, width 1500 (also offered by the header)" in text
    reference = sitk.ReadImage(str(path))
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))
    np.testing.assert_allclose(volume.origin, reference.GetOrigin(), atol=1e-4)


def test_enhanced_ct_applies_each_frames_rescale_and_makes_its_padding_air(decoded_slices, tmp_path):
    """An Enhanced CT may give each frame its own Pixel Value Transformation (a Legacy Converted one keeps each
    source slice's), and marks voxels outside the field of view with PixelPaddingValue. GDCM applies the first
    frame's rescale to every frame and keeps the padding code. `ctcolor info` of the converted file reports what it
    reports for the series it was made from, and the voxels equal SimpleITK's reading of that series (which rescales
    each slice by its own header), padding made air: exact, integers."""
    import highdicom

    from conftest import ctcolor

    slices = subset(decoded_slices, 6)
    for k, ds in enumerate(slices):
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        intercept = -1000 if k % 2 else -1024  # stored values differ by 24 between neighbouring slices
        stored = hu - intercept
        stored[:30, :30] = -2000  # a scanner's padding code (stored)
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
        ds.PixelData = stored.astype(np.int16).tobytes()
        ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    series = write_series(tmp_path / "series", slices)
    enhanced = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(f) for f in sorted(series.iterdir())],
        series_instance_uid=highdicom.UID(),
        series_number=901,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
    )
    per_frame = [
        float(f.PixelValueTransformationSequence[0].RescaleIntercept) for f in enhanced.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(set(per_frame)) == [-1024.0, -1000.0]  # the converter kept each slice's own
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)

    done = ctcolor("info", str(path), "--json")
    assert done.returncode == 0, done.stderr
    info, reference = json.loads(done.stdout), json.loads(ctcolor("info", str(series), "--json").stdout)
    assert (info["hu_min"], info["hu_max"]) == (reference["hu_min"], reference["hu_max"])
    assert info["hu_min"] >= -1024  # neither the padding code nor a 24 HU shift on every other frame

    want = sitk_series(series)
    expected = sitk.GetArrayFromImage(want)
    expected[:, :30, :30] = -1024
    volume = read_volume(path)
    order = slice(None) if np.allclose(volume.origin, want.GetOrigin(), atol=1e-3) else slice(None, None, -1)
    np.testing.assert_array_equal(volume.array[order], expected)
    assert volume.meta["padded_voxels"] == 6 * 30 * 30
    normal = np.asarray(want.GetDirection()).reshape(3, 3)[:, 2]
    assert abs(abs(float(volume.direction[:, 2] @ normal)) - 1.0) < 1e-6
