#!/usr/bin/env bash
# napari-ctcolor's GPU checks in one command, offline: the GPU tests, the bench rows on cuda and cpu in the same run,
# and (with --sweep NAME) the training sweep configs/sweeps/NAME.yaml, its recipes trained side by side on the GPU.
#
#   ./run.sh [--sweep NAME] [--smoke] [--out DIR]
#
# Installs nothing system-wide and downloads nothing: the bundle's wheels go into a folder of their own that the
# server's python3 (the one with CUDA PyTorch; PYTHON=... to choose another) reads first. Writes under --out (else
# $OUT, else ./out): report.md, rows.json, bench.md, tests.xml, sweep/ (each trained model's weights, card and
# comparison) and logs/. --smoke runs the same steps with tiny settings on any machine (a CPU one skips the GPU
# tests, as everywhere): the bundle's own check.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT_DIR=${OUT:-$HERE/out}
SWEEP="" SMOKE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --sweep) SWEEP=${2:?--sweep NAME}; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --out) OUT_DIR=${2:?--out DIR}; shift 2 ;;
        *) echo "error: unknown argument $1 (run.sh [--sweep NAME] [--smoke] [--out DIR])" >&2; exit 2 ;;
    esac
done
if [ -n "$SWEEP" ] && [ ! -f "$HERE/project/configs/sweeps/$SWEEP.yaml" ]; then
    echo "error: configs/sweeps/$SWEEP.yaml: no such sweep (the bundle has: $(ls "$HERE/project/configs/sweeps"))" >&2
    exit 2
fi
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR/logs"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
started=$(date +%s)
step() { echo "[$(( $(date +%s) - started )) s] $*" | tee -a "$OUT_DIR/logs/steps.log"; }

# 1. The bundle's packages, offline, into a site folder read before the system's.
SITE="$HERE/.site"
rm -rf "$SITE" && mkdir -p "$SITE"
step "install: $(ls "$HERE"/wheels | wc -l) files from the bundle, no index"
"$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
    "$HERE"/wheels/*.whl > "$OUT_DIR/logs/install.log" 2>&1 || { cat "$OUT_DIR/logs/install.log"; exit 1; }
for tar in "$HERE"/wheels/*.tar.xz; do [ -e "$tar" ] && tar -xJf "$tar" -C "$SITE"; done
# The chest CTs' prepared training cases (the CTs themselves do not fit in the bundle).
if [ -e "$HERE/shared/prepared.tar.xz" ]; then
    mkdir -p "$HERE/shared/data/prepared" && tar -xJf "$HERE/shared/prepared.tar.xz" -C "$HERE/shared/data/prepared"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export CTCOLOR_SHARED_DATA="$HERE/shared/data"
export PYTHONUNBUFFERED=1
cd "$HERE/project"
"$PY" -c "import napari_ctcolor, torch; print('napari-ctcolor from', napari_ctcolor.__file__)" | tee -a "$OUT_DIR/logs/steps.log"

# The sweep's runs, worked out before anything runs: a recipe reading data the bundle lacks stops here.
jobs=()
if [ -n "$SWEEP" ]; then
    file="configs/sweeps/$SWEEP.yaml"
    device=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    mapfile -t jobs < <("$PY" - "$file" "$SMOKE" <<'EOF'
import sys, yaml
from napari_ctcolor.errors import InputError
from napari_ctcolor.training.compare import sweep_data
sweep = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))
smoke = sys.argv[2] == "1"
try:
    data = sweep_data(sweep["recipes"], sweep.get("variants", []), bool(sweep.get("finetune")))
except InputError as exc:
    sys.exit(f"error: {exc}")
if data["missing"]:
    sys.exit(f"error: the sweep's recipes read {', '.join(data['missing'])}, not in this bundle")
if data["unmeasured"]:
    print(f"note: measured without the blood pools of {', '.join(data['unmeasured'])} (not in this bundle): "
          "run the same `ctcolor train compare` where they are to add them", file=sys.stderr)
seeds = 1 if smoke else int(sweep.get("seeds", 3))
extra = ["--finetune"] * bool(sweep.get("finetune")) + ["--steps", "2"] * smoke
exams = sweep.get("smoke_exams" if smoke else "exams")  # --smoke: the sweep's smallest measures
extra += ["--exams", exams] if exams else []
extra += ["--pairs", str(sweep["smoke_pairs"])] if smoke and sweep.get("smoke_pairs") else []  # SYMNet's
extra += ["--jobs", str(sweep.get("jobs", 1))]
for recipe in sweep["recipes"][: 1 if smoke else None]:
    print(" ".join([recipe, *sweep["variants"][: 1 if smoke else None], "--seeds", str(seeds), *extra]))
EOF
)
    [ "${#jobs[@]}" -gt 0 ] || exit 2
fi

# The numba kernels compiled once, as `make setup` does, so no bench row or sweep counts their compilation: on the
# host's cores while the GPU tests run (about 80 s on a 2-core CPU).
step "ctcolor warmup, beside the GPU tests"
"$PY" -m napari_ctcolor warmup > "$OUT_DIR/logs/warmup.log" 2>&1 &
warmup_pid=$!

# 2. The GPU tests (skipped where no CUDA device is).
step "pytest -m gpu"
"$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml "$OUT_DIR/tests.xml" $(cat "$HERE/gpu-tests.txt") \
    > "$OUT_DIR/logs/pytest.log" 2>&1
tests_rc=$?

# 3. The bench rows, each device in the same run.
if ! wait "$warmup_pid"; then cat "$OUT_DIR/logs/warmup.log"; exit 1; fi
step "ctcolor bench --only pipeline,register-device"
quick=(); [ "$SMOKE" = 1 ] && quick=(--quick)
"$PY" -m napari_ctcolor bench --only pipeline,register-device "${quick[@]}" --json "$OUT_DIR/rows.json" \
    --markdown "$OUT_DIR/bench.md" > "$OUT_DIR/logs/bench.log" 2>&1
bench_rc=$?

# 4. The sweep: one `ctcolor train compare` per recipe, all at once on the one device.
sweep_rc=0
if [ -n "$SWEEP" ]; then
    step "sweep $SWEEP: ${#jobs[@]} recipes on $device at once"
    pids=()
    for job in "${jobs[@]}"; do
        read -r -a words <<< "$job"
        name=$(basename "${words[0]}" .yaml)
        "$PY" -m napari_ctcolor train compare "${words[@]}" --device "$device" -o "$OUT_DIR/sweep/$name" \
            --data-cache "$OUT_DIR/sweep/data-cache" --weights-dir "$SITE/napari_ctcolor/_weights" \
            > "$OUT_DIR/logs/sweep-$name.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || sweep_rc=$?; done
fi

# 5. The report, and a short summary last.
step "report"
"$PY" - "$OUT_DIR" "$tests_rc" "$bench_rc" "$sweep_rc" "$SWEEP" <<'EOF'
import json, platform, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, tests_rc, bench_rc, sweep_rc, sweep = Path(sys.argv[1]), *sys.argv[2:6]
import torch, napari_ctcolor
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
lines = ["# napari-ctcolor GPU run", "", f"- machine: {platform.node()}, {platform.processor() or platform.machine()}, "
         f"GPU {gpu}; Python {platform.python_version()}, torch {torch.__version__}"]
tests = {"passed": 0, "failed": 0, "skipped": 0}
if (out / "tests.xml").exists():
    for case in ET.parse(out / "tests.xml").getroot().iter("testcase"):
        kind = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        tests[kind] += 1
lines.append(f"- tests (-m gpu): {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
             f"(exit {tests_rc})")
lines.append(f"- bench: exit {bench_rc}; sweep {sweep or 'none'}: exit {sweep_rc}")
if (out / "bench.md").exists():
    lines += ["", (out / "bench.md").read_text(encoding="utf-8")]
for table in sorted((out / "sweep").glob("*/compare.md")) if (out / "sweep").exists() else []:
    lines += ["", f"## Sweep {sweep}: {table.parent.name}", "", table.read_text(encoding="utf-8")]
(out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
rows = json.loads((out / "rows.json").read_text(encoding="utf-8")).get("rows", []) if (out / "rows.json").exists() else []
summary = lines[:4] + [f"- {len(rows)} bench rows:"]
for row in rows[:12]:
    summary.append(f"  {row.get('section')} | {row.get('item')} | {row.get('device')} | {row.get('median')} {row.get('unit')}")
summary.append(f"- report: {out / 'report.md'}")
print("\n".join(summary[:20]))
EOF
step "done"
[ "$tests_rc" = 0 ] || [ "$tests_rc" = 5 ] || exit 1
[ "$bench_rc" = 0 ] && [ "$sweep_rc" = 0 ]
