"""Paired comparison of recipes, colorizer or SYMNet: ``ctcolor train compare BASE.yaml VARIANT.yaml ... --seeds 3
--finetune [--jobs N]``.

Two trainings of one recipe with different seeds differ, on the held-out rows, by as much as most changes under test
(one run per recipe moved the held-out aorta by several points). A change is therefore settled by a **paired**
comparison: every arm (the base recipe and each variant) is trained with the same seeds, hence the same data order
wherever the change leaves the sampler's draws alone, and the effect is the per-seed difference variant - base, given
with its spread. The unpaired spread (what two independent runs of each arm would show) is printed beside it.

- A VARIANT file holds only what it changes: its keys replace the base's (nested mappings are merged), e.g.
  ``confusion: 1.0``.
- ``finetune``: each arm starts from the base recipe's own weights (``weights/NAME.safetensors``, or
  ``weights/validation/`` for a leave-one-out recipe) and trains `FINETUNE_STEPS` steps at a tenth of the recipe's
  learning rate: minutes on a CPU where a training from scratch takes half an hour. Without it, each arm trains from
  scratch with the recipe's steps (the offline GPU bundle's sweeps).
- The training data are prepared once for all arms and seeds (`prepare.prepare_training_data`'s cache).
- Each model is measured only on what a comparison weighs (`measures`): how the held-out patients' anatomy is named
  in every exam of the matrix (`training.exams`) and the unlabelled chest CTs' blood pool; the full model card is made
  once, for the arm that is kept, by ``ctcolor train colorizer``.
- Every run writes its measures to ``OUT/ARM/seed-N.measures.json`` (its weights and card beside them): a comparison
  stopped part-way continues where it stopped, and one measured without a chest CT (the offline GPU bundle's) is
  measured again where it is.
- A SYMNet recipe's models are measured through the registration engine (`symnet_measures`).
- ``--jobs N``: N runs at once, each in a spawned process of its own (`_concurrent_runs`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io.write import atomic_path
from .colorizer import VALIDATION_DIR, TrainConfig, train_colorizer
from .data import case_name, read_config

#: Steps of a fine-tuning arm, and its learning rate as a share of the recipe's.
FINETUNE_STEPS = 300
FINETUNE_LR_SHARE = 0.1


def merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the keys of ``change`` replaced; nested mappings are merged key by key."""
    out = copy.deepcopy(base)
    for key, value in change.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of a comparison: its name (``base`` or the variant file's stem) and its recipe (a colorizer's
    `TrainConfig` or SYMNet's `SymnetTrainConfig`)."""

    name: str
    train: Any


def recipe_class(raw: dict[str, Any]) -> type:
    """The training config class of a recipe's mapping: a colorizer's has a ``model`` section, SYMNet's not."""
    from .symnet import SymnetTrainConfig

    return TrainConfig if "model" in raw else SymnetTrainConfig


def arms(base: Path, variants: list[Path]) -> list[Arm]:
    """The base recipe and each variant (the base with the variant's keys), checked as training configs."""
    raw = read_config(base)
    kind = recipe_class(raw)
    out = [Arm("base", kind.from_dict(raw, base))]
    for path in variants:
        name = Path(path).stem
        if name in {arm.name for arm in out}:
            raise InputError(f"{path}: two arms named {name!r}; rename one variant file")
        train = kind.from_dict(merge(raw, read_config(path)), path)
        if train == out[0].train:
            raise InputError(f"{path}: a variant that changes nothing is not a comparison")
        out.append(Arm(name, train))
    return out


def sweep_data(recipes: Sequence[Path], variants: Sequence[Path], finetune: bool = False) -> dict[str, list[str]]:
    """What comparing each of ``recipes`` against ``variants`` reads from the shared data, checked before a sweep
    starts (the offline GPU bundle's ``run.sh --sweep``): ``missing``, the files its training reads that are neither
    there nor prepared (`prepare.prepared_partial_path`); ``unmeasured``, the chest CTs whose blood pools its
    measures leave out for want of them (`chests_at_hand`). ``finetune``: runs start from the shipped weights, not
    from a recipe's ``init``."""
    from ..models.colorizer import ColorizerConfig
    from .data import shared_data_dir
    from .prepare import prepared_partial_path

    data = shared_data_dir()
    missing, unmeasured = set(), set()
    for recipe in recipes:
        for arm in arms(Path(recipe), [Path(v) for v in variants]):
            train = arm.train
            needed = [f"ct/{name}" for entry in train.real_train + train.real_val for name in entry[:2]]
            if not isinstance(train, TrainConfig):  # SYMNet: its official starting checkpoint too
                needed += [train.init] if train.init and not finetune else []
                missing |= {name for name in needed if not (data / name).exists()}
                continue
            config = ColorizerConfig.from_dict(train.model)
            for entry in train.real_partial:
                if not prepared_partial_path(data, entry, config, train.partial_aorta).is_file():
                    needed += [f"ct/{entry[0]}", *[f"ct/{name}" for name in entry[2:3]]]
            missing |= {name for name in needed if not (data / name).exists()}
            unmeasured |= set(train.tissue_val) - set(chests_at_hand(train))
    return {"missing": sorted(missing), "unmeasured": sorted(unmeasured)}


def prepare_partials(recipes: Sequence[Path], variants: Sequence[Path], folder: Path) -> list[Path]:
    """The prepared case of every chest CT (``real_partial``) that ``recipes`` and ``variants`` train on, written
    to ``folder`` from the shared data (`prepare.write_prepared_partial`): what the offline GPU bundle carries in
    place of the CTs."""
    from ..models.colorizer import ColorizerConfig
    from .data import shared_data_dir
    from .prepare import write_prepared_partial

    written = set()
    for recipe in recipes:
        for arm in arms(Path(recipe), [Path(v) for v in variants]):
            if not isinstance(arm.train, TrainConfig):
                continue
            config = ColorizerConfig.from_dict(arm.train.model)
            for entry in arm.train.real_partial:
                written.add(write_prepared_partial(shared_data_dir(), entry, config, arm.train.partial_aorta, folder))
    return sorted(written)


def start_weights(train: TrainConfig, weights_dir: Path) -> Path:
    """The base recipe's own weights, where a fine-tuning starts: ``weights_dir/NAME.safetensors``, else in its
    ``validation`` folder (a leave-one-out recipe's)."""
    for path in (weights_dir / f"{train.name}.safetensors", weights_dir / VALIDATION_DIR / f"{train.name}.safetensors"):
        if path.is_file():
            return path
    raise InputError(
        f"{weights_dir}: no weights named {train.name!r} to fine-tune from (train the recipe first, or compare "
        "without --finetune)"
    )


def run_config(arm: Arm, seed: int, init: Path | None, steps: int | None, lr_share: float) -> TrainConfig:
    """The arm's recipe for one seed: fine-tuned from ``init`` for ``steps`` at ``lr_share`` of its rate, or from
    scratch (``init`` None) with its own steps unless ``steps`` is given."""
    train = arm.train
    changes: dict[str, Any] = {"seed": seed, "name": f"{train.name}-{arm.name}-seed{seed}"}
    if init is not None:
        changes.update(init=str(init), steps=steps or FINETUNE_STEPS, lr=train.lr * lr_share)
    elif steps:
        changes["steps"] = steps
    return dataclasses.replace(train, **changes)


@dataclasses.dataclass
class ExamSet:
    """What `measures` reads that no model changes, made once per comparison (`exam_set`): the held-out labelled
    patients' exam versions as (patient, exam, version), and the unlabelled chest CTs with their blood pools and the
    pool values to measure, as (name, CT, pool, values)."""

    labelled: list[tuple[str, str, Any]]
    chests: list[tuple[str, Any, np.ndarray, tuple[float, ...]]]


def exam_set(train: TrainConfig, exams: Sequence[str] | None = None) -> ExamSet:
    """The exams of ``train``'s held-out patients (``real_val`` not in ``real_train``: every version of
    `evaluate.exam_versions`, its blood in each contrast phase and the other fields of view and scan ranges where it
    has them) and of its unlabelled chest CTs (``tissue_val``: the blood pool at each of `evaluate.POOL_HU`).
    ``exams``: only these (e.g. ``arterial_300``, ``pool_450``); None: all."""
    from ..io import read_volume
    from .data import shared_data_dir
    from .evaluate import POOL_HU, chest_pool, exam_versions
    from .prepare import real_cases

    trained = {entry[0].split(".")[0] for entry in train.real_train}
    labelled = [
        (case.name, exam, version)
        for case in real_cases(train.real_val)
        if case.name not in trained
        for exam, version in exam_versions(case)
        if exams is None or exam in exams
    ]
    values = tuple(v for v in POOL_HU if exams is None or f"pool_{v:.0f}" in exams)
    chests = []
    for name in chests_at_hand(train) if values else []:
        ct = read_volume(shared_data_dir() / "ct" / name)
        chests.append((name.split(".")[0], ct, chest_pool(ct), values))
    return ExamSet(labelled, chests)


def chests_at_hand(train: TrainConfig) -> list[str]:
    """``train``'s unlabelled chest CTs (``tissue_val``) that are in the shared data. The offline GPU bundle has no
    room for them: a comparison run there is measured without their blood pools, and measured again where they are
    (`compare` adds them to the runs it finds)."""
    from .data import shared_data_dir

    return [name for name in train.tissue_val if (shared_data_dir() / "ct" / name).exists()]


def measures(model, exams: ExamSet) -> dict[str, float]:
    """What a comparison weighs, as ``{"PATIENT EXAM STRUCTURE measure": share}``: in each exam of ``exams``
    (`exam_set`), how the most probable class names the aorta, heart, vertebrae, ribs, liver, spleen and kidneys
    (``bone``, ``blood``: wrongly named as bone or as blood; ``right``: as the structure or its tissue) and the spinal
    canal (``bone``); and each chest CT's blood pool named bone (`evaluate.pool_metrics`)."""
    from .evaluate import named_classes, pool_metrics

    out: dict[str, float] = {}
    for patient, exam, version in exams.labelled:
        named, _ = named_classes(model, version)
        for group, row in named["named"].items():
            name = f"{patient} {exam} {group}"
            if row is not None and "right" in row:  # the spinal canal has only its bone share
                out[f"{name} right"] = row["right"] + row["tissue"]
            for measure in ("bone", "blood"):
                if row is not None and measure in row:
                    out[f"{name} {measure}"] = row[measure]
    for name, ct, pool, values in exams.chests:
        for row in pool_metrics(model, ct, pool, values):
            out[f"{name} {row['exam']} blood_pool bone"] = row["pool_bone"]
    return out


def exam_names() -> list[str]:
    """Every exam `measures` can take: the contrast phases, scan range and field of view of a labelled patient, the
    blood pool values of a chest CT."""
    from .evaluate import POOL_HU
    from .exams import PHASES

    return [*PHASES, "above_pelvis", "cut_fov", *(f"pool_{value:.0f}" for value in POOL_HU)]


def symnet_measures(weights: Path, train: Any, log=print, cases: Sequence[str] | None = None) -> dict[str, float]:
    """What a comparison of SYMNet recipes weighs, through the production engine (`evaluate_symnet`): per held-out
    case (``cases``: only those named; None: all), the mean Dice after registration (``dice``) and the share of folded
    voxels (``folding``); and the network's own map of the last of them against itself turned `TURN_DEG` and moved
    `SHIFT_MM`, then turned back as a perfect pre-alignment would (no pre-alignment, no refinement; the engine's
    early exits would end such a pair before the network): the share of the body with det J within 0.95-1.05
    (``near_1``), where nothing deforms."""
    from ..engines.geometry import turned
    from ..engines.register import register
    from .data import load_real_case, shared_data_dir
    from .symnet import evaluate_symnet

    if cases is not None:
        train = dataclasses.replace(train, real_val=[pair for pair in train.real_val if case_name(pair[0]) in cases])
    out: dict[str, float] = {}
    for case, row in evaluate_symnet(weights, train, log)["by_case"].items():
        out[f"{case} dice"], out[f"{case} folding"] = row["dice_after"], row["folding_fraction"]
    case = load_real_case(shared_data_dir(), *train.real_val[-1][:2])
    realigned = turned(case.ct, TURN_DEG, SHIFT_MM, back=True)
    result = register(case.ct, realigned, model=weights, affine=False, refine=0)
    out[f"{case.name} turned near_1"] = result.metrics["jacobian_body_near_1_fraction"]
    return out


#: The rigid motion of `symnet_measures` (the bench's register-device pair's).
TURN_DEG, SHIFT_MM = 4.0, 7.0


def lower_is_better(measure: str) -> bool:
    """Every measure is a share of wrong names or folded voxels except ``right``, ``dice`` and ``near_1``."""
    return not measure.endswith((" right", " dice", " near_1"))


def paired_table(results: dict[str, dict[int, dict[str, float]]], start: dict[str, float] | None) -> list[dict]:
    """Per variant and measure: the start model's value, the mean of the base and the variant over seeds, the
    per-seed difference variant - base (mean and standard deviation: the paired spread), the unpaired spread (the
    standard deviation of the difference of two independent runs, sqrt(var base + var variant)), and the seeds on
    which the variant is better."""
    base = results["base"]
    rows = []
    for arm, runs in results.items():
        if arm == "base":
            continue
        seeds = sorted(set(runs) & set(base))
        keys = sorted(set.intersection(*(set(base[s]) & set(runs[s]) for s in seeds))) if seeds else []
        for key in keys:
            b = np.array([base[s][key] for s in seeds])
            v = np.array([runs[s][key] for s in seeds])
            diff = v - b
            spread = lambda a: float(a.std(ddof=1)) if len(a) > 1 else math.nan  # noqa: E731
            better = (diff < 0) if lower_is_better(key) else (diff > 0)
            rows.append(
                {
                    "variant": arm,
                    "measure": key,
                    "start": None if start is None else start.get(key),
                    "base": float(b.mean()),
                    "variant_mean": float(v.mean()),
                    "diff": float(diff.mean()),
                    "paired_sd": spread(diff),
                    "unpaired_sd": math.sqrt(spread(b) ** 2 + spread(v) ** 2) if len(seeds) > 1 else math.nan,
                    "better_seeds": f"{int(better.sum())}/{len(seeds)}",
                }
            )
    return rows


def markdown(rows: list[dict], only_changed: float = 0.0) -> str:
    """The table of `paired_table` in markdown, in percent; rows whose base, variant and start all stay below
    ``only_changed`` are left out (a structure named right nowhere wrong in any arm)."""
    head = "| variant | measure | start | base | variant | paired diff | paired sd | unpaired sd | better |"
    lines = [head, "|" + "---|" * 9]

    def pct(value):
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"

    for row in rows:
        values = [row["base"], row["variant_mean"], row["start"] or 0.0]
        if lower_is_better(row["measure"]) and max(values) < only_changed:
            continue
        lines.append(
            f"| {row['variant']} | {row['measure']} | {pct(row['start'])} | {pct(row['base'])} | "
            f"{pct(row['variant_mean'])} | {100 * row['diff']:+.2f} | {pct(row['paired_sd'])} | "
            f"{pct(row['unpaired_sd'])} | {row['better_seeds']} |"
        )
    return "\n".join(lines)


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


def _measurer(train: Any, exams: Sequence[str] | None, log):
    """``measured(weights) -> measures`` for the comparison whose base recipe is ``train``; a colorizer's exams are
    made once, when the first model is measured."""
    from ..weights import load_colorizer

    if not isinstance(train, TrainConfig):
        return lambda weights: symnet_measures(weights, train, log, exams)
    made = None

    def measured(weights: Path) -> dict[str, float]:
        nonlocal made
        made = made or exam_set(train, exams)
        return measures(load_colorizer(weights)[0], made)

    return measured


def _kept_record(path: Path, settings: dict) -> dict | None:
    """The record a stopped comparison left at ``path`` (None: none); `InputError` where other settings made it."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("settings") != json.loads(json.dumps(settings)):
        raise InputError(
            f"{path}: made with other settings (recipe, steps, exams, pairs or start weights); use another --out"
        )
    return record


def _one_run(folder: Path, seed: int, train: Any, settings: dict, measured, device: str, data_cache, log) -> dict:
    """One arm's run for one seed: its record ``folder/seed-N.measures.json`` (its weights and card beside it) as
    found, measured again where chest CTs it lacked are now at hand, or trained and measured now."""
    from ..weights import save_weights

    path, weights = folder / f"seed-{seed}.measures.json", folder / f"seed-{seed}.safetensors"
    colorizer = isinstance(train, TrainConfig)
    record = _kept_record(path, settings)
    if record is not None:
        if colorizer and set(chests_at_hand(train)) - set(record.get("chests", [])):  # trained where they were not
            log(f"{folder.name}, seed {seed}: measuring again with {', '.join(chests_at_hand(train))}")
            record.update(measures=measured(weights), chests=chests_at_hand(train))
            _write_json(path, record)
        return record
    log(f"{folder.name}, seed {seed}: {'fine-tuning' if train.init else 'training'} {train.steps} steps")
    t0 = time.time()
    if colorizer:
        model, train, facts = train_colorizer(
            train, folder.parent / "checkpoints", device, log=log, data_cache=data_cache
        )
        card = {"architecture": {"config": model.config.to_dict()}}
    else:  # the engine reads SYMNet's inputs (axes, window, voxel size) from its card
        from .symnet import model_card, train_symnet

        model, train, facts = train_symnet(train, folder.parent / "checkpoints", device, log=log)
        card = model_card(model, train, Path(f"{train.name}.yaml"), facts, metrics={})
    seconds = time.time() - t0
    card["training"] = {**dataclasses.asdict(train), **facts, "command": "ctcolor train compare (compare.json)"}
    save_weights(model, card, folder, f"seed-{seed}")
    t1 = time.time()
    record = {"seed": seed, "settings": settings, "train_seconds": round(seconds, 1), "measures": measured(weights)}
    record.update(chests=chests_at_hand(train) if colorizer else [], measure_seconds=round(time.time() - t1, 1))
    _write_json(path, record)
    return record


def _concurrent_runs(out_dir: Path, runs: list, base: Any, exams, device: str, data_cache, jobs: int, log) -> None:
    """The runs of ``runs`` ((arm name, recipe) pairs) without a record yet, ``jobs`` at a time, each in a process of
    its own (spawned: no CUDA state shared) with an equal share of the CPU's threads, each measured as the ``base``
    recipe measures. A colorizer's data are prepared first, once, in ``data_cache``, so that no two processes prepare
    them; the caller then reads every record."""
    import concurrent.futures
    import multiprocessing
    import os

    todo = [
        (name, train) for name, train in runs if not (out_dir / name / f"seed-{train.seed}.measures.json").is_file()
    ]
    if not todo:
        return
    if isinstance(todo[0][1], TrainConfig) and data_cache is not None:
        from ..models.colorizer import ColorizerConfig
        from .prepare import prepare_training_data

        for train in {t.name.rsplit("-seed", 1)[0]: t for _, t in todo}.values():  # one preparation per arm's data
            prepare_training_data(train, ColorizerConfig.from_dict(train.model), data_cache, log)
    threads = max(1, (os.cpu_count() or 1) // min(jobs, len(todo)))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(jobs, len(todo)), mp_context=context) as pool:
        futures = [
            pool.submit(_run_in_process, out_dir / name, train, base, exams, device, data_cache, threads)
            for name, train in todo
        ]
        for future in concurrent.futures.as_completed(futures):
            log(future.result())


def _run_in_process(folder: Path, train: Any, base: Any, exams, device: str, data_cache, threads: int) -> str:
    """One run of `_concurrent_runs`, in its worker process; returns the line that says it ended."""
    import torch

    torch.set_num_threads(threads)
    settings = run_settings(train, base, exams)
    record = _one_run(folder, train.seed, train, settings, _measurer(base, exams, print), device, data_cache, print)
    return f"{folder.name}, seed {train.seed}: done in {record['train_seconds']} s"


def measuring_recipe(train: Any, pairs: int | None) -> Any:
    """The base recipe as it measures: a SYMNet recipe on ``pairs`` held-out deformations per case when given
    (``--pairs``); `InputError` for a colorizer recipe, which is measured on its exams."""
    if pairs is None:
        return train
    if isinstance(train, TrainConfig):
        raise InputError(f"--pairs {pairs}: held-out deformations measure SYMNet recipes; a colorizer's, --exams")
    if pairs < 1:
        raise InputError(f"--pairs {pairs}: at least one deformation per case")
    return dataclasses.replace(train, val_pairs_per_case=pairs)


def run_settings(train: Any, judge: Any, exams: Sequence[str] | None) -> dict[str, Any]:
    """What a run's record is reused for: its recipe, the exams and, where ``--pairs`` changed it, the held-out
    deformations per case that measured it."""
    settings = {"recipe": dataclasses.asdict(train), "exams": None if exams is None else sorted(exams)}
    pairs = getattr(judge, "val_pairs_per_case", None)
    if pairs is not None and pairs != getattr(train, "val_pairs_per_case", None):
        settings["pairs"] = pairs
    return settings


def check_exams(train: Any, exams: Sequence[str] | None) -> None:
    """``--exams`` names exams of the matrix for colorizer recipes (`exam_names`), held-out cases (``real_val``) for
    SYMNet's (`symnet_measures`)."""
    colour = isinstance(train, TrainConfig)
    known = exam_names() if colour else [case_name(ct) for ct, *_ in train.real_val]
    if exams is not None and set(exams) - set(known):
        unknown = ", ".join(sorted(set(exams) - set(known)))
        kind = "exam" if colour else "held-out case"
        raise InputError(f"--exams {unknown}: no such {kind} (known: {', '.join(known)})")


def compare(
    base: Path,
    variants: list[Path],
    out_dir: Path,
    seeds: int = 3,
    finetune: bool = False,
    steps: int | None = None,
    lr_share: float = FINETUNE_LR_SHARE,
    weights_dir: Path = Path("weights"),
    data_cache: Path | None = None,
    device: str = "cpu",
    exams: Sequence[str] | None = None,
    jobs: int = 1,
    log=print,
    pairs: int | None = None,
) -> dict[str, Any]:
    """Train every arm x seed, measure each model (`measures` for colorizers, `symnet_measures` for SYMNet) and
    write ``out_dir/compare.json`` and ``compare.md`` (`paired_table`). Returns the JSON's content. ``jobs`` > 1:
    that many runs at once, each in a process of its own (`_concurrent_runs`), for a machine whose cores or GPU one
    run leaves idle. ``pairs``: SYMNet recipes measured on that many held-out deformations per case instead of the
    recipe's ``val_pairs_per_case`` (a quick look; the runs record it)."""
    if seeds < 1:
        raise InputError(f"--seeds {seeds}: at least one seed")
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: at least one")
    all_arms = arms(base, variants)
    check_exams(all_arms[0].train, exams)
    judge = measuring_recipe(all_arms[0].train, pairs)  # the base recipe as it measures every model
    init = start_weights(all_arms[0].train, weights_dir).resolve() if finetune else None
    out_dir.mkdir(parents=True, exist_ok=True)
    measured = _measurer(judge, exams, log)
    start = None
    if init is not None:  # the weights every arm starts from, measured as the runs are (the same exams and pairs)
        settings = {**run_settings(judge, judge, exams), "weights": str(init)}
        record = _kept_record(out_dir / "start.json", settings)
        if record is None:
            record = {"settings": settings, "measures": measured(init)}
            _write_json(out_dir / "start.json", record)
        start = record["measures"]
    results: dict[str, dict[int, dict[str, float]]] = {arm.name: {} for arm in all_arms}
    timing: dict[str, list[float]] = {arm.name: [] for arm in all_arms}
    if jobs > 1:
        runs = [(arm.name, run_config(arm, all_arms[0].train.seed + k, init, steps, lr_share)) for k in range(seeds)
                for arm in all_arms]  # fmt: skip
        _concurrent_runs(out_dir, runs, judge, exams, device, data_cache, jobs, log)
    for k in range(seeds):
        seed = all_arms[0].train.seed + k
        for arm in all_arms:  # seed by seed: a comparison stopped early still has paired arms
            train = run_config(arm, seed, init, steps, lr_share)
            settings = run_settings(train, judge, exams)
            record = _one_run(out_dir / arm.name, seed, train, settings, measured, device, data_cache, log)
            results[arm.name][seed] = record["measures"]
            timing[arm.name].append(record["train_seconds"])
    rows = paired_table(results, start)
    summary = {
        "base": str(base),
        "variants": [str(v) for v in variants],
        "arms": {
            arm.name: {k: v for k, v in dataclasses.asdict(arm.train).items() if k != "command"} for arm in all_arms
        },
        "seeds": sorted(results["base"]),
        "finetune": None if init is None else {"from": str(init), "lr_share": lr_share},
        "train_seconds": timing,
        "exams": None if exams is None else list(exams),
        "pairs": pairs,
        "start": start,
        "rows": rows,
    }
    _write_json(out_dir / "compare.json", summary)
    (out_dir / "compare.md").write_text(markdown(rows) + "\n", encoding="utf-8")
    return summary
