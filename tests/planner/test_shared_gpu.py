"""A prefill and a decode node on one GPU: whole steps in turns, or both at once with each step
stretched by the profile's measured interference; and the prefill table's floor for short prompts."""
from __future__ import annotations

import json

import pytest

from planner.profile import Profile, constant, synthetic
from planner.simulator import ClusterSpec, simulate
from planner.workload import SimRequest

PREFILL_S, DECODE_S = 0.1, 0.01


def _two_requests() -> list[SimRequest]:
    """A decodes 50 tokens from t≈0.1 s; B's prefill (0.1 s) lands in the middle of A's decode."""
    return [SimRequest("a", list(range(100, 164)), 50, 0.0), SimRequest("b", list(range(200, 264)), 2, 0.2)]


def _run(model: str, interference: dict | None, first_token: str = "sampled"):
    profile = constant(PREFILL_S, DECODE_S, interference=interference)
    spec = ClusterSpec(num_prefill=1, num_decode=1, share_gpu=True, shared_gpu_model=model, kv_link="nvlink",
                       first_token=first_token)
    reqs = _two_requests()
    simulate(profile, spec, reqs)
    return {r.request_id: r for r in reqs}


def test_without_interference_both_roles_step_at_once_and_decode_keeps_its_pace():
    r = _run("interference", {"decode_slowdown": 1.0, "prefill_slowdown": 1.0})
    # (the first token leaves when P samples it; the second also waits for the KV to land: the
    # link's latency, spread over 49 gaps)
    assert r["a"].tpot == pytest.approx(DECODE_S, rel=1e-4)
    assert r["b"].ttft == pytest.approx(PREFILL_S, abs=1e-3)


def test_turns_stall_decode_for_a_whole_prefill():
    r = _run("turns", None)
    # 49 decode gaps of 10 ms, one of which also waits for B's 100 ms prefill (and B's own decode).
    assert r["a"].tpot > DECODE_S + 0.09 / 49


def test_measured_slowdowns_stretch_the_overlapping_steps_only():
    r = _run("interference", {"decode_slowdown": 3.0, "prefill_slowdown": 2.0})
    # B's prefill starts while A decodes: it takes 2 x 100 ms.
    assert r["b"].ttft == pytest.approx(2 * PREFILL_S, abs=0.011)
    # A's decode steps that start during that prefill (about 200 ms / 30 ms of them) take 30 ms.
    stretched = 2 * PREFILL_S // (3 * DECODE_S)
    expected = (49 * DECODE_S + stretched * 2 * DECODE_S) / 49
    assert r["a"].tpot == pytest.approx(expected, rel=0.1)
    free = _run("interference", {"decode_slowdown": 1.0, "prefill_slowdown": 1.0})["a"].tpot
    assert free < r["a"].tpot


def test_auto_uses_interference_only_when_the_profile_measured_it():
    assert _run("auto", None)["a"].tpot == pytest.approx(_run("turns", None)["a"].tpot)
    measured = {"decode_slowdown": 1.0, "prefill_slowdown": 1.0}
    assert _run("auto", measured)["a"].tpot == pytest.approx(DECODE_S, rel=1e-4)


def test_interference_table_survives_a_profile_file(tmp_path):
    p = synthetic(interference={"decode_slowdown": 1.4, "prefill_slowdown": 1.1})
    p.save(tmp_path / "p.json")
    q = Profile.load(tmp_path / "p.json")
    assert q.slowdown("decode") == 1.4 and q.slowdown("prefill") == 1.1
    assert synthetic().slowdown("decode") == 1.0
    assert json.load(open(tmp_path / "p.json"))["interference"]["decode_slowdown"] == 1.4


def test_prompts_shorter_than_the_first_column_cost_the_first_column():
    p = synthetic()
    p.prefill["tokens"] = [128, 512, 2048]
    p.prefill["seconds"] = [[0.013, 0.021, 0.05]] * len(p.prefill["cached"])
    p = Profile(**p.to_dict())
    assert p.prefill_time(16) == pytest.approx(0.013)
    assert p.prefill_time(300) > 0.013
    # Several short prompts in one step share its fixed cost: one step, not two.
    assert p.step_time([(20, 0), (30, 0)], 0, 0) == pytest.approx(0.013)


BY_SIZE = {"decode_slowdown": 1.5, "prefill_slowdown": 2.0, "prefill_tokens": 2048,
           "by_prefill_tokens": [{"prefill_tokens": 64, "prefill_slowdown": 5.0, "decode_slowdown": 1.1},
                                 {"prefill_tokens": 2048, "prefill_slowdown": 2.0, "decode_slowdown": 1.5}]}


def test_slowdown_follows_the_prefill_size_where_several_were_measured():
    p = synthetic(interference=BY_SIZE)
    assert p.slowdown("prefill", 64) == pytest.approx(5.0) and p.slowdown("prefill", 2048) == pytest.approx(2.0)
    assert p.slowdown("prefill", 16) == pytest.approx(5.0) and p.slowdown("prefill", 8192) == pytest.approx(2.0)
    mid = 2 ** ((6 + 11) / 2)  # halfway in log tokens
    assert p.slowdown("prefill", mid) == pytest.approx(3.5) and p.slowdown("decode", mid) == pytest.approx(1.3)
    assert p.slowdown("prefill") == 2.0 and p.slowdown("decode") == 1.5  # no size: the largest size's figures


BY_BATCH = {"decode_slowdown": 1.5, "prefill_slowdown": 2.0, "prefill_tokens": 2048, "decode_batch": 32,
            "by_prefill_tokens": [
                {"decode_batch": 1, "prefill_tokens": 64, "prefill_slowdown": 1.2, "decode_slowdown": 1.1},
                {"decode_batch": 1, "prefill_tokens": 2048, "prefill_slowdown": 1.4, "decode_slowdown": 1.3},
                {"decode_batch": 32, "prefill_tokens": 64, "prefill_slowdown": 3.0, "decode_slowdown": 1.2},
                {"decode_batch": 32, "prefill_tokens": 2048, "prefill_slowdown": 2.0, "decode_slowdown": 1.5}]}


def test_slowdown_follows_the_decode_batch_where_several_were_measured():
    """An MoE decode step at batch 1 reads a few experts, at 32 most: the stretch is looked up by the decode
    engine's running batch, linear in log batch between the measured ones, held beyond them."""
    p = synthetic(interference=BY_BATCH)
    assert p.slowdown("prefill", 2048, 1) == pytest.approx(1.4)
    assert p.slowdown("prefill", 2048, 32) == pytest.approx(2.0)
    assert p.slowdown("prefill", 64, 1) == pytest.approx(1.2) and p.slowdown("decode", 64, 32) == pytest.approx(1.2)
    assert p.slowdown("prefill", 2048, 128) == pytest.approx(2.0)  # held beyond the largest batch
    mid = 2 ** 2.5  # halfway between 1 and 32 in log batch
    assert p.slowdown("prefill", 2048, mid) == pytest.approx(1.7)
    assert p.slowdown("prefill", 2048) == pytest.approx(2.0)  # no batch: the largest batch's figures
    assert synthetic(interference=BY_SIZE).slowdown("prefill", 64, 1) == pytest.approx(5.0)  # one batch: no axis


def test_a_prefill_beside_a_one_sequence_decode_takes_the_small_batch_stretch():
    """B's 64-token prefill lands beside A's decode of one sequence: stretched by the batch-1 row (1.2×), not
    the batch-32 one (3×)."""
    r = _run("interference", BY_BATCH)
    assert r["b"].ttft == pytest.approx(1.2 * PREFILL_S, abs=0.011)


def test_a_short_prompt_beside_decode_takes_its_own_sizes_stretch():
    """B's 64-token prefill lands in A's decode: stretched by the 64-token row (5×), not the 2k one (2×)."""
    r = _run("interference", BY_SIZE)
    assert r["b"].ttft == pytest.approx(5 * PREFILL_S, abs=0.011)


PUSH = {"decode_slowdown": 1.0, "prefill_slowdown": 1.0, "prefill_tokens": 2048,
        "by_prefill_tokens": [{"prefill_tokens": 64, "prefill_slowdown": 1.0, "decode_slowdown": 1.0,
                               "push_exposed_shared_s": 0.03},
                              {"prefill_tokens": 2048, "prefill_slowdown": 1.0, "decode_slowdown": 1.0,
                               "push_exposed_shared_s": 0.01}]}


def test_the_measured_shared_gpu_push_delays_the_decode_only_beside_a_decode_step():
    """B's 64-token prompt is prefilled while A decodes on the same GPU: its KV lands the measured 30 ms
    after its prefill, which delays B's second token (its first leaves when sampled), or its first
    where the product answered after the push (`first_token="kv_landed"`). A, prefilled on an idle
    GPU, hands off over the modelled link alone."""
    base = _run("interference", {k: v for k, v in PUSH.items() if k != "by_prefill_tokens"})
    r = _run("interference", PUSH)
    assert r["b"].ttft == pytest.approx(base["b"].ttft, abs=1e-9)
    assert r["b"].tpot == pytest.approx(base["b"].tpot + 0.03, abs=2e-3)
    assert r["b"].kv_exposed == pytest.approx(0.03, abs=1e-6)
    assert r["a"].ttft == pytest.approx(base["a"].ttft, abs=1e-9)
    landed = _run("interference", PUSH, first_token="kv_landed")
    landed_base = _run("interference", {k: v for k, v in PUSH.items() if k != "by_prefill_tokens"},
                       first_token="kv_landed")
    assert landed["b"].ttft == pytest.approx(landed_base["b"].ttft + 0.03, abs=2e-3)
    assert landed["b"].ttft > r["b"].ttft
    p = synthetic(interference=PUSH)
    assert p.shared_push_exposed(64) == pytest.approx(0.03) and p.shared_push_exposed(8192) == pytest.approx(0.01)
    assert synthetic().shared_push_exposed(64) == 0.0  # unmeasured: the link model alone
