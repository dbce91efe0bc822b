"""AttentionMetadata.build's slot mapping (whole-tensor ops) against the per-token definition, on random
batches of decodes and prefill chunks with and without cached prefixes, several page sizes."""
from __future__ import annotations

import random

import pytest
import torch

from engine.attention.metadata import AttentionMetadata


def test_slot_mapping_is_each_new_tokens_page_slot():
    rng = random.Random(0)
    for _ in range(200):
        page = rng.choice([1, 4, 16])
        batch = rng.randint(1, 6)
        decodes = rng.randint(0, batch)
        query_lens, seq_lens, tables = [], [], []
        for i in range(batch):
            s = rng.randint(2, 60)
            q = 1 if i < decodes else rng.randint(2, s)
            query_lens.append(q)
            seq_lens.append(s)
            tables.append(rng.sample(range(500), -(-s // page) + rng.randint(0, 2)))
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, page)
        want = [t[p // page] * page + p % page for q, s, t in zip(query_lens, seq_lens, tables) for p in range(s - q, s)]
        assert meta.slot_mapping.dtype == torch.int64
        assert meta.slot_mapping.tolist() == want
        assert meta.query_start_loc.tolist()[-1] == len(want) == meta.num_tokens


def test_an_empty_batch_and_bad_lengths():
    assert AttentionMetadata.build([], [], [], 16).slot_mapping.numel() == 0
    with pytest.raises(ValueError, match="query length"):
        AttentionMetadata.build([5], [3], [[0]], 16)
    with pytest.raises(ValueError, match="cannot hold"):
        AttentionMetadata.build([20], [20], [[0]], 16)


def test_context_index_reads_each_sequence_back_from_its_pages():
    from engine.attention.torch_backend import gather_kv
    rng = random.Random(1)
    page = 4
    pool = torch.randn(40, 1, page, 1, 6)
    seq_lens = [9, 1, 16, 5]
    query_lens = [3, 1, 16, 2]
    tables = [rng.sample(range(40), -(-s // page)) for s in seq_lens]
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, page)
    pages, offsets, cu = meta.context_index()
    assert meta.context_index()[0] is pages  # built once per step
    got = pool[pages, 0, offsets, 0]
    want = torch.cat([gather_kv(pool, 0, meta.block_tables[b], s)[:, 0] for b, s in enumerate(seq_lens)])
    assert torch.equal(got, want)
    assert cu.tolist() == [0, 9, 10, 26, 31]
