"""Continuous batching with chunked prefill, prefix reuse and preemption by recompute.

Each step gets a token budget (`max_num_batched_tokens`). Running requests are served first, in
arrival order: a decode costs one token, an unfinished prefill takes what is left of the budget
(chunked). Waiting requests are admitted next, each starting from its longest cached prefix.
When pages run out the scheduler evicts unreferenced prefix-cache pages, then preempts the most
recently admitted running request (its pages are released, its computed full pages stay in the
prefix cache, and it recomputes later from the front of the waiting queue).

It decides *what* to compute; the model runner computes it. Stop conditions that need only
token ids (EOS, stop token ids, max_tokens, the context limit) are checked here in `update`;
stop strings need text and belong to the front.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_pool import BlockPool, NoFreePages
from engine.config import CacheConfig, SchedulerConfig
from engine.radix_cache import RadixCache
from engine.request import Request, RequestStatus


class SchedulerOverloaded(RuntimeError):
    """The admission queue is full; the request is refused (nothing of it is kept)."""


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first position computed this step (== request.num_computed_tokens)
    num_new_tokens: int
    sample: bool  # the chunk reaches the request's last token: sample its next one


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # query length 1 first
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheConfig, num_pages: int, max_model_len: int):
        self.config = config
        self.page_size = cache.page_size
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(num_pages)
        self.radix = RadixCache(self.block_pool, self.page_size) if cache.enable_prefix_cache else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_finished = 0
        self.held: dict[str, list[int]] = {}  # finished prefill-role requests' pages, until sent
        self.reserved: dict[str, list[int]] = {}  # decode role: pages reserved for incoming KV

    # ------------------------------------------------------------- admission
    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def add_request(self, req: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise SchedulerOverloaded(f"{len(self.waiting)} requests already waiting (max_waiting)")
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------- pages
    def _allocate(self, n: int) -> list[int] | None:
        if n <= 0:
            return []
        short = n - self.block_pool.num_free_pages
        if short > 0 and self.radix is not None:
            self.radix.evict(short)
        try:
            return self.block_pool.allocate(n)
        except NoFreePages:
            return None

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make `req.page_ids` cover `num_tokens` tokens."""
        pages = self._allocate(self.pages_for(num_tokens) - len(req.page_ids))
        if pages is None:
            return False
        req.page_ids.extend(pages)
        return True

    def _release(self, req: Request) -> None:
        """Give back a request's pages; its computed full pages go to the prefix cache first."""
        if not req.page_ids:
            return
        if self.radix is not None:
            self.radix.insert(req.all_token_ids, req.page_ids, req.num_computed_tokens)
        if req.kv_hold and req.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self.held[req.request_id] = req.page_ids  # released by release_held once sent
        else:
            self.block_pool.decref(req.page_ids)
        req.page_ids = []

    def release_held(self, request_id: str) -> None:
        pages = self.held.pop(request_id, None)
        if pages:
            self.block_pool.decref(pages)

    # ------------------------------------------------------------- decode role
    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Pages for `num_tokens` tokens of KV that another node will write; None if none free."""
        if request_id in self.reserved:
            raise ValueError(f"request {request_id!r} already has a reservation")
        pages = self._allocate(self.pages_for(num_tokens))
        if pages is not None:
            self.reserved[request_id] = pages
        return pages

    def cancel_reservation(self, request_id: str) -> bool:
        pages = self.reserved.pop(request_id, None)
        if pages is None:
            return False
        self.block_pool.decref(pages)
        return True

    def start_prefilled(self, req: Request) -> None:
        """Run a request whose prompt KV arrived in its reserved pages (first token already sampled)."""
        pages = self.reserved.pop(req.request_id)
        req.page_ids = pages
        req.num_computed_tokens = req.num_prompt_tokens
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for req in list(self.running):
            if budget <= 0:
                break
            if req not in self.running:  # preempted earlier in this loop
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            while not self._grow(req, req.num_computed_tokens + num_new):
                victim = self.running[-1]
                if victim is req and len(self.running) == 1:
                    self._fail_too_large(req)
                    break
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req not in self.running:
                continue
            out.chunks.append(self._chunk(req, num_new))
            budget -= num_new
        if not out.preempted:
            self._admit(out, budget)
        out.chunks.sort(key=lambda c: c.num_new_tokens != 1)  # decodes (query length 1) first
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not req.page_ids and self.radix is not None:
                # Reuse a cached prefix, but always compute at least the last token (its logits).
                req.page_ids = self.radix.match(req.all_token_ids, max_tokens=req.num_tokens - 1)
                req.num_computed_tokens = len(req.page_ids) * self.page_size
                req.num_cached_tokens = req.num_computed_tokens
            num_new = req.num_tokens - req.num_computed_tokens
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self._grow(req, req.num_computed_tokens + num_new):
                self._release(req)  # give back the matched prefix; try again next step
                req.num_computed_tokens = 0
                if not self.running:
                    self.waiting.popleft()
                    self._fail_too_large(req)
                    continue
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(self._chunk(req, num_new))
            budget -= num_new

    def _chunk(self, req: Request, num_new: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        return ScheduledChunk(req, start, num_new, sample=start + num_new == req.num_tokens)

    def _fail_too_large(self, req: Request) -> None:
        """A request that cannot fit even with the whole pool to itself ends with an error."""
        if req in self.running:
            self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.FINISHED_ERROR
        req.error = (f"request {req.request_id!r} needs {self.pages_for(req.num_tokens)} KV pages of "
                     f"{self.page_size} tokens but the pool has {self.block_pool.num_pages}")
        self.num_finished += 1

    # ------------------------------------------------------------- update
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Record computed tokens and sampled ones; returns the requests that finished."""
        finished = []
        for chunk in out.chunks:
            req = chunk.request
            if req.is_finished or req not in self.running:
                continue  # aborted while the step ran
            req.num_computed_tokens += chunk.num_new_tokens
            token = sampled.get(req.request_id) if chunk.sample else None
            if token is None:
                continue
            req.output_token_ids.append(token)
            status = self._check_stop(req, token)
            if status is not None:
                req.status = status
                self.running.remove(req)
                self._release(req)
                self.num_finished += 1
                finished.append(req)
        return finished

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        n_out = req.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and n_out >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ------------------------------------------------------------- abort
    def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED,
              error: str | None = None) -> Request | None:
        """End a request wherever it is and free its pages. Idempotent."""
        for queue in (self.running, self.waiting):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    self._release(req)
                    req.status, req.error = status, error
                    self.num_finished += 1
                    return req
        return None

    # ------------------------------------------------------------- stats
    def stats(self) -> dict:
        pool = self.block_pool
        evictable = self.radix.num_evictable_pages() if self.radix is not None else 0
        used = pool.num_used_pages - evictable
        return {
            "num_running": len(self.running), "num_waiting": len(self.waiting),
            "num_preemptions": self.num_preemptions, "num_finished": self.num_finished,
            "num_free_pages": pool.num_free_pages, "num_cached_pages": evictable,
            "kv_cache_usage": used / pool.num_pages,
            "prefix_cache_queries_tokens": self.radix.num_queries_tokens if self.radix else 0,
            "prefix_cache_hits_tokens": self.radix.num_hit_tokens if self.radix else 0,
            "num_held_pages": sum(len(p) for p in self.held.values()),
            "num_reserved_pages": sum(len(p) for p in self.reserved.values()),
            "num_reserved": len(self.reserved),
        }
