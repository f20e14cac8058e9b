"""The user guide as a new user follows it: every ``bash`` block of the pages in `mkdocs.yml`'s order runs, in one
scratch folder, and must succeed. Blocks that need a display, a PACS or a GPU are written as ``text`` and not run.
The site itself (no broken link) is built by the lint step (`mkdocs build --strict`). The troubleshooting page lists
every error line the package can print (`InputError`); `test_bad_inputs.py` checks the lines `ctcolor` prints against
it."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml
from PIL import Image

from napari_ctcolor.color import grey_to_lightness, srgb_to_lab
from napari_ctcolor.io import read_volume
from napari_ctcolor.phantom import make_phantom
from napari_ctcolor.windowing import window

from conftest import LUMINANCE_BOUND, troubleshooting_messages

ROOT = Path(__file__).resolve().parents[2]
#: A message's literal pieces shorter than this say nothing on their own: ``f"{path}: {exc}"`` passes on another
#: error's line, which is checked where it is made.
MIN_PIECE = 8
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _pages(nav) -> list[str]:
    """The nav's pages in order (nested sections flattened)."""
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _pages(value) if isinstance(value, list) else [value]
    return pages


def _blocks() -> list[tuple[str, str]]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    return [
        (page, block)
        for page in _pages(config["nav"])
        for block in BLOCK.findall((ROOT / "docs" / page).read_text(encoding="utf-8"))
    ]


def test_the_guide_has_commands_to_run():
    pages = {page for page, _ in _blocks()}
    assert {"index.md", "colorize-in-napari.md", "register.md", "cli.md", "batch.md"} <= pages


def test_every_command_in_the_guide_runs(tmp_path):
    """The guide's first command is `make demo`'s main job (`examples/demo.py`); its outputs are checked here too
    (`_assert_demo_outputs`), so the demo runs once."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    printed = ""
    for page, block in _blocks():
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert run.returncode == 0, f"{page}:\n{block}\n{run.stderr[-2000:]}"
        printed += run.stdout
    assert "examples/demo.py --out demo-out" in _blocks()[0][1]
    assert "examples/demo.py --out demo-out" in (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "modality     CT" in printed and "colorized 48 slices" in printed
    _assert_demo_outputs(tmp_path / "demo-out")
    assert (tmp_path / "demo-out" / "registration" / "metrics.json").exists()
    assert (tmp_path / "demo-out" / "batch" / "report.csv").read_text(encoding="utf-8").count(",ok,") == 2


def _assert_demo_outputs(out: Path) -> None:
    """What `make demo` writes, as the README says: the phantom CT (the README's default phantom, voxel for voxel),
    its colour as NIfTI RGB24 (luminance within the bound, coloured soft tissue, grey air) and the montage (grey above,
    the written colours below)."""
    phantom = make_phantom(seed=0, shape=(48, 384, 384), spacing=(2.5, 0.9, 0.9)).volume
    np.testing.assert_array_equal(read_volume(out / "phantom.nii.gz").array, phantom.array)
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "phantom_colorized.nii.gz")))
    lab = srgb_to_lab(rgb)
    assert np.abs(lab[..., 0] - grey_to_lightness(window(phantom.array, 40, 400))).max() <= LUMINANCE_BOUND
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    assert np.median(chroma[(phantom.array > -100) & (phantom.array < 200)]) > 10
    assert chroma[phantom.array < -900].max() <= 2
    montage = np.asarray(Image.open(out / "montage.png"))
    assert montage.shape == (2 * 384, 4 * 384, 3)
    np.testing.assert_array_equal(montage[384:, :384], rgb[48 // 5])  # the colour row holds the written colours


def _template(node: ast.expr, constants: dict[str, str]) -> str:
    """An error message's text as written, ``{}`` for each value filled in: a string, an f-string, a sum of them, a
    method called on one (``.splitlines()[0]``), or a module's string constant."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _template(node.left, constants) + _template(node.right, constants)
    if isinstance(node, ast.Subscript):
        return _template(node.value, constants)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return _template(node.func.value, constants)
    if isinstance(node, ast.Name):
        return constants.get(node.id, "{}")
    return "{}"


def _input_errors() -> list[tuple[str, int, str]]:
    """(file, line, message template) of every ``InputError(...)`` the package makes."""
    found = []
    for path in sorted((ROOT / "src" / "napari_ctcolor").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args:
                name = getattr(node.func, "id", getattr(node.func, "attr", None))
                if name == "InputError":
                    found.append((str(path.relative_to(ROOT)), node.lineno, _template(node.args[0], constants)))
    return found


def test_troubleshooting_lists_every_error_line():
    """Each message's longest literal piece is on the page, so a user can look up any line the package prints."""
    page = "\n".join(troubleshooting_messages())
    errors = _input_errors()
    assert len(errors) > 200  # the scan finds the package's messages (284 when this test was written)
    missing = []
    for where, line, template in errors:
        piece = max((part.strip(" :;,.") for part in template.split("{}")), key=len)
        if len(piece) >= MIN_PIECE and piece not in page:
            missing.append(f"{where}:{line}: {template}")
    assert not missing, "add these to docs/troubleshooting.md:\n" + "\n".join(missing)


def test_benchmarks_keeps_dated_results_within_300_lines():
    """BENCHMARKS.md holds the latest results by machine kind, each section dated, in at most 300 lines; what it
    outgrows goes to docs/history/measurements.md, which names each of its sections by date too."""
    lines = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"BENCHMARKS.md has {len(lines)} lines: move earlier results to docs/history"
    date = re.compile(r"20\d\d-\d\d-\d\d")
    undated = [line for line in lines if line.startswith("### ") and not date.search(line)]
    assert not undated, undated
    history = (ROOT / "docs" / "history" / "measurements.md").read_text(encoding="utf-8").splitlines()
    assert all(date.search(line) for line in history if line.startswith("## ")), "an undated history section"
