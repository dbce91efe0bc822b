#!/usr/bin/env bash
# One H200 call for issue 17: FP8 kernel checks, FP8 GEMM vs same-run floors, Qwen3-8B decode FP8 vs bf16.
# Run from the worktree copy with PYTHONPATH set; results under $OUT.
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt" 2>&1
timeout 70 python -m tests.engine.kernels.check_fp8 cuda real > "$OUT/check_fp8.txt" 2>&1; echo "check rc=$?" >> "$OUT/check_fp8.txt"
timeout 90 python -m bench.fp8_gemm_bench --m 1,16,64,2048 --out "$OUT" > "$OUT/fp8_gemm.log" 2>&1
for q in fp8 none; do
  flag=""; [ "$q" = fp8 ] && flag="--quantization fp8"
  timeout 60 python -m bench.engine_bench --model qwen3-8b --dtype bfloat16 $flag --batch 1,16,64 \
    --decode-steps 32 --prefill-len 2048 --out "$OUT/engine_$q" > "$OUT/engine_$q.log" 2>&1
done
ls -R "$OUT"
# Not run yet (next device session): the FP8 MoE kernel check ran into a bug of the check script above
# (fixed since), accuracy over 512 tokens, DeepSeek-V2-Lite FP8 vs bf16.
if [ "${FP8_MORE:-0}" = 1 ]; then
  timeout 120 python -m bench.fp8_accuracy --model qwen3-8b --tokens 512 --out "$OUT" > "$OUT/fp8_accuracy.log" 2>&1
  for q in fp8 none; do
    flag=""; [ "$q" = fp8 ] && flag="--quantization fp8"
    timeout 120 python -m bench.engine_bench --model deepseek-v2-lite --dtype bfloat16 $flag --batch 1,16,64 \
      --decode-steps 32 --prefill-len 2048 --out "$OUT/v2lite_$q" > "$OUT/v2lite_$q.log" 2>&1
  done
fi
