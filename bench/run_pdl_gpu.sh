#!/usr/bin/env bash
# Programmatic dependent launch (engine/kernels/pdl.py) on one GPU, ~330 s, no carry: the kernel checks
# with PDL on (skinny GEMM incl. skinny_bmm, FP8 GEMMs, fused ops) and the fused-engine token check
# (tiny models, CUDA graphs), then the engine bench at batch 1 with PDL on and off in the same run
# (the first run of each model tunes; the PDL-off run reuses its choices through the tuning cache, so
# the pair differs only in PDL): Qwen3-8B bf16 and FP8, DeepSeek-V2-Lite bf16; Qwen3-8B bf16 at batch
# 16 and 64 too (QUICK=1: no skinny-GEMM check, batch 1 only). Packs into $OUT/pdl.tgz
# after every step.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PACK=pdl.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
eb() { local name=$1 model=$2 batch=$3; shift 3; bench_step "$name" 110 "$model" --batch "$batch" "$@"; }
[ -z "$QUICK" ] && step check_skinny_gemm 150 python -m tests.engine.kernels.check_skinny_gemm cuda batch1
step check_fp8 90 python -m tests.engine.kernels.check_fp8 cuda real gemm
step check_fused_ops 90 python -m tests.engine.kernels.check_fused_ops cuda real
step check_fused_engine 90 python -m tests.engine.kernels.check_fused_engine cuda
for m in qwen3-8b deepseek-v2-lite; do
  eb "${m}_pdl" "$m" 1 --profile
  PDSERVE_PDL=0 eb "${m}_nopdl" "$m" 1 --profile
done
eb qwen3-8b_fp8_pdl qwen3-8b 1 --quantization fp8 --profile
PDSERVE_PDL=0 eb qwen3-8b_fp8_nopdl qwen3-8b 1 --quantization fp8
if [ -z "$QUICK" ]; then
  eb qwen3-8b_b16_64_pdl qwen3-8b 16,64
  PDSERVE_PDL=0 eb qwen3-8b_b16_64_nopdl qwen3-8b 16,64
fi
grep -h "^ok \|^BAD" "$STAGE"/check_*.log | cut -c1-150
for f in "$STAGE"/*/*.md; do echo "== $f"; grep -h "decode tok/s\|^| 1 |" "$f"; done
