#!/usr/bin/env bash
# One device call on nvidia-h200-x2 for issue 20 (give it timeout_s 300; the steps' timeouts sum to
# 285 s), most important first, each figure next to its floor:
#   0. the symmetric-memory put kernel writes the fixed path's rows (correctness, one GPU, ~10 s);
#   1. bench.ep_bench: dispatch + combine at 128 and 4096 tokens per rank, DeepSeek-V3 MoE shape:
#      fixed (NCCL, bf16), fixed_fp8 (FP8 activations), symm / symm_fp8 (the same rows put into the
#      peers' symmetric memory by one Triton kernel), against the measured GPU->GPU copy floor
#      (achieved GB/s and % of floor; the count-based torch path is in 2026-11-29_h200x2_ep.md);
#   2. bench.ep_engine_check: DeepSeek-V2-Lite (dummy weights) one GPU at batch 64 vs EP = 2 with CUDA
#      graphs at 64 per rank; prefill 4k per rank without overlap, with two-batch overlap across whole
#      layers, and with the per-MoE-layer overlap;
#   3. the same EP = 2 run with FP8 dispatch; 4. EP = 2 decode over symmetric memory (--ep-backend symm).
# Run from the repo root with PYTHONPATH set. The device returns few files: everything goes to $STAGE
# and is packed into $OUT/ep_results.tgz after every step (a timeout still returns what finished).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PACK=ep_results.tgz
source "$(dirname "$0")/packed_steps.sh"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m;
  python -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"; } > "$STAGE/device.txt" 2>&1
step put_rows 20 python -m tests.engine.kernels.check_ep_put_rows cuda
step a2a 75 python -m bench.ep_bench --tokens 128,4096 --backends fixed,fixed_fp8,symm,symm_fp8 --timeout 70 \
  --out "$STAGE"
cp "$STAGE/ep_a2a.md" "$OUT/" 2>/dev/null
step engine_bf16 100 python -m bench.ep_engine_check --ep 2 --configs single,ep_graphs --timeout 90 \
  --prefill-variants no_overlap,two_batch,overlap --out "$STAGE/bf16"
step engine_fp8 45 python -m bench.ep_engine_check --ep 2 --configs ep_graphs --timeout 40 --fp8-dispatch \
  --prefill-variants no_overlap,two_batch --prefill-repeats 1 --out "$STAGE/fp8"
step engine_symm 45 python -m bench.ep_engine_check --ep 2 --configs ep_graphs --timeout 40 --ep-backend symm \
  --prefill-variants no_overlap --prefill-repeats 1 --out "$STAGE/symm"
