"""What a simulated run serves: requests (prompt token ids, output length, arrival time). The
simulator takes request lists; `pdserve plan` builds them with the benchmark's own generators
(`planner/datasets.py`, which `pdserve bench` re-exports), so a simulated run and a measured one
serve the very same requests. Arrival times follow `pdserve bench`'s rule (gamma gaps, shape =
burstiness; 1 = Poisson; tests/planner checks the two agree).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class SimRequest:
    request_id: str
    prompt_ids: list[int]
    output_len: int
    arrival: float = 0.0
    # filled by the simulator
    first_token_time: float | None = None
    finish_time: float | None = None
    tokens_out: int = 0
    status: str = "pending"  # pending | finished | failed
    error: str = ""
    kv_done: float = 0.0  # disaggregated: when the last KV byte landed on the decode node
    kv_exposed: float = 0.0  # how much of the KV push ran past the end of the prefill (delays the decode)
    reservation: tuple | None = field(default=None, repr=False)  # (decode node, rank) holding its KV pages

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def ttft(self) -> float:
        return self.first_token_time - self.arrival

    @property
    def tpot(self) -> float:
        if self.tokens_out <= 1:
            return 0.0
        return (self.finish_time - self.first_token_time) / (self.tokens_out - 1)


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Start times of `n` requests: cumulative gamma(shape=burstiness, mean=1/rate) gaps, the
    first request at 0 (`pdserve bench` sends it at once and sleeps after each). rate=inf: all at 0."""
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def from_samples(samples, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[SimRequest]:
    """SimRequests from anything with `prompt_ids` and `output_len` (bench's SampleRequest)."""
    times = arrival_times(len(samples), rate, burstiness, seed)
    return [SimRequest(f"r{i}", s.prompt_ids, s.output_len, t) for i, (s, t) in enumerate(zip(samples, times))]


def fixed(n: int, prompt_len: int, output_len: int, rate: float, seed: int = 0,
          unique: bool = True) -> list[SimRequest]:
    """`n` requests of one shape (distinct token ids per request unless `unique` is False)."""
    times = arrival_times(n, rate, 1.0, seed)
    return [SimRequest(f"r{i}", [(i * 7919 + k) % 30000 + 100 if unique else 100 for k in range(prompt_len)],
                       output_len, t) for i, t in enumerate(times)]
