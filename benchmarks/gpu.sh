#!/usr/bin/env bash
# Wan-scale GPU figures in one go (about 2 minutes on one H100/H200): the 1.3B unified model with random
# weights at 480x832x81 (21x60x104 latents, 32,760 video tokens) + 256 text tokens, 512 prompt tokens, bf16.
#   bash benchmarks/gpu.sh OUT_DIR [WAN_SCALE_FLAGS]   -> OUT_DIR/result.json, OUT_DIR/result.md, OUT_DIR/nvidia-smi.txt
# (e.g. --text-padding 200 adds the masked T2V step; benchmarks/train_sweep.sh times the training configurations)
# PYTHON picks the interpreter (default python3).
set -euo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR [WAN_SCALE_FLAGS]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
PYTHONPATH=.:${PYTHONPATH:-} "${PYTHON:-python3}" benchmarks/wan_scale.py --device cuda --dtype bfloat16 \
    --latent 21 60 104 --text-len 256 --prompt-len 512 --steps 5 --warmup 2 --train-steps 3 --out "$out" "$@" 2>&1 \
    | grep -v Warning | tee "$out/log.txt"
