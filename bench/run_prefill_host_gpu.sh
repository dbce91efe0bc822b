#!/usr/bin/env bash
# Where DeepSeek-V2-Lite's 2k prefill spends its host time (issue 16), ~60 s on one GPU:
# bench/prefill_host.py (step wall vs forward enqueue vs forward GPU, host ms per module class,
# host-device syncs with their source lines, host µs per launch). Packed into $OUT/prefill_host.tgz.
set -o pipefail
export PYTHONUNBUFFERED=1
PACK=prefill_host.tgz
source "$(dirname "$0")/packed_steps.sh"
step prefill_host_v2lite 90 python -m bench.prefill_host --model deepseek-v2-lite --tokens 2048 --out "$STAGE"
cat "$STAGE"/prefill_host_*.md 2>/dev/null
