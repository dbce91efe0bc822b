"""The planner's search space and SLO parsing."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from planner.plan import Evaluation, parse_slo, plan, shapes, transient_warning
from planner.profile import synthetic
from planner.simulator import ClusterSpec
from planner.workload import fixed


def test_every_shape_uses_exactly_the_gpus_given():
    got = shapes(16, [1, 2, 4, 8], [2048, 8192])
    assert all(s.num_gpus == 16 for s in got)
    described = {s.describe() for s in got}
    assert len(described) == len(got)  # no shape twice
    assert "2×colloc(ep8) chunk 8192" in described and "1P(ep8) + 1D(ep8) chunk 2048" in described
    assert "15P(ep1) + 1D(ep1) chunk 2048" in described and "1P(ep1) + 15D(ep1) chunk 2048" in described
    assert not any(s.num_prefill == 0 and s.decode_ep == 16 for s in got)


def test_slo_parsing():
    assert parse_slo("ttft:1000 tpot:50") == {"ttft": 1.0, "tpot": 0.05}
    with pytest.raises(ValueError):
        parse_slo("itl:5")


def test_plan_ranks_by_goodput_per_gpu_and_refines_the_best():
    p = synthetic()
    slos = {"ttft": 2.0, "tpot": 0.05}
    ev = plan(p, 4, fixed(80, 512, 32, rate=1), slos, [1, 2], [8192], refine=3)
    assert len(ev) == 3
    per_gpu = [e.goodput_per_gpu for e in ev]
    assert per_gpu == sorted(per_gpu, reverse=True) and per_gpu[0] > 0
    assert all(e.at_goodput["slo_attainment"] >= 0.9 for e in ev)


def test_a_goodput_found_during_ramp_up_is_flagged():
    samples = [SimpleNamespace(output_len=256)] * 100
    e = Evaluation(ClusterSpec(), goodput_rate=100.0, at_goodput={"median_ttft_ms": 100.0, "median_tpot_ms": 20.0})
    assert "ramp-up" in transient_warning(e, samples)  # 1 s of arrivals, 5.2 s per request
    e.goodput_rate = 1.0  # 100 s of arrivals
    assert transient_warning(e, samples) is None
