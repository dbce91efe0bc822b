"""Invariants of the block pool, the radix prefix cache and the scheduler, driven without a model:
a fake runner "computes" whatever is scheduled and samples deterministic tokens."""
from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest

from engine.block_pool import BlockPool, NoFreePages
from engine.config import CacheConfig, SchedulerConfig
from engine.radix_cache import RadixCache
from engine.request import Request
from engine.scheduler import Scheduler, SchedulerOverloaded


def _params(max_tokens=8, **kw):
    base = dict(max_tokens=max_tokens, min_tokens=0, ignore_eos=True, stop_token_ids=[])
    base.update(kw)
    return SimpleNamespace(**base)


def _req(rid, prompt, **kw):
    return Request(request_id=rid, prompt_token_ids=list(prompt), sampling_params=_params(**kw), eos_token_ids=(1,))


def _scheduler(num_pages=32, page_size=4, budget=16, max_seqs=8, prefix=True, max_len=256, max_waiting=100):
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_waiting=max_waiting),
                     CacheConfig(page_size=page_size, enable_prefix_cache=prefix), num_pages, max_len)


def _holders(s: Scheduler) -> Counter:
    c = Counter()
    for r in s.running:
        c.update(r.page_ids)
    for r in s.waiting:
        c.update(r.page_ids)
    return c


def _check(s: Scheduler):
    s.block_pool.check_invariants()
    if s.radix is not None:
        s.radix.check_invariants()
    holders = _holders(s)
    cached = {n.page for n in s.radix._iter_nodes()} if s.radix else set()
    for page, n in holders.items():
        # every holder's reference is counted, plus one for the tree if cached
        assert s.block_pool.ref_count(page) == n + (page in cached), page
    for page in cached:
        assert s.block_pool.ref_count(page) >= 1
    for r in s.running:
        assert len(r.page_ids) * s.page_size >= r.num_computed_tokens


def _step(s: Scheduler, rng=None):
    out = s.schedule()
    lens = [c.num_new_tokens for c in out.chunks]
    assert lens == sorted(lens, key=lambda n: n != 1), "decodes must come first"
    assert sum(lens) <= s.config.max_num_batched_tokens
    for c in out.chunks:
        assert len(c.request.page_ids) * s.page_size >= c.start + c.num_new_tokens
    sampled = {c.request.request_id: (c.request.num_tokens * 7) % 50 + 2 for c in out.chunks if c.sample}
    return out, s.update(out, sampled)


def test_block_pool_refcounts_and_double_free():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free_pages == 1
    with pytest.raises(NoFreePages):
        pool.allocate(2)
    pool.incref(a[:1])
    assert pool.decref(a) == a[1:]
    assert pool.decref(a[:1]) == a[:1]
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref(a[:1])
    pool.check_invariants()
    assert pool.num_free_pages == 4


def test_block_pool_keeps_a_prompts_pages_in_one_run_after_decodes_interleaved_others():
    """Two sequences decoding page by page interleave their pages; when one finishes, its pages are
    scattered holes. A prompt's pages must still come as one run of consecutive ids where a free run
    that long exists (the KV push posts one descriptor per run), and from the lowest free pages, run by
    run, where none does."""
    pool = BlockPool(64)
    a, b = [], []
    for _ in range(16):  # decode steps: one page each, alternating sequences
        a += pool.allocate(1)
        b += pool.allocate(1)
    assert a == list(range(0, 32, 2)) and b == list(range(1, 32, 2))
    pool.decref(a)  # sequence a finishes: 16 scattered holes below page 32
    prompt = pool.allocate(20)
    assert prompt == list(range(32, 52))  # the first run long enough, not the holes
    single = pool.allocate(1)
    assert single == [0]  # single pages fill the lowest hole
    rest = pool.allocate(pool.num_free_pages)  # no run that long: lowest free pages, ascending
    assert rest == sorted(rest) and len(set(rest + prompt + single + b)) == 64
    pool.check_invariants()


def test_block_pool_random_allocations_never_hand_out_a_held_page():
    rng = random.Random(0)
    pool, held = BlockPool(50), []
    for _ in range(2000):
        if held and (rng.random() < 0.5 or pool.num_free_pages == 0):
            pool.decref(held.pop(rng.randrange(len(held))))
        else:
            got = pool.allocate(rng.randint(1, min(8, pool.num_free_pages)))
            assert not set(got) & {p for h in held for p in h}
            held.append(got)
    pool.check_invariants()
    assert pool.num_used_pages == sum(map(len, held))


def test_radix_match_insert_and_lru_eviction_spares_referenced_pages():
    pool = BlockPool(8)
    radix = RadixCache(pool, page_size=2)
    pages = pool.allocate(3)
    radix.insert([1, 2, 3, 4, 5, 6, 7], pages, num_computed_tokens=6)
    pool.decref(pages)  # the request lets go; the tree keeps all three full pages
    assert radix.num_evictable_pages() == 3 and pool.num_free_pages == 5
    held = radix.match([1, 2, 3, 4, 9, 9])  # a new request reuses two pages
    assert held == pages[:2]
    assert radix.evict(8) == 1  # only the unreferenced leaf can go
    assert pool.ref_count(pages[0]) == 2 and pool.ref_count(pages[1]) == 2
    pool.decref(held)
    assert radix.evict(8) == 2 and pool.num_free_pages == 8
    pool.check_invariants()


def test_radix_partial_pages_are_not_cached_and_duplicates_stay_private():
    pool = BlockPool(8)
    radix = RadixCache(pool, page_size=4)
    a = pool.allocate(2)
    radix.insert([1, 2, 3, 4, 5, 6], a, num_computed_tokens=6)
    b = pool.allocate(2)
    radix.insert([1, 2, 3, 4, 5, 6, 7, 8], b, num_computed_tokens=8)  # first page already cached as a[0]
    pool.decref(a)
    pool.decref(b)
    assert radix.num_cached_pages == 2
    assert radix.match([1, 2, 3, 4, 5, 6, 7, 8, 9]) == [a[0], b[1]]


@pytest.mark.parametrize("prefix", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_mix_of_finish_abort_preempt_leaks_no_page(seed, prefix):
    rng = random.Random(seed)
    s = _scheduler(num_pages=rng.choice([10, 16, 40]), budget=rng.choice([3, 8, 32]), prefix=prefix)
    shared = [rng.randrange(2, 50) for _ in range(12)]
    n = 0
    for step in range(300):
        if n < 25 and rng.random() < 0.3:
            prompt = (shared[: rng.randrange(0, 12)] + [rng.randrange(2, 50) for _ in range(rng.randrange(1, 14))])
            s.add_request(_req(f"r{n}", prompt, max_tokens=rng.randrange(1, 12)))
            n += 1
        if rng.random() < 0.1 and (s.running or s.waiting):
            victim = rng.choice(list(s.running) + list(s.waiting))
            assert s.abort(victim.request_id) is victim
            assert s.abort(victim.request_id) is None
            assert victim.page_ids == []
        _step(s)
        _check(s)
        if n >= 25 and not s.has_unfinished():
            break
    assert not s.has_unfinished()
    evictable = s.radix.num_evictable_pages() if s.radix else 0
    assert s.block_pool.num_free_pages + evictable == s.block_pool.num_pages
    if s.radix:
        s.radix.clear()
    assert s.block_pool.num_free_pages == s.block_pool.num_pages


def test_preemption_recomputes_from_the_front_of_the_queue():
    s = _scheduler(num_pages=6, page_size=2, budget=64, prefix=False)
    a, b = _req("a", [2, 3, 4, 5], max_tokens=6), _req("b", [6, 7, 8, 9], max_tokens=6)
    s.add_request(a)
    s.add_request(b)
    preempted = []
    for _ in range(40):
        out, _ = _step(s)
        preempted += [r.request_id for r in out.preempted]
        _check(s)
        if not s.has_unfinished():
            break
    assert preempted == ["b"] or "b" in preempted
    assert b.num_preemptions >= 1 and s.num_preemptions >= 1
    assert a.finish_reason == b.finish_reason == "length"
    assert len(a.output_token_ids) == len(b.output_token_ids) == 6


def test_chunked_prefill_respects_the_budget_and_samples_only_at_the_end():
    s = _scheduler(budget=5)
    r = _req("a", list(range(2, 14)), max_tokens=2)
    s.add_request(r)
    sizes = []
    for _ in range(3):
        out, _ = _step(s)
        sizes.append([(c.num_new_tokens, c.sample) for c in out.chunks])
    assert sizes == [[(5, False)], [(5, False)], [(2, True)]]


def test_prefix_hit_skips_cached_pages_but_computes_the_last_token():
    s = _scheduler(page_size=4)
    first = _req("a", list(range(2, 14)), max_tokens=1)  # 12 tokens = 3 full pages
    s.add_request(first)
    while s.has_unfinished():
        _step(s)
    again = _req("b", list(range(2, 14)), max_tokens=1)
    s.add_request(again)
    out, _ = _step(s)
    assert again.num_cached_tokens == 8  # 2 pages reused, the last page recomputed for its logits
    assert out.chunks[0].start == 8 and out.chunks[0].num_new_tokens == 4


def test_stop_conditions_eos_stop_ids_min_tokens_and_context_limit():
    s = _scheduler(max_len=10)
    eos = _req("eos", [2, 3], max_tokens=5, ignore_eos=False)
    stop = _req("stop", [2, 3], max_tokens=5, stop_token_ids=[9], min_tokens=2)
    ctx = _req("ctx", [2, 3, 4, 5, 6, 7, 8, 9], max_tokens=50)
    for r in (eos, stop, ctx):
        s.add_request(r)
    out = s.schedule()
    s.update(out, {"eos": 1, "stop": 9, "ctx": 4})
    assert eos.finish_reason == "stop" and eos.stop_reason is None
    assert not stop.is_finished  # min_tokens=2 not reached yet
    out = s.schedule()
    s.update(out, {"stop": 9, "ctx": 4})
    assert stop.finish_reason == "stop" and stop.stop_reason == 9
    assert ctx.finish_reason == "length" and ctx.num_tokens == 10


def test_admission_queue_is_bounded():
    s = _scheduler(max_waiting=2)
    s.add_request(_req("a", [2]))
    s.add_request(_req("b", [2]))
    with pytest.raises(SchedulerOverloaded):
        s.add_request(_req("c", [2]))


def test_request_larger_than_the_pool_ends_with_an_error_and_frees_everything():
    s = _scheduler(num_pages=3, page_size=2, budget=64, prefix=True)
    r = _req("big", [2, 3, 4, 5, 6], max_tokens=20)
    s.add_request(r)
    for _ in range(30):
        _step(s)
        if not s.has_unfinished():
            break
    assert r.finish_reason == "error" and "KV pages" in r.error
    s.radix.clear()
    assert s.block_pool.num_free_pages == 3
