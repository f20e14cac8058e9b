"""The bad-input corpus (`make_bad_inputs.py`) through `ctcolor info`, `colorize`, `register` and the napari reader.

Every case: exit 2, exactly one stderr line ``error: <file>: <problem>``, nothing on stdout, no traceback, no warning
logged, an answer within seconds, no output written, and the input byte-identical afterwards. The CLI runs in-process
(importing torch per subprocess would cost ~2 s a call); log records stand in for what a real process would print.
"""

from __future__ import annotations

import json
import logging
import re
import time
import tracemalloc
from pathlib import Path

import pytest

from napari_ctcolor.cli import main
from napari_ctcolor.errors import InputError
from napari_ctcolor.io import read_volume
from napari_ctcolor.napari._reader import get_reader

from conftest import assert_documented, file_hashes
from make_bad_inputs import MAKERS, Case, make_corpus, nifti_bytes, small_ct_array

#: Each command must answer within this (imports are warmed up first; the slowest case decodes one 512^2 slice).
CALL_SECONDS = 5.0
#: Tally for the issue note: printed by the last test of this file.
TALLY = {"cases": 0, "commands": 0, "clean_errors": 0, "reader_none": 0, "reader_input_error": 0}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Case]:
    import napari_ctcolor.engines  # noqa: F401 - torch's import (~2 s) must not count against a case's time

    return make_corpus(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture(scope="session")
def good_fixed(tmp_path_factory) -> Path:
    """A valid small CT, the FIXED image when a bad input is given as MOVING."""
    path = tmp_path_factory.mktemp("good") / "fixed.nii.gz"
    path.write_bytes(nifti_bytes(small_ct_array(), gz=True))
    return path


def _case(corpus: dict[str, Case], name: str) -> Case:
    if name not in corpus:
        pytest.skip(f"{name} is made from the shared CT in ../shared/data, which is missing")
    return corpus[name]


def _hashes(case: Case) -> dict[str, str]:
    return {k: v for path in case.inputs if path.exists() for k, v in file_hashes(path).items()}


def run_cli(capsys, caplog, *args: object) -> tuple[int, str, str, float]:
    """``ctcolor ARGS`` in-process: exit code, stdout, stderr and seconds; fails on any warning logged meanwhile."""
    capsys.readouterr()
    caplog.clear()
    start = time.perf_counter()
    code = main([str(a) for a in args])
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    # In a process of its own, `main` prints WARNING records to stderr: they would be extra lines.
    logged = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert not logged, (args, logged)
    return code, out, err, seconds


def assert_clean_error(case: Case, args: list, result: tuple[int, str, str, float]) -> str:
    code, out, err, seconds = result
    lines = err.splitlines()
    where = (case.name, args[0], err)
    assert code == 2, where
    assert len(lines) == 1 and lines[0].startswith("error: "), where
    assert str(case.culprit) in lines[0], where
    assert re.search(case.problem, lines[0], re.IGNORECASE), (case.problem, *where)
    assert "Traceback" not in err and out == "", where
    assert seconds < CALL_SECONDS, (seconds, *where)
    assert_documented(lines[0])  # the user can look the line up
    TALLY["clean_errors"] += 1
    return lines[0]


@pytest.mark.parametrize("name", list(MAKERS))
def test_bad_input_exits_2_with_one_error_line_and_stays_unchanged(name, corpus, good_fixed, tmp_path, capsys, caplog):
    case = _case(corpus, name)
    before, existed = _hashes(case), [p.exists() for p in case.inputs]
    color, reg_dir = tmp_path / "colour.nii.gz", tmp_path / "registration"
    if case.register:
        for path in case.inputs:  # each image alone is valid; the pair is what cannot be registered
            assert run_cli(capsys, caplog, "info", path)[0] == 0
        # Without the pre-alignment (the CT card's default), which brings disjoint frames together.
        commands = [["register", *case.inputs, "-o", reg_dir, "--no-affine", "--refine", "0"]]
    else:
        path = case.inputs[0]
        commands = [["colorize", path, "-o", color, "--model", "colorizer-2d"]]
        if case.info_reads:
            assert run_cli(capsys, caplog, "info", path, "--json")[0] == 0  # a valid image, of the wrong modality
        else:
            commands += [
                # Reading fails before the modality check: --allow-non-ct cannot make an RGB ultrasound readable.
                ["colorize", path, "-o", color, "--model", "colorizer-2d", "--allow-non-ct"],
                ["register", good_fixed, path, "-o", reg_dir],
                ["register", path, good_fixed, "-o", reg_dir],
            ]
            if case.color_reads:  # a colour image is described as such; only the commands that need HU refuse it
                code, out, _, _ = run_cli(capsys, caplog, "info", path, "--json")
                assert code == 0 and json.loads(out)["modality"] == "RGB"
            else:
                commands += [["info", path, "--json"], ["info", path]]
    for args in commands:
        assert_clean_error(case, args, run_cli(capsys, caplog, *args))
        TALLY["commands"] += 1
    assert not color.exists() and not (reg_dir.exists() and any(reg_dir.iterdir()))
    assert _hashes(case) == before and [p.exists() for p in case.inputs] == existed
    TALLY["cases"] += 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's notes on damaged values; napari shows them, harmless
@pytest.mark.parametrize("name", [n for n in MAKERS if not n.startswith("register_")])
def test_napari_reader_returns_none_or_raises_the_cli_message(name, corpus, capsys, caplog):
    case = _case(corpus, name)
    path = case.inputs[0]
    before = _hashes(case)
    reader = get_reader(str(path))
    if reader is None:  # napari tries its other readers, then tells the user none could open it
        TALLY["reader_none"] += 1
    elif case.info_reads:
        [(data, kwargs, kind)] = reader(str(path))
        assert kind == "image" and data.ndim == 3
    elif case.color_reads:
        [(data, kwargs, kind)] = reader(str(path))
        assert kind == "image" and kwargs["rgb"] and data.shape[-1] == 3
    else:
        with pytest.raises(InputError) as info:
            reader(str(path))
        code, _, err, _ = run_cli(capsys, caplog, "info", path)

        # A memory-budget message quotes the RAM free at that moment, which the other test worker changes between
        # the two calls: the GiB figures are masked, the rest is compared to the letter.
        def sizes_masked(text: str) -> str:
            return re.sub(r"\d+(\.\d+)? GiB", "N GiB", text)

        assert code == 2 and sizes_masked(err.strip()) == sizes_masked(f"error: {info.value}")
        TALLY["reader_input_error"] += 1
    assert _hashes(case) == before


@pytest.mark.parametrize(
    "name", ["nifti_header_bomb", "nifti_header_bomb_gz", "mha_huge_dimsize", "huge_multiframe_header"]
)
def test_header_bombs_are_refused_before_allocating(name, corpus):
    case = _case(corpus, name)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=case.problem):
            read_volume(case.inputs[0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.1f} MiB allocated while refusing a header bomb"


def test_mr_slice_is_colorized_only_with_allow_non_ct(corpus, tmp_path, capsys, caplog):
    case = _case(corpus, "mr_slice_to_colorize")
    out = tmp_path / "mr.nii.gz"
    code, _, err, _ = run_cli(
        capsys, caplog, "colorize", case.inputs[0], "-o", out, "--allow-non-ct", "--device", "cpu"
    )
    assert code == 0, err
    assert out.exists()


def test_corpus_has_at_least_30_cases_and_reports_the_tally(corpus):
    assert len(MAKERS) >= 30
    shared = sum(m.needs_shared for m in MAKERS.values())
    print(f"\nbad-input corpus: {len(MAKERS)} cases ({shared} from the shared CT, {len(corpus)} made here); {TALLY}")
    if not TALLY["cases"]:
        pytest.skip("the tally reports the corpus tests of this run; run it with them (file order)")
    assert TALLY["clean_errors"] == TALLY["commands"] > 0
