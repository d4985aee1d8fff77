#!/usr/bin/env bash
# The training step at Wan2.1-1.3B, 480x832x81 (21x60x104 latents) + 256 text tokens, 512 prompt tokens, bf16, in
# the configurations that bound its MFU (benchmarks/README.md's training table), each in OUT/<name>/result.json,
# then OUT/summary.md (name, step, MFU, peak memory). About 2 minutes a configuration on one H100 / H200.
#   bash benchmarks/train_sweep.sh OUT [NAME ...]      # names from the list below; default: all
# SIZE overrides the size and device flags (the tests run it on a CPU at a tiny size); a configuration that fails
# (out of memory, a timeout of PER_RUN_S seconds, default 300) is listed as failed and the sweep goes on. Under a hard
# time limit, TOTAL_S=N skips each configuration that could end later than N seconds after the sweep's start (each
# may take PER_RUN_S + 10: timeout's grace before its kill);
# summary.md is rewritten after each configuration (with its run's wall time), so a sweep killed part way still
# leaves the table of what ended, and each log.txt timestamps the run's phases. PYTHON picks the interpreter.
set -uo pipefail
out=${1:?usage: benchmarks/train_sweep.sh OUT [NAME ...]}
shift
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python3 || command -v python)}
size=${SIZE:---device cuda --dtype bfloat16 --latent 21 60 104 --text-len 256 --prompt-len 512}
declare -A flags=(
    [compile_none_b0.3]="--checkpointing none --compile --memory-budget 0.3 --profile"  # the best on an H100
    [compile_none_b0.6]="--checkpointing none --compile --memory-budget 0.6"
    [compile_none]="--checkpointing none --compile"  # out of memory on an H100 (78 GiB); the best on an H200
    [compile_none_b0.3_pad200]="--checkpointing none --compile --memory-budget 0.3 --text-padding 200"  # masked
    [keep_attention]="--checkpointing keep_attention"  # the Wan configs' choice
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(compile_none_b0.3 compile_none_b0.6 compile_none compile_none_b0.3_pad200 keep_attention)
for name in "${names[@]}"; do
    [ -n "${flags[$name]+x}" ] || { echo "unknown configuration $name (known: ${!flags[*]})" >&2; exit 2; }
done
per_run=${PER_RUN_S:-300}
for value in "$per_run" "${TOTAL_S:-0}"; do
    [[ $value =~ ^[0-9]+$ ]] || { echo "PER_RUN_S and TOTAL_S are whole seconds, got $value" >&2; exit 2; }
done
declare -A state=()  # name -> "rc N in S s", "started" (cut off while it ran) or "skipped"; unset: not reached
summarize() {  # summary.md from the result files and each configuration's state
    local pairs=() name
    for name in "${names[@]}"; do pairs+=("$name" "${state[$name]:-}"); done
    "$python" - "$out" "${pairs[@]}" > "$out/summary.md" <<'EOF'
import json, sys
from pathlib import Path

out, pairs = Path(sys.argv[1]), sys.argv[2:]
print("| configuration | step | MFU | peak memory | run |\n|---|---|---|---|---|")
for name, state in zip(pairs[::2], pairs[1::2]):
    path = out / name / "result.json"
    if not state.startswith("rc") or not path.exists():
        why = {"": "not reached", "skipped": "skipped (TOTAL_S)", "started": f"cut off (see {name}/log.txt)"}.get(
            state, f"failed (see {name}/log.txt)")
        print(f"| {name} | {why} | | | {state if state.startswith('rc') else ''} |")
        continue
    r = json.loads(path.read_text())
    mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    memory = "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB"
    print(f"| {name} | {r['train_step_s']:.3f} s | {mfu} | {memory} | {state} |")
EOF
}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
for name in "${names[@]}"; do
    # a run may take PER_RUN_S and timeout's 10 s grace before its kill
    if [ -n "${TOTAL_S:-}" ] && [ $((SECONDS + per_run + 10)) -gt "$TOTAL_S" ]; then
        state[$name]=skipped
        echo "$name: skipped ($SECONDS s of TOTAL_S=$TOTAL_S gone, PER_RUN_S=$per_run)"
        continue
    fi
    mkdir -p "$out/$name"
    rm -f "$out/$name/result.json"  # a configuration failing this time must not show an earlier run's figures
    began=$SECONDS
    state[$name]=started
    summarize
    # -k: a run that outlives the timeout's TERM is killed, not left holding the GPU and the caller's pipes
    # shellcheck disable=SC2086  # the flag strings are word lists
    PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 timeout -k 10 "$per_run" "$python" benchmarks/wan_scale.py \
        --skip-latency --train-steps 2 $size ${flags[$name]} --out "$out/$name" > "$out/$name/log.txt" 2>&1
    state[$name]="rc $? in $((SECONDS - began)) s"
    echo "$name: ${state[$name]}"
    summarize
done
summarize
cat "$out/summary.md"
