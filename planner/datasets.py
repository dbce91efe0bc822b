"""Benchmark request sets built without downloads, from a fixed seed — the one generator behind
both `pdserve bench` (bench/serving re-exports it) and `pdserve plan` (the product may not import
bench), so a measured run and a simulated one serve the same requests. Prompts are token-id lists
(the OpenAI completions API and our gRPC API accept them), so lengths are exact.

* random: input/output lengths uniform in [len·(1−r), len·(1+r)] (`--random-range-ratio r`);
* sharegpt-like: log-normal input/output lengths shaped like ShareGPT conversations
  (median ≈ 220 in / 180 out, long tails), clipped to [4, max];
* shared-prefix: a few long "system prompts", each followed by many short questions;
* multi-turn: conversations whose every turn resends the whole history plus a new question.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class SampleRequest:
    prompt_ids: list[int]
    output_len: int
    conversation: int = -1  # multi-turn: which conversation; turns of one run in order

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float, vocab: int, seed: int = 0):
    rng = random.Random(seed)

    def length(mean: int) -> int:
        lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
        return rng.randint(lo, hi)
    return [SampleRequest(_ids(rng, length(input_len), vocab), length(output_len)) for _ in range(n)]


def sharegpt_like(n: int, vocab: int, max_input: int = 4096, max_output: int = 1024, seed: int = 0):
    rng = random.Random(seed)

    def lognormal(median: float, sigma: float, hi: int) -> int:
        return int(min(hi, max(4, math.exp(rng.gauss(math.log(median), sigma)))))
    return [SampleRequest(_ids(rng, lognormal(220, 1.0, max_input), vocab), lognormal(180, 0.9, max_output))
            for _ in range(n)]


def shared_prefix(n: int, vocab: int, num_prefixes: int = 4, prefix_len: int = 1024, question_len: int = 64,
                  output_len: int = 128, seed: int = 0):
    rng = random.Random(seed)
    prefixes = [_ids(rng, prefix_len, vocab) for _ in range(num_prefixes)]
    return [SampleRequest(prefixes[i % num_prefixes] + _ids(rng, question_len, vocab), output_len)
            for i in range(n)]


def multi_turn(n: int, vocab: int, turns: int = 4, turn_len: int = 64, output_len: int = 64, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for conv in range(max(1, n // turns)):
        history: list[int] = []
        for _ in range(turns):
            history = history + _ids(rng, turn_len, vocab)
            out.append(SampleRequest(list(history), output_len, conversation=conv))
            history = history + _ids(rng, output_len, vocab)  # stands in for the model's answer
    return out[:n]


def build(name: str, n: int, vocab: int, args) -> list[SampleRequest]:
    if name == "random":
        return random_requests(n, args.random_input_len, args.random_output_len, args.random_range_ratio, vocab,
                               args.seed)
    if name == "sharegpt":
        return sharegpt_like(n, vocab, seed=args.seed)
    if name == "prefix":
        return shared_prefix(n, vocab, seed=args.seed)
    if name == "multiturn":
        return multi_turn(n, vocab, seed=args.seed)
    raise ValueError(f"unknown dataset {name!r}; expected random, sharegpt, prefix or multiturn")
