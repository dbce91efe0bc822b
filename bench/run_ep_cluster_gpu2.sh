#!/usr/bin/env bash
# `pdserve up` with one EP = 2 node over two GPUs (collocated: the node prefills and decodes),
# DeepSeek-V2-Lite dummy bf16, 2 redundant experts, EPLB every 32 steps: a short benchmark, then the
# node's /metrics (EP backend label, per-expert tokens, group imbalance, rebalances). Writes to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ts() { date -u +%H:%M:%S; }
echo "$(ts) up"
python -m deploy.cli up --model deepseek-v2-lite --load-format dummy --dtype bfloat16 --device cuda \
  --num-prefill 0 --num-decode 1 --ep-size 2 --num-redundant-experts 2 --eplb-interval 32 --eplb-window 32 \
  --gpu-memory-utilization 0.85 --max-model-len 4096 --grpc-port 50051 --http-port 8000 \
  --prometheus-targets "$OUT/targets.json" > "$OUT/up.log" 2>&1 &
UP=$!
for i in $(seq 1 300); do grep -q "pdserve up: gRPC" "$OUT/up.log" && break; sleep 1; done
grep -E "on GPU|pdserve up:" "$OUT/up.log"
python -m deploy.cli bench --base-url http://127.0.0.1:8000/v1 --dataset-name random --num-prompts 48 \
  --random-input-len 512 --random-output-len 64 --max-concurrency 16 --goodput ttft:1000 tpot:100 \
  --save-result --result-dir "$OUT" --result-filename ep_cluster.json 2>/dev/null \
  | grep -E "Successful|Failed|throughput|Median TTFT|Median TPOT"
NODE=$(python -c "import json;print([t for t in json.load(open('$OUT/targets.json')) if t['labels']['role']=='decode'][0]['targets'][0])")
curl -s "http://$NODE/metrics" > "$OUT/node_metrics.txt"
grep -E "^pdserve:(node_info|ep_imbalance|eplb_rebalances_total|engine_steps_total|num_requests_running)" "$OUT/node_metrics.txt"
grep -c "^pdserve:expert_tokens_total" "$OUT/node_metrics.txt"
kill -TERM $UP; wait $UP; echo "$(ts) down (exit $?)"
