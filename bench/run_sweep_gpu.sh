#!/usr/bin/env bash
# Request-rate sweeps through `pdserve up` on one GPU (prefill + decode node sharing it), dummy
# bf16 weights: random 2k-in/256-out and ShareGPT-like workloads, goodput at TTFT<=1000 ms and
# TPOT<=50 ms. Results (JSON per run) land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SEED=${SEED:-1000}  # the first run's seed; each run after it the next
ts() { date -u +%H:%M:%S; }
for model in ${MODELS:-qwen3-8b deepseek-v2-lite}; do
  echo "$(ts) up $model"
  python -m deploy.cli up --model "$model" --load-format dummy --dtype bfloat16 --device cuda \
    --gpu-memory-utilization 0.45 --max-model-len 6144 --max-num-seqs 128 --grpc-port 50051 --http-port 8000 \
    > "$OUT/up_$model.log" 2>&1 &
  UP=$!
  for i in $(seq 1 300); do grep -q "pdserve up: gRPC" "$OUT/up_$model.log" && break; sleep 1; done
  for rate in ${RANDOM_RATES:-1 2 4}; do
    SEED=$((SEED + 1))  # each run its own prompts: the prefix cache keeps the last run's
    echo "$(ts) $model random 2048/256 @ $rate req/s"
    python -m deploy.cli bench --base-url http://127.0.0.1:8000/v1 --dataset-name random --num-prompts 32 \
      --random-input-len 2048 --random-output-len 256 --request-rate $rate --seed $SEED --goodput ttft:1000 tpot:50 \
      --save-result --result-dir "$OUT" --result-filename "sweep_${model}_random_${rate}.json" 2>/dev/null \
      | grep -E "Successful|Failed|throughput|goodput|Median TTFT|P99 TTFT|Median TPOT|P99 TPOT"
  done
  for rate in ${SHAREGPT_RATES:-2 4 8}; do
    SEED=$((SEED + 1))  # each run its own prompts: the prefix cache keeps the last run's
    echo "$(ts) $model sharegpt-like @ $rate req/s"
    python -m deploy.cli bench --base-url http://127.0.0.1:8000/v1 --dataset-name sharegpt --num-prompts 64 \
      --request-rate $rate --seed $SEED --goodput ttft:1000 tpot:50 --save-result --result-dir "$OUT" \
      --result-filename "sweep_${model}_sharegpt_${rate}.json" 2>/dev/null \
      | grep -E "Successful|Failed|throughput|goodput|Median TTFT|P99 TTFT|Median TPOT|P99 TPOT"
  done
  kill -TERM $UP; wait $UP
  echo "$(ts) down $model (exit $?)"
done
