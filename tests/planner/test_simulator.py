"""The simulator against invariants and queueing theory: every request ends exactly once, KV pages
are never over-committed and all come back, a single server under Poisson arrivals waits as
M/D/1 says (Pollaczek–Khinchine), and a 16-GPU cluster simulates 10,000 requests quickly."""
from __future__ import annotations

import math
import random
import time

import pytest

from planner.profile import constant, synthetic
from planner.simulator import ClusterSpec, Simulator
from planner.workload import SimRequest, arrival_times, fixed


def _mixed(n: int, rate: float, seed: int = 0, output_median: int = 180) -> list[SimRequest]:
    """ShareGPT-like log-normal lengths (as bench's generator shapes them), unique prompts."""
    rng = random.Random(seed)
    out = []
    for i, t in enumerate(arrival_times(n, rate, 1.0, seed)):
        p = int(min(4096, max(4, math.exp(rng.gauss(math.log(220), 1.0)))))
        o = int(min(1024, max(1, math.exp(rng.gauss(math.log(output_median), 0.9)))))
        out.append(SimRequest(f"r{i}", [(i * 131 + k) % 30000 + 100 for k in range(p)], o, t))
    return out


def _run(profile, spec, requests):
    sim = Simulator(profile, spec)
    return sim, sim.run(requests)


SHAPES = [ClusterSpec(num_prefill=1, num_decode=2, chunk_budget=512),
          ClusterSpec(num_prefill=0, num_decode=2, chunk_budget=512),
          ClusterSpec(num_prefill=1, num_decode=1, prefill_ep=2, decode_ep=2, chunk_budget=1024),
          ClusterSpec(num_prefill=1, num_decode=1, share_gpu=True)]


@pytest.mark.parametrize("spec", SHAPES, ids=lambda s: s.describe())
def test_every_request_ends_exactly_once_and_pages_come_back(spec):
    # A small KV pool and a high rate: preemptions, refused reservations and queueing all happen.
    profile = synthetic(kv_capacity_tokens=12_000, num_moe_layers=4, hidden_size=1024, top_k=2)
    requests = _mixed(400, rate=40.0)
    sim, res = _run(profile, spec, requests)
    assert all(r.status in ("finished", "failed") for r in requests)  # `_end` raises on a second ending
    done = [r for r in requests if r.status == "finished"]
    assert done and all(r.tokens_out == r.output_len and r.first_token_time <= r.finish_time for r in done)
    assert all(r.first_token_time >= r.arrival for r in done)
    for node in sim.prefill_nodes + sim.decode_nodes:
        for rank in node.ranks:
            pool = rank.scheduler.block_pool
            pool.check_invariants()
            assert pool.num_free_pages == pool.num_pages, f"{node.name} leaked pages"
            assert not rank.sim and not rank.scheduler.remote_kv and not rank.scheduler.sending
    if not spec.collocated:
        assert any(r.status == "failed" and "overloaded" in r.error for r in requests) or res.num_preemptions


def test_kv_capacity_is_never_exceeded_and_forces_preemption():
    profile = synthetic(kv_capacity_tokens=8_000)
    requests = fixed(200, 600, 400, rate=50.0)
    sim, res = _run(profile, ClusterSpec(num_prefill=0, num_decode=1, chunk_budget=2048), requests)
    pages = sim.decode_nodes[0].ranks[0].scheduler.block_pool.num_pages
    assert res.num_preemptions > 0  # the pool was the constraint
    assert 0 < max(res.max_pages_used.values()) <= pages
    assert all(r.status == "finished" for r in requests)


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_single_server_matches_md1_mean_wait(rho):
    # One request at a time, one step each of a fixed service time D: an M/D/1 queue, whose mean
    # wait is rho·D / (2(1-rho)) (Pollaczek–Khinchine).
    service = 0.1
    profile = constant(prefill_s=service, decode_s=0.01)
    spec = ClusterSpec(num_prefill=0, num_decode=1, max_num_seqs=1, enable_prefix_cache=False)
    waits = []
    for seed in range(4):
        requests = fixed(10_000, 32, 1, rate=rho / service, seed=seed)
        _run(profile, spec, requests)
        waits += [r.ttft - service for r in requests]
    expected = rho * service / (2 * (1 - rho))
    measured = sum(waits) / len(waits)
    assert abs(measured - expected) / expected < 0.05, (measured, expected)


@pytest.mark.slow  # ~20 s on one core: the engine scheduler's own cost per decode token dominates
def test_ten_thousand_requests_on_sixteen_gpus_within_a_minute():
    profile = synthetic()
    requests = _mixed(10_000, rate=60.0, seed=3, output_median=100)
    spec = ClusterSpec(num_prefill=4, num_decode=6, prefill_ep=1, decode_ep=2, chunk_budget=8192)
    assert spec.num_gpus == 16
    t0 = time.perf_counter()
    _, res = _run(profile, spec, requests)
    elapsed = time.perf_counter() - t0
    assert res.summary()["completed"] == 10_000
    assert elapsed < 60, f"{elapsed:.1f} s"


@pytest.mark.parametrize("spec", [ClusterSpec(num_prefill=0, num_decode=1), ClusterSpec(num_prefill=1, num_decode=1)],
                         ids=["collocated", "disaggregated"])
def test_a_request_larger_than_the_pool_fails_once_and_the_rest_finish(spec):
    profile = synthetic(kv_capacity_tokens=2_048)
    requests = fixed(20, 200, 20, rate=5.0)
    requests[7].prompt_ids = [5] * 3000  # 3,000 tokens: more than the whole pool
    sim, _ = _run(profile, spec, requests)
    assert requests[7].status == "failed" and ("KV pages" in requests[7].error)
    assert all(r.status == "finished" for i, r in enumerate(requests) if i != 7)
    for node in sim.prefill_nodes + sim.decode_nodes:
        assert node.in_flight == 0
        assert node.ranks[0].scheduler.block_pool.num_free_pages == node.ranks[0].scheduler.block_pool.num_pages


def test_arrivals_follow_the_benchmark_runner_rule():
    from bench.serving.runner import arrival_gaps

    gaps = arrival_gaps(50, 3.0, 0.7, seed=5)
    times = arrival_times(50, 3.0, 0.7, seed=5)
    assert times[0] == 0.0
    assert times[1:] == pytest.approx([sum(gaps[:k]) for k in range(1, 50)])
