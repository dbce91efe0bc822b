"""`pdserve profile` on CPU with tiny-llama writes a valid profile (through the real engine, KV
transfer over NIXL in DRAM), and `pdserve plan` plans on it: real subprocesses, as a user runs them."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from planner.profile import Profile

PDSERVE = [sys.executable, "-m", "deploy.cli"]


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("profile") / "tiny-llama.json")
    r = subprocess.run(PDSERVE + ["profile", "--model", "tiny-llama", "--device", "cpu", "--out", out,
                                  "--prefill-tokens", "16,64,256", "--cached", "0,64", "--decode-batch", "1,4,16",
                                  "--decode-context", "32,128", "--decode-steps", "4", "--repeats", "1",
                                  "--num-pages", "512", "--kv-pages", "2,8", "--ep-ranks", "",
                                  "--serving-prompts", "16"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout
    return out


@pytest.mark.slow
def test_profile_on_cpu_writes_a_valid_profile(tiny_profile):
    p = Profile.load(tiny_profile)
    assert p.model == "tiny-llama" and p.device == "cpu" and p.commit and p.date
    assert p.prefill["tokens"] == [16, 64, 256] and p.prefill["cached"] == [0, 64]
    assert all(s > 0 for row in p.prefill["seconds"] + p.decode["seconds"] for s in row)
    assert len(p.decode["seconds"]) == 2 and all(len(r) == 3 for r in p.decode["seconds"])
    assert p.kv_capacity_tokens == 512 * p.page_size
    assert p.kv_bytes_per_token > 0 and p.num_layers > 0 and p.num_moe_layers == 0
    assert p.kv_transfer and len(p.kv_transfer["bytes"]) == 2  # NIXL over UCX in DRAM
    # CPU timings on a shared machine are too noisy to order; the tables must still interpolate.
    assert 0 < p.prefill_time(1000, 32) < float("inf") and 0 < p.decode_time(8, 64) < float("inf")
    # Through two idle `pdserve up` clusters; CPU timings here are too noisy for a value check.
    assert set(p.serving_overhead) == {"disaggregated", "collocated"}
    assert all(v >= 0 for v in p.serving_overhead.values())
    # and per probed prompt length, which the simulator interpolates
    prompts = p.notes["serving_prompts"]
    for mode in ("disaggregated", "collocated"):
        assert [n for n, _ in p.serving_overhead_by_prompt[mode]] == prompts
        assert all(v >= 0 for _, v in p.serving_overhead_by_prompt[mode])


@pytest.mark.slow
def test_plan_runs_on_the_cpu_profile(tiny_profile, tmp_path):
    png, js = str(tmp_path / "plan.png"), str(tmp_path / "plan.json")
    r = subprocess.run(PDSERVE + ["plan", "--profile", tiny_profile, "--model", "tiny-llama", "--gpus", "2",
                                  "--slo", "ttft:5000 tpot:2000", "--num-prompts", "40", "--random-input-len", "64",
                                  "--random-output-len", "8", "--chunk-budgets", "256", "--plot", png, "--json", js],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1P(ep1) + 1D(ep1)" in r.stdout and "2×colloc(ep1)" in r.stdout
    evals = json.load(open(js))
    assert len(evals) == 2 and all(e["goodput_rate"] > 0 and e["bottleneck"] for e in evals)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plan_refuses_a_profile_of_another_model(tmp_path):
    from planner.profile import synthetic
    path = str(tmp_path / "s.json")
    synthetic().save(path)
    r = subprocess.run(PDSERVE + ["plan", "--profile", path, "--model", "qwen3-8b", "--gpus", "2",
                                  "--slo", "ttft:1000"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "synthetic" in r.stderr
