"""CUDA graphs for pure-decode steps.

A decode step of a few sequences launches hundreds of small kernels; on a slow host CPU the
launches, not the GPU, set the step time. We capture the model forward + logits once per batch
size bucket over static input buffers and replay it. Padded rows (batch rounded up to a bucket)
write no KV (slot -1) and attend to one cached position of page 0; their logits are dropped.
The attention backend's decode path and the MoE kernels must be capture-safe (no host syncs,
shapes depend only on the batch size).

With expert parallelism the graphs hold the MoE dispatch/combine collectives, so every rank must
replay the same bucket in a step, idle ranks included (`run_idle`): the EP runtime agrees the
bucket at `step_begin` (`ep.graph_bucket`) and masks the padded rows' routes on the device.

A step is one upload and one replay: the inputs are one packed pinned buffer
(engine/decode_inputs.py); the graph gathers its token ids from the host's ids and the previous
step's draws (overlap scheduling's pending tokens), runs the model and samples into the buffer the
next step gathers from. Each bucket has a greedy graph (argmax) and, without EP, a sampling graph
(temperature / top-k / top-p / min-p, `engine.sampler.draw`); batches that need the host-driven
sampler (penalties, seeds, logprobs, grammars) replay the greedy graph and sample its logits.
"""
from __future__ import annotations

import logging

import torch

from engine.attention.metadata import AttentionMetadata
from engine.decode_inputs import DecodeInputs
from engine.forward_batch import ForwardBatch
from engine.request import PENDING_TOKEN
from engine.sampler import draw

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(self, runner, max_batch: int):
        self.runner = runner
        self.device = runner.device
        self.sizes = batch_buckets(max_batch)
        self.max_batch = n = self.sizes[-1]
        self.modes = ("greedy",) if runner.ep is not None else ("greedy", "sample")
        self.buf = DecodeInputs(n, runner.max_pages_per_seq, self.device)
        dev = self.buf.dev
        self.positions, self.seq_lens, self.slot_mapping = dev.positions, dev.seq_lens, dev.slot_mapping
        self.block_tables, self.sampled = dev.block_tables, dev.sampled
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=self.device)
        self._neutral_src = list(range(n, 2 * n))
        # (batch, mode, context bound): every bucket has a graph for any context (bound None), and with
        # `decode_graph_short_context` N a second one whose attention sizes its split-KV launch for
        # contexts up to N (fewer splits, no merge kernel when one split covers them), replayed while
        # every sequence of the step fits N. Not on EP ranks (their capture plans one graph per bucket).
        short = runner.config.decode_graph_short_context
        self.bounds: tuple[int | None, ...] = (None, short) if short and runner.ep is None else (None,)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple, torch.Tensor] = {}
        self.pool = None

    def _metadata(self, bs: int, bound: int | None = None) -> AttentionMetadata:
        return AttentionMetadata(
            num_decode_tokens=bs, query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs], max_query_len=1,
            max_seq_len=self.runner.max_model_len if bound is None else bound, query_lens_cpu=[1] * bs,
            seq_lens_cpu=[1] * bs, page_size=self.runner.page_size, decode_context_bound=bound)

    def _forward(self, bs: int, bound: int | None = None) -> torch.Tensor:
        r = self.runner
        ids = torch.index_select(self.buf.token_pool, 0, self.buf.dev.src[:bs])
        batch = ForwardBatch(self._metadata(bs, bound), r.kv_pool.layers, r.backend)
        hidden = r.model(ids, self.positions[:bs], batch)
        return r.model.compute_logits(hidden)

    def _body(self, bs: int, mode: str, bound: int | None = None) -> torch.Tensor:
        """What a graph holds: gather ids, forward, logits, draws into `sampled`."""
        logits = self._forward(bs, bound)
        out = self.sampled[:bs]
        if mode == "greedy":
            torch.argmax(logits, dim=-1, out=out)
        else:
            d = self.buf.dev
            truncation = (d.top_k[:bs], d.top_p[:bs], d.min_p[:bs])
            noise = torch.empty_like(logits).exponential_()
            out.copy_(draw(logits, d.greedy[:bs], d.temperature[:bs], truncation, noise))
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        ep = self.runner.ep
        # EP: the NCCL watchdog thread polls events while we capture; only this thread must not.
        mode_ = "global" if ep is None else "thread_local"
        torch.cuda.synchronize(self.device)
        for bs in reversed(self.sizes):  # largest first so smaller graphs reuse its memory pool
            if ep is not None:
                ep.capture_plan(bs)
            for mode in self.modes:
                for bound in self.bounds:
                    self._body(bs, mode, bound)  # warm-up: Triton compilation and autotuning outside capture
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool, capture_error_mode=mode_):
                        self.logits[(bs, mode, bound)] = self._body(bs, mode, bound)
                    if self.pool is None:
                        self.pool = graph.pool()
                    self.graphs[(bs, mode, bound)] = graph
        torch.cuda.synchronize(self.device)
        if ep is not None:
            ep.graphs_captured(self.sizes)
        log.info("captured decode CUDA graphs for batch sizes %s (%s)%s", self.sizes, ", ".join(self.modes),
                 f", also for contexts up to {self.bounds[1]}" if len(self.bounds) > 1 else "")

    def _bucket(self, b: int) -> int | None:
        if self.runner.ep is None:
            return next((s for s in self.sizes if s >= b), None)
        return self.runner.ep.graph_bucket  # agreed by all ranks; None: the step is too large

    def can_run(self, chunks: list) -> bool:
        return (len(chunks) <= self.max_batch and all(c.num_new_tokens == 1 and c.sample for c in chunks)
                and self._bucket(len(chunks)) is not None)

    def run_idle(self) -> bool:
        """EP rank without requests: replay this step's agreed bucket with padding rows only
        (False when the step has no bucket; the caller then joins the MoE layers eagerly)."""
        bs = self._bucket(0)
        if bs is None:
            return False
        self.seq_lens[:bs].fill_(1)
        self.slot_mapping[:bs].fill_(-1)
        self.block_tables[:bs].zero_()
        self.runner.ep.prepare_replay(0)
        self.graphs[(bs, "greedy", None)].replay()
        return True

    def run(self, chunks: list, prev, mode: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Replay the bucket for `chunks` (all decodes). Input tokens still PENDING on the host are
        `prev`'s draws (a StepHandle). `mode`: "greedy" / "sample" draw in the graph and return the
        draws' device view; None returns only the logits (the caller samples)."""
        b = len(chunks)
        bs = self._bucket(b)
        ps = self.runner.page_size
        h = self.buf.host()
        ids, src, pos, slots = [0] * b, self._neutral_src[:bs], [0] * b, [0] * b
        pending = False
        tables = h.block_tables
        width = 1
        for i, c in enumerate(chunks):
            req, p = c.request, c.start
            prompt = req.prompt_token_ids
            tok = prompt[p] if p < len(prompt) else req.output_token_ids[p - len(prompt)]
            if tok == PENDING_TOKEN:  # sampled by the step in flight: gathered on the device
                src[i] = self._prev_row(prev, req.request_id)
                pending = True
            else:
                ids[i] = tok
            pages = req.page_ids
            width = max(width, len(pages))
            pos[i] = p
            slots[i] = pages[p // ps] * ps + p % ps
            tables[i, :len(pages)] = pages  # every step: copy on write (n > 1) replaces page ids in place
        h.ids[:b] = ids
        h.src[:bs] = src
        h.positions[:b] = pos
        h.seq_lens[:b] = h.positions[:b] + 1
        h.seq_lens[b:bs] = 1
        h.slot_mapping[:b] = slots
        h.slot_mapping[b:bs] = -1
        if mode == "sample":
            self._fill_sampling(h, chunks)
        if pending and not prev.graph_sampled:
            rows = len(prev.rows)  # the host sampler drew them: put them where the graph gathers
            self.sampled[:rows].copy_(prev.token_ids)
        self.buf.upload(b, width)
        if self.runner.ep is not None:
            self.runner.ep.prepare_replay(b)
        short = self.bounds[-1]
        bound = short if short is not None and max(pos) < short else None  # every length = position + 1 ≤ N
        key = (bs, mode or "greedy", bound)
        self.graphs[key].replay()
        return self.logits[key][:b], (self.sampled[:b] if mode else None)

    @staticmethod
    def _prev_row(prev, request_id: str) -> int:
        if prev is None or prev.sampled is None or request_id not in prev.rows:
            raise RuntimeError(f"request {request_id!r}: an input is pending but the step in flight did not sample it")
        return prev.rows[request_id]

    def _fill_sampling(self, h, chunks: list) -> None:
        b = len(chunks)
        vocab = self.runner.model_config.vocab_size
        params = [c.request.sampling_params for c in chunks]
        h.greedy[:b] = [p.is_greedy for p in params]
        h.temperature[:b] = [1.0 if p.is_greedy else p.temperature for p in params]
        h.top_k[:b] = [p.top_k if p.top_k > 0 else vocab for p in params]
        h.top_p[:b] = [p.top_p for p in params]
        h.min_p[:b] = [p.min_p for p in params]
