"""bench/fp8_accuracy.py runs end to end on a tiny preset (CPU) and reports sane numbers."""
from __future__ import annotations

from bench.fp8_accuracy import run


def test_fp8_accuracy_bench_reports_agreement_and_logit_error():
    r = run("tiny-qwen3", "float32", "cpu", prompt_len=8, tokens=12, seed=0, kv="fp8_e4m3")
    assert 0.5 <= r["top1_agreement"] <= 1.0
    assert 0.0 < r["max_logit_error"] < r["max_abs_logit"]
