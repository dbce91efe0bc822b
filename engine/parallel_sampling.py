"""Parallel sampling (`n` > 1): the choices of one prompt as requests sharing its KV pages.

A request of n choices is one request while its prompt computes. The step that samples its first
token forks choices 1..n-1 (the scheduler's `fork`, or on a decode node the arrival of the prefill
node's notice with n first tokens): each is a `Request` of its own (`choice_id`) holding one more
reference on every page of the prompt, with seed `seed + i` (`SamplingParams.for_choice`) and its
own structured-output matcher. Full prompt pages stay shared for good; the last, partly filled one
is copied by the scheduler's copy on write before a choice writes into it. This module only builds
the choices; pages are counted by `block_pool.py` and scheduled by `scheduler.py`.
"""
from __future__ import annotations

from dataclasses import replace

from engine.block_pool import BlockPool
from engine.request import Request, RequestStatus, choice_id


def fork_choices(pool: BlockPool, parent: Request) -> list[Request]:
    """Choices 1..n-1 of `parent` (n > 1), running from its computed prompt: each holds one more
    reference on every page `parent` holds. `parent` becomes choice 0 (n = 1 from now on) and lists
    the choices in `forks`."""
    params = parent.sampling_params
    pool.incref(parent.page_ids * (params.n - 1))
    for i in range(1, params.n):
        # the prompt's logprobs came with choice 0's prefill; a choice never recomputes them
        child = Request(choice_id(parent.request_id, i), parent.prompt_token_ids,
                        replace(params.for_choice(i), prompt_logprobs=None),
                        arrival_time=parent.arrival_time, eos_token_ids=parent.eos_token_ids,
                        status=RequestStatus.RUNNING, num_computed_tokens=parent.num_prompt_tokens,
                        page_ids=list(parent.page_ids), num_cached_tokens=parent.num_cached_tokens,
                        first_scheduled_time=parent.first_scheduled_time, choice_index=i,
                        group_id=parent.request_id)
        if parent.grammar is not None:  # a matcher of its own, at the grammar's start
            child.grammar = parent.grammar.fork()
        parent.forks.append(child)
    parent.sampling_params = params.for_choice(0)
    return parent.forks
