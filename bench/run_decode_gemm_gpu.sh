#!/usr/bin/env bash
# One H200 call for the decode GEMM tuner (engine/kernels/decode_gemm.py, skinny_gemm.py): kernel
# correctness at real sizes, every candidate timed at decode sizes against its floor, then the engine's
# decode step with the tuner's choices: Qwen3-8B bf16 and FP8 at batch 1/16/64, Llama-3-8B bf16 at batch 1.
# Packs everything into $OUT/decode_gemm_results.tgz after every step. ~5 min.
set -o pipefail
export PYTHONUNBUFFERED=1
PACK=decode_gemm_results.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
step check_skinny 30 python -m tests.engine.kernels.check_skinny_gemm cuda real
[ -z "${SKIP_GEMM_BENCH:-}" ] && step gemm_bench 60 python -m bench.decode_gemm_bench --m 1,4 --out "$STAGE" \
  --shapes "qwen3-8b qkv,qwen3-8b o,qwen3-8b gate_up,qwen3-8b down,qwen3-8b lm_head"
for q in none fp8; do
  flag=""; [ "$q" = fp8 ] && flag="--quantization fp8"
  step "qwen3_$q" 70 python -m bench.engine_bench --model qwen3-8b --dtype bfloat16 $flag --batch 1,16,64 \
    --decode-steps 48 --prefill-len 2048 --out "$STAGE/qwen3_$q"
done
[ -z "${SKIP_LLAMA:-}" ] && step llama_none 45 python -m bench.engine_bench --model llama-3-8b --dtype bfloat16 --batch 1 \
  --decode-steps 48 --prefill-len 2048 --out "$STAGE/llama_none"
