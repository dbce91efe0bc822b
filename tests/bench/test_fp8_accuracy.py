"""bench/fp8_accuracy.py runs end to end on a tiny preset (CPU) and reports sane numbers."""
from __future__ import annotations

from bench.fp8_accuracy import run


def test_fp8_accuracy_bench_reports_agreement_and_logit_error():
    r = run("tiny-qwen3", "float32", "cpu", prompt_len=8, tokens=12, seed=0, kv="fp8_e4m3")
    assert 0.5 <= r["top1_agreement"] <= 1.0
    assert 0.0 < r["max_logit_error"] < r["max_abs_logit"]


def test_roofline_fp8_decode_bytes_match_an_fp8_model():
    """The FP8 decode floor counts what an FP8 model holds: projections at 1 byte, the LM head in bf16."""
    from bench import roofline
    from engine.config import ParallelConfig
    from engine.presets import resolve_model
    from engine.quantization import Fp8Config
    from engine.weight_loader import build_model

    mc = resolve_model("tiny-qwen3", "bfloat16")
    model = build_model(mc, "meta", ParallelConfig(), Fp8Config((32, 32)))
    held = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    counted = roofline.decode_step_bytes(mc, 1, 0, fp8_weights=True)["weight_bytes"]
    assert abs(counted - held) < 0.02 * held, (counted, held)
