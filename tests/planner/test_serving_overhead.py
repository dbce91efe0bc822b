"""The serving path's idle overhead per prompt length: the probe measures it per size, the profile
interpolates it (log-linear in prompt length, held beyond the probed sizes), the simulator adds each
request its own. The probe runs here against a stand-in gRPC stub (no cluster: the stub's replies take
a known time per prompt length)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from planner.profile import synthetic
from planner.serving_probe import probe
from planner.simulator import ClusterSpec, Simulator
from planner.workload import SimRequest


def test_the_profile_interpolates_the_overhead_by_prompt_length_and_holds_it_beyond():
    p = synthetic(serving_overhead={"disaggregated": 0.012},
                  serving_overhead_by_prompt={"disaggregated": [[2048, 0.006], [256, 0.020]]})
    assert p.request_overhead("disaggregated", 256) == pytest.approx(0.020)
    assert p.request_overhead("disaggregated", 2048) == pytest.approx(0.006)
    assert p.request_overhead("disaggregated", 724) == pytest.approx(0.013, abs=2e-4)  # log-middle
    assert p.request_overhead("disaggregated", 16) == pytest.approx(0.020)  # held, not extrapolated
    assert p.request_overhead("disaggregated", 65536) == pytest.approx(0.006)
    # a mode probed with one figure only, and one not probed
    q = synthetic(serving_overhead={"disaggregated": 0.012, "collocated": 0.003})
    assert q.request_overhead("disaggregated", 256) == 0.012 and q.request_overhead("collocated") == 0.003
    assert synthetic().request_overhead("disaggregated", 256) == 0.0
    # a length probed twice (a probe given `--prompts 256,256`) counts once, at its mean
    r = synthetic(serving_overhead_by_prompt={"collocated": [[256, 0.010], [256, 0.020]]})
    assert r.request_overhead("collocated", 256) == pytest.approx(0.015)
    assert r.request_overhead("collocated", 4096) == pytest.approx(0.015)


def test_each_simulated_request_reaches_its_node_after_its_own_prompt_lengths_overhead():
    by_prompt = {"disaggregated": [[256, 0.040], [2048, 0.004]]}
    spec = ClusterSpec(num_prefill=1, num_decode=1)
    ttft = {}
    for n in (256, 2048):
        for name, prof in (("by prompt", synthetic(serving_overhead_by_prompt=by_prompt)), ("none", synthetic())):
            r = SimRequest(f"r{n}", [(k * 31) % 30000 + 100 for k in range(n)], 4, 0.0)
            Simulator(prof, spec).run([r])
            ttft[(n, name)] = r.ttft
    assert ttft[(256, "by prompt")] - ttft[(256, "none")] == pytest.approx(0.040, abs=1e-9)
    assert ttft[(2048, "by prompt")] - ttft[(2048, "none")] == pytest.approx(0.004, abs=1e-9)


class _Stub:
    """Streams one token after `delay[len(prompt)]` seconds (plus `first` on a length's first request,
    as a compile would), then the end."""

    def __init__(self, delay: dict, first: float = 0.0):
        self.delay, self.first, self.seen = delay, first, set()

    def _extra(self, ids: list[int]) -> float:
        """Seconds this request pays beyond its length's delay."""
        n = len(ids)
        extra = 0.0 if n in self.seen else self.first
        self.seen.add(n)
        return extra

    def Generate(self, msg, timeout=None):  # noqa: N802 — the gRPC method's name
        ids = list(msg.token_ids.ids)
        time.sleep(self.delay.get(len(ids), 0.001) + self._extra(ids))
        yield SimpleNamespace(token_ids=[7], finished=False, finish_reason="", error="")
        yield SimpleNamespace(token_ids=[8], finished=False, finish_reason="", error="")
        yield SimpleNamespace(token_ids=[], finished=True, finish_reason="length", error="")


def test_the_probe_reports_the_overhead_per_prompt_length():
    prefill = {256: 0.010, 2048: 0.070}
    res = probe(_Stub({256: 0.050, 2048: 0.080}), [256, 2048], lambda n: prefill[n], repeats=3)
    (n1, o1), (n2, o2) = res["overhead_by_prompt_s"]
    assert (n1, n2) == (256, 2048)
    assert o1 == pytest.approx(0.040, abs=0.015) and o2 == pytest.approx(0.010, abs=0.015)
    assert o1 > o2 and res["samples"] == 6
    # Every request's own TTFT and profiled prefill are kept, in order, for later analysis.
    assert [n for n, _, _ in res["ttft_samples"]] == [256] * 3 + [2048] * 3
    assert all(ttft > pre == prefill[n] for n, ttft, pre in res["ttft_samples"])


def test_each_prompt_length_is_warmed_up_before_it_is_timed():
    """A length's first request through a fresh cluster can compile (0.4 s on an H100); the probe sends
    one untimed request per length, so no timed sample carries it."""
    prefill = {256: 0.010, 2048: 0.070}
    res = probe(_Stub({256: 0.020, 2048: 0.080}, first=0.3), [256, 2048], lambda n: prefill[n], repeats=2)
    assert max(ttft for _, ttft, _ in res["ttft_samples"]) < 0.2


class _MoEStub(_Stub):
    """Slow (as a cold grouped GEMM would be) on a request of a length whose varied prompt it has not yet
    seen: a prompt of one repeated token warms only the few experts it routes to."""

    def _extra(self, ids: list[int]) -> float:
        cold = (len(ids), True) not in self.seen
        self.seen.add((len(ids), len(set(ids)) > len(ids) // 2))
        return 0.3 if cold else 0.0


def test_the_warm_up_prompts_are_as_varied_as_the_timed_ones_and_share_no_prefix_with_them():
    prefill = {256: 0.010, 2048: 0.070}
    stub = _MoEStub({256: 0.020, 2048: 0.080})
    res = probe(stub, [256, 2048], lambda n: prefill[n], repeats=2)
    assert max(ttft for _, ttft, _ in res["ttft_samples"]) < 0.2
    from planner.serving_probe import _prompt
    timed = {_prompt(i, 256)[0] for i in range(2)}
    assert not timed & {_prompt(i, 256)[0] for i in range(2, 4)}


class _PrefixCacheStub(_Stub):
    """Slow on a prompt whose first page (16 tokens) an earlier prompt began with, as a server's step over
    a cached prefix was (the eager path, 2026-12-07o): the probe must time fresh prefills only."""

    def _extra(self, ids: list[int]) -> float:
        page = tuple(ids[:16])
        hit = page in self.seen
        self.seen.add(page)
        return 0.3 if hit else 0.0


def test_no_probe_prompt_starts_like_an_earlier_one_of_any_length():
    prefill = {256: 0.010, 2048: 0.070}
    res = probe(_PrefixCacheStub({256: 0.020, 2048: 0.080}), [256, 2048], lambda n: prefill[n], repeats=3)
    assert max(ttft for _, ttft, _ in res["ttft_samples"]) < 0.2
    from planner.serving_probe import _prompt
    firsts = [tuple(_prompt(i, n)[:16]) for n in (256, 512, 2048, 8192) for i in range(6)]
    assert len(set(firsts)) == len(firsts)
    assert _prompt(1, 2048) == _prompt(1, 2048)  # the same prompts on every run
