"""The model runner: turns one scheduled step into tensors, runs the model and samples.

It owns the model weights, the KV pool memory, the attention backend and (on CUDA) the decode
CUDA graphs and the dense prefill ones (engine/prefill_graph.py). It knows nothing about queues or requests' lifecycles: it reads the scheduler's
chunks (which tokens of which request to compute, into which pages) and returns the sampled
token of every chunk that ends at its request's last known token.

`launch` only enqueues the step on the device and returns a `StepHandle`; its tokens stay on the
device and feed the next launch directly: an input token the host has not seen yet
(`PENDING_TOKEN`) is taken from the previous step's sampled ids. `StepHandle.result` waits for the
step (an event) and copies its draws to the host (non-blocking copies started at launch), so the
host prepares step N+1 while the GPU runs step N.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from engine.attention.backend import select_backend
from engine.attention.metadata import AttentionMetadata
from engine.config import EngineConfig, ModelConfig, kv_cache_dtype
from engine.cuda_graph import DecodeGraphs
from engine.forward_batch import ForwardBatch
from engine.kv_cache import KVPool
from engine.prefill_graph import MIN_BUCKET as PREFILL_GRAPH_MIN_TOKENS
from engine.prefill_graph import PrefillGraphs
from engine.prompt_logprobs import PromptLogprobs, computes_prompt_logprobs
from engine.request import PENDING_TOKEN
from engine.sampler import Sampled, Sampler, graph_sampling
from engine.weight_loader import load_model

log = logging.getLogger(__name__)

PREFILL_GRAPH_MAX_SEQS = 64  # sequences a prefill graph step holds (its logits rows: [64, vocab])


@dataclass
class StepResult:
    sampled: dict[str, int]  # request_id -> new token
    logprobs: dict[str, object]  # request_id -> logprob entry (only where asked for)
    num_tokens: int  # tokens computed this step


class StepHandle:
    """A launched step: its draws on the device, their host copies in flight, an event."""

    def __init__(self, rows: dict[str, int], sampled: Sampled | None, num_tokens: int, device: torch.device,
                 graph_sampled: bool = False):
        self.rows = rows  # request id -> row of `sampled`
        self.sampled = sampled
        self.num_tokens = num_tokens
        self.graph_sampled = graph_sampled  # drawn inside a decode graph: already where the next graph gathers
        self._host = None
        self._event = None
        if sampled is not None and device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                          for t in sampled.tensors()]
            self._event = torch.cuda.Event()
            self._event.record()
        elif graph_sampled:  # a view of the graphs' draw buffer, which the next step overwrites
            self._host = [t.clone() for t in sampled.tensors()]

    @property
    def token_ids(self) -> torch.Tensor:
        return self.sampled.token_ids

    def result(self) -> StepResult:
        if self.sampled is None:
            return StepResult({}, {}, self.num_tokens)
        if self._event is not None:
            self._event.synchronize()
        out = self.sampled.to_host(self._host)
        rids = list(self.rows)
        logprobs = {}
        if out.logprobs is not None:
            logprobs = {rid: lp for rid, lp in zip(rids, out.logprobs) if lp is not None}
        return StepResult(dict(zip(rids, out.token_ids)), logprobs, self.num_tokens)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model: torch.nn.Module | None = None):
        self.config = config
        self.model_config = model_config
        self.max_model_len = model_config.check_max_model_len(config.max_model_len, config.model)  # before loading
        self.device = config.resolved_device()
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.model = model if model is not None else load_model(
            model_config, self.device, config.load_format, seed=config.seed, parallel=config.parallel,
            quantization=config.quantization, progress=config.load_progress)
        self.ep = None
        if config.parallel.ep_size > 1:
            from engine.ep.runtime import ExpertParallel
            mode = "low_latency" if config.kv_role == "decode" else "normal"
            self.ep = ExpertParallel(config.parallel, self.model, self.device, model_config.hf["hidden_size"], mode,
                                     max_tokens_per_rank=config.scheduler.max_num_seqs)
        self.backend = select_backend(self.device, config.attention_backend)
        self.page_size = config.cache.page_size
        self.kv_spec = model_config.kv_spec(self.page_size, kv_cache_dtype(config.kv_cache_dtype, model_config.dtype))
        self.max_pages_per_seq = -(-self.max_model_len // self.page_size)
        self.num_pages = self._decide_num_pages()
        self.kv_pool = KVPool(self.kv_spec, self.num_pages, self.device)
        self.sampler = Sampler()
        self.prompt_logprobs = PromptLogprobs()  # filled during prefill for requests that ask
        self.graphs: DecodeGraphs | None = None
        graphs_ok = self.ep is None or self.ep.all_to_all.graph_safe  # the torch all-to-all reads counts on the host
        if self.device.type == "cuda" and not config.enforce_eager and graphs_ok:
            max_batch = min(config.cuda_graph_max_batch, config.scheduler.max_num_seqs)
            self.graphs = DecodeGraphs(self, max_batch)
            self.graphs.capture()
        self.prefill_graphs: PrefillGraphs | None = None
        if self._prefill_graphs_planned():
            pg = PrefillGraphs(self, config.prefill_graph_max_tokens,
                               min(PREFILL_GRAPH_MAX_SEQS, config.scheduler.max_num_seqs),
                               piecewise=config.prefill_graph_piecewise)
            self.prefill_graphs = pg if pg.capture() else None
        log.info("model runner ready: %s on %s, %s, %d KV pages of %d tokens (%.1f MiB), backend=%s, graphs=%s, "
                 "prefill graphs=%s", model_config.architecture, self.device, model_config.dtype, self.num_pages,
                 self.page_size, self.kv_pool.total_bytes / 2**20, self.backend.name, self.graphs is not None,
                 self.prefill_graphs is not None)

    def _prefill_graphs_planned(self) -> bool:
        """Dense prefill steps replay CUDA graphs on one GPU (no EP) with the Triton backend, in half
        precision (the varlen flash path; others attend per sequence, which cannot be captured); not on a
        decode node, whose prompts arrive as KV, unless it serves collocated (runs prompts itself)."""
        return (self.device.type == "cuda" and not self.config.enforce_eager and self.ep is None
                and (self.config.kv_role != "decode" or self.config.collocated)
                and self.config.prefill_graph_max_tokens >= PREFILL_GRAPH_MIN_TOKENS
                and self.backend.name == "triton" and self.model_config.dtype in (torch.float16, torch.bfloat16))

    # ---------------------------------------------------------------- memory
    def _decide_num_pages(self) -> int:
        cache = self.config.cache
        if cache.num_pages is not None:
            return cache.num_pages
        if self.device.type != "cuda":
            return max(1, KVPool.pages_for_budget(self.kv_spec, cache.cpu_kv_bytes))
        peak = self._profile_peak_activation_bytes()
        if self._prefill_graphs_planned():  # the graphs' private pool: about the activations of the largest bucket
            profiled = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
            peak += int(peak * min(1.0, self.config.prefill_graph_max_tokens / profiled))
        free, total = torch.cuda.mem_get_info(self.device)
        # gpu_memory_utilization is this process's share of the GPU (several engines may share one):
        # weights + activations + KV stay under it, and never beyond what is actually free now.
        if self.ep is not None:  # EPLB weight moves need room for one layer's packed experts
            peak += self.ep.rebalance_workspace_bytes()
        budget = int(total * cache.gpu_memory_utilization) - torch.cuda.memory_allocated(self.device) - peak
        budget = min(budget, free - peak - (512 << 20))
        pages = KVPool.pages_for_budget(self.kv_spec, budget)
        if pages < self.max_pages_per_seq // 8 + 1:
            raise RuntimeError(
                f"not enough GPU memory for the KV cache: {budget / 2**30:.2f} GiB left after weights and "
                f"activations (gpu_memory_utilization={cache.gpu_memory_utilization}); lower max_num_batched_tokens "
                f"or raise gpu_memory_utilization")
        return pages

    @torch.inference_mode()
    def _profile_peak_activation_bytes(self) -> int:
        """Run one prefill of `max_num_batched_tokens` into a scratch pool; peak minus resting memory."""
        tokens = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        pages = -(-tokens // self.page_size)
        scratch = KVPool(self.kv_spec, pages, self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        meta = AttentionMetadata.build([tokens], [tokens], [list(range(pages))], self.page_size, self.device)
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        pos = torch.arange(tokens, device=self.device)
        hidden = self.model(ids, pos, ForwardBatch(meta, scratch.layers, self.backend))
        self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del scratch, hidden
        torch.cuda.empty_cache()
        return peak

    # ---------------------------------------------------------------- step
    @torch.inference_mode()
    def launch(self, chunks: list, expert_load: torch.Tensor | None = None, layer_hook=None,
               prev: StepHandle | None = None, copies: list[tuple[int, int]] = ()) -> StepHandle:
        """Enqueue one step over the scheduler's chunks (decodes first, then prefill chunks); input
        tokens still PENDING on the host come from `prev`'s sampled ids on the device. `copies`
        (copy-on-write pages) are copied first; a fork chunk (n > 1) computes nothing and draws from
        the logits row of the request it was forked from."""
        if not chunks:
            return StepHandle({}, None, 0, self.device)
        self.kv_pool.copy_pages(list(copies))
        sampling = [c for c in chunks if c.sample]
        rows = {c.request.request_id: i for i, c in enumerate(sampling)}
        requests = [c.request for c in sampling]
        forks = any(c.fork_of is not None for c in chunks)
        if (not forks and self.graphs is not None and expert_load is None and layer_hook is None
                and self.graphs.can_run(chunks)):
            mode = graph_sampling(requests)
            logits, tokens = self.graphs.run(chunks, prev, mode if mode in self.graphs.modes else None)
            if tokens is not None:
                return StepHandle(rows, Sampled(tokens, [r.sampling_params for r in requests]), len(chunks),
                                  self.device, graph_sampled=True)
            return StepHandle(rows, self.sampler.sample_on_device(logits, requests), len(chunks), self.device)
        if forks:
            chunks = [c for c in chunks if c.fork_of is None]
        inputs = self._inputs(chunks)
        if chunks and expert_load is None and self.prefill_graphs is not None and self.prefill_graphs.can_run(chunks):
            logprobs = any(computes_prompt_logprobs(c) for c in chunks)
            logits = self.prefill_graphs.run(inputs, layer_hook, prev, chunks if logprobs else None)
        else:
            logits = self._run_eager(chunks, inputs, prev, expert_load, layer_hook)
        if forks:  # every choice of a forked prompt draws from that prompt's last-position logits
            row = {c.request.request_id: i for i, c in enumerate(c for c in chunks if c.sample)}
            index = [row[(c.fork_of or c.request).request_id] for c in sampling]
            logits = logits[torch.tensor(index, dtype=torch.long).to(logits.device, non_blocking=True)]
        sampled = self.sampler.sample_on_device(logits, requests) if sampling else None
        return StepHandle(rows, sampled, len(inputs.ids), self.device)

    @staticmethod
    def _inputs(chunks: list) -> "_StepInputs":
        inputs = _StepInputs()
        for c in chunks:
            start, n = c.start, c.num_new_tokens
            tokens = c.request.token_slice(start, start + n)
            if PENDING_TOKEN in tokens:  # sampled by the step in flight: patched on the device
                for i, t in enumerate(tokens):
                    if t == PENDING_TOKEN:
                        inputs.pending.append((len(inputs.ids) + i, c.request.request_id))
                inputs.ids.extend(0 if t == PENDING_TOKEN else t for t in tokens)
            else:  # a prompt chunk: no per-token Python
                inputs.ids.extend(tokens)
            inputs.positions.extend(range(start, start + n))
            inputs.query_lens.append(n)
            inputs.seq_lens.append(start + n)
            inputs.tables.append(c.request.page_ids)
            if c.sample:
                inputs.logits_rows.append(len(inputs.ids) - 1)
        return inputs

    def _patch_pending(self, ids: torch.Tensor, inputs: "_StepInputs", prev: StepHandle | None) -> None:
        if not inputs.pending:
            return
        if prev is None or prev.sampled is None:
            raise RuntimeError("a step input is pending but no step is in flight")
        at = torch.tensor([i for i, _ in inputs.pending], dtype=torch.long).to(self.device, non_blocking=True)
        rows = torch.tensor([prev.rows[rid] for _, rid in inputs.pending], dtype=torch.long)
        ids[at] = prev.token_ids[rows.to(self.device, non_blocking=True)]

    @torch.inference_mode()
    def execute_idle(self) -> None:
        """EP rank with no tokens this step: serve the other ranks' MoE dispatches (replaying the
        step's agreed decode graph when it has one, so the collectives match the busy ranks')."""
        if self.graphs is None or not self.graphs.run_idle():
            self.ep.run_idle()

    def _run_eager(self, chunks: list, inputs: "_StepInputs", prev: StepHandle | None,
                   expert_load: torch.Tensor | None, layer_hook=None) -> torch.Tensor:
        if self.ep is not None and self.ep.two_batch and self.ep.baton is None:
            return self._run_two_batches(chunks, prev, expert_load, layer_hook)
        meta = AttentionMetadata.build(inputs.query_lens, inputs.seq_lens, inputs.tables, self.page_size, self.device)
        ids = torch.tensor(inputs.ids, dtype=torch.long).to(self.device, non_blocking=True)
        self._patch_pending(ids, inputs, prev)
        pos = torch.tensor(inputs.positions, dtype=torch.long).to(self.device, non_blocking=True)
        batch = ForwardBatch(meta, self.kv_pool.layers, self.backend, expert_load, layer_hook)
        return self.step_logits(self.model(ids, pos, batch), inputs, chunks)

    def step_logits(self, hidden: torch.Tensor, inputs: "_StepInputs", chunks: list | None) -> torch.Tensor:
        """The logits of a step's sampling rows from its final hidden states (its rows back to back, in
        `inputs` order; more rows after them are ignored), the prompt logprobs of `chunks` collected first
        (None: none wanted)."""
        if chunks:
            self.prompt_logprobs.collect(self.model, hidden, chunks)
        if not inputs.logits_rows:
            return torch.empty(0, self.model_config.vocab_size, device=self.device)
        rows = torch.tensor(inputs.logits_rows, dtype=torch.long).to(self.device, non_blocking=True)
        return self.model.compute_logits(hidden[rows])

    def _run_two_batches(self, chunks: list, prev: StepHandle | None, expert_load: torch.Tensor | None,
                         layer_hook=None) -> torch.Tensor:
        """EP two-batch overlap (engine/ep/two_batch.py): the step as two micro-batches interleaved
        across whole layers. The later micro-batch carries the per-layer hook (its layer i ends after
        the other's); an empty one (a one-token step) joins the MoE collectives with no tokens."""
        from engine.ep.two_batch import split_chunks

        parts = split_chunks(chunks)
        hooks = (None, layer_hook) if parts[1] else (layer_hook, None)

        def forward(i: int):
            if not parts[i]:
                return lambda: self.ep.run_idle()
            return lambda: self._run_eager(parts[i], self._inputs(parts[i]), prev, expert_load, hooks[i])
        logits = self.ep.run_two_batches(forward(0), forward(1))
        return torch.cat([x for x in logits if x is not None])


@dataclass
class _StepInputs:
    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    tables: list[list[int]] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)
    pending: list[tuple[int, str]] = field(default_factory=list)  # (position in ids, request id)
