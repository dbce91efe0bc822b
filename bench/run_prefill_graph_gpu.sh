#!/usr/bin/env bash
# Dense prefill CUDA graphs (engine/prefill_graph.py) on one GPU, ~330 s, carry .whldev: the replayed step
# against the eager one (tiny models, bf16), then the engine bench's prefill with the graphs on and off
# in the same call (DeepSeek-V2-Lite and Qwen3-8B at 2,048 and 256 tokens), then the layer-wise KV push
# through the graphs' per-layer hook (bench/disagg_bench.py, Qwen3-8B 1k: a graph bucket, 4k eager).
# Packs into $OUT/prefill_graph.tgz after every step (steps.txt beside it).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PACK=prefill_graph.tgz
source "$(dirname "$0")/packed_steps.sh"
record_run
step check_prefill_graph 100 python -m tests.engine.kernels.check_prefill_graph tiny-qwen3,tiny-deepseek-v2
eb() {  # name model prefill-len graph-max [extra...]
  local name=$1 model=$2 len=$3 gmax=$4; shift 4
  step "$name" 60 python -m bench.engine_bench --model "$model" --dtype bfloat16 --batch 1 --decode-steps 8 \
    --prefill-len "$len" --prefill-graph-max-tokens "$gmax" --out "$STAGE/$name" "$@"
}
eb v2lite_2k_graphs deepseek-v2-lite 2048 2048 --profile
eb v2lite_2k_eager deepseek-v2-lite 2048 0
eb v2lite_256_graphs deepseek-v2-lite 256 2048
eb v2lite_256_eager deepseek-v2-lite 256 0
eb qwen3_256_graphs qwen3-8b 256 2048
eb qwen3_256_eager qwen3-8b 256 0
python -m pip install -q --no-deps --no-index --target /tmp/site .whldev/*.whl > "$STAGE/pip.log" 2>&1
PYTHONPATH=$PWD:/tmp/site step disagg_qwen3 70 python -m bench.disagg_bench --model qwen3-8b --lengths 1024,4096 \
  --repeats 5 --warmup 2 --prefill-graph-max-tokens 2048 --out "$STAGE"
eb qwen3_2k_graphs qwen3-8b 2048 2048
grep -h "ok \|BAD" "$STAGE/check_prefill_graph.log"
grep -h "prefill tok/s" "$STAGE"/*/*.md
cat "$STAGE"/disagg*.md 2>/dev/null | tail -15
