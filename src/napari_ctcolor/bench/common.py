"""What every `ctcolor bench` section shares: the shared data's place, the rows (plain dicts, JSON-ready), timing
in process and as whole `ctcolor` processes, the machine's description and the markdown table."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: The shared OASIS pair beside the checkout (../shared/data/symnet-oasis from the repository root), or under
#: ``CTCOLOR_SHARED_DATA`` (the offline GPU bundle's).
OASIS_DIR = Path(os.environ.get("CTCOLOR_SHARED_DATA") or Path(__file__).resolve().parents[4] / "shared" / "data") / (
    "symnet-oasis"
)
OASIS_CHECKPOINT = "SYMNet_neurite_oasis_smo30_update_80000.pth"
ROW_KEYS = ("section", "item", "device", "size", "unit", "median", "min", "max", "repeats", "note")


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, torch version and threads, Python, commit and date of this run."""
    cpu = platform.processor() or platform.machine()
    ram_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal"):
                ram_gb = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": _dt.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": ram_gb,
        "gpu": gpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "commit": git_commit(),
    }


def make_row(section: str, item: str, device: str = "cpu", size: str = "", unit: str = "", **values: Any) -> dict:
    row = {key: None for key in ROW_KEYS}
    row.update(section=section, item=item, device=device, size=size, unit=unit, note="")
    row.update(values)
    return row


def once_row(section: str, item: str, size: str, unit: str, value: float, note: str, **extra) -> dict:
    """A row of one measurement on the CPU (one run, or one run per peer in the same process)."""
    return make_row(section, item, "cpu", size, unit, median=value, repeats=1, note=note, **extra)


def rate_row(section: str, item: str, device: str, size: str, count: int, seconds: Sequence[float], **extra) -> dict:
    """A throughput row: ``count`` items per run over the measured ``seconds`` of each repeat."""
    rates = [count / s for s in seconds]
    return make_row(
        section,
        item,
        device,
        size,
        "slices/s",
        median=round(statistics.median(rates), 2),
        min=round(min(rates), 2),
        max=round(max(rates), 2),
        repeats=len(seconds),
        **extra,
    )


def stats_row(section: str, item: str, device: str, size: str, unit: str, values: Sequence[float], **extra) -> dict:
    """Median, min and max of ``values`` (one per repeat or pair)."""
    return make_row(
        section,
        item,
        device,
        size,
        unit,
        median=round(statistics.median(values), 4),
        min=round(min(values), 4),
        max=round(max(values), 4),
        repeats=len(values),
        **extra,
    )


def seconds_row(section: str, item: str, device: str, size: str, seconds: Sequence[float], **extra) -> dict:
    return stats_row(section, item, device, size, "s", seconds, **extra)


def sync_device(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], repeats: int, device: str = "cpu", warmup: int = 1) -> list[float]:
    """Wall seconds of ``fn()`` for each of ``repeats`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    sync_device(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - start)
    return times


def bench_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def ncc_of(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def ctcolor_seconds(args: Sequence[str], timeout: float | None = None) -> float:
    """Wall seconds of ``ctcolor ARGS`` as its own process (start-up, reading and writing included); a process still
    running after ``timeout`` seconds is stopped (`subprocess.TimeoutExpired`)."""
    command = [sys.executable, "-m", "napari_ctcolor", *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"ctcolor {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as one markdown table: median (min..max) per row, with notes."""
    lines = [
        "| section | item | device | size | median (min..max) | unit | repeats | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["median"] is None:
            value = "not measured"
        elif row["min"] is None:
            value = _fmt(row["median"])
        else:
            value = f"{_fmt(row['median'])} ({_fmt(row['min'])}..{_fmt(row['max'])})"
        cells = [row["section"], row["item"], row["device"], row["size"], value, row["unit"], row["repeats"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + f" | {row['note']} |")
    return "\n".join(lines)


def machine_line(info: dict[str, Any]) -> str:
    """One line describing the machine and the commit."""
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, GPU {info['gpu']}; "
        f"torch {info['torch']} ({info['torch_threads']} threads), Python {info['python']}. Commit {info['commit']}."
    )
