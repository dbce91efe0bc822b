"""Compares the Triton MLA decode kernel with its torch reference and with the torch attention
backend's paged reference, on random paged batches (shuffled pages, ragged lengths, split counts
that leave some splits empty). Run as a script (under TRITON_INTERPRET=1 on CPU, natively on CUDA);
exits non-zero on mismatch. Usage: python -m tests.engine.kernels.check_mla_decode [device] [small|real]"""
from __future__ import annotations

import dataclasses
import random
import sys

import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_backend import paged_attention_ref
from engine.kernels.mla_decode import choose_config, mla_decode, mla_decode_ref


def check(heads, rank, rope, page_size, seq_lens, dtype, device, splits=None, value_splits=None,
          seed=0) -> tuple[float, float]:
    """Max abs error of the kernel against (its reference, the torch backend's reference)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    num_pages = 8 + sum(-(-s // page_size) for s in seq_lens)
    free = list(range(1, num_pages))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-s // page_size))] for s in seq_lens]
    meta = AttentionMetadata.build([1] * len(seq_lens), seq_lens, tables, page_size, device)
    cache = torch.randn(num_pages, 1, page_size, 1, rank + rope, generator=g).to(device, dtype)
    q = torch.randn(len(seq_lens), heads, rank + rope, generator=g).to(device, dtype)
    scale = (rank + rope) ** -0.5
    cfg = choose_config(len(seq_lens), heads, torch.device(device))
    if splits is not None:
        cfg = dataclasses.replace(cfg, num_splits=splits)
    if value_splits is not None:
        cfg = dataclasses.replace(cfg, value_splits=value_splits)
    got = mla_decode(q, cache, meta.block_tables, meta.seq_lens, scale, rank, config=cfg).float()
    ref = mla_decode_ref(q, cache, meta.block_tables, meta.seq_lens, scale, rank).float()
    backend = paged_attention_ref(q, cache, meta, scale, v_component=0, v_dim=rank).float()
    return (got - ref).abs().max().item(), (got - backend).abs().max().item()


def check_graph_replay(device, seed=0) -> float:
    """Capture the kernel in a CUDA graph at one set of lengths, replay it after the lengths and
    page tables changed in place (as the engine's decode graphs do); error of the replay."""
    g = torch.Generator().manual_seed(seed)
    batch, heads, rank, rope, page, max_pages = 5, 128, 512, 64, 16, 40
    cache = torch.randn(batch * max_pages + 1, 1, page, 1, rank + rope, generator=g).to(device, torch.bfloat16)
    q = torch.randn(batch, heads, rank + rope, generator=g).to(device, torch.bfloat16)
    tables = (torch.randperm(batch * max_pages, generator=g) + 1).int().view(batch, max_pages).to(device)
    seq_lens = torch.ones(batch, dtype=torch.int32, device=device)
    out = torch.empty(batch, heads, rank, dtype=torch.bfloat16, device=device)
    mla_decode(q, cache, tables, seq_lens, 0.05, rank, out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mla_decode(q, cache, tables, seq_lens, 0.05, rank, out)
    seq_lens.copy_(torch.tensor([1, 640, 17, 333, 129], dtype=torch.int32))
    tables.copy_(tables.flip(0))
    graph.replay()
    ref = mla_decode_ref(q, cache, tables, seq_lens, 0.05, rank)
    return (out.float() - ref.float()).abs().max().item()


def cases(size: str):
    """(name, heads, R, P, page_size, seq_lens, splits, value splits); None: the default rule."""
    if size == "small":
        return [
            ("one split, 4 heads", 4, 32, 8, 4, [1, 7, 33], 1, None),
            ("default splits, ragged", 4, 32, 8, 16, [5, 17, 40, 2, 64], None, None),
            ("3 splits, some empty", 20, 16, 8, 4, [1, 3, 50], 3, None),
            ("more splits than tiles", 16, 16, 8, 8, [9, 70], 8, None),
            ("two value splits, one split", 20, 32, 8, 4, [1, 7, 45], 1, 2),
            ("two value splits, 3 splits", 4, 32, 8, 16, [5, 40, 2], 3, 2),
        ]
    v3 = (128, 512, 64)
    lite = (16, 512, 64)
    return [
        ("v3 b128 ctx4k", *v3, 16, [4097] * 128, None, None),
        ("v3 b64 ragged", *v3, 16, [random.Random(1).randint(1, 5000) for _ in range(64)], None, None),
        ("v3 b3 short, splits", *v3, 64, [1, 15, 300], None, None),
        ("v3 b1 ctx1k, 7 splits", *v3, 16, [1025], 7, None),
        ("v3 b64 ragged, two value splits", *v3, 16, [random.Random(3).randint(1, 5000) for _ in range(64)], 1, 2),
        ("v3 b5, 3 splits, two value splits", *v3, 16, [1, 700, 4097, 33, 2000], 3, 2),
        ("v2-lite b16 ctx4k", *lite, 16, [4097] * 16, None, None),
        ("v2-lite b37 ragged", *lite, 16, [random.Random(2).randint(1, 3000) for _ in range(37)], None, None),
        ("tp8 v3 shard: 16 heads b128", *lite, 16, [1024] * 128, None, None),
    ]


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    size = sys.argv[2] if len(sys.argv) > 2 else "small"
    dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16]
    bad = 0
    for dtype in dtypes:
        tol = 2e-4 if dtype == torch.float32 else 2e-2
        for name, heads, rank, rope, page, lens, splits, value_splits in cases(size):
            err_ref, err_backend = check(heads, rank, rope, page, lens, dtype, device, splits, value_splits)
            ok = max(err_ref, err_backend) < tol
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {name} {dtype}: max abs err {err_ref:.2e} vs reference, "
                  f"{err_backend:.2e} vs torch backend (tol {tol})", flush=True)
    if device == "cuda":
        err = check_graph_replay(device)
        bad += err >= 2e-2
        print(f"{'ok ' if err < 2e-2 else 'BAD'} cuda graph replay with new lengths: max abs err {err:.2e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
