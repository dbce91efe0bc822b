#!/usr/bin/env bash
# cuBLAS's block-scaled FP8 GEMM as a tuner candidate (decode_gemm.SCALED_MM) on one GPU, ~330 s, no carry:
# the FP8 kernels' checks at real sizes (scaled_mm at M = 1, 3, 4, 64, 2047 included), the FP8 GEMM bench
# (ours / Triton default / cuBLAS block-scaled / bf16 per shape at M = 1, 64, 2048, with cuBLAS's refusals),
# then the engine bench with its 2k prefill: Qwen3-8B at batch 1 and DeepSeek-V2-Lite at 1/16/64 (the planner's
# reference for DeepSeek-V3), FP8 and bf16 in one
# run for the ratio. BUDGET_S (default 330) cuts the last steps. Packs into $OUT/fp8_prefill.tgz after every step.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PACK=fp8_prefill.tgz
BUDGET_S=${BUDGET_S:-330}
source "$(dirname "$0")/packed_steps.sh"
record_run
left() { echo $((BUDGET_S - SECONDS)); }
cap() { local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }
step check_fp8 "$(cap 90)" python -m tests.engine.kernels.check_fp8 cuda real gemm
step fp8_gemm "$(cap 90)" python -m bench.fp8_gemm_bench --m 1,64,2048 --out "$STAGE/fp8_gemm"
[ "$(left)" -gt 40 ] && bench_step qwen3_fp8 "$(cap 140)" qwen3-8b --batch 1 --quantization fp8
[ "$(left)" -gt 40 ] && bench_step qwen3_bf16 "$(cap 70)" qwen3-8b --batch 1
[ "$(left)" -gt 40 ] && bench_step v2lite_fp8 "$(cap 140)" deepseek-v2-lite --batch 1,16,64 --quantization fp8
[ "$(left)" -gt 40 ] && bench_step v2lite_bf16 "$(cap 80)" deepseek-v2-lite --batch 1,16,64
grep -h "^ok \|^BAD\|refused" "$STAGE"/check_*.log | cut -c1-160
grep -h "refused at\|2048 |" "$STAGE"/fp8_gemm/*.md 2>/dev/null | cut -c1-220
grep -h "decode tok/s\|prefill tok/s\|% of" "$STAGE"/qwen3_*/*.md "$STAGE"/v2lite_*/*.md 2>/dev/null | head -20
