"""`ctcolor train compare`: arms trained with the same seeds, the paired table, the data prepared once, a stopped
comparison continued, fine-tuning from the base recipe's weights; and the two arms of the aorta comparison."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from napari_ctcolor.cli import main
from napari_ctcolor.models.colorizer import ColorizerConfig
from napari_ctcolor.training.colorizer import TrainConfig, family_confusion
from napari_ctcolor.training.compare import merge, paired_table
from napari_ctcolor.training.prepare import data_key, prepare_training_data

from conftest import REPO, TINY, ctcolor, require_shared


def _tiny_recipe(tmp_path: Path) -> Path:
    """The held-out-DICOM recipe at smoke size: one small phantom, a tiny network, the DICOM patient measured."""
    config = yaml.safe_load((REPO / "configs" / "colorizer_2d_heldout_dicom.yaml").read_text(encoding="utf-8"))
    config.update(
        name="tiny-heldout",
        steps=2,
        batch_size=2,
        crop=32,
        checkpoint_every=2,
        real_train=[],
        real_partial=[],
        tissue_val=[],
        phantoms={"first_seed": 5, "count": 1, "slices": 4, "pixel_mm": [1.7, 1.8], "fov_mm": 340},
    )
    config["model"].update(TINY)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_compare_trains_each_arm_with_the_same_seeds_and_prints_the_paired_table(tmp_path):
    require_shared()
    base = _tiny_recipe(tmp_path)
    variant = tmp_path / "confusion.yaml"
    variant.write_text("confusion: 1.0\n", encoding="utf-8")
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ("train", "compare", str(base), str(variant), "-o", str(out), "--seeds", "2", "--data-cache", str(cache),
            "--exams", "arterial_300")  # fmt: skip
    done = ctcolor(*args, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert summary["seeds"] == [20261121, 20261122]
    assert summary["arms"]["confusion"]["confusion"] == 1.0 and summary["arms"]["base"]["confusion"] == 0.0
    # The data were prepared once, then read back by the three other runs.
    assert len(list(cache.glob("*.safetensors"))) == 1
    assert done.stderr.count("from the cache") == 3
    rows = {row["measure"]: row for row in summary["rows"]}
    key = "totalseg-abdomen-dicom arterial_300 aorta bone"
    assert key in rows and "| confusion | " in done.stdout
    # Each row is the per-seed difference of what each run measured.
    runs = {
        arm: [
            json.loads((out / arm / f"seed-{s}.measures.json").read_text())["measures"][key] for s in summary["seeds"]
        ]
        for arm in ("base", "confusion")
    }
    diff = np.subtract(runs["confusion"], runs["base"])
    assert abs(rows[key]["diff"] - diff.mean()) < 1e-9
    assert abs(rows[key]["paired_sd"] - diff.std(ddof=1)) < 1e-9
    # The same seed in both arms drew the same batches: with the loss term at weight 0 the arms would be one run;
    # the seeds differ, so the two base runs differ.
    a, b = (torch.load(p, weights_only=True) for p in sorted((out / "checkpoints").glob("*base-seed*.pt")))
    assert a["losses"] != b["losses"]

    # Fine-tuning starts from the base recipe's own weights; a second call repeats no finished run.
    weights = tmp_path / "weights"
    weights.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(out / "base" / f"seed-20261121{suffix}", weights / f"tiny-heldout{suffix}")
    assert json.loads((weights / "tiny-heldout.json").read_text(encoding="utf-8"))["sha256"]  # a card, checked
    tuned = tmp_path / "tuned"
    done = ctcolor(
        *args[:5], str(tuned), "--seeds", "1", "--data-cache", str(cache), "--finetune", "--steps", "1",
        "--weights-dir", str(weights), "--exams", "arterial_300", "--lr-share", "0.05", timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((tuned / "compare.json").read_text(encoding="utf-8"))
    assert summary["finetune"]["from"].endswith("tiny-heldout.safetensors") and summary["start"][key] >= 0
    assert summary["arms"]["base"]["lr"] == TrainConfig.load(base).lr  # the recipe; each run took a tenth of it
    state = torch.load(next((tuned / "checkpoints").glob("*base-seed*.pt")), weights_only=True)
    assert state["step"] == 1
    run_card = json.loads((tuned / "base" / "seed-20261121.json").read_text(encoding="utf-8"))
    assert run_card["training"]["lr"] == TrainConfig.load(base).lr * 0.05
    again = ctcolor(*args[:5], str(tuned), "--seeds", "1", "--data-cache", str(cache), "--finetune", "--steps", "1",
                    "--weights-dir", str(weights), "--exams", "arterial_300", "--lr-share", "0.05",
                    timeout=600)  # fmt: skip
    assert again.returncode == 0 and "fine-tuning" not in again.stderr
    # A finished run is reused only with the settings it was made with.
    other = ctcolor(*args[:5], str(tuned), "--seeds", "1", "--data-cache", str(cache), "--finetune", "--steps", "2",
                    "--weights-dir", str(weights), "--exams", "arterial_300", timeout=600)  # fmt: skip
    assert other.returncode == 2 and "made with other settings" in other.stderr, other.stderr
    # So is the measure of the weights every arm starts from: measured on other exams, it would compare unlike rows.
    other = ctcolor(*args[:5], str(tuned), "--seeds", "1", "--data-cache", str(cache), "--finetune", "--steps", "1",
                    "--weights-dir", str(weights), "--exams", "pool_450", "--lr-share", "0.05",
                    timeout=600)  # fmt: skip
    assert other.returncode == 2 and "start.json: made with other settings" in other.stderr, other.stderr


def test_compare_refuses_what_is_no_comparison(tmp_path, capsys):
    base = REPO / "configs" / "colorizer_2d_heldout_dicom.yaml"
    same = tmp_path / "same.yaml"
    same.write_text("lr: 0.002\n", encoding="utf-8")
    unknown = tmp_path / "typo.yaml"
    unknown.write_text("confusoin: 1.0\n", encoding="utf-8")
    confusion = base.parent / "variants" / "confusion.yaml"
    for variant, more, message in (
        (same, (), "changes nothing"),
        (unknown, (), "unknown config keys: confusoin"),
        (confusion, ("--exams", "arterial_350"), "--exams arterial_350: no such exam"),
        (confusion, ("--lr-share", "0"), "--lr-share 0.0: a share of the recipe's rate"),
        (confusion, ("--pairs", "1"), "--pairs 1: held-out deformations measure SYMNet recipes"),
    ):
        code = main(["train", "compare", str(base), str(variant), "-o", str(tmp_path / "out"), *more])
        stderr = capsys.readouterr().err  # through `cli.main` in this process: a process start is 4-5 s
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    done = ctcolor("train", "compare", str(base), str(base.parent / "variants" / "confusion.yaml"), "-o",
                   str(tmp_path / "out"), "--finetune", "--weights-dir", str(tmp_path))  # fmt: skip
    assert done.returncode == 2 and "no weights named 'colorizer-2d-heldout-dicom'" in done.stderr


def test_merge_replaces_keys_and_merges_nested_mappings():
    base = {"model": {"dims": 2, "context": 3}, "steps": 4000, "real_train": [["a", "b"]]}
    assert merge(base, {"model": {"context": 5}, "real_train": []}) == {
        "model": {"dims": 2, "context": 5}, "steps": 4000, "real_train": [],
    }  # fmt: skip
    assert base["model"]["context"] == 3


def test_paired_spread_is_that_of_the_per_seed_differences():
    base = {1: {"m bone": 0.10}, 2: {"m bone": 0.20}, 3: {"m bone": 0.30}}
    variant = {1: {"m bone": 0.08}, 2: {"m bone": 0.17}, 3: {"m bone": 0.29}}
    (row,) = paired_table({"base": base, "v": variant}, None)
    assert np.isclose(row["diff"], -0.02) and np.isclose(row["paired_sd"], 0.01)
    assert np.isclose(row["unpaired_sd"], np.sqrt(0.1**2 + np.var([0.08, 0.17, 0.29], ddof=1)))
    assert row["better_seeds"] == "3/3"


def test_family_confusion_is_the_probability_given_to_the_other_family():
    """Analytic: a blood pixel whose probabilities put p on bone costs -log(1 - p); a fat pixel costs nothing."""
    classes = ["air", "lung", "fat", "soft_tissue", "contrast_blood", "bone", "aorta", "vertebrae_lumbar"]
    config = ColorizerConfig(**TINY, classes=classes)
    p = torch.tensor([0.0, 0.0, 0.1, 0.1, 0.2, 0.3, 0.1, 0.2])  # bone family 0.5, blood family 0.3
    logits = p.clamp_min(1e-9).log().view(1, -1, 1, 1).repeat(1, 1, 1, 3)
    target = torch.zeros(1, len(classes), 1, 3)
    target[0, 6, 0, 0] = 1.0  # aorta
    target[0, 7, 0, 1] = 1.0  # a vertebra
    target[0, 2, 0, 2] = 1.0  # fat
    weight = torch.ones(1, 1, 1, 3)
    expected = (-np.log(1 - 0.5) - np.log(1 - 0.3) + 0.0) / 3
    assert np.isclose(float(family_confusion(logits, target, weight, config.classes)), expected, rtol=1e-5)


def test_the_data_cache_key_follows_the_data_not_the_seed_the_loss_or_the_augmentation(tmp_path):
    train = TrainConfig.load(_tiny_recipe(tmp_path))
    config = ColorizerConfig.from_dict(train.model)
    key = data_key(train, config)
    for same in ({"seed": 1}, {"confusion": 2.0}, {"elastic": 0.5}, {"steps": 9}, {"lr": 1e-5}):
        assert data_key(dataclasses.replace(train, **same), config) == key, same
    more = dataclasses.replace(train, phantoms={**train.phantoms, "count": 2})
    assert data_key(more, config) != key
    other = ColorizerConfig.from_dict({**train.model, "chroma_mm": 3.0})
    assert data_key(train, other) != key


def test_the_spinal_canal_is_the_cord_and_what_a_vertebra_encloses_below_150_hu():
    """Analytic: a vertebra's ring around a 4 x 4 hole; its content (one voxel of bony HU left out) and a labelled cord
    voxel make the canal, the ring and what lies outside it do not."""
    from napari_ctcolor.io import Volume
    from napari_ctcolor.training.data import LabelledCT
    from napari_ctcolor.training.evaluate import spinal_canal

    names = {1: "vertebrae_L1", 2: "spinal_cord"}
    labels = np.zeros((2, 12, 12), np.uint8)
    labels[:, 2:8, 2:8] = 1
    labels[:, 3:7, 3:7] = 0  # the hole the ring encloses
    labels[1, 10, 10] = 2  # the cord outside any ring (a level whose arch the labels leave open)
    hu = np.full(labels.shape, 20, np.int16)
    hu[labels == 1] = 700
    hu[0, 4, 4] = 400  # bone partial-volumed into the canal
    case = LabelledCT("ring", Volume(hu, (3.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), {}), labels, names)
    expected = np.zeros(labels.shape, bool)
    expected[:, 3:7, 3:7] = True
    expected[0, 4, 4] = False
    expected[1, 10, 10] = True
    np.testing.assert_array_equal(spinal_canal(case), expected)


def test_the_cache_gives_back_what_was_prepared_and_a_damaged_file_is_prepared_again(tmp_path):
    train = TrainConfig.load(_tiny_recipe(tmp_path))
    config = ColorizerConfig.from_dict(train.model)
    cache, said = tmp_path / "cache", []
    fresh, names = prepare_training_data(train, config, cache, log=said.append)
    (path,) = cache.glob("*.safetensors")
    cached, cached_names = prepare_training_data(train, config, cache, log=said.append)
    assert "from the cache" in said[-1] and cached_names == names
    for a, b in zip(fresh, cached, strict=True):
        assert (a.name, a.real, a.partial, a.contrast) == (b.name, b.real, b.partial, b.contrast)
        for field in ("hu", "target", "weight"):
            assert torch.equal(getattr(a, field), getattr(b, field))
    path.write_bytes(b"not a safetensors file")
    again, _ = prepare_training_data(train, config, cache, log=said.append)
    assert "unreadable" in said[-2] and torch.equal(again[0].target, fresh[0].target)
    assert prepare_training_data(train, config, cache, log=said.append) and "from the cache" in said[-1]


def test_every_variant_and_sweep_file_names_real_recipes_and_keys():
    """configs/sweeps/*.yaml name recipes and variants that exist, each variant valid against each recipe (known
    keys only, and a change: `compare.arms` refuses else); a variant in no sweep is valid against a colorizer recipe."""
    from napari_ctcolor.training.compare import arms, check_exams, measuring_recipe

    named = set()
    for sweep in sorted((REPO / "configs" / "sweeps").glob("*.yaml")):
        spec = yaml.safe_load(sweep.read_text(encoding="utf-8"))
        named |= {REPO / name for name in spec["variants"]}
        recipes = [REPO / name for name in spec["recipes"]]
        for recipe in recipes:
            assert len(arms(recipe, [REPO / name for name in spec["variants"]])) == len(spec["variants"]) + 1
        assert spec["seeds"] >= 2 and isinstance(spec["finetune"], bool), sweep
        for key in ("exams", "smoke_exams"):  # run.sh passes them to --exams
            if spec.get(key):
                check_exams(arms(recipes[0], [])[0].train, spec[key].split(","))
        if spec.get("smoke_pairs"):  # and this to --pairs: SYMNet recipes only
            measuring_recipe(arms(recipes[0], [])[0].train, spec["smoke_pairs"])
    for variant in set((REPO / "configs" / "variants").glob("*.yaml")) - named:  # a colorizer's, in no sweep
        assert len(arms(REPO / "configs" / "colorizer_2d_heldout_dicom.yaml", [variant])) == 2


def test_a_chest_ct_missing_from_the_data_trains_from_its_prepared_case_and_is_measured_where_it_is(tmp_path):
    """The offline GPU bundle carries the chest CTs as prepared cases: a comparison there trains from them, says what
    its measures lack, and the same command where the CTs are adds their blood pools to the runs it finds."""
    import os
    import subprocess
    import sys

    from napari_ctcolor.training.compare import prepare_partials, sweep_data
    from napari_ctcolor.training.prepare import partial_cases

    from conftest import CT_DIR

    require_shared(CT_DIR / "chest-lung2-5mm.nrrd")
    config = yaml.safe_load(_tiny_recipe(tmp_path).read_text(encoding="utf-8"))
    config.update(real_partial=[["chest-lung2-5mm.nrrd", "chest_non_contrast", "chest-lung2-5mm-tumour.nrrd"]],
                  tissue_val=["chest-lung1-5mm.nrrd"])  # fmt: skip
    base, variant = tmp_path / "tiny-chest.yaml", tmp_path / "confusion.yaml"
    base.write_text(yaml.safe_dump(config), encoding="utf-8")
    variant.write_text("confusion: 1.0\n", encoding="utf-8")
    # A data folder as the bundle's: the labelled patient, and lung2 only as its prepared case.
    host = tmp_path / "host"
    (host / "ct").mkdir(parents=True)
    for name in ("totalseg-abdomen-dicom", "totalseg-abdomen-dicom-labels.nii.gz", "totalseg-v2-label-names.json"):
        (host / "ct" / name).symlink_to(CT_DIR / name)
    (prepared,) = prepare_partials([base], [variant], host / "prepared")
    train = TrainConfig.load(base)
    derived = partial_cases(train.real_partial, ColorizerConfig.from_dict(train.model), train.partial_aorta)
    env = {**os.environ, "CTCOLOR_SHARED_DATA": str(host)}
    os.environ["CTCOLOR_SHARED_DATA"] = str(host)
    try:
        (read,) = partial_cases(train.real_partial, ColorizerConfig.from_dict(train.model), train.partial_aorta)
        assert sweep_data([base], [variant]) == {"missing": [], "unmeasured": ["chest-lung1-5mm.nrrd"]}
        aside = prepared.rename(tmp_path / prepared.name)
        lacking = sweep_data([base], [variant])["missing"]
    finally:
        del os.environ["CTCOLOR_SHARED_DATA"]
    assert lacking == ["ct/chest-lung2-5mm-tumour.nrrd", "ct/chest-lung2-5mm.nrrd"]
    assert read.name == derived[0].name and read.partial and torch.equal(read.target, derived[0].target)
    assert torch.allclose(read.hu, derived[0].hu, atol=1e-3) and torch.equal(read.blood, derived[0].blood)

    aside.rename(prepared)  # the bundle's case again (prepared once: each derivation of the chest takes 20 s)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "napari_ctcolor", "train", "compare", str(base), str(variant), "-o", str(out),
            "--seeds", "1", "--exams", "arterial_300,pool_450", "--data-cache", str(tmp_path / "cache")]  # fmt: skip
    there = subprocess.run(args, capture_output=True, text=True, encoding="utf-8", timeout=600, env=env)
    assert there.returncode == 0, there.stderr[-3000:]
    record = json.loads((out / "base" / "seed-20261121.measures.json").read_text(encoding="utf-8"))
    assert record["chests"] == [] and not any(key.startswith("chest-lung1") for key in record["measures"])
    here = ctcolor(*args[3:], timeout=600)  # the full shared data: lung1's pool added, nothing trained again
    assert here.returncode == 0, here.stderr[-3000:]
    assert "measuring again with chest-lung1-5mm.nrrd" in here.stderr and "training 2 steps" not in here.stderr
    record = json.loads((out / "confusion" / "seed-20261121.measures.json").read_text(encoding="utf-8"))
    assert record["chests"] == ["chest-lung1-5mm.nrrd"]
    assert "chest-lung1-5mm pool_450 blood_pool bone" in record["measures"]
