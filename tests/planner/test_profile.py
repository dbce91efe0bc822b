"""Profile tables: interpolation reproduces power laws exactly between measured points, files
round-trip, and the step-cost model composes prefill chunks, decodes and EP as documented."""
from __future__ import annotations

import pytest

from planner.interp import Table1D, Table2D
from planner.link import Channel, Link, parse_link
from planner.profile import Profile, ProfileError, synthetic


def test_log_log_interpolation_is_exact_on_power_laws_and_extrapolates_them():
    f = lambda x: 3.0 * x ** 1.5  # noqa: E731
    t = Table1D([1, 10, 100], [f(1), f(10), f(100)])
    for x in (1, 2, 7, 10, 33, 100, 400):
        assert t(x) == pytest.approx(f(x), rel=1e-9)


def test_two_dimensional_table_is_linear_in_the_second_axis():
    t = Table2D([1, 100], [0, 1000], [[1.0, 100.0], [2.0, 200.0]])
    assert t(10, 0) == pytest.approx(10.0)
    assert t(10, 500) == pytest.approx(15.0)
    assert t(10, 2000) == pytest.approx(30.0)  # extrapolated along the last segment


def test_profile_round_trips_and_rejects_bad_tables(tmp_path):
    p = synthetic(num_moe_layers=2, hidden_size=512, top_k=2, weight_bytes=100, expert_weight_bytes=80)
    path = tmp_path / "p.json"
    p.save(str(path))
    q = Profile.load(str(path))
    assert q.to_dict() == p.to_dict()
    bad = p.to_dict()
    bad["decode"]["seconds"] = bad["decode"]["seconds"][:1]
    with pytest.raises(ProfileError):
        Profile(**bad)


def test_step_cost_model():
    p = synthetic(num_moe_layers=2, hidden_size=512, top_k=2, weight_bytes=100 << 30, expert_weight_bytes=80 << 30)
    # A chunk after earlier chunks costs more than at the start (attention over its prefix).
    assert p.step_time([(512, 4096)], 0, 0) > p.step_time([(512, 0)], 0, 0)
    # Decodes riding along a prefill cost less than a separate decode step.
    mixed = p.step_time([(512, 0)], 8, 8 * 100)
    assert p.step_time([(512, 0)], 0, 0) < mixed < p.step_time([(512, 0)], 0, 0) + p.decode_time(8, 100)
    # EP: each GPU reads a quarter of the experts; the all-to-all grows with the tokens.
    assert p.expert_read_scale(4) == pytest.approx(0.2 + 0.8 / 4)
    link = Link("x", 100e9, 1e-5)
    assert 0 < p.all_to_all_time(16, 4, link) < p.all_to_all_time(1024, 4, link)
    assert p.all_to_all_time(16, 1, link) == 0.0
    assert p.kv_capacity(4) == p.kv_capacity(1) + int((80 << 30) * 0.75 / p.kv_bytes_per_token)


def test_layerwise_push_hides_the_transfer_behind_the_step_when_the_link_is_fast():
    fast, slow = Channel(parse_link("nvlink")), Channel(Link("slow", 1e8, 1e-5))
    step, nbytes = 0.1, 50e6
    assert fast.push_layers(0.0, step, nbytes, 32) == pytest.approx(step + fast.link.time(nbytes / 32), rel=1e-6)
    assert slow.push_layers(0.0, step, nbytes, 32) == pytest.approx(step / 32 + nbytes / 1e8 + 32 * 1e-5, rel=1e-3)


@pytest.mark.slow
def test_ep_all_to_all_table_from_two_gloo_ranks():
    from engine.presets import resolve_model
    from planner.ep_profile import measure_all_to_all

    mc = resolve_model("tiny-deepseek-v3", "auto")
    ep = measure_all_to_all([2], [4, 32], mc, "cpu", repeats=2)
    assert ep["ranks"] == [2] and ep["tokens"] == [4, 32]
    assert all(t > 0 for row in ep["dispatch_seconds"] + ep["combine_seconds"] for t in row)
    p = synthetic(num_moe_layers=3, hidden_size=ep["shape"]["hidden"], top_k=ep["shape"]["top_k"], ep=ep)
    per_layer = ep["dispatch_seconds"][0][1] + ep["combine_seconds"][0][1]
    assert p.all_to_all_time(32, 2) == pytest.approx(3 * per_layer)


def test_a_step_of_several_prompts_costs_no_more_than_their_prefills_in_turn():
    # Quadratic attention in the table: one 8192-token sequence costs more than four of 2048.
    p = synthetic(prefill_s_per_token=1e-5)
    p.prefill["seconds"] = [[1e-3 + 1e-5 * n + 1e-9 * n * n for n in p.prefill["tokens"]] for _ in p.prefill["cached"]]
    p = Profile(**p.to_dict())
    four = [(2048, 0)] * 4
    assert p.step_time(four, 0, 0) == pytest.approx(4 * p.prefill_time(2048), rel=1e-6)
    assert p.step_time(four, 0, 0) < p.prefill_time(8192)
    # Small chunks batch: the shared weight reads make one step cheaper than the chunks in turn.
    assert p.step_time([(16, 0)] * 4, 0, 0) == pytest.approx(p.prefill_time(64), rel=1e-6)
