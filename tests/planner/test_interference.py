"""planner/interference.py on CPU: two engine processes of a tiny model step alone and beside each
other, and the ratios land in the profile file where the simulator reads them."""
from __future__ import annotations

import pytest

from planner import interference
from planner.profile import Profile, synthetic


@pytest.mark.slow
def test_two_engine_processes_measure_slowdowns_into_the_profile(tmp_path):
    path = tmp_path / "p.json"
    synthetic(model="tiny-qwen3").save(str(path))
    assert interference.main(["--profile", str(path), "--model", "tiny-qwen3", "--dtype", "float32", "--device",
                              "cpu", "--prefill-tokens", "32,64", "--decode-batch", "1,2", "--decode-context", "32",
                              "--decode-steps", "4", "--prefills", "2"]) == 0
    t = Profile.load(str(path)).interference
    for k in ("decode_alone_s", "prefill_alone_s", "decode_shared_s", "prefill_shared_s"):
        assert t[k] > 0, k
    assert t["decode_slowdown"] == pytest.approx(t["decode_shared_s"] / t["decode_alone_s"])
    assert t["prefill_slowdown"] == pytest.approx(t["prefill_shared_s"] / t["prefill_alone_s"])
    assert (t["decode_batch"], t["decode_context"], t["prefill_tokens"]) == (2, 32, 64)
    # one row per decode batch and prompt size, the largest pair's figures also at the top level
    rows = t["by_prefill_tokens"]
    assert [(r["decode_batch"], r["prefill_tokens"]) for r in rows] == [(1, 32), (1, 64), (2, 32), (2, 64)]
    assert rows[-1]["prefill_slowdown"] == t["prefill_slowdown"]
    assert all(r["prefill_shared_s"] > 0 for r in rows)
    assert rows[0]["decode_alone_s"] == rows[1]["decode_alone_s"]  # one decode timing per batch
    assert rows[2]["decode_alone_s"] == rows[3]["decode_alone_s"] == t["decode_alone_s"]
    p = Profile.load(str(path))  # the simulator's lookup takes the measured batch's row
    assert p.slowdown("prefill", 32, decode_batch=1) == pytest.approx(rows[0]["prefill_slowdown"])
    assert p.slowdown("prefill", 64, decode_batch=2) == pytest.approx(rows[3]["prefill_slowdown"])


@pytest.mark.slow
def test_push_mode_hands_kv_over_nixl_into_the_decode_engine_alone_and_while_it_decodes(tmp_path):
    """Prefill and decode roles joined by real NIXL (CPU memory): each size's prompts are prefilled into
    pages the decode engine reserved, once with it idle and once while it loops over its batch (the
    reservations served between its steps); the exposed push times land in each size's row."""
    path = tmp_path / "p.json"
    synthetic(model="tiny-qwen3").save(str(path))
    assert interference.main(["--profile", str(path), "--model", "tiny-qwen3", "--dtype", "float32", "--device",
                              "cpu", "--prefill-tokens", "16,48", "--decode-batch", "2", "--decode-context", "32",
                              "--decode-steps", "4", "--prefills", "2", "--push"]) == 0
    rows = Profile.load(str(path)).interference["by_prefill_tokens"]
    for r in rows:
        for name in ("alone", "shared"):
            assert r[f"push_exposed_{name}_s"] >= 0.0 and r[f"push_destination_wait_{name}_s"] >= 0.0
            # the hand-off's wall time holds the prefill and the exposed push
            assert r[f"push_wall_{name}_s"] >= r[f"push_exposed_{name}_s"] > -1e-9
            assert r[f"push_wall_{name}_s"] > 0


def test_a_decode_unit_is_a_decode_step_even_when_the_batch_prefills_in_many_chunks():
    """batch × context far above the chunk budget: the refill runs the whole prefill and warm steps
    before any timed unit, so every unit decodes one token of every sequence (2026-12-07j timed prefill
    chunks as decode steps at batch 32 × 1k with a 2k chunk)."""
    core = interference._engine("tiny-qwen3", "float32", "cpu", 0.4, max_len=256, max_seqs=6, chunk=16)
    d = interference._Decode(core, batch=6, context=40, horizon=64)  # 240 prompt tokens: 15 chunks
    d.ready(8)
    ids = [r for r in core.requests if r.startswith("d")]
    assert len(ids) == 6
    before = {r: len(core.requests[r].output_token_ids) for r in ids}
    assert min(before.values()) >= 3
    for _ in range(4):
        d.unit()
    after = {r: len(core.requests[r].output_token_ids) for r in ids}
    # one token per sequence per unit (overlap scheduling may report the last one a step late)
    assert all(3 <= after[r] - before[r] <= 4 for r in ids), (before, after)
