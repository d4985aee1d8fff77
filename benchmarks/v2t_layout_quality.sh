#!/usr/bin/env bash
# Does attention_layout "video_prefix" (the layout that lets V2T cache the clean video) cost caption
# quality? Trains recall -> refine from the shipped base for both layouts x seeds 0 and 1 (4 runs in
# parallel, same budget), evaluates each on the test split and prints a table; the V2T accuracy of
# video_prefix should be within 2 points of full.
#
# usage: benchmarks/v2t_layout_quality.sh DEVICE OUT [RECALL_STEPS] [REFINE_STEPS] [N] [TASKS]
#   DEVICE        cuda or cpu (cpu: each run on one thread)
#   OUT           folder for the runs, logs, eval JSONs and table.txt
#   RECALL_STEPS  default 200 (0: refine straight from the base, the toy default recipe);
#   REFINE_STEPS  default 600; N test samples, default 256
#   TASKS         eval tasks, default v2t,t2v,joint (v2t is the one that matters)
# SEQUENTIAL=1 runs the four one after another with every thread (for eval times comparable between layouts on
# a CPU); OUT/table.txt and OUT/result.json hold the results.
# About 3 minutes on one H200 with the defaults; `... cpu /tmp/q 2 2 8 v2t` checks it on a CPU.
set -euo pipefail
usage="usage: $0 DEVICE OUT [RECALL_STEPS] [REFINE_STEPS] [N] [TASKS]"
device=${1:?$usage}
out=${2:?$usage}
recall_steps=${3:-200}
refine_steps=${4:-600}
n=${5:-256}
tasks=${6:-v2t,t2v,joint}
cd "$(dirname "$0")/.."  # the repo root: configs and the shipped base are relative to it
base=univigu/assets/toy-base
configs=univigu/configs/toy
sequential=${SEQUENTIAL:-0}
if [ "$device" = cpu ]; then
    export ACCELERATE_USE_CPU=1
    [ "$sequential" = 1 ] || export OMP_NUM_THREADS=1  # 4 runs share the cores
fi
mkdir -p "$out"
python=$(command -v python || command -v python3)

run() {  # layout seed: [recall,] refine (the layout travels in the model's config), eval
    local layout=$1 seed=$2 dir=$out/$1-seed$2 init=$base
    # the sampling the ablations measure with (the toy refine config now defaults to 50 caption steps)
    local common=(--train.seed="$seed" --data_seed="$seed" --pipeline.caption_steps=20 --pipeline.text_update=ctmc)
    mkdir -p "$dir"
    {
        if [ "$recall_steps" -gt 0 ]; then
            "$python" -m univigu train "$configs/recall.yaml" --init_from="$base" --attention_layout="$layout" \
                "${common[@]}" --train.max_steps="$recall_steps" --train.save_every="$recall_steps" \
                --train.output_dir="$dir/recall"
            init=$dir/recall/final
        fi
        "$python" -m univigu train "$configs/refine.yaml" --init_from="$init" --attention_layout="$layout" \
            "${common[@]}" --train.max_steps="$refine_steps" --train.save_every="$refine_steps" \
            --train.output_dir="$dir/refine"
        "$python" -m univigu eval "$dir/refine/final" --device "$device" --split test --n "$n" --tasks "$tasks" \
            --json "$dir/eval_test.json"
    } >"$dir/log.txt" 2>&1
}

start=$SECONDS
pids=()
for layout in full video_prefix; do
    for seed in 0 1; do
        if [ "$sequential" = 1 ]; then
            run "$layout" "$seed" &  # a background subshell keeps set -e (a `run || ...` would not)
            wait $! || { echo "a run failed; see $out/$layout-seed$seed/log.txt" >&2; exit 1; }
        else
            run "$layout" "$seed" &
            pids+=($!)
        fi
    done
done
failed=0
for pid in "${pids[@]+"${pids[@]}"}"; do
    wait "$pid" || failed=1
done
if [ "$failed" = 1 ]; then
    echo "a run failed; see $out/*/log.txt" >&2
    tail -n 5 "$out"/*/log.txt >&2
    exit 1
fi
echo "trained and evaluated 4 runs in $((SECONDS - start)) s (recall $recall_steps + refine $refine_steps steps)"

"$python" - "$out" "$0 $*" "$sequential" <<'PY' | tee "$out/table.txt"
import json, platform, statistics, sys
from datetime import date
from pathlib import Path

import torch

out, command, sequential = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
rows = []
for layout in ("full", "video_prefix"):
    for seed in (0, 1):
        run = out / f"{layout}-seed{seed}"
        r = json.loads((run / "eval_test.json").read_text())
        saved = json.loads((run / "refine/final/transformer/config.json").read_text()).get("attention_layout", "full")
        assert saved == layout, f"{run}: the model was saved with attention_layout {saved!r}"
        get = lambda task, key: 100 * r[task][key] if task in r else float("nan")  # noqa: E731
        rows.append((layout, seed, get("v2t", "all"), r.get("v2t", {}).get("bleu4", float("nan")),
                     r.get("v2t", {}).get("cider", float("nan")), get("t2v", "all"), get("joint", "consistency"),
                     r["seconds"]))
print(f"{'layout':<14}{'seed':>5}{'V2T acc %':>11}{'BLEU-4':>8}{'CIDEr':>8}{'T2V acc %':>11}{'joint %':>9}{'eval s':>8}")
for layout, seed, v2t, bleu, cider, t2v, joint, sec in rows:
    print(f"{layout:<14}{seed:>5}{v2t:>11.1f}{bleu:>8.3f}{cider:>8.3f}{t2v:>11.1f}{joint:>9.1f}{sec:>8.1f}")
mean = {lay: statistics.mean(r[2] for r in rows if r[0] == lay) for lay in ("full", "video_prefix")}
gap = mean["video_prefix"] - mean["full"]
print(f"mean V2T accuracy: full {mean['full']:.1f}%, video_prefix {mean['video_prefix']:.1f}%; "
      f"video_prefix - full = {gap:+.1f} points ({'within' if gap >= -2 else 'NOT within'} 2 points)")
keys = ("layout", "seed", "v2t_percent", "bleu4", "cider", "t2v_percent", "joint_consistency_percent", "eval_seconds")
result = {"command": ("SEQUENTIAL=1 " if sequential else "") + command, "date": date.today().isoformat(),
          "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
          "runs": [{k: None if v != v else v for k, v in zip(keys, row)} for row in rows]}  # NaN: task not run
(out / "result.json").write_text(json.dumps(result, indent=2))
PY
