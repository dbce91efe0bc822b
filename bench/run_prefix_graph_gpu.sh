#!/usr/bin/env bash
# Piecewise prefill CUDA graphs (engine/prefill_graph.py, 2026-12-08), one device call (~330 s): their
# replay against the eager step on the tiny models (logits, KV pages, hook; greedy tokens over prefix hits,
# a chunked prompt and prompts joining decodes), then per model (DeepSeek-V2-Lite, Qwen3-8B) the prefill
# step over a 2,048-token cached prefix with and without them next to a fresh prompt (floors from the same
# run's matmul rate) and the mixed step of 16 or 64 decodes plus a joining 128- or 512-token prompt
# (bench/prefix_prefill_bench.py; MODELS="..." names others). Packs into $OUT/prefix_graph.tgz after each step.
set -o pipefail
export PYTHONUNBUFFERED=1
PACK=prefix_graph.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
step check_prefill_graph 150 python -m tests.engine.kernels.check_prefill_graph
for m in ${MODELS:-deepseek-v2-lite qwen3-8b}; do
  step "prefix_$m" 200 python -m bench.prefix_prefill_bench --model "$m" --tokens 32,128,512,2048 --cached 0,2048 \
    --repeats 5 --mixed-batch 16,64 --mixed-prompt 128,512 --profile 128,2048 --out "$STAGE/prefix_$m.json"
done
