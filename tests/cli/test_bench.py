"""`ctcolor bench --quick`: the table and JSON are produced with the expected rows (not the speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from napari_ctcolor.bench import colour, common, register
from napari_ctcolor.cli import main

from conftest import require_shared


def test_peer_network_matches_the_seed_thesis() -> None:
    net = colour.PeerColorizer()
    assert colour.parameter_count(net) == colour.PEER_PARAMETERS == 3_896_530
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 13
    with torch.inference_mode():
        ab = net(torch.rand(1, 1, 64, 64))
    assert ab.shape == (1, 2, 64, 64)  # three stride-2 convs, three x2 upsamplings: same size out
    assert ab.abs().max() <= 1.0  # tanh


def test_machine_info_keys() -> None:
    info = common.machine_info()
    for key in ("date", "cpu", "cores", "ram_gb", "gpu", "torch", "commit"):
        assert info[key] not in (None, ""), key
    assert info["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")


def test_bench_quick_writes_table_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_shared()  # the registration rows need the OASIS pair and the labelled CTs
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    # Every section but the two the GPU bundle's smoke run measures through the same command
    # (tests/cli/test_gpu_bundle.py: pipeline, register-device).
    only = "colorize,series,memory,register,register-ct,register-speed,batch"
    assert main(["bench", "--quick", "--only", only, "--json", str(out_json), "--markdown", str(out_md)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("| section | item | device | size | median (min..max) |")

    report = json.loads(out_json.read_text(encoding="utf-8"))
    assert report["quick"] is True
    assert report["machine"]["torch"] == torch.__version__
    rows = report["rows"]
    for row in rows:
        assert set(common.ROW_KEYS) <= set(row)
        if row["median"] is None:
            # With the shared data and the [bench] extra present, only what --quick leaves out and CUDA rows on a
            # machine without CUDA may be missing: a broken section must not pass as "not measured".
            allowed = ("not measured: --quick", "not measured: no CUDA device")
            assert row["note"].startswith(allowed), row
        else:
            assert row["median"] > 0, row
            if row["min"] is not None:
                assert 0 < row["min"] <= row["median"] <= row["max"], row

    def find(section: str, item: str, device: str = "cpu", size: str | None = None) -> list[dict]:
        return [
            r
            for r in rows
            if (r["section"], r["item"], r["device"]) == (section, item, device) and size in (None, r["size"])
        ]

    for size in ("512x512",):  # --quick: one size
        for item in ("colorizer-2d", "colorizer-3d", "peer (seed thesis)"):
            (row,) = find("colorize", item, size=size)
            assert row["median"] > 0 and row["unit"] == "slices/s" and row["repeats"] >= 1
            (cuda,) = find("colorize", item, "cuda", size)
            assert cuda["median"] is None or torch.cuda.is_available()
        for model in ("colorizer-2d", "colorizer-3d"):
            (ratio,) = find("ratio", f"{model} / peer", size=size)
            assert ratio["median"] > 0
    # The OASIS pair: ours and the official recipe, each a whole process, with the ratio measured in this run.
    (ours,) = find("register", "ctcolor register (whole process)")
    (official,) = find("register", "official SYMNet recipe (whole process)")
    assert ours["median"] > 0 and official["median"] > 0 and "x the official recipe, same run" in ours["note"]
    ratio = float(ours["note"].split("x the official recipe")[0])  # the two medians of this run
    assert ratio == pytest.approx(official["median"] / ours["median"], rel=0.01)
    # CT registration quality: Dice after registration on a synthetic deformation and its phase-change variant, for
    # the default `ctcolor register`, the network alone and (--quick) the demons peer, each a whole process.
    for item in ("ctcolor register", "ctcolor register --refine 0", "SimpleITK demons"):
        quality = [r for r in find("register CT", item) if r["unit"] == "Dice"]
        assert len(quality) == 2 and sum("phase change" in r["size"] for r in quality) == 1, item
        assert all(0.0 < r["median"] <= 1.0 for r in quality), quality
        seconds = [r for r in find("register CT", item) if r["unit"] == "s"]
        assert len(seconds) == 2 and all(r["median"] > 0 and r["note"] == "whole process" for r in seconds), seconds
    # Registration speed (issue 51): ours in process (as the widget) and as a process, and (--quick) the demons and
    # Greedy peers as processes, each with the Dice of its ddf; a ratio against the fastest peer ours beats on Dice.
    speed = {r["item"]: r for r in rows if r["section"] == "register speed"}
    assert {register.IN_PROCESS, register.WHOLE_PROCESS, "SimpleITK demons", "Greedy"} == set(speed), sorted(speed)
    assert all(r["unit"] == "s" and 0.0 < r["dice"] <= 1.0 and r["median"] > 0 for r in speed.values()), speed
    for ratio in (r for r in rows if r["item"].endswith("/ fastest peer beaten on Dice")):
        peer = speed[ratio["note"].split(":")[0]]
        ours = speed[ratio["item"].split(" / ")[0]]
        assert ours["dice"] > peer["dice"] + register.DICE_TIE
        assert ratio["median"] == pytest.approx(ours["median"] / peer["median"], rel=0.01)
    # Batch: one `ctcolor batch colorize` against the same inputs as sequential processes; the ratio of this run's two.
    (batch,) = find("batch", "ctcolor batch colorize, 2 workers (whole process)")
    (sequential,) = find("batch", "2 x ctcolor colorize (sequential processes)")
    (ratio,) = find("ratio", "batch / sequential processes")
    assert ratio["median"] == pytest.approx(batch["median"] / sequential["median"], abs=0.006)
    # What a user waits for: a whole `ctcolor colorize` process on a real DICOM folder (quick: 20 slices of 512²).
    (series,) = find("series", "ctcolor colorize DICOM folder -> .nii.gz (whole process)", size="512x512x20")
    assert series["unit"] == "slices/s" and "peak RSS" in series["note"] and "x the int16 input" in series["note"]
    (rss,) = find("memory", "colorizer-2d peak RSS - baseline")
    assert rss["note"] == "not measured: --quick"

    for row in rows:  # every row is in the printed table
        assert f"| {row['section']} | {row['item']} | {row['device']} | {row['size']} |" in stdout
    section = out_md.read_text(encoding="utf-8")
    assert section.startswith(f"## {report['machine']['date']}") and "Machine: " in section
    assert common.markdown_table(rows) in section


def test_bench_refuses_a_missing_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--json", str(tmp_path / "no" / "bench.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_bench_refuses_unknown_sections_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--only", "register,speed"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --only: unknown sections ['speed']") and len(err.strip().splitlines()) == 1
