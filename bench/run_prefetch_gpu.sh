#!/usr/bin/env bash
# The decode GEMMs' L2 prefetch ahead of their PDL wait and split-K without a zero fill or cast
# (engine/kernels/pdl.py `prefetch_rows`, fp8_gemm.py `split_k_workspace`) on one GPU, ~330 s, no carry:
# the FP8 and skinny GEMM checks (split-K workspace reuse included), then the engine bench at batch 1
# with the prefetch at PDSERVE_L2_PREFETCH_MB=8 (the default, which tunes), 0 (off) and 16 in the same run
# (the later runs reuse the first one's tuning through the cache, so they differ only in the prefetch):
# Qwen3-8B FP8 (and PDL off), Qwen3-8B bf16, DeepSeek-V2-Lite bf16. Packs into $OUT/prefetch.tgz after
# every step.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PACK=prefetch.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
eb() { local name=$1 model=$2; shift 2; bench_step "$name" 150 "$model" --batch 1 "$@"; }
step check_fp8 90 python -m tests.engine.kernels.check_fp8 cuda real gemm
[ -z "$QUICK" ] && step check_skinny_gemm 150 python -m tests.engine.kernels.check_skinny_gemm cuda batch1
eb qwen3_fp8_pf8 qwen3-8b --quantization fp8 --profile
PDSERVE_L2_PREFETCH_MB=0 eb qwen3_fp8_pf0 qwen3-8b --quantization fp8 --profile
PDSERVE_L2_PREFETCH_MB=16 eb qwen3_fp8_pf16 qwen3-8b --quantization fp8
PDSERVE_PDL=0 eb qwen3_fp8_nopdl qwen3-8b --quantization fp8
eb qwen3_bf16_pf8 qwen3-8b
PDSERVE_L2_PREFETCH_MB=0 eb qwen3_bf16_pf0 qwen3-8b
eb v2lite_bf16_pf8 deepseek-v2-lite
PDSERVE_L2_PREFETCH_MB=0 eb v2lite_bf16_pf0 deepseek-v2-lite
grep -h "^ok \|^BAD" "$STAGE"/check_*.log | cut -c1-150
for f in "$STAGE"/*/*.md; do echo "== $f"; grep -h "decode tok/s\|^| 1 |" "$f"; done
