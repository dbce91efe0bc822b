"""Sampler and SamplingParams against brute-force references; tokenizer and detokenizer round trips."""
from __future__ import annotations

import random

import pytest
import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.request import Request
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer, load_tokenizer


def _req(params, prompt=(3, 4), out=(), eos=(1,)):
    r = Request("r", list(prompt), params, eos_token_ids=tuple(eos))
    r.output_token_ids = list(out)
    return r


def test_invalid_parameters_name_the_field():
    for kw, field in [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -5}, "top_k"),
                      ({"min_p": 1.5}, "min_p"), ({"max_tokens": 0}, "max_tokens"),
                      ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"), ({"logprobs": 100}, "logprobs"),
                      ({"stop": [""]}, "stop"), ({"temperature": float("nan")}, "temperature")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)


def test_params_round_trip_through_a_dict():
    p = SamplingParams(temperature=0.7, top_k=5, stop="END", seed=3, logprobs=2)
    q = SamplingParams.from_dict(p.to_dict())
    assert q == p and q.stop == ["END"]
    with pytest.raises(ValueError, match="bogus"):
        SamplingParams.from_dict({"bogus": 1})


def test_greedy_is_argmax_and_penalties_match_a_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    reqs = [_req(SamplingParams(temperature=0)),
            _req(SamplingParams(temperature=0, repetition_penalty=1.5), prompt=(1, 2, 3), out=(4, 4)),
            _req(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.3), out=(7, 7, 8))]
    got = Sampler().sample(logits, reqs).token_ids
    ref = logits.clone()
    for t in {1, 2, 3, 4}:
        ref[1, t] = ref[1, t] / 1.5 if ref[1, t] > 0 else ref[1, t] * 1.5
    ref[2, 7] -= 0.5 + 2 * 0.3
    ref[2, 8] -= 0.5 + 0.3
    assert got == ref.argmax(-1).tolist()


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(1, 10)
    logits[0, 1] = 10.0  # eos
    logits[0, 5] = 9.0  # stop id
    r = _req(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5]))
    assert Sampler().sample(logits, [r]).token_ids[0] not in (1, 5)
    r.output_token_ids = [2, 2]
    assert Sampler().sample(logits, [r]).token_ids == [1]


def _keep_set(logits: torch.Tensor, p: SamplingParams) -> set[int]:
    """Brute force: the tokens top-k / top-p / min-p leave."""
    probs = (logits / p.temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep, mass = [], 0.0
    for rank, t in enumerate(order):
        if p.top_k and rank >= p.top_k:
            break
        if rank > 0 and mass >= p.top_p:
            break
        if rank > 0 and probs[t] < p.min_p * probs[order[0]]:
            break
        keep.append(t)
        mass += float(probs[t])
    return set(keep)


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.6), dict(min_p=0.3), dict(top_k=5, top_p=0.8)])
def test_truncation_only_draws_from_the_brute_force_keep_set(kw):
    torch.manual_seed(1)
    logits = torch.randn(1, 30) * 2
    p = SamplingParams(temperature=0.9, **kw)
    keep = _keep_set(logits[0], p)
    seen = {Sampler().sample(logits, [_req(p)]).token_ids[0] for _ in range(300)}
    assert seen <= keep and len(seen) >= min(len(keep), 2)


def test_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    counts = torch.zeros(3)
    sampler = Sampler()
    torch.manual_seed(2)
    for _ in range(3000):
        counts[sampler.sample(logits, [_req(SamplingParams(temperature=1.0))]).token_ids[0]] += 1
    assert torch.allclose(counts / counts.sum(), torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


def test_same_seed_same_tokens_whatever_the_batch():
    torch.manual_seed(3)
    logits = torch.randn(4, 100)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    alone = Sampler().sample(logits[1:2], [_req(seeded)]).token_ids[0]
    batch = [_req(SamplingParams(temperature=1.0)), _req(seeded), _req(SamplingParams(temperature=0.5)),
             _req(SamplingParams(temperature=0))]
    for _ in range(5):
        assert Sampler().sample(logits, batch).token_ids[1] == alone
    other_step = _req(seeded, out=(9,))
    draws = {Sampler().sample(logits[1:2], [_req(SamplingParams(temperature=1.0, seed=s))]).token_ids[0]
             for s in range(20)}
    assert len(draws) > 1 and other_step.sampling_params.seed == 42


def test_logprobs_are_raw_log_softmax_with_rank_and_top_n():
    torch.manual_seed(4)
    logits = torch.randn(2, 20)
    reqs = [_req(SamplingParams(temperature=0, logprobs=3)), _req(SamplingParams(temperature=0))]
    out = Sampler().sample(logits, reqs)
    lp = logits.log_softmax(-1)
    entry = out.logprobs[0]
    assert out.logprobs[1] is None
    assert entry["rank"] == 1 and abs(entry["logprob"] - float(lp[0].max())) < 1e-5
    assert list(entry["top_logprobs"]) == lp[0].topk(3).indices.tolist()


@pytest.fixture(scope="module")
def deepseek():
    return load_tokenizer(None)


def test_deepseek_tokenizer_is_the_default_and_round_trips(deepseek):
    assert 128_000 < deepseek.vocab_size <= 130_000
    text = "Hello, world! 你好，世界 🚀 naïve"
    assert deepseek.decode(deepseek.encode(text)) == text
    assert deepseek.eos_token_id is not None and deepseek.decode([10**7]) == ""


def test_checkpoint_tokenizer_wins(tmp_path):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers

    tok = HF(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(str(tmp_path))
    assert isinstance(t, Tokenizer) and t.encode("hello world") == [1, 2]


def test_incremental_deltas_concatenate_to_the_full_decode(deepseek):
    rng = random.Random(0)
    text = "Streaming 流式输出 works ✓ with emoji 🎉🎉 and spaces   ok."
    ids = deepseek.encode(text)
    for trial in range(5):
        detok = IncrementalDetokenizer(deepseek, [5, 6])
        out, i = "", 0
        while i < len(ids):
            n = rng.randint(1, 3)
            delta = detok.append(ids[i: i + n])
            assert "\ufffd" not in delta
            out += delta
            i += n
        out += detok.flush()
        assert out == text


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens_truncates(deepseek, include):
    ids = deepseek.encode("The answer is 42. STOP here and more")
    detok = IncrementalDetokenizer(deepseek, [], stop=["STOP"], include_stop_str_in_output=include)
    out = ""
    for t in ids:
        out += detok.append([t])
        if detok.stopped:
            break
    assert detok.stopped and detok.stop_reason == "STOP"
    assert out == ("The answer is 42. STOP" if include else "The answer is 42. ")
