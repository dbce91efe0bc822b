"""CUDA graphs for pure-decode steps.

A decode step of a few sequences launches hundreds of small kernels; on a slow host CPU the
launches, not the GPU, set the step time. We capture the model forward + logits once per batch
size bucket over static input buffers and replay it. Padded rows (batch rounded up to a bucket)
write no KV (slot -1) and attend to one cached position of page 0; their logits are dropped.
The attention backend's decode path and the MoE kernels must be capture-safe (no host syncs,
shapes depend only on the batch size).
"""
from __future__ import annotations

import logging

import torch

from engine.attention.metadata import AttentionMetadata, page_table_tensor
from engine.forward_batch import ForwardBatch

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
        self.max_batch = self.sizes[-1]
        dev, n = self.device, self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros((n, runner.max_pages_per_seq), dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            num_decode_tokens=bs, query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs], max_query_len=1,
            max_seq_len=self.runner.max_model_len, query_lens_cpu=[1] * bs, seq_lens_cpu=[1] * bs,
            page_size=self.runner.page_size)

    def _forward(self, bs: int) -> torch.Tensor:
        r = self.runner
        batch = ForwardBatch(self._metadata(bs), r.kv_pool.layers, r.backend)
        hidden = r.model(self.input_ids[:bs], self.positions[:bs], batch)
        return r.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        torch.cuda.synchronize(self.device)
        for bs in reversed(self.sizes):  # largest first so smaller graphs reuse its memory pool
            self._forward(bs)  # warm-up: Triton compilation and autotuning happen outside capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, chunks: list) -> bool:
        return len(chunks) <= self.max_batch and all(c.num_new_tokens == 1 and c.sample for c in chunks)

    def run(self, chunks: list, inputs, patch_pending) -> torch.Tensor:
        """Replay the bucket for `chunks` (all decodes) with the runner's `inputs`; `patch_pending`
        fills input ids the host has not seen yet from the step in flight, on the device."""
        b = len(chunks)
        bs = next(s for s in self.sizes if s >= b)
        ps = self.runner.page_size
        slots = [c.request.page_ids[c.start // ps] * ps + c.start % ps for c in chunks]
        table = page_table_tensor([c.request.page_ids for c in chunks])
        width = table.shape[1]
        self.input_ids[:b].copy_(torch.tensor(inputs.ids), non_blocking=True)
        patch_pending(self.input_ids[:b])
        self.positions[:b].copy_(torch.tensor(inputs.positions), non_blocking=True)
        self.seq_lens[:b].copy_(torch.tensor(inputs.seq_lens, dtype=torch.int32), non_blocking=True)
        self.slot_mapping[:b].copy_(torch.tensor(slots), non_blocking=True)
        self.block_tables[:b, :width].copy_(table, non_blocking=True)
        if bs > b:
            self.seq_lens[b:bs].fill_(1)
            self.slot_mapping[b:bs].fill_(-1)
            self.block_tables[b:bs].zero_()
        self.graphs[bs].replay()
        return self.logits[bs][:b]
