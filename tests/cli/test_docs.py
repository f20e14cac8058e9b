"""The user guide as a new user follows it: every ``bash`` block of the pages in `mkdocs.yml`'s order runs, in one
scratch folder, and must succeed. Blocks that need a display, a PACS or a GPU are written as ``text`` and not run.
The site itself (no broken link) is built by the lint step (`mkdocs build --strict`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
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
