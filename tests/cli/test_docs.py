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

import yaml

from conftest import troubleshooting_messages

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
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
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
    assert (tmp_path / "demo-out" / "registration" / "metrics.json").exists()
    assert (tmp_path / "demo-out" / "batch" / "report.csv").read_text(encoding="utf-8").count(",ok,") == 2


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
