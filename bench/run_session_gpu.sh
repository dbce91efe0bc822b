#!/usr/bin/env bash
# One device call of TOTAL_S seconds (default 570) for a session short of device time: the decode GEMM
# tuner and engine step (bench/run_decode_gemm_gpu.sh), the V2-Lite FP8 decode MoE
# (bench/run_v2l_gpu.sh), then issue 21's validation (bench/run_planner_validation_gpu.sh, QUICK,
# first model only) in whatever time is left. Carry .whldev. Every part packs its own results into $OUT.
set -uo pipefail
TOTAL_S=${TOTAL_S:-570}
T0=$SECONDS
export OUT
SKIP_GEMM_BENCH=1 bash "$(dirname "$0")/run_decode_gemm_gpu.sh"
bash "$(dirname "$0")/run_v2l_gpu.sh"
python -m pip install -q --no-deps --no-index --target /tmp/site .whldev/*.whl > "$OUT/pip.log" 2>&1
left=$((TOTAL_S - (SECONDS - T0)))
echo "planner validation with ${left}s" >> "$OUT/steps.txt"
[ "$left" -gt 150 ] && PYTHONPATH=$PWD:/tmp/site QUICK=1 MODEL2= BUDGET_S=$left bash "$(dirname "$0")/run_planner_validation_gpu.sh"
cat "$OUT/steps.txt"
