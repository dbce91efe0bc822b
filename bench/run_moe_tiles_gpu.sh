#!/usr/bin/env bash
# The decode-MoE tile tuner (engine/kernels/moe_decode.py) on one GPU, ~300 s, no carry: every candidate
# tiling and the tuned choice against the references at DeepSeek-V2-Lite's sizes (with each candidate's
# time), then the engine bench with the tuner on: V2-Lite bf16 decode at 1/16/64 (profiled) and prefill 2k
# (prefill graphs on by default), V2-Lite FP8 and Qwen3-8B FP8 at batch 1 and bf16 at batch 1 (profiled: where
# the step goes).
# Packs into $OUT/moe_tiles.tgz after every step (steps.txt beside it).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PACK=moe_tiles.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
step check_moe_decode_tiles 150 python -m tests.engine.kernels.check_moe_decode_tiles cuda v2lite
eb() {  # name model [extra...]
  local name=$1 model=$2; shift 2
  step "$name" 90 python -m bench.engine_bench --model "$model" --dtype bfloat16 --decode-steps 32 \
    --out "$STAGE/$name" "$@"
}
eb v2lite_bf16 deepseek-v2-lite --batch 1,16,64 --prefill-len 2048 --profile
eb v2lite_fp8 deepseek-v2-lite --quantization fp8 --batch 1 --prefill-len 2048
eb qwen3_fp8 qwen3-8b --quantization fp8 --batch 1 --prefill-len 2048 --profile
eb qwen3_bf16 qwen3-8b --batch 1 --prefill-len 2048 --profile
grep -h "ok \|BAD" "$STAGE/check_moe_decode_tiles.log" | cut -c1-400
grep -h "decode tok/s\|prefill tok/s" "$STAGE"/*/*.md
