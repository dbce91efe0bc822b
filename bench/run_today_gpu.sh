#!/usr/bin/env bash
# The first device call of a session that got none for two (~480 s, no carry): what the CPU-only
# changes since the last device run need checked and measured, most informative first. Packs into
# $OUT/today.tgz after every step (steps.txt beside it).
# 1. Correctness of the GPU paths changed on CPU: the one-call varlen flash prefill against per-sequence
#    SDPA (kernel and tiny engines in bf16); fused ops at real sizes (the decompressed prefill's query
#    kernel included); tiny models' greedy tokens with fused kernels + graphs vs torch ops (MLA's rope-8
#    kernels and decompressed prefill included).
# 2. V2-Lite bf16 engine bench: decode batch 1 and prefill 2k with --profile (the MLA decompression
#    change), then the 2k prefill's host time by module, syncs, launch costs (bench/prefill_host.py).
# 3. Qwen3-8B batch 1 bf16 then FP8 (issue 17's 1.6x), the skinny GEMM and FP8 decode-MoE checks.
# 4. V2-Lite FP8 decode batch 1/16/64 with --profile.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PACK=today.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
step check_varlen_prefill 60 python -m tests.engine.kernels.check_varlen_prefill cuda
step check_fused_ops 40 python -m tests.engine.kernels.check_fused_ops cuda real
step check_fused_engine 90 python -m tests.engine.kernels.check_fused_engine cuda
step v2lite_bf16 75 python -m bench.engine_bench --model deepseek-v2-lite --dtype bfloat16 --batch 1 \
  --decode-steps 32 --prefill-len 2048 --profile --out "$STAGE/v2lite_bf16"
step prefill_host 75 python -m bench.prefill_host --model deepseek-v2-lite --tokens 2048 --out "$STAGE"
# 3. is bench/run_fp8_bs1_gpu.sh, into the same staging folder (it also packs $OUT/fp8_bs1.tgz)
STAGE=$STAGE bash "$(dirname "$0")/run_fp8_bs1_gpu.sh"
step v2lite_fp8 60 python -m bench.engine_bench --model deepseek-v2-lite --dtype bfloat16 --quantization fp8 \
  --batch 1,16,64 --decode-steps 32 --prefill-len 2048 --profile --out "$STAGE/v2lite_fp8"
cat "$STAGE"/prefill_host_*.md 2>/dev/null | head -60
