"""Simulated serving nodes: each GPU rank runs the engine's own `Scheduler` (continuous batching,
chunked-prefill token budget, KV page pool, prefix cache, preemption by recompute) over a page
pool sized from the profile; a node is one rank or an EP group of ranks stepping in lock-step
(attention data-parallel, MoE expert-parallel with an all-to-all per MoE layer). Step durations
come from the profile; nodes that share one GPU (`Device`) take turns.

Roles as in the product: a prefill node computes prompts (its requests end after their first
token, pages held until their KV is pushed); a decode node holds reservations for incoming KV and
decodes; a collocated node (router `--collocated`, decode nodes that prefill too) does both.
"""
from __future__ import annotations

from collections import deque

from engine.config import CacheConfig, SchedulerConfig
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from router.policy import PrefixIndex


class Device:
    """One GPU that one or more nodes' ranks run on: their steps never overlap."""

    def __init__(self, name: str):
        self.name = name
        self.holder = None
        self.waiting: deque = deque()

    def acquire(self, node) -> bool:
        if self.holder is None or self.holder is node:
            self.holder = node
            return True
        if node not in self.waiting:
            self.waiting.append(node)
        return False

    def release(self, node) -> list:
        """Free the GPU; returns the nodes to wake (they retry to step)."""
        if self.holder is node:
            self.holder = None
        woken = list(self.waiting)
        self.waiting.clear()
        return woken


class Rank:
    """One engine (one GPU of a node): the real scheduler plus the simulated requests on it."""

    def __init__(self, num_pages: int, scheduler: SchedulerConfig, cache: CacheConfig, max_model_len: int):
        self.scheduler = Scheduler(scheduler, cache, num_pages, max_model_len)
        self.sim: dict[str, object] = {}  # request id -> SimRequest
        self.engine: dict[str, Request] = {}  # request id -> the scheduler's Request
        self.out: SchedulerOutput | None = None
        self.failed: list[Request] = []  # ended by the scheduler while scheduling (too large for the pool)

    @property
    def load(self) -> int:
        s = self.scheduler
        return len(s.running) + len(s.waiting) + len(s.remote_kv)

    def _request(self, sim, max_tokens: int) -> Request:
        req = Request(sim.request_id, sim.prompt_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                      arrival_time=sim.arrival)
        self.sim[sim.request_id], self.engine[sim.request_id] = sim, req
        return req

    def add(self, sim, max_tokens: int, kv_dest: dict | None = None) -> None:
        """A request this rank computes; with `kv_dest` (prefill role) it ends computed in SENDING_KV."""
        req = self._request(sim, max_tokens)
        req.kv_dest = kv_dest
        try:
            self.scheduler.add_request(req)
        except Exception:
            self.forget(sim.request_id)
            raise

    def reserve(self, sim) -> bool:
        """Decode role: pages for the prompt KV a prefill node will write (False: none free)."""
        if self.scheduler.add_remote(self._request(sim, sim.output_len), sim.request_id, float("inf")):
            return True
        self.forget(sim.request_id)
        return False

    def schedule(self) -> SchedulerOutput:
        s = self.scheduler
        before = s.num_finished
        self.out = s.schedule() if s.has_unfinished() else SchedulerOutput()
        if s.num_finished != before:
            self.failed = [r for r in self.engine.values() if r.status is RequestStatus.FINISHED_ERROR]
        return self.out

    def forget(self, rid: str):
        self.engine.pop(rid, None)
        return self.sim.pop(rid, None)


class Node:
    """A prefill, decode or collocated node of `len(ranks)` GPUs (one EP group)."""

    def __init__(self, name: str, role: str, ranks: list[Rank], devices: list[Device], channel=None):
        self.name, self.role, self.ranks, self.devices = name, role, ranks, devices
        self.channel = channel  # egress for KV (prefill nodes)
        # What the router's policies read (router/policy.py):
        self.in_flight = 0
        self.served = 0
        self.prefixes = PrefixIndex()
        self.stepping = False
        self.step_started = 0.0
        self.gpu_partner = None  # the other role's node on this GPU, when they step at once (simulator)
        self.busy_seconds = 0.0
        self.num_steps = 0
        self.step_seconds = 0.0  # every step's time, the drain's included
        self.sampled_tokens = 0  # tokens its steps sampled (a decode node's: its running batches summed)

    @property
    def ep_size(self) -> int:
        return len(self.ranks)

    @property
    def load(self) -> int:
        return self.in_flight + sum(len(r.scheduler.running) for r in self.ranks)

    def has_work(self) -> bool:
        return any(r.scheduler.has_unfinished() for r in self.ranks)

    def least_loaded_rank(self) -> Rank:
        return min(self.ranks, key=lambda r: r.load)

    def rank_for_reservation(self) -> Rank:
        """The rank with the most free pages (where a prompt's incoming KV is likeliest to fit)."""
        return max(self.ranks, key=lambda r: r.scheduler.block_pool.num_free_pages)

    def plan_step(self, profile, a2a_link) -> float | None:
        """Schedule one step on every rank; its duration, or None when no rank has work."""
        tokens, times = [], []
        any_work = False
        for r in self.ranks:
            chunks = r.schedule().chunks
            any_work = any_work or bool(chunks)
            prefill, nd, ctx = [], 0, 0
            for c in chunks:
                if c.num_new_tokens == 1 and c.start > 0:
                    nd += 1
                    ctx += c.start + 1
                else:
                    prefill.append((c.num_new_tokens, c.start))
            tokens.append(sum(c.num_new_tokens for c in chunks))
            times.append(profile.step_time(prefill, nd, ctx, self.ep_size) if chunks else 0.0)
        if not any_work:
            return None
        return max(times) + profile.all_to_all_time(max(tokens), self.ep_size, a2a_link)
