#!/usr/bin/env bash
# One H200 call (~120 s) for DeepSeek-V2-Lite decode (issues 16/17): the FP8 two-kernel decode MoE and
# the two launch-saving fusions checked at real sizes, then the engine bench in FP8 and bf16, then the MoE
# block alone. Everything is packed into $OUT/v2l_results.tgz (+ steps.txt) after every step, so a
# call cut short still returns what finished. Run from the repository root: `bash bench/run_v2l_gpu.sh`.
set -o pipefail
export PYTHONUNBUFFERED=1
PACK=v2l_results.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
# 1. FP8 decode MoE against the torch reference at V2-Lite sizes (64 experts, H 2048, I 1408, top-6,
#    2 shared experts; T = 1..4; W8A8 and weight-only; shared experts none / as output / as FP8 weights).
step check_moe_decode_fp8 60 python -m tests.engine.kernels.check_moe_decode_fp8 cuda v2lite
# 2. Decode batch 1/16/64 with kernels per step and roofline % (--profile), FP8 then bf16; short prefill.
for q in fp8 none; do
  flag=""; [ "$q" = fp8 ] && flag="--quantization fp8"
  step "v2lite_$q" 60 python -m bench.engine_bench --model deepseek-v2-lite --dtype bfloat16 $flag \
    --batch 1,16,64 --decode-steps 32 --prefill-len 256 --profile --out "$STAGE/v2lite_$q"
done
# 3. The two fusions for fewer launches per step, at V2-Lite and V3 shapes: the absorbed MLA query
#    (q_nope @ W_UK + rotated q_pe, T = 1, 4) and the router logits (float32, T = 1, 4; cuBLAS at 64).
step check_decode_fusions 10 python -m tests.engine.kernels.check_fused_ops cuda decode
# 4. The MoE block alone at 1/2/4 tokens, CUDA-graph timed: FP8 decode kernels (tile variants, W8A8 and
#    weight-only) vs the grouped FP8 path FP8 took before vs the bf16 decode kernels, against the floor.
step moe_decode_fp8_bench 20 python -m bench.moe_decode_fp8_bench --tokens 1,2,4 --out "$STAGE"
