#!/usr/bin/env bash
# Issue 16, third pass (decode step = one upload + one graph replay with the sampler inside; host
# path): the decode-graph check on tiny-llama, then the engine bench with the step profile for the
# models in $MODELS (default qwen3-8b) at batch $BATCH (default 1,16,64), inside BUDGET_S seconds.
# One log, $OUT/log.txt, plus the benches' JSON/Markdown under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-140}
MODELS=${MODELS:-qwen3-8b}
BATCH=${BATCH:-1,16,64}
CHECK=${CHECK:-1}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
source "$(dirname "$0")/budget_steps.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
if [ "$CHECK" = 1 ]; then
  step check_decode_graphs 35 python -m tests.engine.check_decode_graphs cuda
fi
# MODELS: model[:batches] entries, e.g. "qwen3-8b llama-3-8b deepseek-v2-lite:64"
for entry in $MODELS; do
  m=${entry%%:*}; b=$BATCH; [ "$entry" != "$m" ] && b=${entry#*:}
  step "engine_bench_$m" 120 python -m bench.engine_bench --model "$m" --dtype bfloat16 --batch "$b" \
    --decode-steps 48 --prompt-len 128 --prefill-len 2048 --profile --out "$OUT"
done
[ "$CHECK" = 1 ] && step check_attention 30 python -m tests.engine.kernels.check_attention cuda real
echo "total ${SECONDS}s" >> "$LOG"
