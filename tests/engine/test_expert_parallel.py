"""Expert parallelism across real gloo ranks (one engine process per rank, as a node runs them):
tiny DeepSeek-V3 and Qwen3-MoE checkpoints built by HF `transformers` give the same greedy tokens
and logprobs within tolerance with EP = 1, 2, 4 — with and without redundant experts, with
online EPLB rebalances in the middle of generation (weights moved between ranks), and with a
rank that has no requests. Both all-to-all paths: the fixed-capacity one (default), including
prefill steps past its capacity (split into several dispatches), two overlapped micro-batches per
MoE layer, and two micro-batches interleaved across whole layers (two-batch overlap, prefill
chunks split mid-prompt and decode batches), and the count-based `torch` one."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.engine_client import EngineClient
from engine.llm import build_engine_config
from tests.engine.hf_reference import build_hf_checkpoint

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 30, 42, 7, 99, 100, 3, 8], [11, 12, 13], [1, 2, 3, 4, 5, 6], [200, 100, 50], [7, 7, 7, 9]]
KW = dict(page_size=4, num_pages=128, max_model_len=128, device="cpu")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in ("DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM"):
        _, path = build_hf_checkpoint(arch, tmp_path_factory.mktemp(arch))
        ref = LLM(path, **KW).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
        out[arch] = (path, ref)
    return out


def _run(path: str, prompts, **ep):
    client = EngineClient(build_engine_config(path, **KW, **ep))
    try:
        results = client.generate(prompts, GREEDY)
        return results, client.engine_stats()
    finally:
        client.shutdown()


def _assert_same(results, reference):
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]
    for got, want in zip(results, reference):
        assert len(got.logprobs) == len(want.logprobs) == GREEDY.max_tokens
        for a, b in zip(got.logprobs, want.logprobs):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=2e-4)


# Fixed-capacity cases: prefill steps hold up to 19 tokens per rank, so a capacity of 3 or 4 splits
# them into several dispatches; `ep_overlap_min_tokens` 2 runs every step of 2+ tokens as two
# overlapped micro-batches.
SPLIT = dict(ep_dispatch_capacity=3, ep_overlap_min_tokens=0)
SPLIT_OVERLAP = dict(ep_dispatch_capacity=4, ep_overlap_min_tokens=2)
# Two-batch overlap from 2 tokens on (every prefill and every decode step of 2+ requests), each
# micro-batch's MoE split further by a capacity of 3.
TWO_BATCH = dict(ep_dispatch_capacity=3, ep_two_batch_min_tokens=2)


@pytest.mark.parametrize("arch,ep_size,redundant,interval,a2a", [
    ("DeepseekV3ForCausalLM", 2, 0, 0, dict(ep_backend="torch")),
    ("DeepseekV3ForCausalLM", 4, 4, 2, SPLIT_OVERLAP),
    ("Qwen3MoeForCausalLM", 2, 2, 3, SPLIT),
    ("Qwen3MoeForCausalLM", 4, 0, 0, {}),
    ("Qwen3MoeForCausalLM", 2, 2, 2, SPLIT_OVERLAP),
    ("DeepseekV3ForCausalLM", 2, 2, 2, TWO_BATCH),
    ("Qwen3MoeForCausalLM", 4, 4, 3, TWO_BATCH),
])
def test_ep_ranks_give_the_single_rank_tokens(checkpoints, arch, ep_size, redundant, interval, a2a):
    path, reference = checkpoints[arch]
    results, stats = _run(path, PROMPTS, ep_size=ep_size, num_redundant_experts=redundant,
                          eplb_interval=interval, eplb_window=2, **a2a)
    _assert_same(results, reference)
    ranks = stats["ranks"]
    assert [r["ep_rank"] for r in ranks] == list(range(ep_size))
    assert {r["ep_backend"] for r in ranks} == {a2a.get("ep_backend", "fixed")}
    assert all(r["num_steps"] > 0 for r in ranks)  # attention data-parallel: every rank served requests
    if a2a is TWO_BATCH:  # prefill and decode steps really ran as two interleaved micro-batches
        assert all(r["ep_two_batch_steps"] > 0 for r in ranks)
    # Every routed token was counted once, on the rank that owned its request.
    routed = sum(sum(r["expert_tokens"].values()) for r in ranks)
    assert routed > 0
    if interval:
        # Rebalanced mid-generation, and weights really moved between slots.
        assert min(r["eplb_rebalances"] for r in ranks) >= 2
        assert ranks[0]["eplb_weight_moves"] > 0
        # The imbalance metric is the group's (load summed over ranks), so every rank reports the same.
        imbalance = ranks[0]["ep_imbalance"]
        assert imbalance and all(v >= 1.0 for v in imbalance.values())
        assert all(r["ep_imbalance"] == imbalance for r in ranks)
    else:
        assert all(r["eplb_rebalances"] == 0 for r in ranks)
    # No KV page leaked on any rank (finished prompts stay in the prefix cache, evictable).
    assert all(r["num_free_pages"] + r["num_cached_pages"] == KW["num_pages"] for r in ranks)


@pytest.mark.parametrize("a2a", [SPLIT_OVERLAP, TWO_BATCH], ids=["overlap", "two_batch"])
def test_an_idle_rank_joins_every_moe_step(checkpoints, a2a):
    path, reference = checkpoints["DeepseekV3ForCausalLM"]
    results, stats = _run(path, PROMPTS[:1], ep_size=2, num_redundant_experts=2, eplb_interval=3, eplb_window=2,
                          **a2a)
    _assert_same(results, reference[:1])
    busy, idle = stats["ranks"]
    assert busy["num_steps"] > 0 and idle["num_steps"] == 0
    assert sum(idle["expert_tokens"].values()) == 0
    assert idle["eplb_rebalances"] == busy["eplb_rebalances"] >= 1
    if a2a is TWO_BATCH:  # the idle rank joined the busy rank's two micro-batches
        assert idle["ep_two_batch_steps"] == busy["ep_two_batch_steps"] > 0


def test_placements_that_gain_little_are_not_applied(checkpoints):
    """With a gain threshold no placement can meet, EPLB evaluates but moves nothing (and the
    tokens are of course unchanged)."""
    path, reference = checkpoints["Qwen3MoeForCausalLM"]
    results, stats = _run(path, PROMPTS, ep_size=2, num_redundant_experts=2, eplb_interval=2, eplb_window=2,
                          eplb_min_gain=0.99)
    _assert_same(results, reference)
    assert all(r["eplb_rebalances"] == 0 and r["eplb_weight_moves"] == 0 for r in stats["ranks"])


def test_in_process_llm_refuses_ep_with_a_clear_error(checkpoints):
    path, _ = checkpoints["Qwen3MoeForCausalLM"]
    with pytest.raises(ValueError, match="one engine process per EP rank"):
        LLM(path, ep_size=2, **KW)


def test_redundant_experts_must_split_evenly_over_ranks(checkpoints):
    path, _ = checkpoints["Qwen3MoeForCausalLM"]
    with pytest.raises(RuntimeError, match="do not split evenly"):
        EngineClient(build_engine_config(path, ep_size=4, num_redundant_experts=1, **KW), startup_timeout_s=120)
