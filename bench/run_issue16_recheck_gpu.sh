#!/usr/bin/env bash
# Issue 16's open items re-measured on one H200 with the decode-MoE tuner and prefill graphs on (defaults),
# ~300 s, carry .whldev: the short-context decode graphs' token check, engine bench DeepSeek-V2-Lite (decode
# batch 1 profiled, prefill 2k) and Qwen3-8B (batch 1, prefill 2k; FP8 batch 1 beside it), both at batch 1
# also with short-context decode graphs (N = 512: the bench's contexts fit), then the layer-wise KV push (disagg_bench) at 1k/4k/16k
# for both models. Packs into $OUT/issue16_recheck.tgz after every step (steps.txt beside it).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PACK=issue16_recheck.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
eb() { local name=$1; shift; bench_step "$name" 70 "$@"; }  # name model [extra...]
step check_short_context_graphs 90 python -m tests.engine.kernels.check_short_context_graphs
eb v2lite_bf16 deepseek-v2-lite --batch 1 --profile
eb v2lite_bf16_short deepseek-v2-lite --batch 1 --decode-graph-short-context 512
eb qwen3_bf16 qwen3-8b --batch 1
eb qwen3_bf16_short qwen3-8b --batch 1 --decode-graph-short-context 512
eb qwen3_fp8 qwen3-8b --batch 1 --quantization fp8
python -m pip install -q --no-deps --no-index --target /tmp/site .whldev/*.whl > "$STAGE/pip.log" 2>&1
for m in qwen3-8b deepseek-v2-lite; do
  PYTHONPATH=$PWD:/tmp/site step "disagg_$m" 80 python -m bench.disagg_bench --model "$m" --lengths 1024,4096,16384 \
    --repeats 3 --warmup 1 --out "$STAGE"
done
grep -h "ok \|BAD" "$STAGE/check_short_context_graphs.log"
grep -h "decode tok/s\|prefill tok/s" "$STAGE"/*/*.md
cat "$STAGE"/disagg*.md 2>/dev/null | grep "^| [0-9]"
