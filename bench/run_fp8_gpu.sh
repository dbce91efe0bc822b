#!/usr/bin/env bash
# One H200 call for issue 17 (FP8), every record in one run, most important first; results under $OUT.
# Run from the worktree copy with PYTHONPATH set. Each step has its own timeout (sum 240 s: the call's timeout_s should be ~250) so
# that whatever finished comes back.
set -o pipefail
export PYTHONUNBUFFERED=1
# The device returns at most a handful of files: everything goes to $STAGE and is packed into
# $OUT/fp8_results.tgz after every step (so a timeout still returns what finished).
PACK=fp8_results.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
# GEMM correctness at real sizes first (every tiling the decode tuner may pick), then decode/prefill.
step check_gemm 30 python -m tests.engine.kernels.check_fp8 cuda real gemm
for q in fp8 none; do
  flag=""; [ "$q" = fp8 ] && flag="--quantization fp8"
  step "qwen3_$q" 40 python -m bench.engine_bench --model qwen3-8b --dtype bfloat16 $flag --batch 1,16,64 \
    --decode-steps 32 --prefill-len 2048 --out "$STAGE/qwen3_$q"
done
step gemm 30 python -m bench.fp8_gemm_bench --m 1,16,64,2048 --out "$STAGE"
# DeepSeek-V3 as it ships (FP8 blocks), full width, first 13 layers (3 dense + 10 MoE, 112.8 GiB of weights).
step v3_cut 45 python -m bench.engine_bench --model deepseek-v3-fp8 --dtype bfloat16 --num-layers 13 \
  --batch 1,16,64 --decode-steps 16 --prefill-len 2048 --gpu-mem 0.93 --out "$STAGE/v3_cut"
step accuracy 25 python -m bench.fp8_accuracy --model qwen3-8b --tokens 512 --out "$STAGE"
for q in fp8 none; do
  flag=""; [ "$q" = fp8 ] && flag="--quantization fp8"
  step "v2lite_$q" 25 python -m bench.engine_bench --model deepseek-v2-lite --dtype bfloat16 $flag --batch 1,16,64 \
    --decode-steps 32 --prefill-len 2048 --out "$STAGE/v2lite_$q"
done
