"""The Prometheus metric catalogue of every pdserve process: one place that names each metric,
its type, labels and buckets, so the router, the nodes, the dashboards and the alert rules agree.

Names follow vLLM's (`vllm:time_to_first_token_seconds` → `pdserve:time_to_first_token_seconds`)
so existing dashboards and habits carry over. Every metric carries `model`, `role`
(router | prefill | decode) and `node` labels. Latency histograms use fine buckets from 1 ms and
add the operator's SLO targets as extra bucket boundaries, so `histogram_quantile` and the
"fraction under SLO" ratio are exact at the thresholds that matter.

Multi-process export: each process serves its own registry on its own `/metrics`. Engine-side
numbers (running/waiting requests, KV usage, prefix hits, preemptions, expert load) live in the
engine process; the node's front process pulls them with the engine's stats message and exports
them through `EngineStatsCollector`, so no shared multiprocess directory is needed and a
restarted engine cannot leave stale files behind. This module must not start servers or threads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "pdserve:"
LABELS = ("model", "role", "node")

# Seconds. Fine from 1 ms so inter-token latency and TPOT SLOs (tens of ms) resolve well.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.15, 0.2,
                   0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
                   40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without the prefix
    kind: str  # counter | gauge | histogram
    doc: str
    labels: tuple[str, ...] = ()  # beyond LABELS
    buckets: tuple[float, ...] = ()
    slo: str | None = None  # which SLO targets extend the buckets: ttft | tpot | itl | e2el

    @property
    def full_name(self) -> str:
        return PREFIX + self.name


CATALOGUE: tuple[MetricSpec, ...] = (
    # --- request latency (router: what the client sees; nodes: their own part) --------------
    MetricSpec("time_to_first_token_seconds", "histogram", "Time to first token (TTFT).",
               buckets=LATENCY_BUCKETS, slo="ttft"),
    MetricSpec("request_time_per_output_token_seconds", "histogram",
               "Time per output token of a request (TPOT): (E2E - TTFT) / (output tokens - 1).",
               buckets=LATENCY_BUCKETS, slo="tpot"),
    MetricSpec("inter_token_latency_seconds", "histogram", "Gap between consecutive streamed token deltas (ITL).",
               buckets=LATENCY_BUCKETS, slo="itl"),
    MetricSpec("e2e_request_latency_seconds", "histogram", "End-to-end request latency.",
               buckets=REQUEST_BUCKETS, slo="e2el"),
    MetricSpec("request_queue_time_seconds", "histogram", "Time a request waited before its first scheduled step.",
               buckets=LATENCY_BUCKETS),
    MetricSpec("request_prefill_time_seconds", "histogram", "Time from first scheduled step to the first token.",
               buckets=LATENCY_BUCKETS),
    MetricSpec("request_decode_time_seconds", "histogram", "Time from the first token to the last.",
               buckets=REQUEST_BUCKETS),
    MetricSpec("request_prompt_tokens", "histogram", "Prompt length of finished requests.", buckets=TOKEN_BUCKETS),
    MetricSpec("request_generation_tokens", "histogram", "Output length of finished requests.",
               buckets=TOKEN_BUCKETS),
    # --- token and request counts -------------------------------------------------------------
    MetricSpec("prompt_tokens_total", "counter", "Prompt tokens processed."),
    MetricSpec("generation_tokens_total", "counter", "Tokens generated."),
    MetricSpec("request_success_total", "counter", "Finished requests by finish reason.", ("finished_reason",)),
    MetricSpec("request_failure_total", "counter", "Requests that ended in an error, by where it failed.",
               ("reason",)),
    # --- KV transfer (prefill pushes, decode receives) ------------------------------------------
    MetricSpec("kv_transfer_time_seconds", "histogram", "Time to push one request's KV to the decode node.",
               buckets=LATENCY_BUCKETS),
    MetricSpec("kv_transfer_exposed_seconds", "histogram",
               "Time from the end of a request's prefill compute to its KV push completing (what the push adds "
               "to TTFT).", buckets=LATENCY_BUCKETS),
    MetricSpec("kv_destination_wait_seconds", "histogram",
               "Time a prompt's written KV waited for the decode node's KV destination.",
               buckets=LATENCY_BUCKETS),
    MetricSpec("kv_write_tail_seconds", "histogram",
               "Time from a push's last KV WRITE posted to all of its WRITEs seen done.", buckets=LATENCY_BUCKETS),
    MetricSpec("kv_post_delay_seconds", "histogram",
               "Time from a push's first WRITE being possible (first layer written, destination known) to its "
               "post.", buckets=LATENCY_BUCKETS),
    MetricSpec("kv_write_lock_wait_seconds", "histogram",
               "Time a push's KV WRITEs waited for the NIXL agent's lock before posting (summed per push).",
               buckets=LATENCY_BUCKETS),
    MetricSpec("kv_write_call_seconds", "histogram",
               "Time inside NIXL posting a push's KV WRITEs, waiting for a connection to the receiver still "
               "under way included (summed per push).", buckets=LATENCY_BUCKETS),
    MetricSpec("kv_writes_per_push", "histogram", "KV WRITEs a push posted (1: all layers at once; one per "
               "layer or group of layers done together when pushed layer by layer).",
               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)),
    MetricSpec("kv_transfer_bytes_total", "counter", "KV bytes pushed to decode nodes."),
    MetricSpec("kv_transfer_failures_total", "counter", "KV transfers that failed or timed out.", ("reason",)),
    # --- engine state (pulled from the engine process) ------------------------------------------
    MetricSpec("num_requests_running", "gauge", "Requests in the running batch.", ("rank",)),
    MetricSpec("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", ("rank",)),
    MetricSpec("num_requests_reserved", "gauge", "Decode role: KV reservations waiting for their prefill.",
               ("rank",)),
    MetricSpec("kv_cache_usage_perc", "gauge", "Fraction of KV pages in use (1 = full).", ("rank",)),
    MetricSpec("kv_cache_pages_total", "gauge", "KV pages in the pool.", ("rank",)),
    MetricSpec("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", ("rank",)),
    MetricSpec("prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.", ("rank",)),
    MetricSpec("num_preemptions_total", "counter", "Requests preempted (pages freed, recomputed later).",
               ("rank",)),
    MetricSpec("engine_steps_total", "counter", "Engine steps run.", ("rank",)),
    MetricSpec("jit_compiles_while_serving_total", "counter",
               "Triton kernels compiled after the engine reported ready, each holding a served step (over "
               "PDSERVE_JIT_LOG_S; logged with the kernel).", ("rank",)),
    MetricSpec("expert_tokens_total", "counter", "Tokens routed to each logical expert.", ("layer", "expert")),
    MetricSpec("ep_imbalance", "gauge", "Max / mean token load per EP rank over the EPLB window.", ("layer",)),
    MetricSpec("eplb_rebalances_total", "counter", "Online expert rebalances applied."),
    # --- node and router state --------------------------------------------------------------------
    MetricSpec("node_info", "gauge", "1 per live process; labels describe it.",
               ("version", "ep_size", "ep_backend")),
    MetricSpec("router_nodes", "gauge", "Nodes the router can route to, by role and health.",
               ("node_role", "state")),
    MetricSpec("router_requests_in_flight", "gauge", "Requests the router is serving now."),
)

BY_NAME = {m.full_name: m for m in CATALOGUE}


def pdserve_version() -> str:
    try:
        from importlib.metadata import version

        return version("pdserve")
    except Exception:
        return "unknown"


def exported_series(spec: MetricSpec) -> list[str]:
    """Names Prometheus stores for one metric (histograms expand to _bucket/_sum/_count)."""
    if spec.kind == "histogram":
        return [spec.full_name + s for s in ("_bucket", "_sum", "_count")]
    return [spec.full_name]


def all_series() -> set[str]:
    return {s for m in CATALOGUE for s in exported_series(m)}


@dataclass
class SLOTargets:
    """Seconds; each becomes an extra bucket boundary of its histogram (and a dashboard line)."""

    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2el: list[float] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str | None) -> "SLOTargets":
        """`ttft:1000 tpot:50` (milliseconds, the `pdserve bench --goodput` syntax)."""
        out = cls()
        for part in (text or "").replace(",", " ").split():
            key, _, value = part.partition(":")
            if key not in ("ttft", "tpot", "itl", "e2el") or not value:
                raise ValueError(f"SLO target {part!r}: expected ttft|tpot|itl|e2el:MILLISECONDS")
            try:
                ms = float(value)
            except ValueError:
                raise ValueError(f"SLO target {part!r}: {value!r} is not a number of milliseconds") from None
            if ms <= 0:
                raise ValueError(f"SLO target {part!r} must be positive")
            getattr(out, key).append(ms / 1000.0)
        return out

    def buckets(self, spec: MetricSpec) -> tuple[float, ...]:
        extra = getattr(self, spec.slo) if spec.slo else []
        return tuple(sorted(set(spec.buckets) | set(extra)))


class ServingMetrics:
    """The metric objects of one process, bound to its (model, role, node) labels.

    `registry`: a fresh `CollectorRegistry` by default so several components in one process
    (tests) do not collide; serve it with `prometheus_client.generate_latest(metrics.registry)`.
    """

    def __init__(self, model: str, role: str, node: str, slo: SLOTargets | None = None,
                 registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.base = {"model": model, "role": role, "node": node}
        self.slo = slo or SLOTargets()
        self._metrics = {}
        for spec in CATALOGUE:
            if spec.labels and spec.labels[0] == "rank" or spec.name in ("expert_tokens_total", "ep_imbalance",
                                                                              "eplb_rebalances_total"):
                continue  # engine-side: exported by EngineStatsCollector
            names = LABELS + spec.labels
            if spec.kind == "histogram":
                m = Histogram(spec.full_name, spec.doc, names, buckets=self.slo.buckets(spec), registry=self.registry)
            elif spec.kind == "counter":
                m = Counter(spec.full_name.removesuffix("_total"), spec.doc, names, registry=self.registry)
            else:
                m = Gauge(spec.full_name, spec.doc, names, registry=self.registry)
            self._metrics[spec.name] = m

    def get(self, name: str, **labels):
        return self._metrics[name].labels(**self.base, **labels)

    def observe(self, name: str, value: float, **labels) -> None:
        self.get(name, **labels).observe(value)

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        if amount:
            self.get(name, **labels).inc(amount)

    def set(self, name: str, value: float, **labels) -> None:
        self.get(name, **labels).set(value)

    def observe_request(self, ttft: float | None, e2e: float, num_output_tokens: int, itls: list[float] = (),
                        num_prompt_tokens: int | None = None, finish_reason: str | None = None,
                        total_output_tokens: int | None = None) -> None:
        """One finished request, as the client saw it. With n > 1 choices the latencies and
        `num_output_tokens` are one choice's, `total_output_tokens` every choice's."""
        if ttft is not None:
            self.observe("time_to_first_token_seconds", ttft)
            if num_output_tokens > 1:
                self.observe("request_time_per_output_token_seconds", (e2e - ttft) / (num_output_tokens - 1))
                self.observe("request_decode_time_seconds", e2e - ttft)
        for gap in itls:
            self.observe("inter_token_latency_seconds", gap)
        self.observe("e2e_request_latency_seconds", e2e)
        total = num_output_tokens if total_output_tokens is None else total_output_tokens
        self.observe("request_generation_tokens", total)
        self.inc("generation_tokens_total", total)
        if num_prompt_tokens is not None:
            self.observe("request_prompt_tokens", num_prompt_tokens)
            self.inc("prompt_tokens_total", num_prompt_tokens)
        if finish_reason is not None:
            self.inc("request_success_total", finished_reason=finish_reason)


# Per-rank engine metrics and the engine stats key each comes from.
RANK_METRICS = (
    ("num_requests_running", "num_running"),
    ("num_requests_waiting", "num_waiting"),
    ("num_requests_reserved", "num_reserved"),
    ("kv_cache_usage_perc", "kv_cache_usage"),
    ("kv_cache_pages_total", "num_pages"),
    ("prefix_cache_queries_total", "prefix_cache_queries_tokens"),
    ("prefix_cache_hits_total", "prefix_cache_hits_tokens"),
    ("num_preemptions_total", "num_preemptions"),
    ("engine_steps_total", "num_steps"),
    ("jit_compiles_while_serving_total", "jit_compiles_while_serving"),
)


def _family(name: str, extra_labels: list[str]):
    """An empty metric family for catalogue entry `name` (counters drop `_total`, the client adds it)."""
    spec = BY_NAME[PREFIX + name]
    labels = list(LABELS) + extra_labels
    if spec.kind == "counter":
        return CounterMetricFamily(spec.full_name.removesuffix("_total"), spec.doc, labels=labels)
    return GaugeMetricFamily(spec.full_name, spec.doc, labels=labels)


class EngineStatsCollector:
    """Exports an engine process's stats (pulled by the front) as Prometheus metrics.

    `fetch()` returns a list of per-rank stats dicts (the engine's `stats()`), or None when the
    engine cannot answer; then nothing engine-side is exported for that scrape (a gap, not a
    stale value). Counters come straight from the engine's monotonic totals. Expert load is summed
    over ranks (each counts the tokens it routed); imbalance and rebalances are the group's.
    """

    def __init__(self, fetch, base_labels: dict[str, str]):
        self.fetch = fetch
        self.base = base_labels

    def describe(self):
        return []  # unchecked collector: families depend on what the engine reports

    def collect(self):
        stats = self.fetch()
        if not stats:
            return
        base = [self.base[k] for k in LABELS]
        per_rank = {name: _family(name, ["rank"]) for name, _ in RANK_METRICS}
        expert_sum: dict[tuple[int, int], float] = {}
        imbalance_of: dict[int, float] = {}
        rebalances = 0
        for rank, s in enumerate(stats):
            labels = base + [str(s.get("ep_rank", rank))]
            for name, key in RANK_METRICS:
                per_rank[name].add_metric(labels, s.get(key) or 0)
            for layer_expert, n in (s.get("expert_tokens") or {}).items():
                expert_sum[layer_expert] = expert_sum.get(layer_expert, 0.0) + n
            for layer, v in (s.get("ep_imbalance") or {}).items():
                imbalance_of[layer] = max(imbalance_of.get(layer, 0.0), v)
            rebalances = max(rebalances, s.get("eplb_rebalances", 0))
        yield from per_rank.values()
        expert = _family("expert_tokens_total", ["layer", "expert"])
        for (layer, e), n in sorted(expert_sum.items()):
            expert.add_metric(base + [str(layer), str(e)], n)
        yield expert
        imbalance = _family("ep_imbalance", ["layer"])
        for layer, v in sorted(imbalance_of.items()):
            imbalance.add_metric(base + [str(layer)], v)
        yield imbalance
        fam = _family("eplb_rebalances_total", [])
        fam.add_metric(base, rebalances)
        yield fam
