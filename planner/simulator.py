"""The discrete-event simulation of one cluster serving one request list.

Events: a request arrives; a node's step ends; a request's KV lands on its decode node. The
router part follows `router/core.py` with its real policies (`router.policy.pick_node`): a
disaggregated request reserves KV pages on the least-loaded decode node (none free: it fails as
overloaded, as the product answers), goes to a prefill node picked by the policy, its KV is
pushed layer by layer during each prefill step over the prefill node's egress channel, and the
first token reaches the client when the prefill step that sampled it ends (the product's prefill
node streams it before the push has ended; `first_token="kv_landed"` models the product before
2026-12-07, which answered with it after the transfer); the decode node decodes the rest once the
last byte has landed, so an exposed push shows in the second token's latency. Collocated nodes run whole
requests. Time is simulated; nothing sleeps.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import numpy as np

from engine.config import CacheConfig, SchedulerConfig
from engine.scheduler import SchedulerOverloaded
from planner.link import LINKS, Channel, Link
from planner.nodes import Device, Node, Rank
from planner.profile import Profile
from planner.workload import SimRequest
from router.policy import PREFIX_BLOCK, pick_node


@dataclass
class ClusterSpec:
    """A cluster shape: `num_prefill` prefill nodes of `prefill_ep` GPUs and `num_decode` decode
    nodes of `decode_ep` GPUs (num_prefill = 0: collocated decode nodes that run whole requests)."""

    num_prefill: int = 1
    num_decode: int = 1
    prefill_ep: int = 1
    decode_ep: int = 1
    chunk_budget: int = 8192  # max_num_batched_tokens of every node
    max_num_seqs: int = 256
    max_model_len: int = 1 << 20
    policy: str = "least_load"  # the router's prefill policy (decode nodes: least_load)
    # None: on when some prompts share a 16-token-aligned prefix. Off changes nothing for prompts
    # that share none, and spares the radix cache's eviction scans (the simulation's hot spot).
    enable_prefix_cache: bool | None = None
    kv_link: str | Link = "rdma"  # prefill → decode KV path
    ep_link: str | Link = "nvlink"  # inside an EP group
    share_gpu: bool = False  # every prefill/decode node pair on one GPU (one-GPU product runs)
    # How a shared GPU is split: "turns" (whole steps, one role at a time), "interference" (both roles
    # step at once, each step stretched by the profile's measured slowdown while the other role works),
    # "auto": interference when the profile measured it.
    shared_gpu_model: str = "auto"
    kv_capacity_tokens: int | None = None  # per GPU; default: the profile's (adjusted for EP)
    gpu_memory_utilization: float | None = None  # size the KV pool as at this memory share instead
    use_measured_kv: bool = False  # the profile's measured KV transfer table instead of kv_link
    # Seconds from a client's send to the nodes (router, RPC hops); None: the profile's measured
    # serving overhead for this mode (0 if it has none).
    request_overhead_s: float | None = None
    # When a disaggregated request's first token reaches the client: "sampled" (when P's step that
    # sampled it ends: the product streams it ahead of the push) or "kv_landed" (after the push; the
    # product before 2026-12-07, for re-predicting runs recorded with it).
    first_token: str = "sampled"

    def __post_init__(self):
        if self.first_token not in ("sampled", "kv_landed"):
            raise ValueError(f"first_token must be 'sampled' or 'kv_landed', not {self.first_token!r}")

    @property
    def collocated(self) -> bool:
        return self.num_prefill == 0

    @property
    def serving_mode(self) -> str:
        """The profile's key for this shape's serving-path overhead."""
        return "collocated" if self.collocated else "disaggregated"

    @property
    def num_gpus(self) -> int:
        n = self.num_prefill * self.prefill_ep + self.num_decode * self.decode_ep
        return n // 2 if self.share_gpu else n

    def describe(self) -> str:
        if self.collocated:
            return f"{self.num_decode}×colloc(ep{self.decode_ep}) chunk {self.chunk_budget}"
        return (f"{self.num_prefill}P(ep{self.prefill_ep}) + {self.num_decode}D(ep{self.decode_ep}) "
                f"chunk {self.chunk_budget}")


def _link(x) -> Link:
    return LINKS[x] if isinstance(x, str) else x


@dataclass
class SimResult:
    spec: ClusterSpec
    requests: list[SimRequest]
    end_time: float
    busy: dict = field(default_factory=dict)  # role -> mean busy share of its nodes while requests arrive
    max_pages_used: dict = field(default_factory=dict)  # node name -> peak pages in use on a rank
    num_preemptions: int = 0
    # role -> {"steps", "tokens_per_step" (sampled; a decode role's mean batch), "ms_per_step"}, over the run
    steps: dict = field(default_factory=dict)

    def summary(self, slos: dict | None = None) -> dict:
        """`pdserve bench`'s fields: throughput, TTFT/TPOT percentiles (ms), goodput (req/s meeting
        every SLO in `slos`, seconds). Duration: first arrival to last finish."""
        ok = [r for r in self.requests if r.status == "finished"]
        t0 = min((r.arrival for r in self.requests), default=0.0)
        dur = max(self.end_time - t0, 1e-9)
        out = {"duration": dur, "completed": len(ok), "failed": len(self.requests) - len(ok),
               "request_throughput": len(ok) / dur, "output_throughput": sum(r.tokens_out for r in ok) / dur,
               "num_preemptions": self.num_preemptions, "busy": dict(self.busy), "steps": dict(self.steps),
               "mean_kv_exposed_ms": float(np.mean([r.kv_exposed for r in ok] or [0.0])) * 1e3,
               "errors": sorted({r.error for r in self.requests if r.error})[:5]}
        for name, vals in (("ttft", [r.ttft for r in ok]), ("tpot", [r.tpot for r in ok if r.tokens_out > 1])):
            a = np.asarray(vals or [0.0]) * 1e3
            out[f"mean_{name}_ms"] = float(a.mean())
            out[f"median_{name}_ms"] = float(np.median(a))
            out[f"p90_{name}_ms"] = float(np.percentile(a, 90))
            out[f"p99_{name}_ms"] = float(np.percentile(a, 99))
        if slos:
            ttft, tpot = slos.get("ttft", float("inf")), slos.get("tpot", float("inf"))
            good = [r for r in ok if r.ttft <= ttft and r.tpot <= tpot]
            out["goodput"] = len(good) / dur
            out["slo_attainment"] = len(good) / max(len(self.requests), 1)
        return out


class Simulator:
    def __init__(self, profile: Profile, spec: ClusterSpec):
        self.profile, self.spec = profile, spec
        self.kv_link, self.ep_link = _link(spec.kv_link), _link(spec.ep_link)
        self._heap: list = []
        self._seq = itertools.count()
        self._rr = {"prefill": itertools.count(), "decode": itertools.count()}
        self.now = 0.0
        self.prefill_nodes: list[Node] = []
        self.decode_nodes: list[Node] = []
        self.peak_pages: dict[str, int] = {}
        self.num_preemptions = 0

    def _nodes(self, role: str, count: int, ep: int) -> list[Node]:
        sp = self.spec
        tokens = sp.kv_capacity_tokens or (self.profile.kv_capacity_at(sp.gpu_memory_utilization, ep)
                                           if sp.gpu_memory_utilization else self.profile.kv_capacity(ep))
        pages = tokens // self.profile.page_size
        sched = SchedulerConfig(max_num_seqs=sp.max_num_seqs, max_num_batched_tokens=sp.chunk_budget)
        cache = CacheConfig(page_size=self.profile.page_size, num_pages=max(pages, 1),
                            enable_prefix_cache=sp.enable_prefix_cache)
        measured = self.profile.kv_transfer_time if sp.use_measured_kv and self.profile.kv_transfer else None
        nodes = []
        for i in range(count):
            name = f"{role}{i}"
            ranks = [Rank(max(pages, 1), sched, cache, sp.max_model_len) for _ in range(ep)]
            devices = [Device(f"{name}/gpu{k}") for k in range(ep)]
            channel = Channel(self.kv_link, measured) if role == "prefill" else None
            nodes.append(Node(name, role, ranks, devices, channel))
        return nodes

    # ------------------------------------------------------------- events
    def _at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, args))

    def run(self, requests: list[SimRequest]) -> SimResult:
        if self.spec.enable_prefix_cache is None:
            self.spec.enable_prefix_cache = shares_prefixes(requests)
        self.prefill_nodes = self._nodes("prefill", self.spec.num_prefill, self.spec.prefill_ep)
        self.decode_nodes = self._nodes("collocated" if self.spec.collocated else "decode", self.spec.num_decode,
                                        self.spec.decode_ep)
        if self.spec.share_gpu:
            model = self.spec.shared_gpu_model
            if model == "auto":
                model = "interference" if self.profile.interference else "turns"
            if model not in ("turns", "interference"):
                raise ValueError(f"shared_gpu_model {self.spec.shared_gpu_model!r}: turns, interference or auto")
            for p, d in zip(self.prefill_nodes, self.decode_nodes):
                if model == "turns":
                    d.devices = p.devices
                else:
                    p.gpu_partner, d.gpu_partner = d, p
        def over(r: SimRequest) -> float:  # the serving path before a request reaches its node
            if self.spec.request_overhead_s is not None:
                return self.spec.request_overhead_s
            return self.profile.request_overhead(self.spec.serving_mode, r.prompt_len)

        reach = [r.arrival + over(r) for r in requests]
        for r, t in zip(requests, reach):
            self._at(t, self._arrive, r)
        first = min(reach, default=0.0)
        self.last_arrival = max(reach, default=0.0)
        self.load_window = self.last_arrival - first
        while self._heap:
            self.now, _, fn, args = heapq.heappop(self._heap)
            fn(*args)
        stuck = [r.request_id for r in requests if r.status == "pending"]
        if stuck:
            raise AssertionError(f"{len(stuck)} requests never ended (first: {stuck[:3]})")
        nodes = self.prefill_nodes + self.decode_nodes
        end = max((r.finish_time or r.arrival for r in requests), default=0.0)
        busy, steps = {}, {}
        for role in {n.role for n in nodes}:
            same = [n for n in nodes if n.role == role]
            busy[role] = min(1.0, sum(n.busy_seconds for n in same) / len(same) / max(self.load_window, 1e-9))
            num = sum(n.num_steps for n in same)
            steps[role] = {"steps": num, "tokens_per_step": sum(n.sampled_tokens for n in same) / max(num, 1),
                           "ms_per_step": sum(n.step_seconds for n in same) / max(num, 1) * 1e3}
        return SimResult(self.spec, requests, end, busy, dict(self.peak_pages), self.num_preemptions, steps)

    def _end(self, r: SimRequest, status: str, error: str = "") -> None:
        """Every request ends here exactly once (finished or failed)."""
        if r.status != "pending":
            raise AssertionError(f"request {r.request_id} ended twice ({r.status}, then {status})")
        r.status, r.error, r.finish_time = status, error, self.now

    def _fail(self, r: SimRequest, why: str) -> None:
        if r.reservation:  # a disaggregated request's KV pages on its decode node: the sender abandons them
            decode, rank = r.reservation
            r.reservation = None
            rank.scheduler.remote_kv_arrived(r.request_id, None)
            rank.forget(r.request_id)
        self._end(r, "failed", why)

    def _arrive(self, r: SimRequest) -> None:
        if self.spec.collocated:
            node = pick_node(self.decode_nodes, self.spec.policy, self._rr["decode"], r.prompt_ids)
            self._admit(node, r, r.output_len)
            return
        decode = pick_node(self.decode_nodes, "least_load", self._rr["decode"])
        rank = decode.rank_for_reservation()
        if not rank.reserve(r):
            self._fail(r, f"overloaded: no free KV pages for {r.prompt_len} tokens on {decode.name}")
            return
        r.reservation = (decode, rank)
        prefill = pick_node(self.prefill_nodes, self.spec.policy, self._rr["prefill"], r.prompt_ids)
        self._admit(prefill, r, 1, kv_dest={"node": decode.name})

    def _admit(self, node: Node, r: SimRequest, max_tokens: int, kv_dest: dict | None = None) -> None:
        try:
            node.least_loaded_rank().add(r, max_tokens, kv_dest)
        except SchedulerOverloaded as e:
            self._fail(r, str(e))
            return
        node.in_flight += 1
        self._try_step(node)

    def _try_step(self, node: Node) -> None:
        if node.stepping or not node.has_work():
            return
        if not all(d.acquire(node) for d in node.devices):
            return
        dt = node.plan_step(self.profile, self.ep_link)
        for rank in node.ranks:
            for req in rank.failed:  # the engine reports these after its step; no step time of theirs
                node.in_flight -= 1
                self._fail(rank.forget(req.request_id), req.error or "failed")
            rank.failed = []
        if dt is None:
            self._release_devices(node)
            return
        partner = node.gpu_partner
        if partner is not None and partner.stepping:  # both engines' kernels share the GPU meanwhile
            prefill, decode = (node, partner) if node.role == "prefill" else (partner, node)
            tokens = sum(c.num_new_tokens for r in prefill.ranks if r.out is not None for c in r.out.chunks)
            dt *= self.profile.slowdown(node.role, tokens, self._decode_batch(decode))
        node.stepping, node.step_started = True, self.now
        if node.role == "prefill":
            self._push_kv(node, dt)
        self._at(self.now + dt, self._step_end, node)

    @staticmethod
    def _decode_batch(node: Node) -> int:
        """The sequences a decode engine's step runs (its ranks' running batches): what the interference
        table's decode-batch dimension is looked up by."""
        return max(1, sum(len(r.scheduler.running) for r in node.ranks))

    def _push_kv(self, node: Node, dt: float) -> None:
        p = self.profile
        for rank in node.ranks:
            for c in rank.out.chunks:
                done = node.channel.push_layers(self.now, dt, c.num_new_tokens * p.kv_bytes_per_token, p.num_layers)
                c.request.kv_push_started = True
                sim = rank.sim[c.request.request_id]
                sim.kv_done = max(sim.kv_done, done)

    def _step_end(self, node: Node) -> None:
        node.stepping = False
        if node.step_started <= self.last_arrival:  # utilisation while load arrives, not during the drain
            node.busy_seconds += self.now - node.step_started
        node.num_steps += 1
        node.step_seconds += self.now - node.step_started
        for rank in node.ranks:
            self._finish_step(node, rank)
        self._release_devices(node)
        self._try_step(node)

    def _release_devices(self, node: Node) -> None:
        """Free the node's GPUs; nodes waiting for a shared GPU step first (they alternate)."""
        woken = []
        for d in node.devices:
            woken += d.release(node)
        for other in woken:
            if other is not node:
                self._try_step(other)

    def _finish_step(self, node: Node, rank: Rank) -> None:
        s = rank.scheduler
        out, rank.out = rank.out, None
        self.num_preemptions += len(out.preempted)
        sampled = {c.request.request_id: 0 for c in out.chunks if c.sample}
        node.sampled_tokens += len(sampled)
        finished = {req.request_id for req in s.update(out, sampled)}
        used = s.block_pool.num_used_pages
        self.peak_pages[node.name] = max(self.peak_pages.get(node.name, 0), used)
        for rid in sampled:
            sim = rank.sim[rid]
            if node.role == "prefill":
                if rid in finished:
                    if self.spec.first_token == "sampled":
                        sim.first_token_time, sim.tokens_out = self.now, 1
                    sim.kv_exposed = max(0.0, sim.kv_done - self.now)
                    t = max(self.now, sim.kv_done) + node.channel.link.latency
                    partner = node.gpu_partner
                    if partner is not None and partner.stepping:  # the hand-off beside a decode on this GPU
                        t = max(t, self.now + self.profile.shared_push_exposed(sim.prompt_len,
                                                                               self._decode_batch(partner)))
                        sim.kv_exposed = t - self.now
                    self._at(t, self._kv_landed, node, rank, sim)
                continue
            sim.tokens_out += 1
            if sim.first_token_time is None:
                sim.first_token_time = self.now
            if rid in finished:
                self._complete(node, rank, sim)

    def _complete(self, node: Node, rank: Rank, sim: SimRequest) -> None:
        rank.forget(sim.request_id)
        self._end(sim, "finished")
        node.in_flight -= 1
        node.served += 1

    def _kv_landed(self, prefill: Node, prank: Rank, sim: SimRequest) -> None:
        prank.scheduler.finish_sending(sim.request_id)
        prank.forget(sim.request_id)
        prefill.in_flight -= 1
        prefill.served += 1
        self._try_step(prefill)
        (decode, drank), sim.reservation = sim.reservation, None
        if self.spec.first_token == "kv_landed":
            sim.first_token_time, sim.tokens_out = self.now, 1
        if drank.scheduler.remote_kv_arrived(sim.request_id, 0):  # the first token ended it
            drank.forget(sim.request_id)
            self._end(sim, "finished")
            return
        decode.in_flight += 1
        self._try_step(decode)


def shares_prefixes(requests: list[SimRequest]) -> bool:
    """Whether any two prompts start with the same first 16-token block."""
    seen = set()
    for r in requests:
        head = tuple(r.prompt_ids[:PREFIX_BLOCK])
        if len(head) == PREFIX_BLOCK:
            if head in seen:
                return True
            seen.add(head)
    return False


def simulate(profile: Profile, spec: ClusterSpec, requests: list[SimRequest]) -> SimResult:
    return Simulator(profile, spec).run(requests)
