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
[ "$CHECK" = 1 ] && step check_decode_graphs 45 python -m tests.engine.check_decode_graphs cuda
for m in ${MODELS//,/ }; do
  step "engine_bench_$m" 120 python -m bench.engine_bench --model "$m" --dtype bfloat16 --batch "$BATCH" \
    --decode-steps 48 --prompt-len 128 --prefill-len 2048 --profile --out "$OUT"
done
echo "total ${SECONDS}s" >> "$LOG"
