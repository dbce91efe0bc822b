#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (give it timeout_s <= 300): issue 20's EP figures, each next to
# its floor.
#   1. bench.ep_bench: dispatch + combine at 128 (and 4096) tokens per rank, DeepSeek-V3 MoE shape,
#      backends fixed (NCCL, bf16), fixed_fp8 (FP8 activations), symm / symm_fp8 (the same rows put into
#      the peers' symmetric memory by one Triton kernel), against the measured GPU->GPU copy floor
#      (achieved GB/s and % of floor; the count-based torch path is in 2026-11-29_h200x2_ep.md).
#   2. bench.ep_engine_check: DeepSeek-V2-Lite (dummy weights) one GPU at batch 64 vs EP = 2 with
#      CUDA graphs at 64 per rank; prefill 4k per rank without overlap, with two-batch overlap
#      across whole layers, and with the per-MoE-layer overlap.
#   3. the same EP = 2 engine run with FP8 dispatch (decode + prefill no_overlap / two_batch).
#   4. EP = 2 decode with the symmetric-memory transport (--ep-backend symm), if time is left.
# Run from the repo root with PYTHONPATH set; writes to $OUT. Each part has its own timeout so a
# hang in one still returns the others' results.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ts() { date -u +%H:%M:%S; }
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nvidia-smi topo -m
python -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"
echo "$(ts) 1. EP dispatch/combine vs copy floor"
timeout 80 python -m bench.ep_bench --tokens 128,4096 --backends fixed,fixed_fp8,symm,symm_fp8 --timeout 75 --out "$OUT" \
  | grep -v '^{' | tail -14
echo "$(ts) 2. V2-Lite: one GPU bs64 vs EP=2 graphs bs64/rank; prefill 4k no overlap / two-batch / per-layer"
timeout 110 python -m bench.ep_engine_check --ep 2 --configs single,ep_graphs --timeout 100 \
  --prefill-variants no_overlap,two_batch,overlap --out "$OUT/bf16" | grep -v "^20..-" | tail -70
echo "$(ts) 3. V2-Lite EP=2 with FP8 dispatch"
timeout 50 python -m bench.ep_engine_check --ep 2 --configs ep_graphs --timeout 45 --fp8-dispatch \
  --prefill-variants no_overlap,two_batch --prefill-repeats 1 --out "$OUT/fp8" | grep -v "^20..-" | tail -40
echo "$(ts) 4. V2-Lite EP=2 decode over symmetric memory"
timeout 45 python -m bench.ep_engine_check --ep 2 --configs ep_graphs --timeout 40 --ep-backend symm \
  --prefill-variants no_overlap --prefill-repeats 1 --out "$OUT/symm" | grep -v "^20..-" | tail -30
echo "$(ts) done"
} 2>&1 | tee "$OUT/log"
