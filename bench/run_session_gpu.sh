#!/usr/bin/env bash
# One device call of TOTAL_S seconds (default 570) for a session short of device time, what the CPU-only
# work of 2026-12-08 left owed: the piecewise prefill graphs' check and DeepSeek-V2-Lite's prefix/mixed step
# bench (bench/run_prefix_graph_gpu.sh, up to 350 s), the split-K FP8 GEMM check of 2026-12-07, then
# issue 21's validation (bench/run_planner_validation_gpu.sh, QUICK, V2-Lite, a fresh profile) if 280 s are
# left, else in a second call. Carry .whldev. Every part packs its own results into $OUT.
set -uo pipefail
TOTAL_S=${TOTAL_S:-570}
T0=$SECONDS
export OUT
MODELS=deepseek-v2-lite bash "$(dirname "$0")/run_prefix_graph_gpu.sh"
timeout 60 python -m tests.engine.kernels.check_fp8 cuda real gemm > "$OUT/check_fp8_gemm.log" 2>&1
echo "check_fp8 gemm rc=$?" >> "$OUT/steps.txt"
python -m pip install -q --no-deps --no-index --target /tmp/site .whldev/*.whl > "$OUT/pip.log" 2>&1
left=$((TOTAL_S - (SECONDS - T0)))
echo "planner validation with ${left}s" >> "$OUT/steps.txt"
[ "$left" -gt 280 ] && PYTHONPATH=$PWD:/tmp/site QUICK=1 MODEL=deepseek-v2-lite MODEL2= BUDGET_S=$left \
  bash "$(dirname "$0")/run_planner_validation_gpu.sh"
cat "$OUT/steps.txt"
