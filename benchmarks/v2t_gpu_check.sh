#!/usr/bin/env bash
# Issue #8's GPU checks in one go (about 5 minutes on one H200):
#   1. speed: V2T with 50 steps, cached vs uncached, at the Wan2.1-1.3B size with a 480x832x81 video
#      (latent 21x60x104: 32,760 video tokens, 256 text tokens, 512 prompt states), bf16;
#      target: cached >= 15x faster, i.e. <= 3 full forward passes;
#   2. the same at the shipped toy model's size (batch 64, the eval batch);
#   3. quality: benchmarks/v2t_layout_quality.sh (full vs video_prefix, seeds 0 and 1).
# usage: benchmarks/v2t_gpu_check.sh OUT [RECALL_STEPS] [REFINE_STEPS] [RUNS]
# OUT gets three small files (the two bench JSONs, quality_table.txt); the training runs go to RUNS
# (default /tmp/v2t_quality).
set -uo pipefail
out=${1:?usage: $0 OUT [RECALL_STEPS] [REFINE_STEPS] [RUNS]}
runs=${4:-/tmp/v2t_quality}
cd "$(dirname "$0")/.."
python=$(command -v python || command -v python3)
mkdir -p "$out"
timeout 200 "$python" -m univigu model bench-v2t --preset wan2.1-t2v-1.3b --device cuda --dtype bfloat16 \
    --frames 21 --height 60 --width 104 --text-len 256 --prompt-len 512 --steps 50 --repeats 1 \
    --json "$out/bench_v2t_wan13b.json"
echo "bench 1.3B rc=$?"
timeout 60 "$python" -m univigu model bench-v2t --preset univigu/assets/toy-model --device cuda --batch 64 \
    --text-len 40 --prompt-len 8 --steps 20 --repeats 3 --json "$out/bench_v2t_toy.json"
echo "bench toy rc=$?"
start=$SECONDS
timeout 300 bash benchmarks/v2t_layout_quality.sh cuda "$runs" "${2:-200}" "${3:-600}"
echo "quality rc=$? in $((SECONDS - start)) s"
cp "$runs/table.txt" "$out/quality_table.txt"
