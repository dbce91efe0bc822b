#!/usr/bin/env bash
# One device call (carry .whldev) for two of this session's questions:
# 1. the MLA decode kernel with the probabilities through scratch (correctness at V3/V2-Lite sizes, then
#    bench/mla_decode_sweep.py --scratch against the rule's tile at 128 heads);
# 2. the served DeepSeek-V2-Lite's slow KV pushes: one `pdserve up` and its sweep with an earlier H100
#    profile (PROFILE_FROM), whose node log now names each slow WRITE post's parts.
# Writes $OUT/mla_check.txt, $OUT/mla/ and $OUT/planner_validation.tgz (+ log.txt).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/mla"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
python -m pip install -q --no-deps --no-index --target /tmp/site .whldev/*.whl > "$OUT/pip.log" 2>&1
git log -1 --format=%H > "$OUT/commit.txt" 2>/dev/null
timeout 120 python -m tests.engine.kernels.check_mla_decode cuda real > "$OUT/mla_check.txt" 2>&1
echo "check rc $?" >> "$OUT/mla_check.txt"
timeout 150 python -m bench.mla_decode_sweep --scratch --workers 8 --out "$OUT/mla" > "$OUT/mla/sweep.log" 2>&1
echo "sweep rc $? at ${SECONDS}s" >> "$OUT/mla/sweep.log"
MODEL=deepseek-v2-lite MODEL2= SWEEP="random_1 sharegpt_4 sharegpt_8" BUDGET_S=$((570 - SECONDS)) OUT=$OUT \
  PROFILE_FROM=bench/results/2026-12-07g_h100_roofline/validation_v2lite/profile_deepseek-v2-lite.json \
  bash bench/run_planner_validation_gpu.sh
