#!/usr/bin/env bash
# Issue 21 on a GPU machine, in two stages (each fits one 10-minute device command):
#   STAGE=profile: `pdserve profile` of $MODEL (step tables, NIXL KV transfer, EP all-to-all when
#                  several GPUs, the serving path's fixed TTFT overhead through idle clusters);
#   STAGE=validate: a one-GPU request-rate sweep on this same device (bench/run_sweep_gpu.sh: the
#                  recorded runs in bench/results/ are from H100s, so an H200 profile must be checked
#                  against H200 runs), then bench/validate_simulator.py over it.
# Expects PYTHONPATH to include the repo (and the carried wheels); writes to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
MODEL=${MODEL:-deepseek-v2-lite}
PROFILE=${PROFILE:-$OUT/profile_$MODEL.json}
ts() { date -u +%H:%M:%S; }
if [ "${STAGE:-profile}" = profile ]; then
  echo "$(ts) profile $MODEL"
  python -m deploy.cli --log-level INFO profile --model "$MODEL" --dtype bfloat16 --device cuda --out "$PROFILE" \
    --serving-prompts 256,2048 2>&1 | grep -vE "NIXL|UCX" | tail -20
  echo "$(ts) done"
else
  echo "$(ts) sweep $MODEL"
  MODELS=$MODEL OUT=$OUT RANDOM_RATES="${RANDOM_RATES:-1 4}" SHAREGPT_RATES="${SHAREGPT_RATES:-4 8}" \
    bash "$(dirname "$0")/run_sweep_gpu.sh"
  echo "$(ts) validate"
  python -m bench.validate_simulator --profile "$PROFILE" "$OUT"/sweep_"$MODEL"_*.json --out "$OUT"
fi
