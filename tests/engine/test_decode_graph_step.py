"""The decode-graph step's logic on CPU: packed inputs uploaded once, token ids gathered from the
host's ids and the step in flight's draws, sampling inside the graph (greedy, and temperature /
top-k / top-p / min-p), the host sampler on the graph's logits where a batch needs it — and the
tokens, ends and logprobs equal the same engine without graphs (overlap on and off).

CPU has no CUDA graphs, so `EagerGraphs` stands in: "replaying" a bucket runs the graph's body
(`DecodeGraphs._body`) over the static buffers, reading them as a captured graph would. Capture
safety itself is checked on the device (bench/engine_bench.py runs every step through graphs)."""
from __future__ import annotations

import pytest
import torch

from engine import SamplingParams, decode_inputs
from engine.cuda_graph import DecodeGraphs
from tests.engine.test_overlap_schedule import _llm, _run, _workload


class _Replay:
    def __init__(self, graphs, key):
        self.graphs, self.key = graphs, key

    def replay(self):
        self.graphs.replays[self.key[1]] += 1
        self.graphs.bound_replays[self.key[2]] += 1
        self.graphs.logits[self.key].copy_(self.graphs._body(*self.key))


class EagerGraphs(DecodeGraphs):
    def _metadata(self, bs, bound=None):
        meta = super()._metadata(bs, bound)
        meta.seq_lens_cpu = self.seq_lens[:bs].tolist()  # the torch reference reads lengths on the host
        return meta

    def capture(self):
        self.replays = {m: 0 for m in self.modes}
        self.bound_replays = {b: 0 for b in self.bounds}
        vocab = self.runner.model_config.vocab_size
        for bs in self.sizes:
            for mode in self.modes:
                for bound in self.bounds:
                    self.logits[(bs, mode, bound)] = torch.empty(bs, vocab)
                    self.graphs[(bs, mode, bound)] = _Replay(self, (bs, mode, bound))


def _with_graphs(llm, max_batch: int = 6):
    runner = llm.core.runner
    runner.graphs = EagerGraphs(runner, max_batch)
    runner.graphs.capture()
    return runner.graphs


def _tokens(results):
    return {rid: ([t for t, _ in toks], end) for rid, (toks, end) in results.items()}


@pytest.mark.parametrize("overlap,one_copy", [(True, True), (False, True), (True, False)])
def test_graph_steps_give_the_eager_engines_outputs_on_a_mixed_workload(overlap, one_copy, monkeypatch):
    """`one_copy=False`: block tables go up in their own strided copy (what long context limits take)."""
    if not one_copy:
        monkeypatch.setattr(decode_inputs, "_ONE_COPY_BYTES", 0)
    work = _workload()
    aborts = {3: 2, 8: 1, 11: 0}
    reference = _run(_llm(overlap), work, aborts)
    llm = _llm(overlap)
    graphs = _with_graphs(llm)
    got = _run(llm, work, aborts)
    assert _tokens(got) == _tokens(reference)
    for rid in reference:
        for (_, a), (_, b) in zip(reference[rid][0], got[rid][0]):
            assert (a is None) == (b is None)
            if a is not None:
                assert a["token_id"] == b["token_id"] and abs(a["logprob"] - b["logprob"]) < 1e-4
    assert graphs.replays["greedy"] > 10  # decodes really went through the graph path
    sched = llm.core.scheduler
    assert sched.block_pool.num_free_pages + sched.radix.num_evictable_pages() == sched.block_pool.num_pages


@pytest.mark.parametrize("truncation", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_in_graph_sampling_keeps_only_the_truncated_set(truncation):
    """A truncation that keeps one token makes the in-graph draw deterministic: it must be the argmax."""
    prompts = [[5, 17, 30, 42, 7], [11, 12, 13], [1, 2, 3, 4, 5, 6, 7, 8, 9], [200, 100, 50]]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    hot = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True, **truncation)
    reference = [o.token_ids for o in _llm(True, num_pages=128).generate(prompt_token_ids=prompts,
                                                                          sampling_params=greedy)]
    llm = _llm(True, num_pages=128)
    graphs = _with_graphs(llm)
    mixed = [hot if i % 2 else greedy for i in range(len(prompts))]
    got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=mixed)]
    assert got == reference
    assert graphs.replays["sample"] > 5


def test_in_graph_sampling_draws_beyond_the_argmax_when_hot():
    """Unseeded, untruncated sampling at a high temperature from a random model leaves the argmax."""
    prompts = [[5, 17, 30, 42, 7], [11, 12, 13]]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reference = [o.token_ids for o in _llm(True, num_pages=128).generate(prompt_token_ids=prompts,
                                                                          sampling_params=greedy)]
    llm = _llm(True, num_pages=128)
    _with_graphs(llm)
    got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=SamplingParams(
        temperature=5.0, max_tokens=16, ignore_eos=True))]
    assert got != reference and all(len(t) == 16 for t in got)


@pytest.mark.parametrize("params", [SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True),
                                    SamplingParams(n=3, temperature=1.0, seed=40, max_tokens=8, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_forked_choices_through_graphs_equal_the_eager_engine(params):
    """n > 1: choices share the prompt's pages and copy the partly filled last one on first write (page ids
    replaced in place); the graph step must read the new pages, in-graph (greedy) or with the host sampler."""
    prompts = [[5, 17, 300, 42, 7, 99, 1000, 3, 8, 11], [9, 9, 9]]  # partial last pages of 4-token pages
    reference = [o.token_ids for o in _llm(True, num_pages=128).generate(prompt_token_ids=prompts,
                                                                          sampling_params=params)]
    llm = _llm(True, num_pages=128)
    graphs = _with_graphs(llm)
    got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]
    assert got == reference and len(got) == 6
    assert graphs.replays["greedy"] > 3


def test_short_context_graphs_serve_the_steps_that_fit_them_and_the_rest_take_the_general_ones():
    """`decode_graph_short_context` N: a second graph per bucket whose attention may size its split-KV
    launch for contexts up to N. A step replays it only while every sequence's length fits N; the tokens
    and ends equal the eager engine's either way."""
    work = _workload()
    reference = _run(_llm(True), work, {})
    llm = _llm(True, decode_graph_short_context=32)
    graphs = _with_graphs(llm)
    assert graphs.bounds == (None, 32)
    got = _run(llm, work, {})
    assert _tokens(got) == _tokens(reference)
    assert graphs.bound_replays[32] > 5 and graphs.bound_replays[None] > 5, graphs.bound_replays  # contexts grow past 32


def test_a_context_bound_caps_the_split_kv_launch_and_none_keeps_it():
    """The split choice a short-context graph captures: each split covers at least MIN_TILES_PER_SPLIT
    tiles of the bound (one split, no merge, for a bound within that many tiles); no bound: unchanged."""
    from unittest import mock

    from engine.kernels import mla_decode as mla

    cuda = torch.device("cuda")
    with mock.patch.object(mla, "_num_sms", return_value=132):
        free = mla.choose_config(1, 16, cuda)
        assert free.num_splits == 32  # the SM-filling heuristic at batch 1
        assert mla.choose_config(1, 16, cuda, max_seq_len=None) == free
        short = mla.choose_config(1, 16, cuda, max_seq_len=mla.MIN_TILES_PER_SPLIT * free.block_n)
        assert short.num_splits == 1 and dataclasses_equal_but_splits(short, free)
        assert mla.choose_config(1, 16, cuda, max_seq_len=4096).num_splits == 4096 // (4 * free.block_n)
    assert mla.max_splits_for(None, 64) > 1 << 20 and mla.max_splits_for(1, 64) == 1


def dataclasses_equal_but_splits(a, b) -> bool:
    import dataclasses
    return dataclasses.replace(a, num_splits=b.num_splits) == b
