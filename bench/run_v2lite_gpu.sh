#!/usr/bin/env bash
# DeepSeek-V2-Lite on one GPU (issue 16: decode batch 1 and prefill 2k), inside BUDGET_S seconds:
# the engine bench with the step profile (kernels per step, top kernels of decode batch 1 and of the
# 2k prefill, the prefill's host ops), floors from the same run; then kernel checks at V2-Lite sizes
# and the tiny DeepSeek models' greedy tokens (fused + graphs vs torch ops eager); then the MoE block
# bench if time is left. One log, $OUT/log.txt, plus the benches' JSON/Markdown under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-140}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
source "$(dirname "$0")/budget_steps.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
step engine_bench_v2lite 80 python -m bench.engine_bench --model deepseek-v2-lite --dtype bfloat16 --batch 1,16,64 \
  --decode-steps 48 --prompt-len 128 --prefill-len 2048 --profile --out "$OUT"
step check_fused_moe 25 python -m tests.engine.kernels.check_fused_moe cuda v2lite
step check_fused_ops 20 python -m tests.engine.kernels.check_fused_ops cuda real
step check_fused_engine 25 python -m tests.engine.kernels.check_fused_engine cuda tiny-deepseek-v2,tiny-deepseek-v3
step moe_block_bench 25 python -m bench.moe_block_bench --tokens 1,16,2048 --repeats 10 --out "$OUT"
echo "total ${SECONDS}s" >> "$LOG"
