"""The metric catalogue's pieces that are plain logic: SLO targets as bucket boundaries, the
per-request observations, and the engine-stats collector's merge of EP ranks."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import BY_NAME, EngineStatsCollector, ServingMetrics, SLOTargets


def _samples(registry) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_slo_targets_become_bucket_boundaries_and_bad_ones_are_refused():
    slo = SLOTargets.parse("ttft:250 tpot:33")
    assert 0.25 in slo.buckets(BY_NAME["pdserve:time_to_first_token_seconds"])
    assert 0.033 in slo.buckets(BY_NAME["pdserve:request_time_per_output_token_seconds"])
    assert 0.033 not in slo.buckets(BY_NAME["pdserve:inter_token_latency_seconds"])
    for bad in ("ttft", "ttft:", "foo:10", "ttft:-5", "ttft:abc"):
        with pytest.raises(ValueError):
            SLOTargets.parse(bad)


def test_one_request_feeds_ttft_tpot_itl_and_counts():
    m = ServingMetrics("m", "router", "r0", SLOTargets.parse("ttft:250"))
    m.observe_request(ttft=0.2, e2e=1.2, num_output_tokens=11, itls=[0.1] * 10, num_prompt_tokens=50,
                      finish_reason="length")
    s = _samples(m.registry)
    base = (("model", "m"), ("node", "r0"), ("role", "router"))
    assert s[("pdserve:time_to_first_token_seconds_bucket", tuple(sorted(base + (("le", "0.25"),))))] == 1
    assert s[("pdserve:request_time_per_output_token_seconds_sum", base)] == pytest.approx(0.1)
    assert s[("pdserve:inter_token_latency_seconds_count", base)] == 10
    assert s[("pdserve:generation_tokens_total", base)] == 11 and s[("pdserve:prompt_tokens_total", base)] == 50
    assert s[("pdserve:request_success_total", tuple(sorted(base + (("finished_reason", "length"),))))] == 1


def test_collector_keeps_ranks_apart_and_sums_expert_load_over_them():
    ranks = [{"ep_rank": 0, "num_running": 2, "num_steps": 7, "expert_tokens": {(1, 0): 3, (1, 1): 1},
              "ep_imbalance": {1: 1.25}, "eplb_rebalances": 2},
             {"ep_rank": 1, "num_running": 0, "num_steps": 7, "expert_tokens": {(1, 0): 4},
              "ep_imbalance": {1: 1.25}, "eplb_rebalances": 2}]
    reg = CollectorRegistry()
    reg.register(EngineStatsCollector(lambda: ranks, {"model": "m", "role": "decode", "node": "d0"}))
    s = _samples(reg)
    base = (("model", "m"), ("node", "d0"), ("role", "decode"))
    assert s[("pdserve:num_requests_running", tuple(sorted(base + (("rank", "0"),))))] == 2
    assert s[("pdserve:num_requests_running", tuple(sorted(base + (("rank", "1"),))))] == 0
    assert s[("pdserve:expert_tokens_total", tuple(sorted(base + (("layer", "1"), ("expert", "0")))))] == 7
    assert s[("pdserve:ep_imbalance", tuple(sorted(base + (("layer", "1"),))))] == 1.25
    assert s[("pdserve:eplb_rebalances_total", base)] == 2
    dead = CollectorRegistry()
    dead.register(EngineStatsCollector(lambda: None, {"model": "m", "role": "decode", "node": "d0"}))
    assert not [k for k in _samples(dead) if k[0].startswith("pdserve:")]  # a gap, not stale values
