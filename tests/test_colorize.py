"""The colorize engine on the shared DICOM series (tiny untrained model) and the ColorVolume exports.

The luminance contract (DESIGN.md): L* of every output pixel equals L* of the windowed CT's grey within 1.0. An
untrained network predicts arbitrary a*, b*, which exercises the gamut mapping at least as hard as a trained one.
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
import torch
from monai.inferers import SlidingWindowInferer
from pydicom.dataset import Dataset

from napari_ctcolor.color import grey_to_lightness, srgb_to_lab
from napari_ctcolor.engines import Cancelled
from napari_ctcolor.engines.colorize import (
    _COMPOSE_CHUNK,
    _ROI_3D,
    colorize,
    compose_chroma,
    iter_colorize,
    iter_predict_chroma,
    predict_chroma,
)
from napari_ctcolor.io import InputError, Volume, read_volume, write_nifti
from napari_ctcolor.io.export import DICOM_MODALITY, write_png_slices, write_rgb_dicom, write_rgb_nifti
from napari_ctcolor.models.colorizer import Colorizer, ColorizerConfig, downsample_hu, prepare_input
from napari_ctcolor.windowing import PRESETS, window

WINDOW = "abdomen"


def tiny_colorizer(dims: int = 2) -> Colorizer:
    """An untrained, seeded colorizer small enough for 2 CPU cores."""
    torch.manual_seed(0)
    return Colorizer(ColorizerConfig(dims=dims, channels=(8, 16, 32, 64)))


def lightness_error(rgb: np.ndarray, hu: np.ndarray, win=PRESETS[WINDOW]) -> float:
    """max |L*(output) - L*(windowed CT grey)| over all voxels."""
    return float(np.abs(srgb_to_lab(rgb)[..., 0] - grey_to_lightness(window(hu, *win))).max())


@pytest.fixture(scope="module")
def ct(dicom_series):
    return read_volume(dicom_series)


@pytest.fixture(scope="module")
def model():
    return tiny_colorizer()


@pytest.fixture(scope="module")
def chroma(ct, model):
    return predict_chroma(ct, model, device="cpu")


@pytest.fixture(scope="module")
def colour(ct, chroma):
    return compose_chroma(ct, chroma, WINDOW, 1.0, device="cpu")


# ------------------------------------------------------------------------------------------------------------------
# Engine
# ------------------------------------------------------------------------------------------------------------------


def test_colour_volume_has_the_ct_shape_and_geometry(ct, chroma, colour):
    assert colour.rgb.shape == (20, 512, 512, 3) and colour.rgb.dtype == np.uint8
    assert colour.spacing == ct.spacing and colour.origin == ct.origin
    np.testing.assert_array_equal(colour.direction, ct.direction)
    assert colour.settings == {"window": [40.0, 400.0], "model": "custom", "chroma": 1.0}
    # 512 px at 0.98 mm -> 4x reduction to the network's 3.5 mm pixels.
    assert chroma.factor == 4 and tuple(chroma.ab.shape) == (20, 2, 128, 128)


def test_luminance_is_the_windowed_ct_on_every_voxel(ct, colour):
    assert lightness_error(colour.rgb, ct.array) <= 1.0
    # ... while the output really is coloured (the untrained net predicts non-zero a*, b*).
    lab = srgb_to_lab(colour.rgb[10])
    assert np.hypot(lab[..., 1], lab[..., 2]).max() > 5.0


def test_zero_chroma_is_exactly_the_grey_ct(ct, chroma):
    grey = compose_chroma(ct, chroma, WINDOW, 0.0, device="cpu").rgb
    expected = np.round(window(ct.array, *PRESETS[WINDOW]) * 255).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(grey[..., channel], expected)


def test_cpu_runs_are_byte_identical_and_colorize_equals_predict_then_compose(ct, model, colour):
    # `colour` is a first run (predict_chroma + compose_chroma, same default batch size); this is the second.
    again = colorize(ct, model, WINDOW, device="cpu")
    assert again.rgb.tobytes() == colour.rgb.tobytes()


def test_progress_reaches_total_and_cancel_raises(ct, model):
    steps = []
    colorize(ct, model, WINDOW, device="cpu", batch_size=8, progress=lambda done, total: steps.append((done, total)))
    # network: 8, 16, 20 slices; compose: chunks of _COMPOSE_CHUNK slices; reported out of 2 x 20.
    compose = [(20 + min(20, k), 40) for k in range(_COMPOSE_CHUNK, 20 + _COMPOSE_CHUNK, _COMPOSE_CHUNK)]
    assert steps == [(8, 40), (16, 40), (20, 40), *compose]

    reported = []

    def cancel_after_first_batch() -> bool:
        return len(reported) > 0

    with pytest.raises(Cancelled):
        colorize(
            ct,
            model,
            device="cpu",
            batch_size=4,
            progress=lambda d, _: reported.append(d),
            cancel=cancel_after_first_batch,
        )
    assert reported == [4]  # stopped before the second batch


def test_generator_yields_each_batch_and_returns_the_chroma(ct, model, chroma):
    steps = iter_predict_chroma(ct, model, device="cpu", batch_size=8)
    assert [next(steps), next(steps), next(steps)] == [(8, 20), (16, 20), (20, 20)]
    with pytest.raises(StopIteration) as stop:
        next(steps)
    assert torch.equal(stop.value.value.ab, chroma.ab)


def test_bad_settings_are_input_errors_before_the_network_runs(ct, model):
    for kwargs in ({"chroma": 1.5}, {"window": "nonsense"}, {"batch_size": -1}):
        with pytest.raises(InputError):
            next(iter_colorize(ct, model, device="cpu", **kwargs))
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            colorize(ct, model, device="cuda")


def test_3d_model_matches_monai_sliding_window_and_keeps_luminance(ct):
    # A 256 x 256 crop: at the network's 4x reduction (64 x 64 x 20) it is smaller than the 3D patch on every side,
    # so the padding path runs too.
    crop = Volume(ct.array[:, 128:384, 128:384], ct.spacing, ct.origin, ct.direction, dict(ct.meta))
    net = tiny_colorizer(dims=3)
    got = predict_chroma(crop, net, device="cpu", batch_size=8)
    # Reference: MONAI's inferer on the same network input (the engine runs its own loop to report progress).
    with torch.inference_mode():
        small = downsample_hu(torch.from_numpy(crop.array.astype(np.float32)), 4)
        x = prepare_input(small[None], net.config)
        inferer = SlidingWindowInferer(_ROI_3D, sw_batch_size=2, overlap=0.5, mode="gaussian", padding_mode="replicate")
        expected = inferer(x, net)[0].permute(1, 0, 2, 3)
    assert tuple(got.ab.shape) == (20, 2, 64, 64)
    torch.testing.assert_close(got.ab, expected, atol=1e-4, rtol=0)
    colour = compose_chroma(crop, got, WINDOW, 1.0, device="cpu")
    assert colour.rgb.shape == (20, 256, 256, 3)
    assert lightness_error(colour.rgb, crop.array) <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_keeps_luminance_exact_and_colours_close_to_cpu(ct, model, colour):
    gpu = colorize(ct, copy.deepcopy(model), WINDOW, device="cuda")  # a copy: the engine moves the model it is given
    assert gpu.rgb.shape == colour.rgb.shape
    assert lightness_error(gpu.rgb, ct.array) <= 1.0
    # bf16 network + float32 torch composition vs the float32 CPU path: the same picture, not the same bytes.
    delta_e = np.linalg.norm(srgb_to_lab(gpu.rgb[::4]) - srgb_to_lab(colour.rgb[::4]), axis=-1)  # CIE76
    assert delta_e.mean() < 2.0 and np.percentile(delta_e, 99) < 6.0


# ------------------------------------------------------------------------------------------------------------------
# Exports
# ------------------------------------------------------------------------------------------------------------------


def test_rgb_nifti_has_the_colours_and_the_affine_of_the_grey_nifti(ct, colour, tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    path = write_rgb_nifti(colour, tmp_path / "colour.nii.gz")
    grey = nib.load(write_nifti(ct, tmp_path / "grey.nii.gz"))
    img = nib.load(path)
    assert int(img.header["datatype"]) == 128  # DT_RGB24
    np.testing.assert_array_equal(img.affine, grey.affine)
    np.testing.assert_array_equal(img.get_qform(), grey.get_qform())
    np.testing.assert_array_equal(img.get_sform(), grey.get_sform())
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
    voxels = np.asarray(img.dataobj)  # (X, Y, Z) RGB24 records
    rgb = np.stack([voxels["R"], voxels["G"], voxels["B"]], axis=-1).transpose(2, 1, 0, 3)
    np.testing.assert_array_equal(rgb, colour.rgb)

    image = sitk.ReadImage(str(path))  # what ITK-SNAP and 3D Slicer use
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert image.GetPixelID() == sitk.sitkVectorUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), colour.rgb)
    reference = ct.to_sitk()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)

    with pytest.raises(InputError, match="already exists"):
        write_rgb_nifti(colour, path)
    write_rgb_nifti(colour, path, overwrite=True)
    with pytest.raises(InputError, match=r"\.nii"):
        write_rgb_nifti(colour, tmp_path / "colour.png")


def test_png_slices_round_trip_one_file_per_slice(colour, tmp_path):
    from PIL import Image

    folder = tmp_path / "png"
    paths = write_png_slices(colour, folder)
    assert [p.name for p in paths] == [f"slice_{k:04d}.png" for k in range(20)]
    assert sorted(folder.iterdir()) == paths  # no temporary files left behind
    for k in (0, 13):
        with Image.open(paths[k]) as png:
            assert png.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(png), colour.rgb[k])
            assert png.info["dpi"][0] == pytest.approx(25.4 / 0.9765625, rel=1e-3)
    with pytest.raises(InputError, match="already exists"):
        write_png_slices(colour, folder)


def test_rgb_dicom_series_has_the_pixels_and_geometry_and_no_patient_identity(ct, colour, tmp_path):
    paths = write_rgb_dicom(colour, tmp_path / "dicom", source_meta=ct.meta)
    assert len(paths) == 20
    series_uids = set()
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert ds.Modality == DICOM_MODALITY == "OT"
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration) == ("RGB", 3, 0)
        assert ds.BitsAllocated == 8
        np.testing.assert_array_equal(ds.pixel_array, colour.rgb[k])
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], (ct.affine @ (0, 0, k, 1))[:3], atol=1e-4
        )
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0], atol=1e-6)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], ct.spacing[1:])
        assert float(ds.SliceThickness) == ct.spacing[0]
        # PS3.15 basic profile: Type 2 identifiers present but empty, no dates or institution.
        assert not ds.get("PatientName") and not ds.get("PatientID") and not ds.get("PatientBirthDate")
        assert not ds.get("StudyDate") and "SeriesDate" not in ds and "InstitutionName" not in ds
        assert ds.PatientIdentityRemoved == "YES"
        series_uids.add(ds.SeriesInstanceUID)
    assert len(series_uids) == 1 and ct.meta["series_uid"] not in series_uids
    assert ds.SeriesDescription == "colorized CT"  # free text of the source can identify a patient
    with pytest.raises(InputError, match="already exists"):
        write_rgb_dicom(colour, tmp_path / "dicom")


def test_rgb_dicom_keeps_patient_and_study_only_when_asked(colour, tmp_path):
    source = Dataset()
    source.PatientName, source.PatientID, source.StudyInstanceUID = "Doe^Jane", "12345", "1.2.3.4"
    source.InstitutionName, source.StudyDate, source.SeriesNumber = "General Hospital", "20240102", 3
    written = write_rgb_dicom(colour, tmp_path / "kept", keep_patient_info=True, source_datasets=[source])
    kept = pydicom.dcmread(written[0])
    assert (kept.PatientName, kept.PatientID, kept.StudyInstanceUID) == ("Doe^Jane", "12345", "1.2.3.4")
    assert (kept.InstitutionName, kept.StudyDate, kept.SeriesNumber) == ("General Hospital", "20240102", 1003)
    assert "PatientIdentityRemoved" not in kept
    removed = pydicom.dcmread(write_rgb_dicom(colour, tmp_path / "removed", source_datasets=[source])[0])
    assert not removed.PatientName and removed.StudyInstanceUID != "1.2.3.4" and "InstitutionName" not in removed
