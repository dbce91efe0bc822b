#!/usr/bin/env bash
# One H200 call: the FP8 GEMM tile sweep (bench/fp8_gemm_sweep.py) and the kernel checks at real sizes.
set -o pipefail
export PYTHONUNBUFFERED=1
timeout 100 python -m bench.fp8_gemm_sweep --m 1,64,2048 --out "$OUT" 2>&1 | tee "$OUT/sweep.log"
timeout 30 python -m tests.engine.kernels.check_fp8 cuda real 2>&1 | tee "$OUT/check_fp8.txt"
