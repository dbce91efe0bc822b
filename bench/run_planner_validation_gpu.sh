#!/usr/bin/env bash
# Issue 21's validation on one GPU, in one device call of BUDGET_S seconds (default 340). Per model
# (MODEL, then MODEL2 if time is left): `pdserve profile` (in-process engine step tables), the
# shared-GPU interference of a prefill and a decode engine (planner/interference.py, written into the
# profile), for MODEL also the engine bench's batch-1 decode step; then one `pdserve up` (prefill +
# decode node sharing the GPU): an idle probe (gRPC: the serving path's fixed TTFT overhead, written
# into the profile, and the TPOT of one request; HTTP: one request at a time) and a request-rate sweep
# (random 2k/256 at 1, 2, 4 req/s; ShareGPT-like at 2, 4, 8). The simulator then re-predicts the sweep
# on CPU (bench/validate_simulator.py) from the profile alone.
# Everything is written under a staging folder and packed after each step into
# $OUT/planner_validation.tgz (plus $OUT/log.txt), so a call cut short still returns what finished.
# Needs PYTHONPATH with the repo and /tmp/site holding bench/device_wheels.sh's wheels: carry .whldev and
#   python -m pip install -q --no-deps --no-index --target /tmp/site .whldev/*.whl
# CPU rehearsal: DEVICE=cpu DTYPE=float32 MODEL=tiny-qwen3 MODEL2=tiny-deepseek-v2 SMALL=1 (small tables,
# short prompts).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-340}
MODEL=${MODEL:-qwen3-8b}
MODEL2=${MODEL2-deepseek-v2-lite}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
GRPC_PORT=${GRPC_PORT:-50051}; HTTP_PORT=${HTTP_PORT:-8000}
STAGE=$(mktemp -d)
LOG=$STAGE/log.txt
source "$(dirname "$0")/budget_steps.sh"
pack() { tar czf "$OUT/planner_validation.tgz" -C "$STAGE" . && cp "$LOG" "$OUT/log.txt"; }
pstep() { step "$@"; pack; }
if [ -n "${SMALL:-}" ]; then  # CPU rehearsal of the flow
  PROF_ARGS="--prefill-tokens 32,128,512 --cached 0,256 --decode-batch 1,4,16 --decode-context 64,256 --decode-steps 4 --repeats 2"
  PROF2_ARGS="--prefill-tokens 32,256 --cached 0 --decode-batch 1,4 --decode-context 64 --decode-steps 2 --repeats 1"
  IF_ARGS="--prefill-tokens 256 --decode-batch 4 --decode-context 128 --decode-steps 8 --prefills 2 --push"
  RIN=256; ROUT=16; RATES_R="1 2 4"; RATES_S="2 4 8"; NR=4; NS=6; MAXLEN=1024
elif [ -n "${QUICK:-}" ]; then  # a short call: lighter tables, four sweep points of the first model
  PROF_ARGS="--prefill-tokens 128,512,2048,8192 --cached 0,2048 --decode-batch 1,16,64,128
    --decode-context 128,2560 --decode-steps 8 --repeats 2"
  PROF2_ARGS=$PROF_ARGS
  IF_ARGS="--prefill-tokens 256,2048 --decode-batch 1,4,32 --decode-context 1024 --decode-steps 20 --prefills 3 --push"
  RIN=2048; ROUT=256; RATES_R="2 4"; RATES_S="4 8"; NR=16; NS=32; MAXLEN=6144
else
  # KV transfer is not profiled: the same-GPU push is modelled as NVLink (the profiler's NIXL loop is slow).
  PROF_ARGS="--prefill-tokens 32,128,512,2048,8192 --cached 0,2048,4096 --decode-batch 1,4,16,64,128
    --decode-context 128,1024,2560 --decode-steps 16 --repeats 3"
  PROF2_ARGS="--prefill-tokens 32,128,512,2048,8192 --cached 0,2048 --decode-batch 1,16,64,128
    --decode-context 128,2560 --decode-steps 16 --repeats 2"
  IF_ARGS="--prefill-tokens 256,2048 --decode-batch 1,4,32 --decode-context 1024 --decode-steps 40 --prefills 5 --push"
  RIN=2048; ROUT=256; RATES_R="2 4 1"; RATES_S="4 8 2"; NR=0; NS=0; MAXLEN=6144
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG" 2>&1
python -c "import sys, torch, grpc, aiohttp, zmq; print(sys.version.split()[0], torch.__version__, 'grpc', grpc.__version__, 'aiohttp', aiohttp.__version__)" >> "$LOG" 2>&1

scrape() {  # before|after NAME: the cluster's histograms into metrics_{before,after}_NAME.json; after: their
  # difference into ttft_split_NAME.txt (where the requests between spent their time)
  local t=$STAGE/targets.json
  [ -f "$t" ] || return 0
  python -m bench.scrape_metrics scrape --targets "$t" --out "$STAGE/metrics_$1_$2.json"
  [ "$1" = after ] && python -m bench.scrape_metrics diff "$STAGE/metrics_before_$2.json" \
    "$STAGE/metrics_after_$2.json" > "$STAGE/ttft_split_$2.txt" 2>&1
  return 0
}

SEED=0
bench() {  # name dataset rate prompts [args...]; the cluster's histograms scraped before and after; each
  # run its own seed (prompts the server's prefix cache holds from an earlier run would prefill cached)
  local name=$1 ds=$2 rate=$3 n=$4; shift 4
  SEED=$((SEED + 1))
  scrape before "$name"
  pstep "$name" 60 python -m deploy.cli bench --base-url http://127.0.0.1:$HTTP_PORT/v1 --dataset-name "$ds" \
    --num-prompts "$n" --request-rate "$rate" --goodput ttft:1000 tpot:50 --seed $SEED "$@" --disable-tqdm \
    --save-result --result-dir "$STAGE" --result-filename "$name.json"
  scrape after "$name"
}

serve() {  # model sweep [colloc]: one `pdserve up`, the idle probes, the sweep (random points then
  # ShareGPT-like), down. colloc: one collocated node with the GPU to itself (`--num-prefill 0`), its runs
  # and files named with a `c` (sweepc_*, probe_*c_*), its probe's overhead written as the profile's
  # collocated one; else a prefill and a decode node sharing the GPU.
  local m=$1 profile=$STAGE/profile_$1.json sweep=$2 c=${3:+c}
  local mode=disaggregated shape="--gpu-memory-utilization 0.45"
  [ -n "$c" ] && mode=collocated shape="--num-prefill 0 --num-decode 1 --gpu-memory-utilization 0.85"
  [ "$(left)" -lt 70 ] && { echo "=== up$c $m skipped: $(left)s left" >> "$LOG"; return; }
  echo "=== up$c $m (at $((SECONDS - T0))s)" >> "$LOG"
  python -m deploy.cli up --model "$m" --load-format dummy --dtype "$DTYPE" --device "$DEVICE" $shape \
    --max-model-len $MAXLEN --max-num-seqs 128 --grpc-port $GRPC_PORT --http-port $HTTP_PORT \
    --prometheus-targets "$STAGE/targets.json" \
    > "$STAGE/up${c}_$m.log" 2>&1 &
  local up=$! i
  for i in $(seq 1 150); do grep -q "pdserve up: gRPC" "$STAGE/up${c}_$m.log" && break; kill -0 $up 2>/dev/null || break
    [ "$(left)" -lt 40 ] && break; sleep 1; done
  echo "up after ${i}s" >> "$LOG"
  scrape before probe_grpc$c
  pstep "probe_grpc${c}_$m" 40 python -m planner.serving_probe --grpc 127.0.0.1:$GRPC_PORT --profile "$profile" \
    --mode $mode --prompts 256,$RIN --repeats 3 --max-tokens 64 --out "$STAGE/probe_grpc${c}_$m.json"
  scrape after probe_grpc$c
  # The same four-prompt probe over HTTP and over gRPC through one client (`pdserve bench`), each with the
  # cluster's histograms scraped around it: a check that the two transports agree (the gRPC probe's 2k
  # prompts measured 20-35 ms more than HTTP in 2026-12-07n/o because each began with one of its 256-token
  # prompts, a prefix-cache hit that ran the eager path; its prompts share no prefix since 2026-12-08).
  local be
  for be in http bgrpc; do  # bgrpc: the bench over gRPC (probe_grpc_*.json is the serving probe's)
    local url=http://127.0.0.1:$HTTP_PORT/v1 backend=openai seed=1000
    [ $be = bgrpc ] && url=127.0.0.1:$GRPC_PORT backend=pdserve-grpc seed=1001
    scrape before "probe_$be$c"
    pstep "probe_${be}${c}_$m" 30 python -m deploy.cli bench --backend $backend --base-url $url --dataset-name random \
      --num-prompts 4 --random-input-len $RIN --random-output-len 64 --request-rate inf --max-concurrency 1 \
      --seed $seed --save-result --result-dir "$STAGE" --result-filename "probe_${be}${c}_$m.json" --disable-tqdm
    scrape after "probe_$be$c"
  done
  local r n
  for r in $RATES_R; do
    [[ " $sweep " == *" random_$r "* ]] || continue
    n=$NR; [ "$n" = 0 ] && n=$(( r * 10 > 16 ? r * 10 : 16 ))
    bench "sweep${c}_${m}_random_$r" random "$r" "$n" --random-input-len $RIN --random-output-len $ROUT
  done
  for r in $RATES_S; do
    [[ " $sweep " == *" sharegpt_$r "* ]] || continue
    n=$NS; [ "$n" = 0 ] && n=$(( r * 8 > 24 ? r * 8 : 24 ))
    bench "sweep${c}_${m}_sharegpt_$r" sharegpt "$r" "$n"
  done
  kill -TERM $up; wait $up; echo "down$c $m (exit $?) at $((SECONDS - T0))s" >> "$LOG"
  grep -iE "error|traceback" "$STAGE/up${c}_$m.log" | grep -v NIXL | head -5 >> "$LOG"
  pack
}

# MODEL: the full validation (PROFILE_FROM=FILE: that profile instead, measured by an earlier call on
# the same device kind; only the serving runs, SWEEP="random_1 sharegpt_4 ..." names a subset, and the
# re-prediction).
if [ -n "${PROFILE_FROM:-}" ]; then
  cp "$PROFILE_FROM" "$STAGE/profile_$MODEL.json"
  serve "$MODEL" "${SWEEP:-random_1 random_2 random_4 sharegpt_2 sharegpt_4 sharegpt_8}"
  [ -n "${COLLOC:-}" ] && serve "$MODEL" "${SWEEP:-random_1 random_2 random_4 sharegpt_2 sharegpt_4 sharegpt_8}" colloc
  echo "total $((SECONDS - T0))s" >> "$LOG"; pack; exit 0
fi
pstep "profile_$MODEL" 90 python -m deploy.cli profile --model "$MODEL" --dtype "$DTYPE" --device "$DEVICE" \
  --out "$STAGE/profile_$MODEL.json" $PROF_ARGS --kv-pages '' --ep-ranks ''
pstep "interference_$MODEL" 90 python -m planner.interference --profile "$STAGE/profile_$MODEL.json" --model "$MODEL" \
  --dtype "$DTYPE" --device "$DEVICE" $IF_ARGS
[ -z "${QUICK:-}" ] && pstep "engine_bench_$MODEL" 30 python -m bench.engine_bench --model "$MODEL" --dtype "$DTYPE" --batch 1 \
  --decode-steps 48 --prompt-len 128 --prefill-len $RIN --max-model-len $MAXLEN --out "$STAGE/engine_bench_$MODEL"
serve "$MODEL" "random_1 random_2 random_4 sharegpt_2 sharegpt_4 sharegpt_8"
# COLLOC=1: the same sweep on one collocated node (the simulator's collocated path, and the decode node's
# prefill graphs under collocated traffic), in the time left
[ -n "${COLLOC:-}" ] && serve "$MODEL" "random_1 random_2 random_4 sharegpt_2 sharegpt_4 sharegpt_8" colloc

# MODEL2 (smaller tables, fewer points) while time is left.
if [ -n "$MODEL2" ]; then
  pstep "profile_$MODEL2" 60 python -m deploy.cli profile --model "$MODEL2" --dtype "$DTYPE" --device "$DEVICE" \
    --out "$STAGE/profile_$MODEL2.json" $PROF2_ARGS --kv-pages '' --ep-ranks ''
  [ -f "$STAGE/profile_$MODEL2.json" ] && serve "$MODEL2" "random_2 sharegpt_4 random_4 sharegpt_8"
  [ -f "$STAGE/profile_$MODEL2.json" ] && pstep "interference_$MODEL2" 40 python -m planner.interference \
    --profile "$STAGE/profile_$MODEL2.json" --model "$MODEL2" --dtype "$DTYPE" --device "$DEVICE" $IF_ARGS
fi
echo "total $((SECONDS - T0))s" >> "$LOG"
pack
