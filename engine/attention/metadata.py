"""Batch metadata every attention backend reads: where each sequence's queries are, how long its
KV is, which pages hold it and where this step's new KV goes.

The batch is flattened ("varlen"): all new tokens of all sequences in one `[T, ...]` tensor.
Sequences are ordered decodes first (query length 1), then prefill chunks, so backends can run
a decode kernel on the first `num_decode_tokens` rows and a prefix-prefill kernel on the rest.
Query token `i` of sequence `b` sits at position `seq_lens[b] - query_len[b] + i` and attends
causally to KV positions `0 .. that position`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def page_table_tensor(page_tables: list[list[int]], width: int | None = None) -> torch.Tensor:
    """`[B, width]` int32 block table from per-sequence page lists, zero-padded: one numpy array filled
    row by row, then shared with torch (a tensor per row costs a host round of allocations per sequence
    per step; one torch.tensor of padded lists 3× the time: 1.3 ms at 200 sequences of 128 pages)."""
    width = max(width if width is not None else max((len(t) for t in page_tables), default=1), 1)
    out = np.zeros((len(page_tables), width), dtype=np.int32)
    for row, table in zip(out, page_tables):
        if table:
            row[: len(table)] = table
    return torch.from_numpy(out)


def _slots(query_lens: list[int], seq_lens: list[int], starts: list[int], page_tables: list[list[int]],
           tables: torch.Tensor, page_size: int) -> torch.Tensor:
    """int64 `[T]` flat KV slot of every new token, `page * page_size + offset` (a few whole-tensor ops
    on the host: a Python loop per token cost ~1 ms per 2k-token step)."""
    total = starts[-1]
    if total <= 256:  # a few tokens (decode steps): the plain loop costs less than the tensor ops
        return torch.tensor([table[pos // page_size] * page_size + pos % page_size
                             for q, s, table in zip(query_lens, seq_lens, page_tables)
                             for pos in range(s - q, s)], dtype=torch.int64)
    q = torch.tensor(query_lens, dtype=torch.int64)
    first = torch.tensor(seq_lens, dtype=torch.int64) - q  # position of each sequence's first new token
    seq, pos = _flat_positions(q, torch.tensor(starts[:-1], dtype=torch.int64), total, first)
    return tables[seq, pos // page_size].long() * page_size + pos % page_size


def _flat_positions(counts: torch.Tensor, starts: torch.Tensor, total: int,
                    first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, position) of each of `total` rows holding sequences back to back: sequence b has
    `counts[b]` rows from row `starts[b]`, at positions `first[b]` (0 if None) onwards. int64, on
    `counts`' device; `total` is the host's sum, so nothing syncs."""
    dev = counts.device
    seq = torch.repeat_interleave(torch.arange(len(counts), device=dev), counts, output_size=total)
    pos = torch.arange(total, device=dev) - starts[seq]
    return seq, pos if first is None else pos + first[seq]


@dataclass
class AttentionMetadata:
    num_decode_tokens: int  # == number of decode sequences (they come first)
    query_start_loc: torch.Tensor  # int32 [B+1], cumulative query lengths
    seq_lens: torch.Tensor  # int32 [B], KV length after this step (context + new tokens)
    block_tables: torch.Tensor  # int32 [B, max_pages], page ids; padding entries are 0
    slot_mapping: torch.Tensor  # int64 [T], page * page_size + offset for each new token; -1 = skip
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    page_size: int
    # A bound on every decode sequence's length that the decode kernels may size their split-KV launch
    # by (fewer splits for short contexts); set only by a short-context decode graph (engine/cuda_graph.py),
    # whose replays it holds. None: the kernels size for any length.
    decode_context_bound: int | None = None

    def context_index(self, first_seq: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(page ids, offsets in the page) of every cached position 0 .. seq_len - 1 of sequences
        `first_seq ..` back to back, and their cumulative lengths (int32 `[n + 1]`): where a prefill
        over cached prefixes reads whole sequences back from a paged pool. Built on the device once per
        step (every layer reads the same positions) from the lengths the host already knows."""
        cache = self.__dict__.setdefault("_context_index", {})
        if first_seq not in cache:
            lens = self.seq_lens[first_seq:].long()
            cu = torch.zeros(len(lens) + 1, dtype=torch.int32, device=lens.device)
            torch.cumsum(lens, 0, out=cu[1:])
            seq, pos = _flat_positions(lens, cu[:-1].long(), sum(self.seq_lens_cpu[first_seq:]))
            pages = self.block_tables[first_seq:][seq, pos // self.page_size].long()
            cache[first_seq] = (pages, pos % self.page_size, cu)
        return cache[first_seq]

    def split(self, num_decodes: int) -> tuple["AttentionMetadata", "AttentionMetadata"]:
        """(the first `num_decodes` sequences' metadata, the rest's): a step's decodes and its prefill
        chunks attended separately (their rows of the step's tensors are `[:num_decodes]` and the rest).
        Built once per step (every layer asks)."""
        cache = self.__dict__.setdefault("_split", {})
        if num_decodes in cache:
            return cache[num_decodes]
        n = num_decodes
        decodes = AttentionMetadata(
            num_decode_tokens=n, query_start_loc=self.query_start_loc[: n + 1], seq_lens=self.seq_lens[:n],
            block_tables=self.block_tables[:n], slot_mapping=self.slot_mapping[:n], max_query_len=1,
            max_seq_len=max(self.seq_lens_cpu[:n], default=0), query_lens_cpu=self.query_lens_cpu[:n],
            seq_lens_cpu=self.seq_lens_cpu[:n], page_size=self.page_size,
            decode_context_bound=self.decode_context_bound)
        chunks = AttentionMetadata(
            num_decode_tokens=0, query_start_loc=self.query_starts_from(n), seq_lens=self.seq_lens[n:],
            block_tables=self.block_tables[n:], slot_mapping=self.slot_mapping[n:],
            max_query_len=max(self.query_lens_cpu[n:], default=0), max_seq_len=max(self.seq_lens_cpu[n:], default=0),
            query_lens_cpu=self.query_lens_cpu[n:], seq_lens_cpu=self.seq_lens_cpu[n:], page_size=self.page_size)
        cache[num_decodes] = decodes, chunks
        return decodes, chunks

    def query_starts_from(self, first_seq: int) -> torch.Tensor:
        """int32 `[n + 1]` cumulative query lengths of sequences `first_seq ..`, starting at 0."""
        cache = self.__dict__.setdefault("_query_starts", {})
        if first_seq not in cache:
            cache[first_seq] = self.query_start_loc[first_seq:] - self.query_start_loc[first_seq]
        return cache[first_seq]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(sum(self.query_lens_cpu))

    @property
    def num_decodes(self) -> int:
        return self.num_decode_tokens

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], page_tables: list[list[int]],
              page_size: int, device: torch.device | str = "cpu",
              max_pages: int | None = None) -> "AttentionMetadata":
        """Build metadata from plain lists; `page_tables[b]` must cover `seq_lens[b]` tokens."""
        if not (len(query_lens) == len(seq_lens) == len(page_tables)):
            raise ValueError("query_lens, seq_lens and page_tables must have one entry per sequence")
        num_decodes = 0
        for q in query_lens:
            if q != 1:
                break
            num_decodes += 1
        if any(q == 1 for q in query_lens[num_decodes:]) and any(q > 1 for q in query_lens[:num_decodes]):
            raise ValueError("decode sequences (query length 1) must come before prefill chunks")
        for q, s, table in zip(query_lens, seq_lens, page_tables):
            if q < 1 or q > s:
                raise ValueError(f"query length {q} must be in [1, seq_len={s}]")
            if len(table) * page_size < s:
                raise ValueError(f"page table of {len(table)} pages cannot hold {s} tokens")
        tables = page_table_tensor(page_tables, max_pages)
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        return cls(
            num_decode_tokens=num_decodes,
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=tables.to(device),
            slot_mapping=_slots(query_lens, seq_lens, qsl, page_tables, tables, page_size).to(device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            page_size=page_size,
        )
