"""The fused Triton kernels (norms, SiLU-and-mul, q/k-norm + rotary + KV write, MoE routing and
expert alignment) against their torch references: under the interpreter on CPU (subprocess), at
real model sizes on GPU; and the dense-prefill SDPA path against the paged torch reference."""
from __future__ import annotations

import pytest
import torch

from engine.attention.dense_prefill import dense_prefill_gqa, is_dense_prefill
from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend
from tests.engine.test_attention_kernels import _run


def test_fused_kernels_match_their_references_under_the_interpreter():
    r = _run(["-m", "tests.engine.kernels.check_fused_ops", "cpu", "small"], interpret=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok ") == 28 and "BAD" not in r.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_kernels_match_their_references_at_real_sizes_on_gpu():
    r = _run(["-m", "tests.engine.kernels.check_fused_ops", "cuda", "real"], interpret=False, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_engine_generates_the_tokens_of_the_torch_ops_on_gpu():
    r = _run(["-m", "tests.engine.kernels.check_fused_engine"], interpret=False, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dense_prefill_matches_paged_attention():
    torch.manual_seed(0)
    lens, hq, hkv, d, page = [5, 9], 4, 2, 16, 4
    tables = [[0, 1], [2, 3, 4]]
    meta = AttentionMetadata.build(lens, lens, tables, page)
    assert is_dense_prefill(meta)
    t = sum(lens)
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    cache = torch.zeros(5, 2, page, hkv, d)
    ref = TorchAttentionBackend().gqa(q, k, v, cache, meta, 0.25)
    assert torch.allclose(dense_prefill_gqa(q, k, v, meta, 0.25), ref, atol=1e-5)


def test_a_cached_prefix_or_a_decode_is_not_dense():
    assert not is_dense_prefill(AttentionMetadata.build([3], [7], [[0, 1]], 4))
    assert not is_dense_prefill(AttentionMetadata.build([1, 4], [6, 4], [[0, 1], [2]], 4))
