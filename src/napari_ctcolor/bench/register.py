"""`ctcolor bench` sections of registration: ``register`` (the OASIS pair against the official recipe and the
classical peers), ``register-ct`` (deformations of the shared CTs), ``register-speed`` (ours against the fastest peers)
and ``register-device`` (whole processes on every device)."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from .common import OASIS_DIR, bench_devices, ctcolor_seconds, make_row, ncc_of, once_row, seconds_row, stats_row

if TYPE_CHECKING:
    from ..io import Volume


OASIS_CHECKPOINT = "SYMNet_neurite_oasis_smo30_update_80000.pth"
#: Issue 51's decision 3: a Dice difference within this of a peer is a tie on any one pair.
DICE_TIE = 0.002


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
            make_row("register", m, "cpu", label, "s", note="not measured: shared data absent")
            for m in (ours, official)
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
                seconds.setdefault(item, []).append(
                    ctcolor_seconds([*command, *map(str, paths), "-o", str(out), *options])
                )
            warped[item] = nib.load(str(out / "warped.nii.gz")).get_fdata(dtype=np.float32)
        ratio = statistics.median(seconds[official]) / statistics.median(seconds[ours])
        for item in (ours, official):
            note = f"{ratio:.2f}x the official recipe, same run" if item == ours else ""
            if not quick:  # the network on a crop is not the reference's registration
                # The reference is in min-max units of the moving image; ours is in the moving image's own units.
                low, high = float(moving.min()), float(moving.max())
                diff = np.abs(((warped[item] - low) / (high - low) if item == ours else warped[item]) - reference)
                note = "; ".join(filter(None, (note, f"max abs(warped - official reference) {diff.max():.2g}")))
            rows.append(seconds_row("register", item, "cpu", label, seconds[item], note=note))
        for name in peers:
            item = PEER_COMMANDS[name]
            note = f"NCC {ncc_of(fixed, moving):.3f} -> {ncc_of(fixed, warped[item]):.3f}"
            rows.append(seconds_row("register", item, "cpu", label, seconds[item], note=note))
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
        return [make_row("register CT", m, "cpu", "", "Dice", note=f"not measured: {reason}") for m in items]
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
                    seconds = ctcolor_seconds([*command, *map(str, paths), "-o", str(out), *options])
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
        rows.append(stats_row("register CT", item, "cpu", size, "Dice", dice, note=note))
        rows.append(seconds_row("register CT", item, "cpu", size, seconds, note="whole process"))
    rows += [make_row("register CT", m, "cpu", "", "Dice", note=f"not run: {why}") for m, why in unavailable.items()]
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
        return [make_row("register speed", WHOLE_PROCESS, "cpu", "", "s", note=f"not measured: {reason}")]
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
                        "import json; from napari_ctcolor.bench.register import register_job; "
                        f"print(json.dumps(register_job({str(paths[0])!r}, {str(paths[1])!r}, {str(ddf_path)!r})))"
                    )
                    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
                else:
                    try:
                        seconds = ctcolor_seconds([*command, *map(str, paths), "-o", str(out), *options], timeout)
                    except subprocess.TimeoutExpired:
                        note = f"slower than {SPEED_PEER_TIMEOUT_S} s: stopped"
                        rows.append(make_row("register speed", item, "cpu", size, "s", note=note))
                        continue
                    except RuntimeError as exc:
                        if item == WHOLE_PROCESS or "pip install" not in str(exc):
                            raise
                        rows.append(make_row("register speed", item, "cpu", size, "s", note=f"not run: {exc}"))
                        continue
                ddf = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ddf.nii.gz")))
                dice = mean_dice(labels, warp(moving_labels, fixed, ddf, "nearest", 0))
                found[item] = (seconds, dice)
                print(f"  {size}: {item}: Dice {dice:.3f}, {seconds:.1f} s", file=sys.stderr, flush=True)
                note = f"Dice {dice:.3f}"
                rows.append(once_row("register speed", item, size, "s", round(seconds, 2), note, dice=round(dice, 4)))
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
                        once_row("ratio", f"{item} / fastest peer beaten on Dice", size, "x", round(ratio, 3), note)
                    )
    return rows


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
        return [make_row(DEVICE_SECTION, DEVICE_ITEM, "cpu", "", "s", note=f"not measured: {str(exc).splitlines()[0]}")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, fixed, moving) in enumerate(pairs):
            paths = [Path(tmp) / f"{k}-{name}.nii.gz" for name in ("fixed", "moving")]
            write_nifti(fixed, paths[0])
            write_nifti(moving, paths[1])
            for device in bench_devices():
                out = Path(tmp) / f"{k}-{device}"
                seconds = ctcolor_seconds(["register", *map(str, paths), "-o", str(out), "--device", device])
                metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
                note = (
                    f"NCC {metrics['ncc_before']:.3f} -> {metrics['ncc_after']:.3f}; stages: {_stage_shares(metrics)}"
                )
                rows.append(seconds_row(DEVICE_SECTION, DEVICE_ITEM, device, label, [seconds], note=note))
    return rows
