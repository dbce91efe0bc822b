#!/usr/bin/env bash
# `pdserve up` on one GPU (prefill and decode node sharing it) with DeepSeek-V2-Lite dummy weights,
# concurrent gRPC load through the router, then SIGTERM and a check that no process is left.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -c "import grpc, google.protobuf as p; print('grpcio', grpc.__version__, 'protobuf', p.__version__)"
python -m deploy.cli up --model deepseek-v2-lite --load-format dummy --dtype bfloat16 --device cuda \
  --gpu-memory-utilization 0.45 --max-model-len 4096 --max-num-seqs 64 --grpc-port 50051 --http-port 8000 \
  > "$OUT/up.log" 2>&1 &
UP=$!
for i in $(seq 1 240); do grep -q "pdserve up: gRPC" "$OUT/up.log" && break; sleep 1; done
grep "pdserve up" "$OUT/up.log" | head -2
for n in 1 16; do
  echo "== $n concurrent requests, 1024-token prompts, 64 new tokens"
  python -m bench.cluster_smoke --grpc 127.0.0.1:50051 --num-requests $n --prompt-len 1024 --max-tokens 64 \
    | tee "$OUT/cluster_smoke_$n.json"
done
curl -s -m 30 http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
  -d '{"prompt": "Hello", "max_tokens": 8, "temperature": 0}' | head -c 400; echo
kill -TERM $UP; wait $UP; echo "up exited: $?"
sleep 2; echo "left behind: $(pgrep -fc 'deploy.cli' || true)"
grep -i "error\|traceback" "$OUT/up.log" | grep -v "NIXL" | head -5
