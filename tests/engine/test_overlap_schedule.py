"""Overlap scheduling (the host schedules and launches step N+1 before it has seen step N's
tokens) must not change a single output: the reference is the same engine with the overlap
turned off, on a mixed workload with chunked prefill, preemption, EOS / stop ids / max tokens /
the context limit, seeded sampling, penalties, logprobs, stop strings and aborts."""
from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams

def _llm(overlap: bool, **kw) -> LLM:
    base = dict(load_format="dummy", page_size=4, num_pages=40, max_num_batched_tokens=24, max_num_seqs=6,
                max_model_len=64, overlap_schedule=overlap)
    base.update(kw)
    return LLM("tiny-llama", **base)


def _workload() -> list[tuple[list[int], SamplingParams, tuple[int, ...]]]:
    """(prompt, params, eos ids). EOS and stop ids are tokens the random tiny model really emits for
    that prompt (a greedy probe run), so those ends happen mid-generation."""
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 1000) for _ in range(rng.choice([3, 9, 17, 30]))] for _ in range(14)]
    probe = [o.token_ids for o in _llm(False, num_pages=256).generate(
        prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))]
    out = []
    for i, prompt in enumerate(prompts):
        kind, eos = i % 7, (0,)
        if kind == 0:
            p = SamplingParams(temperature=0, max_tokens=rng.randint(1, 12), ignore_eos=True)
        elif kind == 1:  # EOS ends it
            p, eos = SamplingParams(temperature=0, max_tokens=40, logprobs=2), (probe[i][3],)
        elif kind == 2:
            p = SamplingParams(temperature=0.8, seed=100 + i, max_tokens=10, ignore_eos=True, logprobs=1)
        elif kind == 3:
            p = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[probe[i][4]], ignore_eos=True)
        elif kind == 4:  # penalties: these steps wait for the step in flight
            p = SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.3, frequency_penalty=0.5,
                               ignore_eos=True)
        elif kind == 5:
            p = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)  # the context limit ends it
        else:  # EOS masked until min_tokens
            p, eos = SamplingParams(temperature=0, max_tokens=8, min_tokens=4), (probe[i][0],)
        out.append((prompt, p, eos))
    return out


def _run(llm: LLM, workload, abort_after: dict[int, int]) -> dict:
    """Drive the core by hand: requests join over time, some are aborted once they have shown
    `abort_after[i]` tokens (a front that aborts on what it has seen, as a stop string does)."""
    core = llm.core
    seen: dict[str, list] = {}
    ends: dict[str, tuple] = {}
    step = 0
    pending = list(enumerate(workload))
    while pending or core.has_unfinished():
        while pending and pending[0][0] <= step * 2:  # two new requests per step
            i, (prompt, params, eos) = pending.pop(0)
            core.add_request(f"r{i}", prompt, params, eos_token_ids=eos)
            seen[f"r{i}"] = []
        for out in core.step():
            seen[out.request_id] += [(t, lp) for t, lp in zip(out.token_ids, out.logprobs or
                                                               [None] * len(out.token_ids))]
            if out.finished:
                ends[out.request_id] = (out.finish_reason, out.stop_reason)
        for i, n in abort_after.items():
            rid = f"r{i}"
            if rid in seen and rid not in ends and len(seen[rid]) >= n:
                core.abort(rid)
        step += 1
        assert step < 2000
    return {rid: (seen[rid], ends[rid]) for rid in seen}


@pytest.fixture(scope="module")
def workload():
    return _workload()


def test_overlapped_and_synchronous_engines_give_identical_outputs(workload):
    aborts = {3: 2, 8: 1, 11: 0}
    results = []
    for overlap in (False, True):
        llm = _llm(overlap)
        results.append(_run(llm, workload, aborts))
        sched = llm.core.scheduler
        assert sched.block_pool.num_free_pages + sched.radix.num_evictable_pages() == sched.block_pool.num_pages
    sync, overlapped = results
    assert sync.keys() == overlapped.keys()
    reasons = {end[0] for _, end in sync.values()}
    assert {"stop", "length", "abort"} <= reasons, reasons  # the workload really exercises each end
    for rid in sync:
        (toks_a, end_a), (toks_b, end_b) = sync[rid], overlapped[rid]
        assert [t for t, _ in toks_a] == [t for t, _ in toks_b], rid
        assert end_a == end_b, rid
        for (_, lp_a), (_, lp_b) in zip(toks_a, toks_b):
            assert (lp_a is None) == (lp_b is None)
            if lp_a is not None:
                assert lp_a["token_id"] == lp_b["token_id"] and lp_a["top_logprobs"].keys() == lp_b["top_logprobs"].keys()
                assert abs(lp_a["logprob"] - lp_b["logprob"]) < 1e-4


def test_preemption_under_overlap_keeps_outputs():
    workload = [(list(range(10 + 7 * i, 40 + 7 * i)), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                 (0,)) for i in range(5)]
    results, preemptions = [], []
    for overlap in (False, True):
        llm = _llm(overlap, num_pages=28, max_num_batched_tokens=64)
        results.append(_run(llm, workload, {}))
        preemptions.append(llm.core.scheduler.num_preemptions)
    assert min(preemptions) > 0, preemptions
    assert {r: [t for t, _ in v[0]] for r, v in results[0].items()} == \
           {r: [t for t, _ in v[0]] for r, v in results[1].items()}


def test_stop_strings_end_the_same_way_through_the_front():
    rng = random.Random(1)
    candidates = [[rng.randrange(3, 1000) for _ in range(6)] for _ in range(8)]
    prompts = [candidates[6], candidates[3]]  # their greedy text is non-empty (" ad ad ...", "时时...")
    outs = []
    for overlap in (False, True):
        llm = _llm(overlap, num_pages=128)
        first = llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(
            temperature=0, max_tokens=8, ignore_eos=True))[0].text
        stop = first[len(first) // 2: len(first) // 2 + 3]
        outs.append([(o.token_ids, o.text, o.finish_reason) for o in llm.generate(
            prompt_token_ids=prompts, sampling_params=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                                     stop=[stop]))])
    assert outs[0] == outs[1]
    assert outs[0][0][2] == "stop"
