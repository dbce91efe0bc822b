"""CUDA graphs for dense prefill steps, one graph per decoder layer.

An eager prefill step is host-bound below a few thousand tokens: every layer launches a few dozen
kernels (Triton launches cost 40-50 µs of host time each on the device's CPU), so DeepSeek-V2-Lite's
2,048-token prefill took 54 ms of host time for ~30 ms of GPU work, and a 256-token prompt 33 ms
(bench/results/2026-12-07_h200_today.md). Here a prefill-only step whose sequences all start at
position 0 (no cached prefix, no decodes: the disaggregated prefill node's usual step) replays graphs
captured per token bucket instead, up to `--prefill-graph-max-tokens` (default 2,048; 0: eager). On an
H100 the replayed step equals the eager one bit for bit (tests/engine/kernels/check_prefill_graph.py) and
cuts a 256-token prefill by 28-40% (bench/results/2026-12-07_h100_prefill_graphs.md).

Layout of a bucket of T tokens with up to S sequences: the step's tokens back to back, then the
padding tokens as one extra sequence (they attend among themselves, so every row stays finite; their
KV slot is -1, no write); unused sequence slots have length 0 (repeated offsets, which the varlen
flash kernel skips). The attention is the one varlen flash call of dense prefill
(engine/attention/dense_prefill.py) with the bucket size as its length bound, so nothing in the
forward depends on the real lengths but device tensors. Logits come from a fixed `[S]` row index
(each sampling sequence's last token; unused rows read row 0 and are dropped).

The capture is cut after every decoder layer (the model's `on_layer_done` callback ends one graph
and begins the next in the same memory pool), so a replay runs the layers' graphs in order and calls
the step's per-layer hook between them: the prefill node's layer-wise KV push records its events
exactly where the eager forward would. L + 1 replays should cost well under a millisecond of host
time (about 10 µs each: an estimate; the step as a whole is measured, not the replays).

Inputs are one packed int64 buffer uploaded with one non-blocking copy from one of two pinned
copies, each guarded by the event of its last upload (as engine/decode_inputs.py does for decode).
Padding tokens cost GPU time (buckets are powers of two, so at most 2× the tokens); the MoE layers
route them like any token.

Piecewise graphs (`piecewise=True`, the default) take the other steps that fit a bucket: chunks over
cached prefixes (a prefix-cache hit, a chunked prompt's later chunks), steps mixing decodes with prefill
chunks (collocated serving, offline batches), more prompts than logits slots, prompt logprobs (the final
hidden states of every row are the graphs' output; the step's logits rows are picked and projected after
them). Eagerly such a step is host-bound like any other
(DeepSeek-V2-Lite on an H100: 45 ms for 32 new tokens after a 2,048-token prefix against 12 ms for a
fresh 32-token prompt, 2026-12-07g), yet only the attention core reads lengths, pages and prefixes:
everything before and after it depends on the token count alone. So the same bucket is captured a second
time with each layer's attention cut out (`ForwardBatch.attend`): the graph before it copies the
attention's inputs into static buffers and ends; at replay the attention runs eagerly over the step's
real metadata (the gather of every sequence from the pages and one varlen flash call, as the eager step
does) into a static output the next graph reads. A layer is then two replays and a few eager launches
instead of a few dozen. Its padding rows keep the output's previous (finite) values.

Steps that do not fit (more tokens than the largest bucket, EPLB recording, EP; without piecewise graphs any
but fresh prefill-only steps of at most `max_seqs` prompts, none asking for prompt logprobs) run eagerly;
decode-only steps replay the decode graphs (engine/cuda_graph.py) first.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from engine.attention.metadata import AttentionMetadata
from engine.forward_batch import ForwardBatch
from engine.prompt_logprobs import computes_prompt_logprobs

log = logging.getLogger(__name__)

MIN_BUCKET = 128  # MLA attends decompressed (dense, the graphable path) from 128 tokens


def token_buckets(max_tokens: int) -> list[int]:
    """Powers of two from MIN_BUCKET up to `max_tokens` (rounded up to one)."""
    sizes = [MIN_BUCKET]
    while sizes[-1] < max_tokens:
        sizes.append(sizes[-1] * 2)
    return sizes


class PrefillGraphs:
    """Per-bucket, per-layer CUDA graphs of the dense prefill forward (`capture=False`: the same padded
    static-buffer forward run eagerly, which is what the CPU tests check against the eager runner)."""

    def __init__(self, runner, max_tokens: int, max_seqs: int, capture: bool = True, piecewise: bool = True):
        self.runner = runner
        self.piecewise = piecewise  # also the piecewise graphs, for the steps whole graphs cannot take
        self.device = runner.device
        self.sizes = token_buckets(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.max_seqs = max_seqs
        self.capture_graphs = capture
        t, s = self.max_tokens, max_seqs
        # [ids T | positions T | slots T | logit rows S | query offsets S + 2]
        self._off = {"ids": 0, "positions": t, "slots": 2 * t, "rows": 3 * t, "cu": 3 * t + s}
        n = 3 * t + 2 * s + 2
        self._dev = torch.zeros(n, dtype=torch.int64, device=self.device)
        pin = self.device.type == "cuda"
        self._hosts = [torch.zeros(n, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._host_np = [h.numpy() for h in self._hosts]
        self._events: list = [None, None]
        self._turn = 0
        self._tables = torch.zeros(s + 1, 1, dtype=torch.int32, device=self.device)  # dense steps read no pages
        self.graphs: dict[int, list] = {}
        self.logits: dict[int, torch.Tensor] = {}
        # Piecewise: per bucket the replay's program, ("graph", g) | ("attend", fn, staged inputs, out) |
        # ("hook", layer), and its final hidden states; the attention's static inputs by (position, dtype)
        # and outputs by dtype, flat, shared by every layer and bucket (sized by the largest bucket's warm-up).
        self.pieces: dict[int, list] = {}
        self.piece_hidden: dict[int, torch.Tensor] = {}
        self._staging: dict[tuple, torch.Tensor] = {}
        self._attn_out: dict[torch.dtype, torch.Tensor] = {}
        self._step_meta: AttentionMetadata | None = None  # the step a piecewise forward attends for
        self.pool = None

    # ---------------------------------------------------------------- eligibility
    def bucket(self, num_tokens: int) -> int | None:
        return next((b for b in self.sizes if b >= num_tokens), None)

    def can_run(self, chunks: list) -> bool:
        """A step that fits a bucket: prefill-only over at most `max_seqs` fresh sequences (whole graphs),
        or with piecewise graphs any step (chunks over cached prefixes, decodes beside them, any number of
        sequences, prompt logprobs: the logits are computed from the hidden states after the graphs)."""
        if len(chunks) > self.max_seqs and not self.piecewise:
            return False
        total = 0
        for c in chunks:  # (no fork chunks: the runner passes those that compute; a fork draws from its row)
            if (c.start != 0 or computes_prompt_logprobs(c)) and not self.piecewise:
                return False
            total += c.num_new_tokens
        return self.bucket(total) is not None

    def _whole(self, inputs) -> bool:
        """The whole-graph path: every sequence starts at position 0 and has a logits slot."""
        return inputs.query_lens == inputs.seq_lens and len(inputs.query_lens) <= self.max_seqs

    # ---------------------------------------------------------------- the forward
    def _views(self, t: int):
        d, o = self._dev, self._off
        return (d[o["ids"]: o["ids"] + t], d[o["positions"]: o["positions"] + t], d[o["slots"]: o["slots"] + t],
                d[o["rows"]: o["rows"] + self.max_seqs], d[o["cu"]: o["cu"] + self.max_seqs + 2])

    def _body(self, t: int, on_layer_done=None, attention_cut=None) -> torch.Tensor:
        """The padded forward of bucket `t` over the static inputs: logits `[S, vocab]`; with
        `attention_cut` the piecewise forward, its attention handed to that callable, and the final hidden
        states `[t, hidden]` (the step's logits rows are picked and projected after the graphs)."""
        r = self.runner
        ids, pos, slots, rows, cu64 = self._views(t)
        cu = cu64.to(torch.int32)
        lens = [t] + [0] * self.max_seqs  # host bounds only: max() is the flash kernel's length bound
        meta = AttentionMetadata(num_decode_tokens=0, query_start_loc=cu, seq_lens=cu[1:] - cu[:-1],
                                 block_tables=self._tables, slot_mapping=slots, max_query_len=t, max_seq_len=t,
                                 query_lens_cpu=lens, seq_lens_cpu=lens, page_size=r.page_size)
        if attention_cut == self._eager_cut and self._step_meta is None:  # a warm-up: attend over this layout
            self._step_meta = meta
        batch = ForwardBatch(meta, r.kv_pool.layers, r.backend, None, on_layer_done, attention_cut)
        hidden = r.model(ids, pos, batch)
        if attention_cut is not None:
            return hidden
        return r.model.compute_logits(hidden.index_select(0, rows))

    # ---------------------------------------------------------------- the piecewise attention
    def _static(self, store: dict, key, numel: int, dtype: torch.dtype, allocate: bool) -> torch.Tensor:
        """`numel` elements of the flat static buffer `store[key]`, allocated (zeroed: the padding rows of
        an attention output are read) or grown only outside capture."""
        buf = store.get(key)
        if buf is None or buf.numel() < numel:
            if not allocate:
                raise RuntimeError(f"piecewise prefill graph: no static buffer of {numel} elements for {key}")
            buf = store[key] = torch.zeros(numel, dtype=dtype, device=self.device)
        return buf[:numel]

    def _handover(self, inputs, out_shape, allocate: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The attention's inputs copied into their static buffers (inside the graph being captured), and
        the static tensor its output goes to."""
        staged = []
        for j, x in enumerate(inputs):
            st = self._static(self._staging, (j, x.dtype), x.numel(), x.dtype, allocate).view(x.shape)
            st.copy_(x)
            staged.append(st)
        dtype = inputs[0].dtype
        return staged, self._static(self._attn_out, dtype, math.prod(out_shape), dtype, allocate).view(out_shape)

    def _attend(self, fn, staged: list[torch.Tensor], out: torch.Tensor) -> None:
        """The eager attention of a piecewise step over its real metadata, into the static output: the
        step's own rows only (the padding rows keep what they held)."""
        meta = self._step_meta
        n = meta.num_tokens
        out[:n].copy_(fn(meta, *(x[:n] for x in staged)))

    def _eager_cut(self, fn, inputs, out_shape) -> torch.Tensor:
        """The piecewise forward run eagerly (warm-up; `capture=False`): the replay's data path, inline."""
        staged, out = self._handover(inputs, out_shape, allocate=True)
        self._attend(fn, staged, out)
        return out

    def _neutral_inputs(self, t: int) -> None:
        """Inputs no step owns (capture and warm-up): one padding sequence of `t` tokens, no KV writes."""
        o, s = self._off, self.max_seqs
        self._dev.zero_()
        self._dev[o["slots"]: o["slots"] + self.max_tokens].fill_(-1)
        self._dev[o["cu"] + s + 1] = t

    @torch.inference_mode()
    def capture(self) -> bool:
        """Warm up and capture every bucket, largest first; False (and nothing kept) if the forward
        cannot be captured (a per-sequence fallback somewhere, an op that syncs)."""
        if not self.capture_graphs:
            return True
        torch.cuda.synchronize(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        try:
            for t in reversed(self.sizes):
                self._neutral_inputs(t)
                self._body(t)  # Triton compilation and autotuning outside capture
                torch.cuda.synchronize(self.device)
                self.graphs[t], self.logits[t] = self._capture_bucket(t, stream)
        except RuntimeError as e:
            log.warning("prefill CUDA graphs not captured (%s); prefill runs eagerly", e)
            self.graphs.clear()
            self.logits.clear()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            return False
        if self.piecewise:
            try:
                for t in reversed(self.sizes):  # the largest first: its warm-up sizes the static buffers
                    self._neutral_inputs(t)
                    try:
                        self._body(t, attention_cut=self._eager_cut)
                    finally:
                        self._step_meta = None
                    torch.cuda.synchronize(self.device)
                    self.pieces[t], self.piece_hidden[t] = self._capture_pieces(t, stream)
            except Exception as e:  # noqa: BLE001 — any failure costs the piecewise graphs, never the engine
                log.warning("piecewise prefill CUDA graphs not captured (%s: %s); steps over cached prefixes or "
                            "with decodes run eagerly", type(e).__name__, e)
                self.piecewise = False
                self.pieces.clear()
                self.piece_hidden.clear()
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
        torch.cuda.synchronize(self.device)
        log.info("captured prefill CUDA graphs for %s tokens, up to %d sequences, %d graphs per bucket%s",
                 self.sizes, self.max_seqs, len(self.graphs[self.sizes[0]]),
                 f"; piecewise for the other steps, {sum(e[0] == 'graph' for e in self.pieces[self.sizes[0]])} "
                 "graphs per bucket" if self.piecewise else "")
        return True

    def _capture_bucket(self, t: int, stream) -> tuple[list, torch.Tensor]:
        graphs = [torch.cuda.CUDAGraph()]

        def cut(_layer: int) -> None:  # end this layer's graph, begin the next one's
            graphs[-1].capture_end()
            graphs.append(torch.cuda.CUDAGraph())
            graphs[-1].capture_begin(pool=self.pool)

        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            graphs[0].capture_begin(pool=self.pool)
            try:
                logits = self._body(t, cut)
            finally:
                graphs[-1].capture_end()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return graphs, logits

    def _capture_pieces(self, t: int, stream) -> tuple[list, torch.Tensor]:  # (program, final hidden)
        """Bucket `t`'s piecewise program: graphs cut at every attention and after every layer."""
        program: list = []

        def begin() -> None:
            g = torch.cuda.CUDAGraph()
            program.append(("graph", g))
            g.capture_begin(pool=self.pool)

        def end() -> None:  # the graph begun last is the program's last entry
            program[-1][1].capture_end()

        def cut_attention(fn, inputs, out_shape) -> torch.Tensor:
            staged, out = self._handover(inputs, out_shape, allocate=False)
            end()
            program.append(("attend", fn, staged, out))
            begin()
            return out

        def cut_layer(layer: int) -> None:
            end()
            program.append(("hook", layer))
            begin()

        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            begin()
            try:
                hidden = self._body(t, cut_layer, cut_attention)
            finally:
                end()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return program, hidden

    # ---------------------------------------------------------------- a step
    def _fill(self, inputs, t: int, whole: bool = True) -> None:
        """The step's ids and positions, and for the whole graphs (`whole`) its KV slots, logits rows and
        query offsets, into the pinned copy, uploaded (a piecewise step's slots come from its metadata)."""
        self._turn ^= 1
        ev = self._events[self._turn]
        if ev is not None:
            ev.synchronize()
        h, o, s = self._host_np[self._turn], self._off, self.max_seqs
        ps = self.runner.page_size
        n = len(inputs.ids)
        h[o["ids"]: o["ids"] + n] = inputs.ids
        h[o["ids"] + n: o["ids"] + t] = 0
        h[o["positions"]: o["positions"] + n] = inputs.positions
        h[o["positions"] + n: o["positions"] + t] = 0
        if whole:
            slots = h[o["slots"]: o["slots"] + t]
            at = 0
            for q, table in zip(inputs.query_lens, inputs.tables):  # every sequence starts at position 0
                pages = np.asarray(table[: -(-q // ps)], dtype=np.int64)
                slots[at: at + q] = (pages[:, None] * ps + np.arange(ps)).reshape(-1)[:q]
                at += q
            slots[n:] = -1
            rows = h[o["rows"]: o["rows"] + s]
            rows[:] = 0
            rows[: len(inputs.logits_rows)] = inputs.logits_rows
            cu = h[o["cu"]: o["cu"] + s + 2]
            cu[0] = 0
            cu[1: len(inputs.query_lens) + 1] = np.cumsum(inputs.query_lens)
            cu[len(inputs.query_lens) + 1: s + 1] = n
            cu[s + 1] = t
        src = self._hosts[self._turn]
        self._dev.copy_(src, non_blocking=True)  # one copy: the few KiB of padding cost less than a second one
        if self.device.type == "cuda":
            ev = self._events[self._turn] or torch.cuda.Event()
            ev.record()
            self._events[self._turn] = ev

    @torch.inference_mode()  # as capture(): the static buffers are inference tensors
    def run(self, inputs, layer_hook=None, prev=None, prompt_logprob_chunks: list | None = None) -> torch.Tensor:
        """One step (`inputs`: the runner's `_StepInputs`; tokens still pending on the host are `prev`'s
        draws, patched into the static inputs on the device): the logits of its sampling sequences, in
        order. `layer_hook(i)` runs after layer i's graph, as in the eager forward. `prompt_logprob_chunks`:
        the step's chunks when some want prompt logprobs (piecewise: every row's hidden state is kept)."""
        t = self.bucket(len(inputs.ids))
        whole = self._whole(inputs) and not prompt_logprob_chunks
        self._fill(inputs, t, whole)
        if inputs.pending:
            self.runner._patch_pending(self._views(t)[0], inputs, prev)
        if not whole:
            return self._run_pieces(inputs, t, layer_hook, prompt_logprob_chunks)
        if not self.capture_graphs:
            logits = self._body(t, layer_hook)
        else:
            graphs = self.graphs[t]
            last = len(graphs) - 1
            for i, g in enumerate(graphs):
                g.replay()
                if layer_hook is not None and i < last:
                    layer_hook(i)
            logits = self.logits[t]
        return logits[: len(inputs.logits_rows)]

    def _run_pieces(self, inputs, t: int, layer_hook=None, prompt_logprob_chunks: list | None = None) -> torch.Tensor:
        """A step over cached prefixes or with decodes: the piecewise program of bucket `t`, its attention
        over the step's metadata (built as the eager step builds it)."""
        r = self.runner
        self._step_meta = meta = AttentionMetadata.build(inputs.query_lens, inputs.seq_lens, inputs.tables,
                                                         r.page_size, self.device)
        n, slots = len(inputs.ids), self._views(t)[2]
        slots[:n].copy_(meta.slot_mapping)  # after the upload of the static inputs, in stream order
        slots[n:].fill_(-1)
        try:
            if not self.capture_graphs:
                hidden = self._body(t, layer_hook, self._eager_cut)
            else:
                for entry in self.pieces[t]:
                    if entry[0] == "graph":
                        entry[1].replay()
                    elif entry[0] == "attend":
                        self._attend(*entry[1:])
                    elif layer_hook is not None:
                        layer_hook(entry[1])
                hidden = self.piece_hidden[t]
        finally:
            self._step_meta = None
        # the prompt logprobs read their rows now (the collector syncs), before a later step overwrites them
        return r.step_logits(hidden, inputs, prompt_logprob_chunks)
