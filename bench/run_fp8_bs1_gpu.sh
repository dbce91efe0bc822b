#!/usr/bin/env bash
# The shortest device call for issue 17's batch-1 target (~200 s): skinny GEMM correctness at real sizes,
# Qwen3-8B decode at batch 1 in bf16 and FP8 in the same run (the decode GEMM tuner's choices recorded),
# the V2-Lite FP8 decode MoE against its reference on the device. Packs into $OUT/fp8_bs1.tgz per step.
set -o pipefail
export PYTHONUNBUFFERED=1
PACK=fp8_bs1.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
for q in none fp8; do
  flag=""; [ "$q" = fp8 ] && flag="--quantization fp8"
  step "qwen3_$q" 60 python -m bench.engine_bench --model qwen3-8b --dtype bfloat16 $flag --batch 1 \
    --decode-steps 48 --prefill-len 256 --out "$STAGE/qwen3_$q"
done
step check_skinny 30 python -m tests.engine.kernels.check_skinny_gemm cuda batch1
step check_moe_decode_fp8 60 python -m tests.engine.kernels.check_moe_decode_fp8 cuda v2lite
