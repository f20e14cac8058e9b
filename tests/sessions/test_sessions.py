"""The dock widgets' sessions without a viewer (`app.colorize_session`, `app.register_session`): the state a panel
keeps between clicks and the jobs it starts, driven as the docks drive them (the steps drained as a worker would),
on the shared 3 mm CT. The docks themselves are tested in a viewer in tests/napari_widgets."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ctcolor.app.colorize_job import ColorizeOutcome, ColorizeRequest
from napari_ctcolor.app.colorize_session import ColorizeSession
from napari_ctcolor.app.register_job import RegisterRequest
from napari_ctcolor.app.register_session import RegisterInputs, RegisterSession, tile_edges
from napari_ctcolor.app.session import Failed
from napari_ctcolor.app.window import opening_window, opens_in_contrast
from napari_ctcolor.color import grey_to_lightness, srgb_to_lab
from napari_ctcolor.engines.checkerboard import checkerboard_mask
from napari_ctcolor.io import Volume, read_volume
from napari_ctcolor.windowing import Window, window

from conftest import CT_DIR, DICOM_SERIES, LUMINANCE_BOUND, ct_weights_shipped, require_shared

CUT = CT_DIR / "totalseg-body-3mm-30slices.nii.gz"


def drain(steps) -> tuple[list[tuple], object]:
    """Run a step generator as a worker does: (the steps it yielded, its return value)."""
    seen = []
    while True:
        try:
            seen.append(next(steps))
        except StopIteration as stop:
            return seen, stop.value


def lightness_error(rgb: np.ndarray, volume: Volume, win: Window) -> float:
    """The largest |L* - L* of the windowed grey| over the voxels."""
    lab = srgb_to_lab(rgb)
    return float(np.abs(lab[..., 0] - grey_to_lightness(window(volume.array, *win))).max())


@pytest.fixture(scope="module")
def cut() -> Volume:
    return read_volume(require_shared(CUT))


def test_a_colorize_session_runs_keeps_the_classes_and_recomposes_in_another_window_without_the_network(cut):
    session = ColorizeSession()
    request = ColorizeRequest.checked(cut, window="abdomen", device="cpu")
    steps, outcome = drain(session.run_steps(cut, request))
    z = cut.shape[0]
    assert isinstance(outcome, ColorizeOutcome)
    assert steps[-1] == (2 * z, 2 * z) and [done for done, _ in steps] == sorted(done for done, _ in steps)
    assert session.composed_with(request, outcome.color.settings)
    run = session.keep(cut, outcome, ct="CT handle", shown="colour handle")
    assert session.current is run and session.runs == [run]

    lung = ColorizeRequest.checked(cut, window="lung", device="cpu")
    assert not session.composed_with(lung, outcome.color.settings)
    steps, recomposed = drain(session.recompose_steps(run, lung))
    assert steps[-1] == (z, z)
    assert session.composed_with(lung, recomposed.settings)
    assert lightness_error(recomposed.rgb, cut, lung.window) <= LUMINANCE_BOUND
    assert lightness_error(outcome.color.rgb, cut, request.window) <= LUMINANCE_BOUND
    # The colour classes are the run's: the lung window's colour differs from the abdomen window's on the body, not
    # because the network ran again (the same `Chroma` object composes both).
    assert not np.array_equal(recomposed.rgb, outcome.color.rgb)
    # The plane on screen first: as the whole volume's recomposition gives it there (the same arithmetic).
    middle = cut.shape[1] // 2
    np.testing.assert_array_equal(session.plane(run, 1, middle, lung), recomposed.rgb[:, middle])
    np.testing.assert_array_equal(session.plane(run, 0, 7, lung), recomposed.rgb[7])


def test_a_colorize_session_keeps_each_cts_last_run_and_chooses_by_the_cts_handle(cut):
    outcome = ColorizeOutcome(chroma=object(), color=None)
    session = ColorizeSession()
    first, second = object(), object()
    a = session.keep(cut, outcome, first, "a colour")
    b = session.keep(cut, outcome, second, "b colour")
    assert session.current is b and session.runs == [a, b]
    assert session.choose(first) is a and session.current is a
    assert session.choose(object()) is a  # a CT without a run leaves the current run as it is
    again = session.keep(cut, outcome, first, "a colour again")  # a re-run replaces that CT's run
    assert session.runs == [b, again] and session.run_of(first) is again
    assert session.choose(second) is b and session.forget(first) and not session.forget(first)
    assert session.runs == [b] and session.current is b  # another CT's run gone: the current one stays
    assert session.forget(second) and session.runs == [] and session.current is None  # its own gone: none is


def test_a_run_looks_for_enhanced_blood_only_on_a_ct_that_did_not_open_in_contrast_still_in_its_opening_window(cut):
    opening = opening_window(cut).limits
    assert ColorizeSession.finds_contrast(cut, opening)
    assert ColorizeSession.finds_contrast(cut, (opening[0] + 0.4, opening[1] - 0.4))  # a slider's rounding
    assert not ColorizeSession.finds_contrast(cut, (opening[0] + 10, opening[1]))  # the reader chose a window
    series = read_volume(require_shared(DICOM_SERIES))
    assert opens_in_contrast(series)  # its HU show enhanced blood: it opens in the contrast window
    assert not ColorizeSession.finds_contrast(series, opening_window(series).limits)
    one_slice = Volume(cut.array[:1], cut.spacing, cut.origin, cut.direction, dict(cut.meta))
    assert not ColorizeSession.finds_contrast(one_slice, opening_window(one_slice).limits)

    found = (230.0, Window(300.0, 1000.0))
    outcome = ColorizeOutcome(chroma=None, color=None, contrast=found)
    assert ColorizeSession.contrast_to_adopt(outcome, opening, opening) == found
    assert ColorizeSession.contrast_to_adopt(outcome, opening, (-1350.0, 150.0)) is None  # changed during the run
    assert ColorizeSession.contrast_to_adopt(ColorizeOutcome(None, None), opening, opening) is None


def test_a_colorize_session_job_ends_with_failed_for_a_problem_the_user_can_fix(cut, tmp_path):
    missing = tmp_path / "gone.safetensors"
    request = ColorizeRequest.checked(cut, window="abdomen", device="cpu", model=missing)
    _, outcome = drain(ColorizeSession.run_steps(cut, request))
    assert isinstance(outcome, Failed) and str(missing) in outcome.message


@pytest.fixture(scope="module")
def moved(cut) -> Volume:
    """The 3 mm cut moved 6 mm along x (two voxels): a pair the CT weights register in seconds."""
    shifted = np.full_like(cut.array, -1024)
    shifted[:, :, 2:] = cut.array[:, :, :-2]
    return Volume(shifted, cut.spacing, cut.origin, cut.direction, dict(cut.meta))


def inputs_of(fixed: Volume, moving: Volume) -> RegisterInputs:
    limits = Window(40.0, 400.0).limits
    return RegisterInputs(fixed, moving, None, None, "moved", None, limits, limits)


@pytest.mark.skipif(not ct_weights_shipped(), reason="weights/symnet-ct.safetensors is not in this checkout")
def test_a_register_session_runs_keeps_the_run_and_redraws_the_checkerboard_from_it(cut, moved):
    session = RegisterSession()
    request = RegisterRequest.checked(affine=False, refine=0, device="cpu")
    steps, run = drain(RegisterSession.job(inputs_of(cut, moved), request, lambda: False, "Register"))
    assert not isinstance(run, Failed), run
    assert steps[-1][0] == steps[-1][1]
    assert run.result.metrics["ncc_after"] > run.result.metrics["ncc_before"]
    session.keep(run)

    # The difference: fixed - warped, both clipped to -1000..400 HU, shown at +-400 HU.
    want = np.clip(cut.array, -1000, 400).astype(np.float32) - np.clip(run.result.warped.array, -1000, 400)
    want[~run.result.covered] = 0.0  # no moving data there (the shifted copy's edge): no change shown
    assert 0 < np.mean(~run.result.covered) < 0.1
    np.testing.assert_allclose(run.difference, want, atol=1e-3)
    assert run.difference_limits == (-400.0, 400.0)

    # The checkerboard at two tile sizes, after and before registration: the fixed image on the mask's tiles, the
    # other image elsewhere; no registering again (the same run).
    for tile, before in ((20.0, False), (9.0, True)):
        board = session.checkerboard(tile, before, colour=False)
        mask = checkerboard_mask(cut.shape, cut.spacing, tile)
        other = (moved if before else run.result.warped).array
        np.testing.assert_array_equal(board.array[mask], cut.array[mask].astype(board.array.dtype))
        np.testing.assert_allclose(board.array[~mask], other[~mask], atol=1e-3)
    # Colour asked for without warped colours: the grey checkerboard.
    grey = session.checkerboard(20.0, False, colour=False).array
    np.testing.assert_array_equal(session.checkerboard(20.0, False, colour=True).array, grey)
    # The outlines of those tiles in an axial plane: where the mask changes along y or x, never along z.
    edges = tile_edges(cut, 20.0, (1, 2)).astype(bool)
    mask = checkerboard_mask(cut.shape, cut.spacing, 20.0)
    np.testing.assert_array_equal(
        edges[:, 1:, 1:], (mask[:, 1:, 1:] != mask[:, :-1, 1:]) | (mask[:, 1:, 1:] != mask[:, 1:, :-1])
    )
    assert not edges[:, 0, 0].any()


@pytest.mark.skipif(not ct_weights_shipped(), reason="weights/symnet-ct.safetensors is not in this checkout")
def test_a_cancelled_register_session_job_ends_with_none_and_a_session_without_a_run_draws_nothing(cut, moved):
    polled = []

    def cancel() -> bool:  # Cancel pressed once the first stage has started
        polled.append(1)
        return len(polled) > 1

    request = RegisterRequest.checked(affine=False, refine=0, device="cpu")
    steps, run = drain(RegisterSession.job(inputs_of(cut, moved), request, cancel, "Register"))
    assert run is None and len(steps) >= 1
    session = RegisterSession()
    assert session.run is None
    with pytest.raises(ValueError, match="no registration yet"):
        session.checkerboard(20.0, False, colour=False)
