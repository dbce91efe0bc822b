"""Compares the Triton attention backend with the torch reference on random paged batches.
Run as a script (under TRITON_INTERPRET=1 on CPU, natively on CUDA); exits non-zero on mismatch.
Usage: python -m tests.engine.kernels.check_attention [device] [size: small|real]"""
from __future__ import annotations

import random
import sys

import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend
from engine.attention.triton_backend import TritonAttentionBackend


def _batch(rng, query_lens, ctx_lens, page_size, num_pages, device):
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    free = list(range(1, num_pages))
    rng.shuffle(free)
    tables = []
    for s in seq_lens:
        n = -(-s // page_size)
        tables.append([free.pop() for _ in range(n)])
    return AttentionMetadata.build(query_lens, seq_lens, tables, page_size, device)


def check(kind, query_lens, ctx_lens, page_size, heads, kv_heads, dims, dtype, device, seed=0) -> float:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    meta = _batch(rng, query_lens, ctx_lens, page_size, 64 + sum(c + q for c, q in zip(ctx_lens, query_lens)) // page_size, device)
    num_pages = int(meta.block_tables.max()) + 2
    t = sum(query_lens)
    results = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        g = torch.Generator(device="cpu").manual_seed(seed)
        if kind == "gqa":
            d = dims
            cache = torch.randn(num_pages, 2, page_size, kv_heads, d, generator=g).to(device, dtype)
            q = torch.randn(t, heads, d, generator=g).to(device, dtype)
            k = torch.randn(t, kv_heads, d, generator=g).to(device, dtype)
            v = torch.randn(t, kv_heads, d, generator=g).to(device, dtype)
            out = backend.gqa(q, k, v, cache, meta, d ** -0.5)
        else:
            r, p = dims
            cache = torch.randn(num_pages, 1, page_size, 1, r + p, generator=g).to(device, dtype)
            q = torch.randn(t, heads, r + p, generator=g).to(device, dtype)
            lat = torch.randn(t, r + p, generator=g).to(device, dtype)
            out = backend.mla(q, lat, cache, meta, (r + p) ** -0.5, r)
        results.append((out.float(), cache.float()))
    (ref, ref_cache), (got, got_cache) = results
    assert torch.equal(ref_cache, got_cache), "KV write differs"
    return (ref - got).abs().max().item()


def cases(size: str):
    if size == "small":
        gqa = dict(heads=4, kv_heads=2, dims=16)
        mla = dict(heads=4, kv_heads=1, dims=(16, 8))
        return [
            ("gqa decode", "gqa", [1, 1, 1], [5, 17, 0], 4, gqa),
            # enough sequences x KV heads for one split per sequence: no merge, direct store
            ("gqa decode one split", "gqa", [1] * 34, [(7 * i) % 23 for i in range(34)], 4,
             dict(heads=8, kv_heads=4, dims=16)),
            ("gqa prefill", "gqa", [7, 20], [0, 0], 4, gqa),
            ("gqa mixed + prefix", "gqa", [1, 1, 9, 3], [30, 3, 12, 40], 16, gqa),
            ("gqa group 1", "gqa", [1, 6], [10, 5], 4, dict(heads=2, kv_heads=2, dims=16)),
            ("mla decode", "mla", [1, 1], [33, 2], 4, mla),
            ("mla mixed + prefix", "mla", [1, 5, 18], [9, 0, 21], 16, mla),
        ]
    qwen = dict(heads=32, kv_heads=8, dims=128)
    lite = dict(heads=16, kv_heads=1, dims=(512, 64))
    return [
        ("qwen3-8b decode b64 ctx2k", "gqa", [1] * 64, [2048] * 64, 16, qwen),
        ("qwen3-8b decode b1 ctx8k", "gqa", [1], [8192], 16, qwen),
        ("qwen3-8b prefill 2k + mixed", "gqa", [1, 1, 2048, 300], [100, 5000, 0, 700], 16, qwen),
        ("v2-lite decode b16 ctx2k", "mla", [1] * 16, [2048] * 16, 16, lite),
        ("v2-lite prefill 1k + prefix", "mla", [1, 1024], [64, 512], 16, lite),
    ]


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    size = sys.argv[2] if len(sys.argv) > 2 else "small"
    dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]
    bad = 0
    for dtype in dtypes:
        tol = 2e-4 if dtype == torch.float32 else 2e-2
        for name, kind, ql, cl, ps, kw in cases(size):
            err = check(kind, ql, cl, ps, kw["heads"], kw["kv_heads"], kw["dims"], dtype, device)
            ok = err < tol
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {name} {dtype}: max abs err {err:.2e} (tol {tol})", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
