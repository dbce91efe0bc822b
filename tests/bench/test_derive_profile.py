"""Derived profiles (bench/derive_profile.py) reproduce the engine measurements they come from:
an anchored profile returns the measured steps at the measured points, and a referenced profile of
the reference model itself returns the reference's steps within the fit's residuals."""
from __future__ import annotations

import pytest

from bench.derive_profile import anchored, fit_reference, referenced

pytest.importorskip("numpy")


def _bench(model: str, decode_ms: dict, floors_ms: dict, prefill_s: float, prefill_floor_s: float) -> dict:
    return {"model": model, "device": "test-gpu", "date": "2026-11-29",
            "probe": {"hbm_copy_bytes_per_s": 3e12, "bf16_matmul_flops_per_s": 7e14},
            "decode": [{"batch": b, "ms_per_step": t, "floor_ms_per_step": floors_ms[b], "context": 176}
                       for b, t in decode_ms.items()],
            "prefill": {"tokens": 2048, "seconds": prefill_s, "floor_s": prefill_floor_s}}


def test_anchored_profile_returns_the_measured_steps():
    b = _bench("qwen3-8b", {1: 10.0, 16: 12.0, 64: 18.0}, {1: 5.0, 16: 5.2, 64: 5.7}, 0.08, 0.044)
    p = anchored("qwen3-8b", b)
    for batch, ms in ((1, 10.0), (16, 12.0), (64, 18.0)):
        assert p.decode_time(batch, 176) * 1e3 == pytest.approx(ms, rel=0.02)
    assert p.prefill_time(2048) == pytest.approx(0.08, rel=0.02)
    # Longer contexts read more KV; longer prompts cost more than proportionally (attention).
    assert p.decode_time(16, 4096) > p.decode_time(16, 176)
    assert p.prefill_time(8192) > 4 * p.prefill_time(2048) * 0.99


def test_referenced_profile_of_the_reference_itself_matches_its_steps():
    # Steps built exactly as fixed + floor / eta: the fit must recover them.
    floors = {1: 1.2, 16: 6.0, 64: 7.5}
    ref = _bench("deepseek-v2-lite", {b: 2.7 + f / 0.9 for b, f in floors.items()}, floors,
                 0.0027 + 0.015 / 0.3, 0.015)
    fit = fit_reference(ref)
    assert fit["eta_bandwidth"] == pytest.approx(0.9, rel=1e-6)
    assert fit["eta_flops"] == pytest.approx(0.3, rel=1e-6)
    assert fit["per_layer_s"] * 27 == pytest.approx(0.0027, rel=1e-6)
    v3 = referenced("deepseek-v3", ref, ep=8, quantization="fp8")
    assert v3.ep_size == 8 and v3.kv_capacity_tokens > 100_000
    # More tokens in the EP group touch more experts: decode grows with the batch.
    assert v3.decode_time(64, 1024) > v3.decode_time(1, 1024)


def test_rates_from_another_device_keep_the_fit_and_speed_up_only_the_roofline_part():
    """A reference measured on one device kind, planned on another (`--rates-from`): the fixed per-layer
    time stays, the bytes and FLOPs parts scale with the target's measured rates."""
    floors = {1: 1.2, 16: 6.0, 64: 7.5}
    ref = _bench("deepseek-v2-lite", {b: 2.7 + f / 0.9 for b, f in floors.items()}, floors,
                 0.0027 + 0.015 / 0.3, 0.015)
    faster = dict(ref, device="faster-gpu", probe={"hbm_copy_bytes_per_s": 6e12, "bf16_matmul_flops_per_s": 1.4e15})
    same = referenced("deepseek-v3", ref, ep=8, quantization="fp8")
    moved = referenced("deepseek-v3", ref, ep=8, quantization="fp8", rates=faster)
    fixed = 0.0027 / 27 * 61
    for b in (1, 64):
        assert moved.decode_time(b, 1024) - fixed == pytest.approx((same.decode_time(b, 1024) - fixed) / 2, rel=1e-6)
    assert moved.prefill_time(2048) - fixed == pytest.approx((same.prefill_time(2048) - fixed) / 2, rel=1e-6)
    assert "faster-gpu" in moved.device and "test-gpu" in moved.device
