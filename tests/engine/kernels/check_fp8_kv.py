"""The Triton attention backend over an FP8 (e4m3) KV cache against the torch reference over the
same FP8 cache: KV writes must land bit-identical, outputs agree. Interpreter on CPU, native on CUDA.
Usage: python -m tests.engine.kernels.check_fp8_kv [device]"""
from __future__ import annotations

import random
import sys

import torch

from engine.attention.torch_backend import TorchAttentionBackend
from engine.attention.triton_backend import TritonAttentionBackend
from tests.engine.kernels.check_attention import _batch


def _no_subnormals(x: torch.Tensor) -> torch.Tensor:
    """Triton's interpreter flushes e4m3 subnormals (|x| < 2^-6) to zero; keep written values above."""
    return torch.where(x.abs() < 2 ** -5, torch.full_like(x, 2 ** -5), x)


def check(kind, query_lens, ctx_lens, device, page_size=4, heads=4, kv_heads=2, d=16, rank=(16, 8)) -> float:
    meta = _batch(random.Random(0), query_lens, ctx_lens, page_size, 64, device)
    num_pages = int(meta.block_tables.max()) + 2
    t = sum(query_lens)
    results = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        g = torch.Generator().manual_seed(0)
        if kind == "gqa":
            cache = (torch.randn(num_pages, 2, page_size, kv_heads, d, generator=g) * 3).to(device, torch.float8_e4m3fn)
            q, k, v = (_no_subnormals(torch.randn(t, h, d, generator=g) * 3).to(device)
                       for h in (heads, kv_heads, kv_heads))
            k[0, 0, 0] = 1000.0  # beyond e4m3's range: saturates to 448
            out = backend.gqa(q, k, v, cache, meta, d ** -0.5)
        else:
            r, p = rank
            cache = torch.randn(num_pages, 1, page_size, 1, r + p, generator=g).to(device, torch.float8_e4m3fn)
            q = torch.randn(t, heads, r + p, generator=g).to(device)
            lat = _no_subnormals(torch.randn(t, r + p, generator=g) * 3).to(device)
            out = backend.mla(q, lat, cache, meta, (r + p) ** -0.5, r)
        results.append((out.float(), cache.float()))
    (ref, ref_cache), (got, got_cache) = results
    assert torch.equal(ref_cache, got_cache), "FP8 KV write differs"
    assert ref_cache.abs().max() <= 448
    return (ref - got).abs().max().item()


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    bad = 0
    for label, kind, q, c in [("gqa decode", "gqa", [1, 1], [5, 17]), ("gqa prefill", "gqa", [3, 6], [0, 9]),
                              ("mla decode", "mla", [1, 1], [7, 12]), ("mla prefill", "mla", [5], [6])]:
        err = check(kind, q, c, device)
        ok = err < 1e-3
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {label}: max abs err {err:.2e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
