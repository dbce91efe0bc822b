#!/usr/bin/env bash
# Disaggregated (1 prefill + 1 decode node) against collocated (2 nodes that each prefill and decode)
# at equal GPU count: two GPUs, one node per GPU, DeepSeek-V2-Lite dummy bf16, random 2k-in/256-out
# at rising request rates through `pdserve up`, goodput at TTFT <= 1000 ms and TPOT <= 50 ms.
# Expects PYTHONPATH to include the repo (and /tmp/site with the carried wheels); writes to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ts() { date -u +%H:%M:%S; }
MODEL=${MODEL:-deepseek-v2-lite}
for mode in disagg colloc; do
  if [ $mode = disagg ]; then nodes="--num-prefill 1 --num-decode 1"; else nodes="--num-prefill 0 --num-decode 2"; fi
  echo "$(ts) up $mode"
  python -m deploy.cli up --model "$MODEL" --load-format dummy --dtype bfloat16 --device cuda $nodes \
    --gpu-memory-utilization 0.85 --max-model-len 6144 --max-num-seqs 128 --grpc-port 50051 --http-port 8000 \
    > "$OUT/up_$mode.log" 2>&1 &
  UP=$!
  for i in $(seq 1 300); do grep -q "pdserve up: gRPC" "$OUT/up_$mode.log" && break; sleep 1; done
  grep "on GPU" "$OUT/up_$mode.log"
  for rate in ${RATES:-4 8 12 16}; do
    SEED=$((SEED + 1))  # each run its own prompts: the prefix cache keeps the last run's
    echo "$(ts) $mode random 2048/256 @ $rate req/s"
    python -m deploy.cli bench --base-url http://127.0.0.1:8000/v1 --dataset-name random --num-prompts ${NUM:-48} \
      --random-input-len 2048 --random-output-len 256 --request-rate $rate --seed $SEED --goodput ttft:1000 tpot:50 --warmup-requests 8 \
      --save-result --result-dir "$OUT" --result-filename "colloc_${mode}_${rate}.json" 2>/dev/null \
      | grep -E "Successful|throughput|goodput|Median TTFT|P99 TTFT|Median TPOT|P99 TPOT"
  done
  kill -TERM $UP; wait $UP
  echo "$(ts) down $mode (exit $?)"
done
