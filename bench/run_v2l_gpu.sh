#!/usr/bin/env bash
# One H200 call (~115 s) for the FP8 decode MoE of DeepSeek-V2-Lite (issues 16/17), most important
# first; everything is packed into $OUT/v2l_results.tgz (+ steps.txt) after every step, so a call cut
# short still returns what finished. Run from the repository root: `bash bench/run_v2l_gpu.sh`.
set -o pipefail
export PYTHONUNBUFFERED=1
PACK=v2l_results.tgz
source "$(dirname "$0")/packed_steps.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$STAGE/device.txt" 2>&1
# 1. The FP8 decode MoE against the torch reference at V2-Lite sizes (T = 1..4, W8A8 and weight-only,
#    shared experts none / as output / as FP8 weights).
step check_moe_decode_fp8 25 python -m tests.engine.kernels.check_moe_decode_fp8 cuda v2lite
# 2. Decode batch 1/16/64 with kernels per step (--profile), FP8 then bf16 in the same call; short prefill.
for q in fp8 none; do
  flag=""; [ "$q" = fp8 ] && flag="--quantization fp8"
  step "v2lite_$q" 35 python -m bench.engine_bench --model deepseek-v2-lite --dtype bfloat16 $flag \
    --batch 1,16,64 --decode-steps 32 --prefill-len 256 --profile --out "$STAGE/v2lite_$q"
done
# 3. The MoE block alone at 1/2/4 tokens: FP8 decode kernels (tile variants) vs the old grouped FP8 path vs bf16.
step moe_decode_fp8_bench 20 python -m bench.moe_decode_fp8_bench --tokens 1,2,4 --out "$STAGE"
