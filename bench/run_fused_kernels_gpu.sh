#!/usr/bin/env bash
# Issue 16 (fused kernels) device run on one GPU, inside a fixed time budget (BUDGET_S seconds):
# kernel checks at real sizes, tiny models fused vs torch ops, the kernel bench, then Qwen3-8B
# decode/prefill through the engine (this tree), the same for the checkout one level up (main)
# and DeepSeek-V2-Lite through this tree, if time is left. Everything goes to one file,
# $OUT/log.txt (the device tool brings back only a few files).
set -uo pipefail
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-290}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
source "$(dirname "$0")/budget_steps.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$LOG" 2>&1
step check_fused_ops 60 python -m tests.engine.kernels.check_fused_ops cuda real
step check_fused_moe 60 python -m tests.engine.kernels.check_fused_moe cuda real
step check_fused_engine 90 python -m tests.engine.kernels.check_fused_engine cuda
step kernels_bench 60 python -m bench.kernels_bench
BENCH=(-m bench.engine_bench --model qwen3-8b --dtype bfloat16 --batch 1,16,64 --decode-steps 48 --prompt-len 128
       --prefill-len 2048 --profile)
step engine_bench 80 python "${BENCH[@]}"
(cd .. && export PYTHONPATH=$PWD && step main/engine_bench 80 python "${BENCH[@]}")
step engine_bench_v2lite 80 python -m bench.engine_bench --model deepseek-v2-lite --dtype bfloat16 --batch 1,16,64 \
  --decode-steps 48 --prompt-len 128 --prefill-len 2048 --profile
