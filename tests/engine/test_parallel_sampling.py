"""Parallel sampling (`n` > 1): one prompt computed once, n choices sharing its KV pages.

The scheduler-level tests drive the block pool and scheduler with a fake runner that keeps each
page's contents (token ids per slot), applies the step's copy-on-write copies, then writes what the
step computes: every running choice must read back exactly its own tokens through its page table,
shared prompt pages are held once, and the pool returns to full after any mix of finish, abort and
preemption. The engine-level tests use the offline `LLM`: choice i of a seeded n-choice request
equals a lone request with seed + i (same logits: the copied KV is right), greedy choices are equal.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest

from engine import LLM, SamplingParams
from engine.config import CacheConfig, SchedulerConfig
from engine.engine_core import RequestError
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler

PS = 4


def _scheduler(num_pages=64, budget=32, prefix=True, max_seqs=16):
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
                     CacheConfig(page_size=PS, enable_prefix_cache=prefix), num_pages, 256)


def _req(rid, prompt, n=1, max_tokens=8):
    params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True, temperature=0)
    return Request(request_id=rid, prompt_token_ids=list(prompt), sampling_params=params, eos_token_ids=(1,))


class FakeKV:
    """Page contents: what each slot holds after the steps so far."""

    def __init__(self):
        self.slots: dict[int, list] = {}

    def step(self, s: Scheduler, out) -> None:
        for src, dst in out.copies:  # copies first, as the runner does
            self.slots[dst] = list(self.slots.get(src, [None] * PS))
        for c in out.chunks:
            if c.fork_of is not None:
                assert c.num_new_tokens == 0 and c.sample
                continue
            tokens = c.request.all_token_ids
            for pos in range(c.start, c.start + c.num_new_tokens):
                page = c.request.page_ids[pos // PS]
                self.slots.setdefault(page, [None] * PS)[pos % PS] = tokens[pos]

    def check(self, s: Scheduler) -> None:
        for r in s.running:
            tokens = r.all_token_ids
            for pos in range(r.num_computed_tokens):
                assert self.slots[r.page_ids[pos // PS]][pos % PS] == tokens[pos], (r.request_id, pos)


def _step(s: Scheduler, kv: FakeKV):
    out = s.schedule()
    kv.step(s, out)
    # each choice draws its own token: choices diverge from their first token on
    sampled = {c.request.request_id: 2 + (hash((c.request.request_id, c.request.num_tokens)) % 40)
               for c in out.chunks if c.sample}
    return out, s.update(out, sampled)


def _check_refcounts(s: Scheduler) -> None:
    holders = Counter()
    for r in list(s.running) + list(s.waiting):
        holders.update(r.page_ids)
    cached = {n.page for n in s.radix._iter_nodes()} if s.radix else set()
    for page, count in holders.items():
        assert s.block_pool.ref_count(page) == count + (page in cached)
    s.block_pool.check_invariants()


def test_fork_shares_full_prompt_pages_and_copies_the_partial_one_on_first_write():
    s, kv = _scheduler(prefix=False), FakeKV()
    s.add_request(_req("a", range(10, 20), n=4))  # 10 tokens: 2 full pages + 1 page with 2 slots
    out, _ = _step(s, kv)
    assert sorted(c.request.request_id for c in out.chunks if c.fork_of) == ["a/choice1", "a/choice2", "a/choice3"]
    assert len(s.running) == 4 and s.block_pool.num_used_pages == 3  # the prompt is stored once
    full, partial = s.running[0].page_ids[:2], s.running[0].page_ids[2]
    assert all(r.page_ids[:2] == full for r in s.running)
    assert [s.block_pool.ref_count(p) for p in full + [partial]] == [4, 4, 4]
    out, _ = _step(s, kv)  # every choice writes its second token into the partial page
    assert len(out.copies) == 3 and all(src == partial for src, _ in out.copies)
    assert s.block_pool.num_used_pages == 2 + 4  # shared full pages + one partial page per choice
    assert len({r.page_ids[2] for r in s.running}) == 4 and [s.block_pool.ref_count(p) for p in full] == [4, 4]
    kv.check(s)
    assert s.abort("a/choice2") is not None  # one choice ends: the others keep every page they read
    assert s.block_pool.num_used_pages == 5 and [s.block_pool.ref_count(p) for p in full] == [3, 3]
    while s.has_unfinished():
        _step(s, kv)
        kv.check(s)
    assert s.block_pool.num_free_pages == s.block_pool.num_pages
    s.block_pool.check_invariants()


def test_page_aligned_prompt_forks_without_any_copy():
    s, kv = _scheduler(prefix=False), FakeKV()
    s.add_request(_req("a", range(10, 18), n=3))
    _step(s, kv)
    out, _ = _step(s, kv)
    assert out.copies == [] and s.block_pool.num_used_pages == 2 + 3


def test_remote_kv_with_n_first_tokens_forks_on_arrival():
    s, kv = _scheduler(prefix=False), FakeKV()
    req = _req("d", range(10, 17), n=3, max_tokens=4)
    assert s.add_remote(req, "d#t", deadline=1e9)
    for pos, page in enumerate(req.page_ids[pos // PS] for pos in range(7)):  # the prefill node's WRITE
        kv.slots.setdefault(page, [None] * PS)[pos % PS] = 10 + pos
    ended = s.remote_kv_arrived("d#t", [5, 6, 7])
    assert ended == [] and [r.output_token_ids for r in s.running] == [[5], [6], [7]]
    assert [r.choice_index for r in s.running] == [0, 1, 2] and s.block_pool.num_used_pages == 2
    assert [r.sampling_params.n for r in s.running] == [1, 1, 1]
    assert s.take_new_forks() == s.running[1:]
    while s.has_unfinished():
        _step(s, kv)
        kv.check(s)
    assert s.block_pool.num_free_pages == s.block_pool.num_pages


def test_remote_kv_first_token_that_stops_ends_only_that_choice():
    s = _scheduler(prefix=False)
    req = _req("d", range(10, 17), n=2, max_tokens=4)
    req.eos_token_ids = (9,)
    req.sampling_params.ignore_eos = False
    assert s.add_remote(req, "d#t", deadline=1e9)
    ended = s.remote_kv_arrived("d#t", [9, 6])
    assert [r.choice_index for r in ended] == [0] and ended[0].status is RequestStatus.FINISHED_STOPPED
    assert len(s.running) == 1 and s.block_pool.num_used_pages == 2


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_forks_aborts_and_preemption_keep_each_choice_its_own_kv(seed, prefix):
    rng = random.Random(seed)
    s, kv = _scheduler(num_pages=rng.choice([14, 20, 48]), budget=rng.choice([4, 9, 32]), prefix=prefix), FakeKV()
    shared = [rng.randrange(2, 50) for _ in range(9)]
    added = 0
    for _ in range(400):
        if added < 14 and rng.random() < 0.3:
            prompt = shared[: rng.randrange(0, 9)] + [rng.randrange(2, 50) for _ in range(rng.randrange(1, 11))]
            s.add_request(_req(f"r{added}", prompt, n=rng.choice([1, 2, 3, 4]), max_tokens=rng.randrange(1, 10)))
            added += 1
        if rng.random() < 0.08 and s.running:
            victim = rng.choice(s.running)
            assert s.abort(victim.request_id) is victim and victim.page_ids == []
        _step(s, kv)
        kv.check(s)
        _check_refcounts(s)
        if added >= 14 and not s.has_unfinished():
            break
    assert not s.has_unfinished()
    if s.radix:
        s.radix.clear()
    assert s.block_pool.num_free_pages == s.block_pool.num_pages


# ------------------------------------------------------------------ engine (offline LLM)
PROMPT = [5, 17, 300, 42, 7, 99, 1000, 3, 8, 11]  # 10 tokens: a partial last page of 4-token pages


def _llm(overlap=True, **kw) -> LLM:
    base = dict(load_format="dummy", page_size=PS, num_pages=128, overlap_schedule=overlap)
    base.update(kw)
    return LLM("tiny-llama", **base)


def _sampled(seed, n=1, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 10)
    return SamplingParams(n=n, temperature=1.0, seed=seed, ignore_eos=True, logprobs=1, **kw)


@pytest.fixture(scope="module")
def lone_choices():
    """Choice i's reference: a lone request with seed 40 + i."""
    llm = _llm()
    return [llm.generate(prompt_token_ids=[PROMPT], sampling_params=_sampled(40 + i))[0] for i in range(3)]


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("extra", [{}, {"num_pages": 9}, {"max_num_batched_tokens": 3}],
                         ids=["plain", "preemption", "chunked"])
def test_seeded_choices_equal_lone_requests_with_seed_plus_index(lone_choices, overlap, extra):
    llm = _llm(overlap, **extra)
    outs = llm.generate(prompt_token_ids=[PROMPT], sampling_params=_sampled(40, n=3))
    assert [o.index for o in outs] == [0, 1, 2]
    assert [o.token_ids for o in outs] == [o.token_ids for o in lone_choices]
    for o, ref in zip(outs, lone_choices):
        assert [e["logprob"] for e in o.logprobs] == pytest.approx([e["logprob"] for e in ref.logprobs], abs=1e-4)
    assert len({tuple(o.token_ids) for o in outs}) == 3
    pool = llm.core.scheduler.block_pool
    assert pool.num_free_pages + llm.core.scheduler.radix.num_evictable_pages() == pool.num_pages


def test_greedy_choices_are_equal_and_n_per_prompt_in_order():
    llm = _llm()
    greedy = SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=[PROMPT, [9, 9, 9]], sampling_params=greedy)
    assert [o.index for o in outs] == [0, 1, 2, 0, 1, 2]
    lone = llm.generate(prompt_token_ids=[PROMPT, [9, 9, 9]], sampling_params=SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in outs] == [lone[0].token_ids] * 3 + [lone[1].token_ids] * 3


def test_n_is_validated():
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=True)
    assert SamplingParams(n=3, seed=7).for_choice(2).seed == 9
    llm = _llm(max_num_seqs=4)
    with pytest.raises(RequestError, match="max_num_seqs"):
        llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(n=5))


def test_every_choice_gets_the_prompt_logprobs():
    outs = _llm().generate(prompt_token_ids=[PROMPT], sampling_params=_sampled(1, n=2, prompt_logprobs=1))
    assert outs[0].prompt_logprobs is not None and len(outs[0].prompt_logprobs) == len(PROMPT)
    assert outs[1].prompt_logprobs == outs[0].prompt_logprobs


def test_engine_process_streams_choices_and_a_stop_string_ends_only_its_choice(lone_choices):
    from engine.engine_client import EngineClient
    from engine.llm import build_engine_config

    client = EngineClient(build_engine_config("tiny-llama", load_format="dummy", page_size=PS, num_pages=128))
    try:
        outs = client.generate([PROMPT], _sampled(40, n=3))
        assert [o.token_ids for o in outs] == [o.token_ids for o in lone_choices]
        assert [o.index for o in outs] == [0, 1, 2]
        stop = outs[1].text[len(outs[1].text) // 2:][:3]  # a piece from the middle of choice 1's text
        assert stop
        cut = client.generate([PROMPT], _sampled(40, n=3, stop=[stop]))
        for full, part in zip(outs, cut):
            if stop in full.text:
                assert part.finish_reason == "stop" and part.text == full.text[: full.text.index(stop)]
            else:  # a sibling's stop string does not end this choice
                assert (part.finish_reason, part.token_ids) == ("length", full.token_ids)
        assert cut[1].finish_reason == "stop"
        from tests.cluster.conftest import wait_for

        assert wait_for(lambda: client.engine_stats()["num_free_or_cached_pages"] == 128, timeout=10)
    finally:
        client.shutdown()


def test_a_notice_without_one_first_token_per_choice_fails_the_request_and_frees_its_pages():
    s = _scheduler(prefix=False)
    req = _req("d", range(10, 17), n=3)
    assert s.add_remote(req, "d#t", deadline=1e9)
    assert s.remote_kv_arrived("d#t", 5) == [req]  # one token for three choices: nothing runs
    assert req.status is RequestStatus.FINISHED_ERROR and req.needs_fork
    assert s.block_pool.num_free_pages == s.block_pool.num_pages and not s.running


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_abort_ends_every_choice_once_before_or_after_the_fork(steps):
    llm = _llm(max_num_batched_tokens=4)  # the 10-token prompt takes 3 steps; the fork comes with the third
    core = llm.core
    core.add_request("x", PROMPT, _sampled(1, n=3, max_tokens=20))
    ends = []
    for _ in range(steps):
        ends += [o for o in core.step() if o.finished]
    assert core.abort("x") and not core.abort("x")
    while core.has_unfinished():
        ends += [o for o in core.step() if o.finished]
    assert sorted(o.index for o in ends) == [0, 1, 2] and {o.finish_reason for o in ends} == {"abort"}
    pool = core.scheduler.block_pool
    assert pool.num_free_pages + core.scheduler.radix.num_evictable_pages() == pool.num_pages
