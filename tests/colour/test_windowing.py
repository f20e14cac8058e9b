"""Windowing: analytic values, presets, DICOM defaults."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ctcolor.errors import InputError
from napari_ctcolor.io import Volume
from napari_ctcolor.windowing import PRESETS, Window, default_window, parse_window, window, window_stack


def test_window_is_the_linear_ramp_between_the_contrast_limits():
    hu = np.array([-1000, -160, 40, 240, 3000], dtype=np.int16)
    grey = window(hu, 40, 400)
    np.testing.assert_allclose(grey, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)
    assert grey.dtype == np.float32
    np.testing.assert_allclose(window(np.array([-850.0]), *PRESETS["lung"]), [(-850 + 1350) / 1500], atol=1e-6)


def test_window_matches_napari_contrast_limits_mapping():
    hu = np.linspace(-1200, 2000, 97)
    low, high = PRESETS["bone"].limits
    np.testing.assert_allclose(window(hu, *PRESETS["bone"]), np.clip((hu - low) / (high - low), 0, 1), atol=1e-6)


def test_presets_have_standard_values():
    assert PRESETS["lung"] == Window(-600, 1500)
    assert PRESETS["abdomen"] == Window(40, 400)
    assert PRESETS["brain"] == Window(40, 80)
    assert PRESETS["bone"] == Window(400, 1800)
    assert {"lung", "mediastinum", "abdomen", "liver", "bone", "brain", "subdural", "stroke", "cta"} <= set(PRESETS)


def test_default_window_prefers_dicom_then_preset_then_percentiles():
    ct = Volume(np.zeros((2, 3, 3), np.int16), meta={"modality": "CT", "window": (35.0, 350.0)})
    assert default_window(ct) == Window(35.0, 350.0)
    assert default_window(Volume(np.zeros((2, 3, 3)), meta={"modality": "CT"})) == PRESETS["abdomen"]
    mr = Volume(np.arange(1000, dtype=np.float32).reshape(10, 10, 10), meta={"modality": "MR"})
    centre, width = default_window(mr)
    assert centre == pytest.approx(499.5, abs=1) and width == pytest.approx(980, abs=2)


def test_parse_window_accepts_names_and_numbers_and_rejects_nonsense():
    assert parse_window("Lung") == PRESETS["lung"]
    assert parse_window("soft-tissue") == PRESETS["soft_tissue"]
    assert parse_window("50,350") == Window(50, 350)
    for bad in ["nonsense", "40,0", "40", "a,b"]:
        with pytest.raises(InputError):
            parse_window(bad)


def test_window_stack_stacks_windows_on_a_new_leading_axis():
    hu = np.array([[-850, 40], [60, 700]], dtype=np.int16)
    stack = window_stack(hu, [PRESETS["lung"], PRESETS["abdomen"], PRESETS["bone"]])
    assert stack.shape == (3, 2, 2)
    np.testing.assert_array_equal(stack[1], window(hu, 40, 400))
