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

The KV hand-off between nodes is two more request states with their own queues (SGLang's decode
side reads the same way): a decode-role request whose prompt KV a prefill node writes waits in
`remote_kv` (WAITING_FOR_REMOTE_KV, pages allocated, keyed by its transfer id) until the write's
notice arrives, then runs; a prefill-role request with a destination ends in `sending`
(SENDING_KV) holding its pages until its push has ended. A request that ends while a WRITE may
still target or read its pages keeps them until the connector says none is in flight (or, on the
decode side, until its deadline) — pages are never reused under a WRITE.

Parallel sampling (`n` > 1, engine/parallel_sampling.py): the step that samples a prompt's first
token also forks its other choices (fork chunks compute nothing and draw from the same logits row),
which share its pages. A page a request is about to write that others still hold is copied first
(copy on write: `SchedulerOutput.copies`, done on the device before the step's forward, so stream
order makes it read the page after earlier steps wrote it); a page is freed by its last holder.
The page operations themselves (allocate, grow with copy on write, release into the prefix cache)
are `kv_cache_manager.py`'s; what a step hands the runner is `scheduler_output.py`'s.
"""
from __future__ import annotations

from collections import deque

from engine.config import CacheConfig, SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.parallel_sampling import fork_choices
from engine.prompt_logprobs import wants_prompt_logprobs
from engine.request import PENDING_TOKEN, Request, RequestStatus
from engine.scheduler_output import ScheduledChunk, SchedulerOutput

__all__ = ["ScheduledChunk", "Scheduler", "SchedulerOutput", "SchedulerOverloaded"]


class SchedulerOverloaded(RuntimeError):
    """The admission queue is full; the request is refused (nothing of it is kept)."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheConfig, num_pages: int, max_model_len: int):
        self.config = config
        self.page_size = cache.page_size
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_pages, cache.page_size, cache.enable_prefix_cache)
        self.block_pool, self.radix = self.kv.block_pool, self.kv.radix
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_finished = 0
        self.kv_timeout_s = 30.0  # bound on waiting for a remote KV write (set by the engine)
        self.remote_kv: dict[str, Request] = {}  # decode role: transfer id -> request waiting for its KV
        self.sending: dict[str, Request] = {}  # prefill role: request id -> computed request, KV push in flight
        self.new_forks: list[Request] = []  # choices forked since the engine last took them

    # ------------------------------------------------------------- admission
    def pages_for(self, num_tokens: int) -> int:
        return self.kv.pages_for(num_tokens)

    def add_request(self, req: Request) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise SchedulerOverloaded(f"{len(self.waiting)} requests already waiting (max_waiting)")
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def any_running(self, predicate) -> bool:
        return any(predicate(r) for r in self.running)

    def has_kv_in_flight(self) -> bool:
        return bool(self.remote_kv or self.sending)

    # ------------------------------------------------------------- parallel sampling
    def fork(self, parent: Request) -> list[Request]:
        """Choices 1..n-1 of `parent` (engine/parallel_sampling.py), running from its computed prompt."""
        forks = fork_choices(self.block_pool, parent)
        self.new_forks += forks
        return forks

    def take_new_forks(self) -> list[Request]:
        forks, self.new_forks = self.new_forks, []
        return forks

    # ------------------------------------------------------------- prefill role
    def _hold_for_send(self, req: Request, status: RequestStatus) -> None:
        """Prefill role: a computed request whose KV push may be in flight keeps its pages (its
        full pages already shared with the prefix cache) until `finish_sending`."""
        self.kv.cache(req)
        req.kv_final_status = status
        req.status = RequestStatus.SENDING_KV
        self.sending[req.request_id] = req

    def finish_sending(self, request_id: str, error: str | None = None) -> Request | None:
        """The push of a SENDING_KV (or aborted mid-push) request ended: free its pages. Returns the
        request, with its final status set, unless it had already ended (aborted)."""
        req = self.sending.pop(request_id, None)
        if req is None:
            return None
        self.kv.free(req)
        if req.is_finished:  # aborted while its WRITEs were in flight: its end was reported then
            return None
        req.status = RequestStatus.FINISHED_ERROR if error else req.kv_final_status
        req.error = error
        self.num_finished += 1
        return req

    # ------------------------------------------------------------- decode role
    def add_remote(self, req: Request, transfer_id: str, deadline: float) -> bool:
        """Admit a request whose prompt KV another node writes: pages for the prompt now; it runs
        once `remote_kv_arrived` names `transfer_id`. False (nothing kept) if the pages are not free."""
        if transfer_id in self.remote_kv:
            raise ValueError(f"transfer id {transfer_id!r} is already in use")
        pages = self.kv.allocate(self.pages_for(req.num_prompt_tokens))
        if pages is None:
            return False
        req.page_ids = pages
        req.kv_transfer_id, req.kv_deadline = transfer_id, deadline
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.remote_kv[transfer_id] = req
        return True

    def remote_kv_arrived(self, transfer_id: str, first_token: int | list[int] | None) -> list[Request]:
        """The sender's notice for `transfer_id`: the KV is in the pages and `first_token` was
        sampled (None: the sender abandoned it; a list: each choice's first token of an n > 1
        request, whose choices fork here). Returns the requests (choices) the notice ended."""
        req = self.remote_kv.pop(transfer_id, None)
        if req is None:
            return []
        tokens = [first_token] if isinstance(first_token, int) else first_token
        if tokens is not None and len(tokens) != getattr(req.sampling_params, "n", 1):
            tokens = None  # not one first token per choice: treated as abandoned
        if req.is_finished or tokens is None:  # ended while waiting, or abandoned: no WRITE in flight now
            self.kv.free(req)
            if req.is_finished:
                return []
            req.status, req.error = RequestStatus.FINISHED_ERROR, "the prefill node abandoned the KV transfer"
            self.num_finished += 1
            return [req]
        req.num_computed_tokens = req.num_prompt_tokens
        choices = [req] + (self.fork(req) if len(tokens) > 1 else [])
        return [r for r, t in zip(choices, tokens) if self._start_remote(r, t) is not None]

    def _start_remote(self, req: Request, first_token: int) -> Request | None:
        """A choice whose prompt KV is in place: record its first token and run it (or end it)."""
        req.output_token_ids.append(first_token)
        status = self._check_stop(req, first_token)
        if status is not None:
            req.status = status
            self.kv.release(req)
            self.num_finished += 1
            return req
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return None

    def expire_remote(self, now: float) -> list[Request]:
        """Requests whose KV did not arrive by their deadline end with an error; their pages stay
        held one more timeout (a late WRITE may still land), as do those of requests that ended
        while waiting. Returns the requests that ended now."""
        ended = []
        for tid, req in list(self.remote_kv.items()):
            if now <= req.kv_deadline:
                continue
            if req.is_finished:  # drained: no WRITE can still be coming
                del self.remote_kv[tid]
                self.kv.free(req)
                continue
            req.status = RequestStatus.FINISHED_ERROR
            req.error = f"KV for request {req.request_id!r} did not arrive in time"
            req.kv_deadline = now + self.kv_timeout_s
            self.num_finished += 1
            ended.append(req)
        return ended

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.release(req)
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
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this loop (O(1): its status says)
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0 or (req.output_token_ids and self._ends_by_count(req)):
                continue
            while not (grown := self.kv.grow(req, req.num_computed_tokens + num_new)):
                victim = self._victim(req)
                if victim is None:  # only requests about to end hold the pages: try next step
                    break
                if victim is req and len(self.running) == 1:
                    self._fail_too_large(req)
                    break
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING or not grown:
                continue
            out.chunks.append(self._chunk(req, num_new))
            budget -= num_new
        if not out.preempted:
            self._admit(out, budget)
        for chunk in list(out.chunks):  # n > 1: the prompt's first draw is also every other choice's
            if chunk.sample and chunk.request.needs_fork and not chunk.request.output_token_ids:
                for child in self.fork(chunk.request):
                    self.running.append(child)
                    out.chunks.append(ScheduledChunk(child, child.num_computed_tokens, 0, True, fork_of=chunk.request))
        out.copies = self.kv.take_copies()
        if any(c.num_new_tokens != 1 for c in out.chunks):
            out.chunks.sort(key=lambda c: c.num_new_tokens != 1)  # decodes (query length 1) first
        return out

    def _victim(self, req: Request) -> Request | None:
        """The most recently admitted request that may be preempted to make room for `req`: not one
        whose launched step ends it anyway, nor one whose pages a KV push may be reading."""
        for victim in reversed(self.running):
            ending = victim.output_token_ids and self._ends_by_count(victim)
            if victim is req or not (ending or victim.kv_push_started):
                return victim
        return None

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if not req.page_ids and self.radix is not None and not wants_prompt_logprobs(req):
                self.kv.match_prefix(req)
            num_new = req.num_tokens - req.num_computed_tokens
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv.grow(req, req.num_computed_tokens + num_new):
                self.kv.release(req)  # give back the matched prefix; try again next step
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
        self.kv.release(req)
        req.status = RequestStatus.FINISHED_ERROR
        req.error = (f"request {req.request_id!r} needs {self.pages_for(req.num_tokens)} KV pages of "
                     f"{self.page_size} tokens but the pool has {self.block_pool.num_pages}")
        self.num_finished += 1

    # ------------------------------------------------------------- update
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Record a step's computed and sampled tokens; returns the requests that finished (or,
        with a KV destination, finished computing: SENDING_KV)."""
        self.advance(out)
        return self.resolve(out, sampled)

    def advance(self, out: SchedulerOutput) -> None:
        """A step was launched: its tokens count as computed and each sampling chunk's token as a
        PENDING output, so the next step can be scheduled before the host knows the token."""
        for chunk in out.chunks:
            req = chunk.request
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted (or preempted) while the step ran
            req.num_computed_tokens += chunk.num_new_tokens
            if chunk.sample:
                chunk.output_index = len(req.output_token_ids)
                req.output_token_ids.append(PENDING_TOKEN)

    def resolve(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """The launched step's tokens are known: fill them in and check stops. A request that stopped
        drops the PENDING tokens of steps launched after this one (their work is discarded)."""
        finished = []
        for chunk in out.chunks:
            req = chunk.request
            if chunk.output_index < 0 or req.is_finished or req.status is RequestStatus.SENDING_KV:
                continue
            token = sampled[req.request_id]
            req.output_token_ids[chunk.output_index] = token
            status = self._check_stop(req, token, num_output=chunk.output_index + 1)
            if status is None:
                continue
            del req.output_token_ids[chunk.output_index + 1:]
            req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)
            finished.append(req)
            if req in self.waiting:  # preempted after this step was launched: it holds no pages
                self.waiting.remove(req)
            else:
                self.running.remove(req)
                if req.kv_dest is not None:  # prefill role: computed, not finished until its KV is sent
                    self._hold_for_send(req, status)
                    continue
            req.status = status
            self.kv.release(req)
            self.num_finished += 1
        return finished

    def _check_stop(self, req: Request, token: int, num_output: int | None = None) -> RequestStatus | None:
        """Stop status after `token`, the `num_output`-th output token (default: the last one)."""
        params = req.sampling_params
        n_out = req.num_output_tokens if num_output is None else num_output
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and n_out >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_prompt_tokens + n_out >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _ends_by_count(self, req: Request) -> bool:
        """Its last (maybe still PENDING) token ends it whatever its value: max_tokens or the
        context limit. Such a request is not scheduled again while that token is in flight."""
        max_tokens = req.sampling_params.max_tokens
        return ((max_tokens is not None and req.num_output_tokens >= max_tokens)
                or req.num_tokens >= self.max_model_len)

    # ------------------------------------------------------------- abort
    def abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED,
              error: str | None = None, now: float = 0.0) -> Request | None:
        """End a request wherever it is and free its pages. Idempotent."""
        for queue in (self.running, self.waiting):
            for req in queue:
                if req.request_id == request_id:
                    queue.remove(req)
                    if req.kv_push_started:  # a WRITE may read its pages: hold them until it ends
                        self.sending[request_id] = req
                    else:
                        self.kv.release(req)
                    req.status, req.error = status, error
                    self.num_finished += 1
                    return req
        req = self.sending.get(request_id)
        if req is None:
            req = next((r for r in self.remote_kv.values() if r.request_id == request_id), None)
            if req is not None and not req.is_finished:
                # its pages stay held until the sender's notice or a full timeout (a WRITE may be landing)
                req.kv_deadline = max(req.kv_deadline, now + self.kv_timeout_s)
        if req is None or req.is_finished:
            return None
        req.status, req.error = status, error
        self.num_finished += 1
        return req

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
            "num_held_pages": sum(len(r.page_ids) for r in self.sending.values()),
            "num_reserved_pages": sum(len(r.page_ids) for r in self.remote_kv.values()),
            "num_reserved": sum(not r.is_finished for r in self.remote_kv.values()),
        }
