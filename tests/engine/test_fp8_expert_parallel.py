"""Expert parallelism over an FP8 block-format DeepSeek-V3 checkpoint across real gloo ranks: EP = 2
with redundant experts and online EPLB rebalances (FP8 expert weights and their block scales moved
between ranks) gives the single-rank tokens; so does FP8 dispatch of the activations (the experts'
own activation quantization reproduces the dispatched FP8 values), with two-batch overlap and a
dispatch capacity the prefill steps overflow, within the FP8 tests' logprob tolerance (1e-3)."""
from __future__ import annotations

import pytest

from engine import LLM
from tests.engine.fp8_checkpoint import build_fp8_checkpoint
from tests.engine.test_expert_parallel import GREEDY, KW, PROMPTS, TWO_BATCH, _run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("dispatch", [{}, dict(ep_dispatch_fp8=True, **TWO_BATCH)], ids=["bf16", "fp8_dispatch"])
def test_fp8_experts_move_with_their_scales_under_eplb(tmp_path, dispatch):
    _, path, _ = build_fp8_checkpoint("DeepseekV3ForCausalLM", str(tmp_path))
    reference = LLM(path, **KW).generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)
    results, stats = _run(path, PROMPTS, ep_size=2, num_redundant_experts=2, eplb_interval=2, eplb_window=2,
                          **dispatch)
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]
    for got, want in zip(results, reference):
        for a, b in zip(got.logprobs, want.logprobs):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)
    ranks = stats["ranks"]
    assert {r["ep_backend"] for r in ranks} == {"fixed+fp8" if dispatch else "fixed"}
    assert min(r["eplb_rebalances"] for r in ranks) >= 2 and ranks[0]["eplb_weight_moves"] > 0
