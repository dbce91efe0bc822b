"""The varlen flash prefill's plumbing on CPU: which rows, lengths and cumulative offsets reach the one
attention call, the gathered context of chunks over cached prefixes, the GQA and MLA callers and the
paths around them. torch's FlashAttention-2 op runs only on CUDA, so here it is replaced by a reference
with that op's documented semantics (sequences back to back, KV heads shared by query-head groups,
causal mask aligned bottom-right): a mock, because the real op cannot run on this machine. On a GPU,
tests/engine/kernels/check_varlen_prefill.py runs the real op against the per-sequence path."""
from __future__ import annotations

import torch

from engine.attention import dense_prefill
from tests.engine.kernels import check_varlen_prefill
from tests.engine.kernels.check_varlen_prefill import PROMPTS
from tests.engine.test_attention_kernels import _run


def fa2_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    group = q.shape[1] // k.shape[1]
    out = torch.full((q.shape[0], q.shape[1], v.shape[-1]), float("nan"), dtype=q.dtype)
    assert cq[0] == ck[0] == 0 and cq[-1] == q.shape[0] and ck[-1] == k.shape[0] and len(cq) == len(ck)
    assert all(b - a <= d - c for a, b, c, d in zip(cq, cq[1:], ck, ck[1:]))  # never more queries than keys
    assert max_q >= max(b - a for a, b in zip(cq, cq[1:])) and max_k >= max(b - a for a, b in zip(ck, ck[1:]))
    for b in range(len(cq) - 1):
        qb = q[cq[b]: cq[b + 1]].double()
        kb = k[ck[b]: ck[b + 1]].double().repeat_interleave(group, 1)
        vb = v[ck[b]: ck[b + 1]].double().repeat_interleave(group, 1)
        lq, lk = qb.shape[0], kb.shape[0]
        scores = torch.einsum("qhd,khd->hqk", qb, kb) * scale
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[cq[b]: cq[b + 1]] = torch.einsum("hqk,khd->qhd", probs, vb).to(q.dtype)
    return out


PATCH = """
import torch
from engine.attention import dense_prefill, triton_backend
from tests.engine.test_varlen_prefill import fa2_reference
calls = []
def fake(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    calls.append("prefix" if not torch.equal(cu_q, cu_k) else "dense")
    return fa2_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale)
dense_prefill._flash_forward = fake
dense_prefill.varlen_applies = triton_backend.varlen_applies = lambda q, d: True
"""

def generate(model: str, backend: str = "auto") -> list[list[int]]:
    """check_varlen_prefill's scenario (a dense step, a chunk over a cached prefix, a step mixing a decode
    with one) on CPU in float32, shorter: two first prompts, three tokens each."""
    return check_varlen_prefill.generate(model, "cpu", "float32", backend, max_tokens=3,
                                         first=(PROMPTS[0], PROMPTS[-1]))


def test_mla_prefill_through_the_varlen_call_gives_the_per_sequence_tokens(monkeypatch):
    """MLA's decompressed prefill calls it from the layer (any backend; the torch one here)."""
    calls = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        calls.append("prefix" if not torch.equal(cu_q, cu_k) else "dense")
        return fa2_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    monkeypatch.setattr(dense_prefill, "VARLEN", False)
    ref = generate("tiny-deepseek-v2")
    monkeypatch.setattr(dense_prefill, "VARLEN", True)
    monkeypatch.setattr(dense_prefill, "_flash_forward", fake)
    monkeypatch.setattr(dense_prefill, "varlen_applies", lambda q, d: True)
    assert generate("tiny-deepseek-v2") == ref
    assert "dense" in calls and "prefix" in calls


def test_gqa_prefill_through_the_varlen_call_gives_the_per_sequence_tokens():
    """GQA calls it from the Triton backend (dense steps and chunks over cached prefixes, with and
    without decodes in the step); the backend's other kernels run under Triton's interpreter."""
    script = PATCH + """
from tests.engine.test_varlen_prefill import generate
dense_prefill.VARLEN = False
ref = generate("tiny-qwen3", "triton")
dense_prefill.VARLEN = True
got = generate("tiny-qwen3", "triton")
assert got == ref, (ref, got)
assert "dense" in calls and "prefix" in calls, calls
print("same", sorted(set(calls)))
"""
    r = _run(["-c", script], interpret=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("same") == 1


def test_mla_steps_mixing_decodes_with_long_chunks_split_them_and_give_the_absorbed_tokens(monkeypatch):
    """A step with decodes and a chunk long enough to decompress: the decodes attend absorbed, the chunk
    decompressed (`AttentionMetadata.split`); tokens equal the all-absorbed engine's (float32)."""
    from engine.attention.metadata import AttentionMetadata
    from engine.layers import mla
    monkeypatch.setattr(mla, "DECOMPRESS_MIN_TOKENS", 10**9)
    ref = generate("tiny-deepseek-v2")
    splits = []
    original = AttentionMetadata.split

    def split(self, n):
        splits.append(n)
        return original(self, n)
    monkeypatch.setattr(AttentionMetadata, "split", split)
    monkeypatch.setattr(mla, "DECOMPRESS_MIN_TOKENS", 8)
    assert generate("tiny-deepseek-v2") == ref
    assert splits and all(n >= 1 for n in splits)
