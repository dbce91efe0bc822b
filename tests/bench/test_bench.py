"""Roofline arithmetic against real parameter counts, and a CPU smoke run of the engine benchmark."""
from __future__ import annotations

import pytest

from bench import roofline
from bench.engine_bench import main as bench_main
from engine.presets import resolve_model
from engine.weight_loader import load_model


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3", "tiny-qwen3-moe", "tiny-deepseek-v2",
                                    "tiny-deepseek-v3"])
def test_parameter_count_equals_the_built_model(preset):
    mc = resolve_model(preset)
    model = load_model(mc, "cpu", "dummy")
    assert roofline.param_counts(mc).total == sum(p.numel() for p in model.parameters())


def test_published_sizes():
    lite = roofline.param_counts(resolve_model("deepseek-v2-lite"))
    assert 15.6e9 < lite.total < 15.8e9 and 2.3e9 < lite.active_per_token < 2.5e9  # "16B total, 2.4B active"
    v3 = roofline.param_counts(resolve_model("deepseek-v3"))
    assert 670e9 < v3.total < 672e9 and 36e9 < v3.active_per_token < 38e9  # 671B / 37B
    assert 8.1e9 < roofline.param_counts(resolve_model("qwen3-8b")).total < 8.3e9


def test_decode_floor_counts_touched_experts_and_kv():
    mc = resolve_model("deepseek-v2-lite")
    assert roofline.experts_touched(64, 6, 1) == pytest.approx(6)
    assert roofline.experts_touched(64, 6, 64) == pytest.approx(64 * (1 - (58 / 64) ** 64))
    one, many = roofline.decode_step_bytes(mc, 1, 1000), roofline.decode_step_bytes(mc, 64, 1000)
    assert many["weight_bytes"] > one["weight_bytes"]
    assert one["kv_bytes"] == 1000 * (512 + 64) * 2 * 27
    f = roofline.floors(mc, 3e12, 7.5e14, 1, 0, 2048)
    assert f["prefill_floor_s"] == pytest.approx(roofline.prefill_flops(mc, 2048) / 7.5e14)


def test_engine_bench_smoke_on_cpu(tmp_path, capsys):
    assert bench_main(["--model", "tiny-qwen3-moe", "--device", "cpu", "--dtype", "float32", "--batch", "1,2",
                       "--decode-steps", "2", "--prefill-len", "16", "--prompt-len", "4", "--num-pages", "64",
                       "--max-model-len", "128", "--hf-baseline", "--hf-decode-steps", "2",
                       "--out", str(tmp_path)]) == 0
    md = (tmp_path / "tiny-qwen3-moe.md").read_text()
    assert "decode tok/s, batch 2" in md and "prefill tok/s, 16 tokens" in md and "×" in md
