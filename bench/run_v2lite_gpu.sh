#!/usr/bin/env bash
# DeepSeek-V2-Lite on one GPU (issue 16: decode batch 1 and prefill 2k), inside BUDGET_S seconds:
# kernel checks at V2-Lite sizes, then the engine bench with the step profile (kernels per step, top
# kernels of decode batch 1 and of the 2k prefill), floors from the same run. One log, $OUT/log.txt,
# plus the bench's JSON/Markdown under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-130}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
source "$(dirname "$0")/budget_steps.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
step check_fused_moe 30 python -m tests.engine.kernels.check_fused_moe cuda v2lite
step engine_bench_v2lite 75 python -m bench.engine_bench --model deepseek-v2-lite --dtype bfloat16 --batch 1,16,64 \
  --decode-steps 48 --prompt-len 128 --prefill-len 2048 --profile --out "$OUT"
step check_fused_ops 25 python -m tests.engine.kernels.check_fused_ops cuda real
echo "total ${SECONDS}s" >> "$LOG"
