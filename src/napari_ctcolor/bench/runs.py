"""`ctcolor bench`: colorize and register throughput, peak memory, and peers measured in the same run.

Importable without Qt. Every timed figure is a median over repeats with its min and max; comparisons (ours vs the
seed thesis's network, SYMNet vs SimpleITK demons) run in the same process so their ratio is meaningful on a noisy
shared machine. Rows are plain dicts (JSON-ready); a row that could not be measured has ``median`` None and a
``note`` starting "not measured" or "not installed".
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError

if TYPE_CHECKING:
    from ..io import Volume

#: The seed thesis's colorizer: (in, out, stride) of its 13 3x3 convolutions, and where the x2 upsamplings go.
PEER_LAYERS: tuple[tuple[int, int, int] | str, ...] = (
    (1, 64, 1),
    (64, 64, 2),
    (64, 128, 1),
    (128, 128, 2),
    (128, 256, 1),
    (256, 256, 2),
    (256, 512, 1),
    (512, 256, 1),
    (256, 128, 1),
    "up",
    (128, 64, 1),
    "up",
    (64, 32, 1),
    (32, 16, 1),
    (16, 2, 1),  # + tanh
    "up",
)
PEER_PARAMETERS = 3_896_530

#: Realistic pixel sizes: the colorizer resamples to its own grid, so these make it run at its usual ~128^2 / 64^2.
SIZES: tuple[tuple[int, float], ...] = ((512, 0.78), (256, 1.56))
MODELS = ("colorizer-2d", "colorizer-3d")
#: The shared OASIS pair beside the checkout (../shared/data/symnet-oasis from the repository root), or under
#: ``CTCOLOR_SHARED_DATA`` (the offline GPU bundle's).
OASIS_DIR = Path(os.environ.get("CTCOLOR_SHARED_DATA") or Path(__file__).resolve().parents[4] / "shared" / "data") / (
    "symnet-oasis"
)
OASIS_CHECKPOINT = "SYMNet_neurite_oasis_smo30_update_80000.pth"
#: Issue 51's decision 3: a Dice difference within this of a peer is a tie on any one pair.
DICE_TIE = 0.002
ROW_KEYS = ("section", "item", "device", "size", "unit", "median", "min", "max", "repeats", "note")


class PeerColorizer(nn.Module):
    """The seed thesis's plain encoder-decoder (L in, ab out; 3,896,530 parameters), for speed comparisons only.

    Conv 3x3 + ReLU throughout (stride 2 where marked), three nearest x2 upsamplings, tanh on the last conv.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for spec in PEER_LAYERS:
            if spec == "up":
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
                continue
            c_in, c_out, stride = spec
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1))
            layers.append(nn.Tanh() if c_out == 2 else nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, lightness: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) L in [0, 1] -> (N, 2, H, W) ab in [-1, 1]."""
        return self.net(lightness)


def parameter_count(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _git_commit() -> str:
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
        "commit": _git_commit(),
    }


def _row(section: str, item: str, device: str = "cpu", size: str = "", unit: str = "", **values: Any) -> dict:
    row = {key: None for key in ROW_KEYS}
    row.update(section=section, item=item, device=device, size=size, unit=unit, note="")
    row.update(values)
    return row


def _once_row(section: str, item: str, size: str, unit: str, value: float, note: str, **extra) -> dict:
    """A row of one measurement on the CPU (one run, or one run per peer in the same process)."""
    return _row(section, item, "cpu", size, unit, median=value, repeats=1, note=note, **extra)


def _rate_row(section: str, item: str, device: str, size: str, count: int, seconds: Sequence[float], **extra) -> dict:
    """A throughput row: ``count`` items per run over the measured ``seconds`` of each repeat."""
    rates = [count / s for s in seconds]
    return _row(
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


def _stats_row(section: str, item: str, device: str, size: str, unit: str, values: Sequence[float], **extra) -> dict:
    """Median, min and max of ``values`` (one per repeat or pair)."""
    return _row(
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


def _seconds_row(section: str, item: str, device: str, size: str, seconds: Sequence[float], **extra) -> dict:
    return _stats_row(section, item, device, size, "s", seconds, **extra)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], repeats: int, device: str = "cpu", warmup: int = 1) -> list[float]:
    """Wall seconds of ``fn()`` for each of ``repeats`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def bench_colorize(slices: int, repeats: int, sizes: Sequence[tuple[int, float]] = SIZES) -> list[dict]:
    """End-to-end colorize (HU -> network -> sRGB uint8) slices/s per model, size and device, and the peer network.

    Ratio rows give ours / peer at the same size and device.
    """
    from ..engines.colorize import compose_chroma, get_colorizer, predict_chroma
    from ..engines.device import cpu_bf16, cpu_bf16_instructions
    from ..phantom import make_phantom

    rows: list[dict] = []
    peer = PeerColorizer().eval()
    for size, pixel in sizes:
        volume = make_phantom(seed=7, shape=(slices, size, size), spacing=(2.0, pixel, pixel)).volume
        label = f"{size}x{size}"
        for device in ("cpu", "cuda"):
            if device not in _devices():
                for model in (*MODELS, "peer (seed thesis)"):
                    rows.append(_row("colorize", model, device, label, "slices/s", note="not measured: no CUDA device"))
                continue
            ours: dict[str, float] = {}
            for model in MODELS:
                get_colorizer(model)

                def run(model: str = model, device: str = device, volume: Volume = volume) -> None:
                    chroma = predict_chroma(volume, model, device=device)
                    compose_chroma(volume, chroma, "abdomen", 1.0, device=device)

                bf16 = device == "cpu" and cpu_bf16()
                note = "network in bfloat16 (this CPU's default, engines.device.cpu_bf16)" if bf16 else ""
                row = _rate_row("colorize", model, device, label, slices, _time(run, repeats, device), note=note)
                rows.append(row)
                ours[model] = row["median"]
                if device == "cpu" and cpu_bf16_instructions():  # the other precision, which this CPU also runs

                    def run_other(model: str = model, volume: Volume = volume, bf16: bool = not bf16) -> None:
                        chroma = predict_chroma(volume, model, device="cpu", bf16=bf16)
                        compose_chroma(volume, chroma, "abdomen", 1.0, device="cpu")

                    name = f"{model} {'float32' if bf16 else 'bfloat16'}"
                    rows.append(_rate_row("colorize", name, device, label, slices, _time(run_other, repeats)))
            net = peer.to(device)
            peer_slices = min(slices, 16)  # a rate: fewer slices keep the slow peer's share of the run small
            batch = torch.rand(peer_slices, 1, size, size, device=device)
            batch_size = 8 if device == "cpu" else 64

            def run_peer(net: nn.Module = net, batch: torch.Tensor = batch, step: int = batch_size) -> None:
                with torch.inference_mode():
                    for start in range(0, batch.shape[0], step):
                        net(batch[start : start + step])

            row = _rate_row(
                "colorize",
                "peer (seed thesis)",
                device,
                label,
                peer_slices,
                _time(run_peer, repeats, device),
                note="network only, random weights, full-resolution input",
            )
            rows.append(row)
            for model, rate in ours.items():
                rows.append(
                    _row(
                        "ratio",
                        f"{model} / peer",
                        device,
                        label,
                        "x",
                        median=round(rate / row["median"], 2),
                        note="end-to-end ours vs peer network alone",
                    )
                )
            peer.to("cpu")
    return rows


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text(encoding="utf-8").split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM): unlike ``ru_maxrss`` it starts afresh at exec, so a subprocess's peak does
    not include the RSS of the parent it was forked from."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def rss_job(path: str, copies: int, model: str = "colorizer-2d") -> dict:
    """Run in a fresh process: colorize ``copies`` tiles of the int16 slab at ``path`` and report the peak RSS.

    The baseline is taken after the imports, the model load and a warm-up on a tiny input; the input volume counts as
    the job's memory.
    """
    from ..engines.colorize import colorize, get_colorizer
    from ..io import Volume

    get_colorizer(model)
    # Warmed up on 2 slices of 32²: numba loads its compiled kernels (~80 MB of code) at their first call, part of
    # the program like torch's libraries, not of this job's memory.
    tiny = np.full((2, 32, 32), 40, dtype=np.int16)
    colorize(Volume(tiny, spacing=(2.0, 0.8, 0.8), meta={"modality": "CT"}), model, window="abdomen", device="cpu")
    base = _rss_mb()
    slab = np.load(path)
    array = np.tile(slab["array"], (copies, 1, 1))
    volume = Volume(array, spacing=tuple(slab["spacing"]), meta={"modality": "CT"})
    del slab
    start = time.perf_counter()
    color = colorize(volume, model, window="abdomen", device="cpu")
    seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    input_mb = array.nbytes / 2**20
    return {
        "shape": list(array.shape),
        "input_mb": round(input_mb, 1),
        "output_mb": round(color.rgb.nbytes / 2**20, 1),
        "baseline_rss_mb": round(base),
        "peak_rss_mb": round(peak),
        "peak_minus_baseline_mb": round(peak - base),
        "ratio_to_input": round((peak - base) / input_mb, 2),
        "seconds": round(seconds, 2),
    }


def bench_rss(slices: int = 600, size: int = 512, model: str = "colorizer-2d") -> list[dict]:
    """Peak RSS of colorizing a (slices, size, size) int16 CT, measured in a subprocess (its own peak)."""
    from ..phantom import make_phantom

    base_slices = 60
    copies = max(1, slices // base_slices)
    volume = make_phantom(seed=3, shape=(base_slices, size, size), spacing=(2.0, 0.78, 0.78)).volume
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "slab.npz")
        np.savez(path, array=volume.array.astype(np.int16), spacing=np.asarray(volume.spacing))
        job = f"rss_job({path!r}, {copies})"
        code = f"import json; from napari_ctcolor.bench.runs import rss_job; print(json.dumps({job}))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    label = "x".join(str(n) for n in result["shape"][::-1])
    return [
        _once_row(
            "memory",
            f"{model} peak RSS - baseline",
            label,
            "MB",
            result["peak_minus_baseline_mb"],
            f"{result['ratio_to_input']}x the int16 input ({result['input_mb']} MB); baseline "
            f"{result['baseline_rss_mb']} MB, peak {result['peak_rss_mb']} MB",
            ratio_to_input=result["ratio_to_input"],
            **{k: result[k] for k in ("baseline_rss_mb", "peak_rss_mb", "input_mb")},
        ),
        _once_row(
            "memory",
            f"{model} end to end",
            label,
            "s",
            result["seconds"],
            f"{result['shape'][0] / result['seconds']:.1f} slices/s",
        ),
    ]


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _ctcolor(args: Sequence[str], timeout: float | None = None) -> float:
    """Wall seconds of ``ctcolor ARGS`` as its own process (start-up, reading and writing included); a process still
    running after ``timeout`` seconds is stopped (`subprocess.TimeoutExpired`)."""
    command = [sys.executable, "-m", "napari_ctcolor", *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"ctcolor {' '.join(args)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def bench_register(quick: bool, repeats: int, data_dir: Path = OASIS_DIR) -> list[dict]:
    """The OASIS pair, every method a whole process in this run: ``ctcolor register`` with the official checkpoint,
    ``ctcolor peer official-symnet`` (the official inference recipe), and ANTs SyN, elastix B-spline and demons
    (``ctcolor peer``). Notes: the ratio to the official recipe, |warped - official reference| for both SYMNets,
    NCC before -> after for the peers.

    ``quick`` registers a 64^3 crop of the pair instead, with one repeat and no classical peers (a smoke run).
    """
    import nibabel as nib

    from ..peers import PEER_COMMANDS

    label = "64x64x64 crop" if quick else "160x192x224"
    ours, official = "ctcolor register (whole process)", "official SYMNet recipe (whole process)"
    peers = [] if quick else [name for name in PEER_COMMANDS if name != "official-symnet"]
    checkpoint = data_dir / OASIS_CHECKPOINT
    paths = [data_dir / f"image_{x}_full_size.nii.gz" for x in "AB"]
    reference_path = data_dir / "reference-warped-B-to-A.nii.gz"
    if not (checkpoint.is_file() and all(p.is_file() for p in paths) and reference_path.is_file()):
        return [
            _row("register", m, "cpu", label, "s", note="not measured: shared data absent") for m in (ours, official)
        ]
    images = [nib.load(str(p)) for p in paths]
    reference = nib.load(str(reference_path)).get_fdata(dtype=np.float32)
    crop = tuple(slice(n // 2 - 32, n // 2 + 32) for n in reference.shape) if quick else (slice(None),) * 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if quick:  # the crop as NIfTI files of its own (the affine's offset does not matter for this timing)
            paths = [Path(tmp) / f"{x}.nii.gz" for x in "AB"]
            for image, path in zip(images, paths, strict=True):
                nib.save(nib.Nifti1Image(image.get_fdata(dtype=np.float32)[crop], image.affine), str(path))
        moving = nib.load(str(paths[1])).get_fdata(dtype=np.float32)
        fixed = nib.load(str(paths[0])).get_fdata(dtype=np.float32)
        seconds: dict[str, list[float]] = {}
        warped: dict[str, np.ndarray] = {}
        # (item, the subcommand and its name, the options after the paths)
        # On the CPU, where the official recipe and every peer run: a GPU machine's ratio compares recipes, not devices.
        runs = [(ours, ["register"], ["--model", str(checkpoint), "--no-affine", "--device", "cpu"])]
        runs.append((official, ["peer", "official-symnet"], ["--model", str(checkpoint)]))
        runs += [(PEER_COMMANDS[name], ["peer", name], []) for name in peers]
        for item, command, options in runs:
            for k in range(1 if item in PEER_COMMANDS.values() else repeats):
                out = Path(tmp) / f"{len(seconds)}-{k}"
                seconds.setdefault(item, []).append(_ctcolor([*command, *map(str, paths), "-o", str(out), *options]))
            warped[item] = nib.load(str(out / "warped.nii.gz")).get_fdata(dtype=np.float32)
        ratio = statistics.median(seconds[official]) / statistics.median(seconds[ours])
        for item in (ours, official):
            note = f"{ratio:.2f}x the official recipe, same run" if item == ours else ""
            if not quick:  # the network on a crop is not the reference's registration
                # The reference is in min-max units of the moving image; ours is in the moving image's own units.
                low, high = float(moving.min()), float(moving.max())
                diff = np.abs(((warped[item] - low) / (high - low) if item == ours else warped[item]) - reference)
                note = "; ".join(filter(None, (note, f"max abs(warped - official reference) {diff.max():.2g}")))
            rows.append(_seconds_row("register", item, "cpu", label, seconds[item], note=note))
        for name in peers:
            item = PEER_COMMANDS[name]
            note = f"NCC {_ncc(fixed, moving):.3f} -> {_ncc(fixed, warped[item]):.3f}"
            rows.append(_seconds_row("register", item, "cpu", label, seconds[item], note=note))
    return rows


#: The CT bench's runs of ``ctcolor register`` (item, options): the card's default (pre-alignment, demons refinement)
#: and the network alone after the same pre-alignment.
CT_REGISTER_RUNS = (("ctcolor register", []), ("ctcolor register --refine 0", ["--refine", "0"]))


def _register_ct_pairs(quick: bool) -> list[tuple[str, Volume, np.ndarray, Volume, Volume]]:
    """(size label, fixed, fixed labels, moving, moving labels) of every validation pair and its phase-change variant:
    the CT weights' held-out deformations of the labelled CTs and two breathing-like deformations of each unlabelled
    chest CT, one smooth across the chest and one that slides along the chest wall (`training.symnet.chest_pairs`;
    ``quick``: one labelled pair). Raises InputError or KeyError when the weights' card or the shared data is
    missing."""
    from ..io import Volume
    from ..training.symnet import (
        SymnetTrainConfig,
        chest_pairs,
        chest_phase_change,
        evaluation_pairs,
        phase_change,
    )
    from ..weights import find_weights, read_card

    _, card_path = find_weights("symnet-ct")
    if card_path is None:
        raise InputError("symnet-ct has no model card (its evaluation pairs are defined there)")
    train = SymnetTrainConfig(**read_card(card_path)["training"]["config"])
    if quick:
        train.real_val, train.val_pairs_per_case = train.real_val[:1], 1
    rng = np.random.default_rng(train.val_seed + 1)
    out = []

    def both(size: str, fixed: Volume, labels: np.ndarray, moving: Volume, moving_labels: Volume, changed) -> None:
        out.append((size, fixed, labels, moving, moving_labels))
        variant = Volume(changed, moving.spacing, moving.origin, moving.direction, meta=moving.meta)
        out.append((f"{size} phase change", fixed, labels, variant, moving_labels))

    for _name, case, moving, moving_labels in evaluation_pairs(train):
        size = "x".join(map(str, case.ct.shape[::-1])) + f" {case.name}"
        changed = phase_change(moving.array, moving_labels.array, case.label_names, rng)
        both(size, case.ct, case.labels, moving, moving_labels, changed)
    if not quick:
        for motion, what in (("smooth", "breathing"), ("sliding", "sliding breathing")):
            for name, fixed, labels, moving, moving_labels in chest_pairs(rng, motion=motion):
                size = "x".join(map(str, fixed.shape[::-1])) + f" {name} {what} 20 mm"
                both(size, fixed, labels, moving, moving_labels, chest_phase_change(moving.array, rng))
    return out


def bench_register_ct(quick: bool) -> list[dict]:
    """The default ``ctcolor register`` (CT weights), the network alone, and the peers (``ctcolor peer demons``,
    ``elastix-bspline``, ``ants-syn``) on the validation pairs (`_register_ct_pairs`), each a whole process in this
    run reading and writing NIfTI files.

    Per pair and method: Dice of the moving labels warped by the written ``ddf.nii.gz`` (nearest neighbour) against
    the fixed labels (mean over structures), folding of that ddf, and wall seconds of the process. A peer that is not
    installed gets a row saying so. ``quick`` runs one labelled pair and the demons peer only.
    """
    import SimpleITK as sitk

    from ..engines.geometry import warp
    from ..io import write_nifti
    from ..peers import PEER_COMMANDS, folding_fraction_mm
    from ..training.symnet import mean_dice

    peers = ["demons"] if quick else [name for name in PEER_COMMANDS if name != "official-symnet"]
    items = [item for item, _ in CT_REGISTER_RUNS] + [PEER_COMMANDS[name] for name in peers]
    try:
        pairs = _register_ct_pairs(quick)
    except (InputError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0]
        return [_row("register CT", m, "cpu", "", "Dice", note=f"not measured: {reason}") for m in items]
    # On the CPU, as every peer runs (a GPU machine's figures compare methods, not devices).
    runs = [(item, ["register"], [*options, "--device", "cpu"]) for item, options in CT_REGISTER_RUNS]
    runs += [(PEER_COMMANDS[name], ["peer", name], []) for name in peers]
    results: dict[tuple[str, str], list[dict]] = {}
    unavailable: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, (size, fixed, labels, moving, moving_labels) in enumerate(pairs):
            paths = [Path(tmp) / f"{k}-{x}.nii.gz" for x in ("fixed", "moving")]
            write_nifti(fixed, paths[0])
            write_nifti(moving, paths[1])
            before = mean_dice(labels, moving_labels.array)
            for item, command, options in runs:
                if item in unavailable:
                    continue
                out = Path(tmp) / f"{k}-{len(results)}"
                try:
                    seconds = _ctcolor([*command, *map(str, paths), "-o", str(out), *options])
                except RuntimeError as exc:
                    if command[0] == "register" or "pip install" not in str(exc):  # only a missing peer is skipped
                        raise
                    unavailable[item] = str(exc)
                    continue
                ddf = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ddf.nii.gz")))  # (Z, Y, X, 3) LPS mm
                warped = warp(moving_labels, fixed, ddf, "nearest", 0)
                folding = folding_fraction_mm(ddf @ fixed.direction, fixed.spacing)  # LPS -> index axes
                after = mean_dice(labels, warped)
                results.setdefault((size, item), []).append(
                    {"before": before, "after": after, "folding": folding, "seconds": seconds}
                )
                # A long section: each run as it ends, so that an interrupted bench still says something.
                line = f"  {size}: {item}: Dice {before:.3f} -> {after:.3f}, {seconds:.1f} s"
                print(line, file=sys.stderr, flush=True)
                shutil.rmtree(out)
    rows = []
    for (size, item), found in results.items():
        dice, seconds = [r["after"] for r in found], [r["seconds"] for r in found]
        note = (
            f"{len(found)} pairs: Dice {np.mean([r['before'] for r in found]):.3f} -> {np.mean(dice):.3f}, "
            f"folding max {100 * max(r['folding'] for r in found):.3f} %, {statistics.median(seconds):.1f} s"
        )
        rows.append(_stats_row("register CT", item, "cpu", size, "Dice", dice, note=note))
        rows.append(_seconds_row("register CT", item, "cpu", size, seconds, note="whole process"))
    rows += [_row("register CT", m, "cpu", "", "Dice", note=f"not run: {why}") for m, why in unavailable.items()]
    return rows


#: The registration speed bench's pairs (issue 51): a chest CT at the size of a held-out contrast exam (popi resampled
#: to 1.5 mm and cut to 164 x 126 x 120 voxels, a smooth 15 mm deformation of itself) and the full 512 x 512 x 141
#: popi CT against a 20 mm breathing motion of itself (over 10 million voxels); ``--quick``: a 64 x 64 x 48 cut.
SPEED_SHAPE_XYZ, SPEED_MM, QUICK_SPEED_SHAPE_XYZ = (164, 126, 120), 1.5, (64, 64, 48)
SPEED_CT = "chest-popi-2mm.nii.gz"
#: What ``ctcolor register`` is measured as in the speed bench: the whole process, and the engine in a process that
#: has imported it and read the images already, as the napari widget runs it (its first registration: the model is
#: loaded in the timed call).
IN_PROCESS = "ctcolor register in process (as the napari widget)"
#: A peer's process still running after this many seconds is stopped and reported as slower than that.
SPEED_PEER_TIMEOUT_S = 600
WHOLE_PROCESS = "ctcolor register (whole process)"


def register_job(fixed_path: str, moving_path: str, ddf_path: str) -> dict:
    """Run in a fresh process: read two images, then time `register` (CT weights, CPU) as the widget calls it; write
    its ddf (LPS mm) for the Dice. Returns ``{"seconds": ...}``."""
    from ..engines.register import register
    from ..io import read_volume, write_vector_nifti

    fixed, moving = read_volume(fixed_path), read_volume(moving_path)
    start = time.perf_counter()
    result = register(fixed, moving, model="ct", device="cpu")
    seconds = time.perf_counter() - start
    write_vector_nifti(result.ddf, fixed, Path(ddf_path))
    return {"seconds": round(seconds, 3)}


def _speed_pairs(quick: bool) -> list[tuple[str, Volume, np.ndarray, Volume, Volume]]:
    """(size label, fixed, fixed masks, moving, moving masks) of the speed bench (`SPEED_SHAPE_XYZ`)."""
    import SimpleITK as sitk

    from ..io import Volume, read_volume
    from ..training.symnet import PHASE_NOISE_HU, chest_masks, chest_pairs, deform_pair, shared_data_dir

    ct = read_volume(shared_data_dir() / "ct" / SPEED_CT)
    image = sitk.Cast(ct.to_sitk(), sitk.sitkFloat32)
    size = [round(n * s / SPEED_MM) for n, s in zip(image.GetSize(), image.GetSpacing(), strict=True)]
    iso = sitk.Resample(
        image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [SPEED_MM] * 3, image.GetDirection(), -1024.0
    )
    want = QUICK_SPEED_SHAPE_XYZ if quick else SPEED_SHAPE_XYZ
    cut = Volume.from_sitk(sitk.RegionOfInterest(iso, want, [(n - w) // 2 for n, w in zip(size, want, strict=True)]))
    rng = np.random.default_rng(51)
    labels = chest_masks(cut.array)
    pair = deform_pair(cut.array, labels, cut.spacing, rng, {"max_mm": 15.0, "noise_hu": (PHASE_NOISE_HU,) * 2})
    geometry = {"spacing": cut.spacing, "origin": cut.origin, "direction": cut.direction}
    moving = Volume(pair.moving[0, 0].numpy(), **geometry)
    fixed = Volume(pair.fixed[0, 0].numpy(), **geometry)
    label = "x".join(map(str, want)) + f" {SPEED_MM:g} mm chest, smooth 15 mm"
    out = [(label, fixed, labels, moving, Volume(pair.moving_labels, **geometry))]
    if not quick:
        ((name, fixed, labels, moving, moving_labels),) = chest_pairs(rng, shrink=1, names=[SPEED_CT])
        out.append(
            ("x".join(map(str, fixed.shape[::-1])) + f" {name} breathing 20 mm", fixed, labels, moving, moving_labels)
        )
    return out


def bench_register_speed(quick: bool) -> list[dict]:
    """Decision 1 of issue 51, measured: on each speed pair (`_speed_pairs`), `IN_PROCESS`, `WHOLE_PROCESS` and every
    installed peer's whole process (``ctcolor peer``), one after the other in this run, each with the Dice of the
    moving masks (lungs, body, ...) warped by its ddf. Ratio rows: ours in process and as a whole process against the
    fastest peer whose Dice ours beats (within 0.002 counts as a tie, not a win). ``quick``: the small cut, demons and
    Greedy."""
    import SimpleITK as sitk

    from ..engines.geometry import warp
    from ..io import write_nifti
    from ..peers import PEER_COMMANDS
    from ..training.symnet import mean_dice

    peers = ["demons", "greedy"] if quick else ["demons", "greedy", "convexadam", "elastix-bspline", "ants-syn"]
    try:
        pairs = _speed_pairs(quick)
    except (InputError, OSError) as exc:
        reason = str(exc).splitlines()[0]
        return [_row("register speed", WHOLE_PROCESS, "cpu", "", "s", note=f"not measured: {reason}")]
    # (item, ctcolor command, options, timeout); the in-process run is a job of its own (`register_job`).
    runs = [(IN_PROCESS, None, None, None), (WHOLE_PROCESS, ["register"], ["--device", "cpu"], None)]
    runs += [(PEER_COMMANDS[name], ["peer", name], [], SPEED_PEER_TIMEOUT_S) for name in peers]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (size, fixed, labels, moving, moving_labels) in enumerate(pairs):
            paths = [Path(tmp) / f"{k}-{x}.nii.gz" for x in ("fixed", "moving")]
            write_nifti(fixed, paths[0])
            write_nifti(moving, paths[1])
            found: dict[str, tuple[float, float]] = {}
            for item, command, options, timeout in runs:
                out = Path(tmp) / f"{k}-{len(found)}"
                if item == IN_PROCESS:
                    out.mkdir()
                    ddf_path = out / "ddf.nii.gz"
                    code = (
                        "import json; from napari_ctcolor.bench.runs import register_job; "
                        f"print(json.dumps(register_job({str(paths[0])!r}, {str(paths[1])!r}, {str(ddf_path)!r})))"
                    )
                    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
                else:
                    try:
                        seconds = _ctcolor([*command, *map(str, paths), "-o", str(out), *options], timeout)
                    except subprocess.TimeoutExpired:
                        note = f"slower than {SPEED_PEER_TIMEOUT_S} s: stopped"
                        rows.append(_row("register speed", item, "cpu", size, "s", note=note))
                        continue
                    except RuntimeError as exc:
                        if item == WHOLE_PROCESS or "pip install" not in str(exc):
                            raise
                        rows.append(_row("register speed", item, "cpu", size, "s", note=f"not run: {exc}"))
                        continue
                ddf = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ddf.nii.gz")))
                dice = mean_dice(labels, warp(moving_labels, fixed, ddf, "nearest", 0))
                found[item] = (seconds, dice)
                print(f"  {size}: {item}: Dice {dice:.3f}, {seconds:.1f} s", file=sys.stderr, flush=True)
                note = f"Dice {dice:.3f}"
                rows.append(_once_row("register speed", item, size, "s", round(seconds, 2), note, dice=round(dice, 4)))
            ours = found[IN_PROCESS][1]
            beaten = {
                item: sec
                for item, (sec, dice) in found.items()
                if item not in (IN_PROCESS, WHOLE_PROCESS) and ours > dice + DICE_TIE
            }
            if beaten:
                peer = min(beaten, key=beaten.get)
                for item in (IN_PROCESS, WHOLE_PROCESS):
                    ratio = found[item][0] / beaten[peer]
                    note = f"{peer}: {beaten[peer]:.1f} s, Dice {found[peer][1]:.3f}; same run"
                    rows.append(
                        _once_row("ratio", f"{item} / fastest peer beaten on Dice", size, "x", round(ratio, 3), note)
                    )
    return rows


#: Inputs of the batch bench: this many copies of a CT, through one `ctcolor batch` on this many local workers.
BATCH_INPUTS, BATCH_WORKERS = 8, 2
BATCH_CT = OASIS_DIR.parent / "ct" / "totalseg-body-3mm-30slices.nii.gz"


def bench_batch(quick: bool, repeats: int, ct_path: Path = BATCH_CT) -> list[dict]:
    """`ctcolor batch colorize` of `BATCH_INPUTS` series on a `BATCH_WORKERS`-worker LocalCluster against as many
    sequential `ctcolor colorize` processes, each a whole process (start-up, cluster, reading, writing) in this run;
    the ratio row is batch / sequential (the target is <= 0.6x). The series are the shared 30-slice CT written as
    NIfTI (``quick``: two 8-slice 64x64 crops of it, one repeat), or phantoms when the shared data is absent.
    """
    from ..io import Volume, read_volume, write_nifti
    from ..phantom import make_phantom

    n, workers = (2 if quick else BATCH_INPUTS), BATCH_WORKERS
    if ct_path.is_file():
        ct = read_volume(ct_path)
        source = "shared 30-slice CT"
    else:
        ct = make_phantom(seed=5, shape=(30, 128, 128), spacing=(3.0, 3.0, 3.0)).volume
        source = "phantom (shared CT absent)"
    array = ct.array[:8, 20:84, 30:94] if quick else ct.array
    label = f"{n} x " + "x".join(map(str, array.shape[::-1]))
    batch_item = f"ctcolor batch colorize, {workers} workers (whole process)"
    single_item = f"{n} x ctcolor colorize (sequential processes)"
    seconds: dict[str, list[float]] = {batch_item: [], single_item: []}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = []
        for k in range(n):  # the copies differ by one voxel, so no two inputs are the same file
            copy = array.copy()
            copy.flat[k] += 1
            path = Path(tmp) / f"series{k}.nii.gz"
            write_nifti(Volume(copy, ct.spacing, ct.origin, ct.direction.copy(), meta=dict(ct.meta)), path)
            inputs.append(str(path))
        for r in range(repeats):
            out = Path(tmp) / f"batch{r}"
            seconds[batch_item].append(
                _ctcolor(["batch", "colorize", *inputs, "-o", str(out), "--workers", str(workers), "--device", "cpu"])
            )
            start = time.perf_counter()
            for k, path in enumerate(inputs):
                _ctcolor(["colorize", path, "-o", str(Path(tmp) / f"single{r}-{k}.nii.gz"), "--device", "cpu"])
            seconds[single_item].append(time.perf_counter() - start)
    rows = [_seconds_row("batch", item, "cpu", label, values, note=source) for item, values in seconds.items()]
    ratio = statistics.median(seconds[batch_item]) / statistics.median(seconds[single_item])
    rows.append(
        _row("ratio", "batch / sequential processes", "cpu", label, "x", median=round(ratio, 2), note="target <= 0.6x")
    )
    return rows


#: The real CT behind the end-to-end series row: 141 slices of 512² at 2 mm, resampled to 1 mm (282 slices).
SERIES_CT = OASIS_DIR.parent / "ct" / "chest-popi-2mm.nii.gz"
SERIES_SLICE_MM = 1.0


def write_bench_series(source: Path, folder: Path, slice_mm: float = SERIES_SLICE_MM) -> int:
    """Write ``source`` resampled to ``slice_mm`` slices (linear, SimpleITK) as a plain uncompressed DICOM CT series
    in ``folder``, as a scanner writes one (CT Image Storage, explicit VR little endian, one file per slice).
    Returns the number of slices. Uses the project's grey DICOM writer, then marks the files as CT acquisitions (the
    writer labels its output Secondary Capture, as a derived image should be)."""
    import pydicom
    import SimpleITK as sitk

    from ..io import read_volume
    from ..io.export import write_grey_dicom

    image = sitk.ReadImage(str(source))
    spacing = (*image.GetSpacing()[:2], slice_mm)
    size = (*image.GetSize()[:2], round(image.GetSize()[2] * image.GetSpacing()[2] / slice_mm))
    resampled = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        spacing,
        image.GetDirection(),
        -1024.0,
        sitk.sitkInt16,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        sitk.WriteImage(resampled, str(path))
        volume = read_volume(path)
    meta = {"modality": "CT", "window": [40.0, 400.0]}
    files = write_grey_dicom(volume, folder, source_meta=meta, derivation="bench series", suffix="bench")
    for file in files:
        dataset = pydicom.dcmread(file)
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        dataset.save_as(file)
    return len(files)


def _ctcolor_peak(args: Sequence[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``ctcolor ARGS`` as its own process. The peak is the child's VmHWM, read
    every 20 ms until it exits (a high-water mark: the last reading holds every earlier peak); its ru_maxrss would
    start from this process's own RSS at the fork."""
    command = [sys.executable, "-m", "napari_ctcolor", *args]
    start = time.perf_counter()
    peak = 0.0
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        status = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                line = next(x for x in status.read_text(encoding="utf-8").splitlines() if x.startswith("VmHWM:"))
                peak = max(peak, int(line.split()[1]) / 1024)
            except (OSError, StopIteration):  # exiting: the last reading stands
                pass
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"ctcolor {' '.join(args)} failed: {errors.read().decode().strip()[-300:]}")
    return seconds, peak


def bench_series(quick: bool, repeats: int, source: Path = SERIES_CT) -> list[dict]:
    """What a user waits for: a whole ``ctcolor colorize FOLDER -o out.nii.gz`` process on a real uncompressed DICOM
    series of 512² slices (`write_bench_series`; ``quick``: its first 2 mm slices, 20 of them), slices/s and the
    process's peak RSS against the int16 input."""
    from ..engines.device import resolve_device

    if not source.is_file():
        return [_row("series", "ctcolor colorize (whole process)", "cpu", "", "slices/s", note="not measured: no CT")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        if quick:
            from ..io import Volume, read_volume
            from ..io.export import write_grey_dicom

            ct = read_volume(source)
            part = Volume(ct.array[:20], ct.spacing, ct.origin, ct.direction, meta={"modality": "CT"})
            count = len(write_grey_dicom(part, folder, source_meta={"modality": "CT", "window": [40.0, 400.0]}))
        else:
            count = write_bench_series(source, folder)
        seconds, peaks = [], []
        for k in range(repeats):
            wall, peak = _ctcolor_peak(["colorize", str(folder), "-o", str(Path(tmp) / f"out{k}.nii.gz")])
            seconds.append(wall)
            peaks.append(peak)
    label = f"512x512x{count}"
    input_mb = count * 512 * 512 * 2 / 2**20
    return [
        _rate_row(
            "series",
            "ctcolor colorize DICOM folder -> .nii.gz (whole process)",
            resolve_device("auto").type,  # what the command's default --device auto runs on
            label,
            count,
            seconds,
            note=f"{source.name} at {SERIES_SLICE_MM:g} mm, uncompressed DICOM; peak RSS {max(peaks):.0f} MB "
            f"({max(peaks) / input_mb:.1f}x the int16 input, start-up included)",
        )
    ]


PIPELINE_CT = OASIS_DIR.parent / "ct" / "totalseg-abdomen-dicom"
PIPELINE_SLICES = 400


def _network_share(volume: Volume, device: str) -> tuple[float, float]:
    """(seconds in the network's forward passes, seconds of the whole call) of one `colorize` of ``volume``: the
    shipped 2D network timed inside the real pipeline by hooks around its forward (they wait for the device, so
    this call runs a little slower than an untimed one)."""
    from ..engines.colorize import colorize, get_colorizer

    net, _ = get_colorizer("colorizer-2d")
    started, spent = [0.0], [0.0]

    def before(_module: nn.Module, _args: Any) -> None:
        _sync(device)
        started[0] = time.perf_counter()

    def after(_module: nn.Module, _args: Any, _out: Any) -> None:
        _sync(device)
        spent[0] += time.perf_counter() - started[0]

    hooks = net.register_forward_pre_hook(before), net.register_forward_hook(after)
    try:
        start = time.perf_counter()
        colorize(volume, net, window="abdomen", device=device)
        _sync(device)
        return spent[0], time.perf_counter() - start
    finally:
        for hook in hooks:
            hook.remove()


def bench_pipeline(quick: bool, repeats: int, source: Path = PIPELINE_CT) -> list[dict]:
    """Where colorize's time goes, per device: the network's forward passes alone, the whole pipeline in process
    (reading HU from memory to the sRGB array) with the share of its time outside the network, and whole
    ``ctcolor colorize`` processes (start-up, reading and writing included) of the DICOM series and of a
    `PIPELINE_SLICES`-slice ``.nii.gz`` (the series repeated forwards and backwards; ``quick``: 20 slices)."""
    from ..engines.colorize import colorize
    from ..io import Volume, read_volume, write_nifti

    if not source.is_dir():
        return [_row("pipeline", "colorize() in process", "cpu", "", "slices/s", note=f"not measured: no {source}")]
    series = read_volume(source)
    count = series.shape[0] if quick else PIPELINE_SLICES
    order = np.concatenate(
        [np.arange(series.shape[0])[:: 1 - 2 * (k % 2)] for k in range(-(-count // series.shape[0]))]
    )
    volume = Volume(series.array[order[:count]], series.spacing, series.origin, series.direction, dict(series.meta))
    size = "x".join(str(n) for n in volume.shape[::-1])  # the in-process rows
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        nifti = Path(tmp) / "ct.nii.gz"
        write_nifti(volume, nifti)
        for device in _devices():
            colorize(volume, window="abdomen", device=device)  # warm: the model, the kernels, the allocator
            network, hooked = _network_share(volume, device)
            share = f"outside the network: {1 - network / hooked:.0%} of a call timed with it (same run)"
            rows.append(
                _rate_row("pipeline", "network alone (forward passes inside colorize)", device, size, count, [network])
            )

            def run(device: str = device) -> None:
                colorize(volume, window="abdomen", device=device)

            seconds = _time(run, repeats, device, warmup=0)
            rows.append(_rate_row("pipeline", "colorize() in process", device, size, count, seconds, note=share))
            for label, path, processed in (
                ("ctcolor colorize .nii.gz -> .nii.gz (whole process)", nifti, volume),
                ("ctcolor colorize DICOM folder -> .nii.gz (whole process)", source, series),
            ):
                out = str(Path(tmp) / f"out-{device}.nii.gz")
                arguments = ["colorize", str(path), "-o", out, "--window", "abdomen", "--device", device, "--overwrite"]
                shape = "x".join(str(n) for n in processed.shape[::-1])
                walls = [_ctcolor(arguments)]
                rows.append(
                    _rate_row(
                        "pipeline", label, device, shape, processed.shape[0], walls, note="start-up, reading, writing"
                    )
                )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# register-device: whole ``ctcolor register`` processes on every device of this machine in the same run (the GPU
# bundle's rows, docs/gpu-server.md), with the share of each engine stage. The pairs need only the shared data the
# bundle carries: the 3 mm CT against a smooth deformation of itself, and the 20-slice 512² contrast series repeated
# forwards and backwards to `LARGE_SLICES` slices against itself turned `TURN_DEG` about the patient's long axis and
# moved `SHIFT_MM` to the patient's left (``quick``: the 30-slice cut, and the 20 slices at 128²).
# ---------------------------------------------------------------------------------------------------------------------

LARGE_SLICES = 141
TURN_DEG, SHIFT_MM = 4.0, 7.0
DEVICE_SECTION = "register device"
DEVICE_ITEM = "ctcolor register (whole process)"


def _device_pairs(data: Path, quick: bool) -> list[tuple[str, Volume, Volume]]:
    """(label, fixed, moving) of the section's pairs."""
    from ..engines.geometry import turned
    from ..io import Volume, read_volume
    from ..training.symnet import PHASE_NOISE_HU, deform_pair

    small = read_volume(data / "ct" / ("totalseg-body-3mm-30slices.nii.gz" if quick else "totalseg-body-3mm.nii.gz"))
    rng = np.random.default_rng(81)
    labels = np.zeros(small.shape, dtype=np.uint8)
    pair = deform_pair(small.array, labels, small.spacing, rng, {"max_mm": 15.0, "noise_hu": (PHASE_NOISE_HU,) * 2})
    geometry = {"spacing": small.spacing, "origin": small.origin, "direction": small.direction}
    out = [
        (
            "x".join(map(str, small.shape[::-1])) + " 3 mm CT, smooth 15 mm",
            Volume(pair.fixed[0, 0].numpy(), **geometry),
            Volume(pair.moving[0, 0].numpy(), **geometry),
        )
    ]
    series = read_volume(data / "ct" / "totalseg-abdomen-dicom")
    count = series.shape[0] if quick else LARGE_SLICES
    order = np.concatenate(
        [np.arange(series.shape[0])[:: 1 - 2 * (k % 2)] for k in range(-(-count // series.shape[0]))]
    )
    step = 4 if quick else 1  # quick: every 4th pixel in-plane (128²)
    spacing = (series.spacing[0], series.spacing[1] * step, series.spacing[2] * step)
    large = Volume(series.array[order[:count], ::step, ::step], spacing, series.origin, series.direction)
    label = "x".join(map(str, large.shape[::-1])) + f" contrast series, turned {TURN_DEG:g} deg, moved {SHIFT_MM:g} mm"
    out.append((label, large, turned(large, TURN_DEG, SHIFT_MM)))
    return out


def _stage_shares(metrics: dict) -> str:
    stages = metrics.get("stage_seconds") or {}
    total = sum(stages.values()) or 1.0
    return ", ".join(f"{name} {seconds / total:.0%}" for name, seconds in stages.items())


def bench_register_device(quick: bool) -> list[dict]:
    """One whole ``ctcolor register`` process per pair (`_device_pairs`) and device, in this run: its wall seconds, with
    NCC before and after and the share of each engine stage in the note."""
    from ..io import write_nifti
    from ..training.data import shared_data_dir

    try:
        data = shared_data_dir()
        pairs = _device_pairs(data, quick)
    except (OSError, InputError) as exc:
        return [_row(DEVICE_SECTION, DEVICE_ITEM, "cpu", "", "s", note=f"not measured: {str(exc).splitlines()[0]}")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, fixed, moving) in enumerate(pairs):
            paths = [Path(tmp) / f"{k}-{name}.nii.gz" for name in ("fixed", "moving")]
            write_nifti(fixed, paths[0])
            write_nifti(moving, paths[1])
            for device in _devices():
                out = Path(tmp) / f"{k}-{device}"
                seconds = _ctcolor(["register", *map(str, paths), "-o", str(out), "--device", device])
                metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
                note = (
                    f"NCC {metrics['ncc_before']:.3f} -> {metrics['ncc_after']:.3f}; stages: {_stage_shares(metrics)}"
                )
                rows.append(_seconds_row(DEVICE_SECTION, DEVICE_ITEM, device, label, [seconds], note=note))
    return rows


#: ``ctcolor bench --only`` section names.
SECTIONS = (
    "colorize",
    "pipeline",
    "series",
    "memory",
    "register",
    "register-ct",
    "register-speed",
    "register-device",
    "batch",
)


def run_bench(
    quick: bool = False, log: Callable[[str], None] | None = None, only: Sequence[str] = SECTIONS
) -> dict[str, Any]:
    """The benchmarks of the sections in ``only`` (all by default); ``quick`` is a smoke run (tiny volumes, 1 warm-up
    + 2 repeats, no full-size registration or RSS subprocess). Returns ``{"machine": ..., "quick": ..., "seconds":
    ..., "sections": [...], "rows": [...]}``.
    """
    log = log or (lambda _message: None)
    start = time.perf_counter()
    info = machine_info()
    rows: list[dict] = []
    if "colorize" in only:
        log("colorize" + " (quick)" * quick)
        rows += bench_colorize(slices=4, repeats=1) if quick else bench_colorize(slices=60, repeats=5)
    if "pipeline" in only:
        log("pipeline (network alone, in process and whole processes, per device" + ", quick: 20 slices" * quick + ")")
        rows += bench_pipeline(quick=quick, repeats=1 if quick else 3)
    if "series" in only:
        log("series (a whole ctcolor colorize process on a real DICOM folder" + ", quick: 20 slices" * quick + ")")
        rows += bench_series(quick=quick, repeats=1 if quick else 3)
    if "memory" in only:
        if quick:
            note = "not measured: --quick"
            rows.append(_row("memory", "colorizer-2d peak RSS - baseline", "cpu", "512x512x600", "MB", note=note))
        else:
            log("peak RSS, 512x512x600 (subprocess)")
            rows += bench_rss()
    if "register" in only:
        log("register (OASIS pair" + ", quick: 64^3 crop)" * quick + ")" * (not quick))
        rows += bench_register(quick=quick, repeats=1 if quick else 3)
    if "register-ct" in only:
        log("register CT (deformations of the shared CTs, whole processes" + ", quick: one pair" * quick + ")")
        rows += bench_register_ct(quick=quick)
    if "register-speed" in only:
        log(
            "register speed (ours in process and as a process against every peer" + ", quick: a small cut" * quick + ")"
        )
        rows += bench_register_speed(quick=quick)
    if "register-device" in only:
        log("register on each device (whole processes" + ", quick: the 30-slice cut, 20 slices of 128²" * quick + ")")
        rows += bench_register_device(quick=quick)
    if "batch" in only:
        log(f"batch ({BATCH_INPUTS} series, {BATCH_WORKERS}-worker LocalCluster vs sequential processes)")
        rows += bench_batch(quick=quick, repeats=1 if quick else 3)
    seconds = round(time.perf_counter() - start, 1)
    return {"machine": info, "quick": quick, "seconds": seconds, "sections": list(only), "rows": rows}


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


#: What each section measures, for the markdown section (only the sections that ran are described).
_DESCRIPTIONS = (
    (
        ("colorize", "memory"),
        "Colorize: end to end (HU in memory -> network -> sRGB uint8), phantom CT at 0.78 mm (512²) and 1.56 mm "
        "(256²) pixels, window abdomen, chroma 1; the peer is the seed thesis's network alone (random weights) at full "
        "resolution.",
    ),
    (
        ("pipeline",),
        "Pipeline: the shared 20-slice contrast abdomen DICOM series (512²) repeated forwards and backwards to "
        f"{PIPELINE_SLICES} slices; the network's forward passes timed inside one colorize call (hooks that wait "
        "for the device), the whole colorize call in process (HU in memory -> sRGB uint8, window abdomen), and whole "
        "`ctcolor colorize` processes of that volume as .nii.gz and of the DICOM series, on each device.",
    ),
    (
        ("series",),
        "Series: a whole `ctcolor colorize FOLDER -o out.nii.gz` process (start-up, DICOM reading, network, "
        "composition, gzip NIfTI writing) on the shared 2 mm Philips chest CT resampled to 1 mm and written as an "
        "uncompressed DICOM series of 282 slices of 512²; peak RSS of that process (its VmHWM).",
    ),
    (
        ("register",),
        "Register: the OASIS pair with the official SYMNet checkpoint; every method is a whole process in "
        "this run (`ctcolor register`, `ctcolor peer official-symnet`, the official inference recipe reimplemented, "
        "and `ctcolor peer` for ANTs SyN: SyNOnly, Mattes, 100/70/50 iterations; elastix: default B-spline map, 20 mm "
        "grid, 256 iterations; SimpleITK fast symmetric demons, 50 iterations), wall seconds including start-up, "
        "reading and writing.",
    ),
    (
        ("register-ct",),
        "Register CT: Dice (mean over structures of >= 100 voxels) after registering held-out synthetic deformations "
        "(<= 15 mm; seed never used in training) of the shared labelled CTs on their native grids (the 3 mm CT is in "
        "the training set with other deformations, the DICOM series never is), and two breathing-like deformations (<="
        " 20 mm, the lung bases most) of each unlabelled chest CT (in-plane pixels averaged 2x2) with lungs, bone and "
        "airways from HU as labels: one smooth across the chest (the spine moves too), one that slides along the chest"
        " wall (the lungs, mediastinum and abdomen move; the spine, ribs and body wall stay); each pair also with the "
        "moving scan in another contrast phase (labelled: arteries -150 HU, veins and liver brighter, kidneys and "
        "spleen darker; chest: enhancing soft tissue +80 HU; 20 HU noise). `ctcolor register` with its defaults and "
        "with `--refine 0`, and `ctcolor peer` for each peer, every one a whole process in this run (start-up, reading"
        " and writing NIfTI included); the moving labels are warped through each written ddf.nii.gz by SimpleITK "
        "(nearest).",
    ),
    (
        ("register-device",),
        "Register device: a whole `ctcolor register` process (CT weights, defaults) per pair and device in this run: "
        "the 3 mm CT against a smooth 15 mm deformation of itself, and the 20-slice contrast series repeated to 141 "
        "slices of 512² against itself turned 4 degrees about the long axis and moved 7 mm; NCC and each engine "
        "stage's share in the note.",
    ),
    (
        ("batch",),
        "Batch: `ctcolor batch colorize` of 8 series (copies of the shared 30-slice CT) on a 2-worker LocalCluster "
        "against 8 sequential `ctcolor colorize` processes, each a whole process in this run, wall seconds including "
        "start-up, reading and writing.",
    ),
)


def markdown_section(report: dict[str, Any]) -> str:
    """A BENCHMARKS.md-style dated section for a `run_bench` report."""
    info = report["machine"]
    kind = "quick smoke run" if report["quick"] else "full run"
    if list(report.get("sections", SECTIONS)) != list(SECTIONS):
        kind += ", sections " + ", ".join(report["sections"])
    gpu = "GPU" if info["gpu"] != "none" else "CPU"
    return (
        f"## {info['date']}, {gpu} (`ctcolor bench`{' --quick' if report['quick'] else ''}, {kind}, "
        f"{report['seconds']} s)\n\n"
        f"{machine_line(info)}\n\n"
        f"{' '.join(text for names, text in _DESCRIPTIONS if set(names) & set(report.get('sections', SECTIONS)))}\n\n"
        f"{markdown_table(report['rows'])}\n"
    )
