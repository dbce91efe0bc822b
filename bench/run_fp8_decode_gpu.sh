#!/usr/bin/env bash
# FP8 and MLA decode-GEMM changes on one GPU, ~400 s, no carry: the skinny GEMM's checks (FP8 quantized
# ahead, K-wider FP8 tiles, SwiGLU in the quantization launch, skinny_bmm at V2-Lite / V3 head shapes),
# the FP8 kernels' checks, the fused-engine token check (tiny models, graphs), then the engine bench at
# batch 1: Qwen3-8B bf16 and FP8 (profiled) and DeepSeek-V2-Lite bf16 and FP8 (profiled), each
# recording every decode-GEMM candidate's time. Packs into $OUT/fp8_decode.tgz after every step.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PACK=fp8_decode.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
eb() { local name=$1 model=$2; shift 2; bench_step "$name" 110 "$model" --batch 1 "$@"; }  # name model [extra...]
step check_skinny_gemm 150 python -m tests.engine.kernels.check_skinny_gemm cuda batch1
step check_fp8 90 python -m tests.engine.kernels.check_fp8 cuda real gemm
step check_fused_engine 90 python -m tests.engine.kernels.check_fused_engine cuda
eb qwen3_bf16 qwen3-8b
eb qwen3_fp8 qwen3-8b --quantization fp8 --profile
eb v2lite_bf16 deepseek-v2-lite --profile
eb v2lite_fp8 deepseek-v2-lite --quantization fp8 --profile
grep -h "^ok \|^BAD" "$STAGE"/check_*.log | cut -c1-150
grep -h "decode tok/s\|prefill tok/s" "$STAGE"/*/*.md
