#!/usr/bin/env bash
# Issue 16's and 17's tables on one GPU in one device call of BUDGET_S seconds (default 540), carry .whldev:
# the engine step against its roofline and HF eager (Qwen3-8B, Llama-3-8B, DeepSeek-V2-Lite; decode batch
# 1/16/64 and prefill 2k, --profile for GPU-busy / kernels / host time not hidden, the engine process at
# batch 1), FP8 against bf16 for Qwen3-8B and V2-Lite, MLA decode at 16 and 128 heads, the layer-wise KV push
# (disagg_bench at 1k/4k/16k), offline throughput against HF's static batch. Most needed first; a step
# starts only while BUDGET_S has room for it; ONLY="name ..." runs just those steps. Packs into
# $OUT/roofline.tgz after every step. The FP8 steps' limits allow for the decode GEMM tuner's first run at three
# batch sizes (60 s cut both off on an H100, 2026-12-07g).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
BUDGET_S=${BUDGET_S:-540}
PACK=roofline.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
python -m pip install -q --no-deps --no-index --target /tmp/site .whldev/*.whl > "$STAGE/pip.log" 2>&1
# room NAME SECONDS: the step's limit cut to what is left of BUDGET_S; nothing (and a note) under 20 s
room() {
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $1 "* ]]; then return 1; fi
  local left=$((BUDGET_S - SECONDS)) secs=$2
  [ "$secs" -gt "$left" ] && secs=$left
  if [ "$secs" -lt 20 ]; then echo "$1 skipped: ${left}s left" | tee -a "$STAGE/steps.txt" >&2; return 1; fi
  echo "$secs"
}
eb() { local name=$1 secs; secs=$(room "$1" "$2") || return 0; shift 2; bench_step "$name" "$secs" "$@"; }
run() { local name=$1 secs; secs=$(room "$1" "$2") || return 0; shift 2; step "$name" "$secs" "$@"; }

eb qwen3_bf16 120 qwen3-8b --batch 1,16,64 --hf-baseline --profile --engine-process
eb v2lite_bf16 120 deepseek-v2-lite --batch 1,16,64 --hf-baseline --profile
eb llama_bf16 100 llama-3-8b --batch 1,16,64 --hf-baseline
eb qwen3_fp8 150 qwen3-8b --batch 1,16,64 --quantization fp8
eb v2lite_fp8 120 deepseek-v2-lite --batch 1,16,64 --quantization fp8
run mla_decode 40 python -m bench.attention_bench --kinds mla,mla16 --phases decode --out "$STAGE/attention"
for m in qwen3-8b deepseek-v2-lite; do
  run "disagg_$m" 80 python -m bench.disagg_bench --model "$m" --lengths 1024,4096,16384 --repeats 3 --warmup 1 \
    --out "$STAGE"
done
run offline_qwen3 100 python -m bench.offline_throughput --model qwen3-8b --num-prompts 1000 --hf-sample 64 \
  --hf-batch 64 --out "$STAGE/offline"
grep -h "decode tok/s\|prefill tok/s\|% of" "$STAGE"/*/*.md 2>/dev/null | head -60
cat "$STAGE"/disagg*.md 2>/dev/null | grep "^| [0-9]"
