"""The DeepEP-API all-to-all adapter against a stand-in `Buffer`.

A MOCK, said plainly: DeepEP (`deep_ep`) cannot be built here and `nixl_ep` needs CUDA with torch
2.12–2.14, so no real DeepEP kernel can run on these machines. The fake below implements the
documented contract of the DeepEP `Buffer` for a one-rank group (normal-mode dispatch/combine with
local expert ids and weights; low-latency dispatch into `[local_experts, max_tokens * ranks, hidden]`
with per-expert counts, and a combine that applies the routing weights). The test checks that our
adapter — its layout flattening, id translation and weight handling — turns that contract into the
same MoE output as running every expert locally, in both modes and for both API flavours
(`deep_ep`'s `dispatch`/`combine` and `nixl_ep`'s `ht_dispatch`/`ht_combine`)."""
from __future__ import annotations

import types

import pytest
import torch

from engine.ep.all_to_all import DeepEPAllToAll
from engine.ep.group import EPGroup
from engine.kernels.fused_moe_ref import fused_experts_ref


def _size_hint(max_tokens, hidden, num_ranks, num_experts):
    return max_tokens * hidden * num_ranks * 2


class _OneRankBuffer:
    """DeepEP's Buffer semantics for a single rank (what both flavours share)."""

    def get_dispatch_layout(self, topk_idx, num_experts):
        valid = topk_idx >= 0
        in_rank = valid.any(dim=1, keepdim=True)
        per_expert = torch.bincount(topk_idx[valid], minlength=num_experts)
        return in_rank.sum(0).int(), None, per_expert.int(), in_rank, None

    def dispatch(self, x, topk_idx=None, topk_weights=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank=None, num_tokens_per_expert=None):
        rows = is_token_in_rank[:, 0].nonzero().squeeze(1)
        handle = (rows, x.shape[0])
        return x[rows], topk_idx[rows], topk_weights[rows], num_tokens_per_expert.tolist(), handle, None

    def combine(self, x, handle, topk_weights=None):
        rows, t = handle
        out = torch.zeros((t, x.shape[1]), dtype=x.dtype)
        out[rows] = x
        return out, None, None

    def low_latency_dispatch(self, x, topk_idx, max_tokens, num_experts, use_fp8=True):
        assert not use_fp8, "the adapter must ask for bf16/fp32 activations (the grouped GEMM takes them as is)"
        recv = torch.zeros((num_experts, max_tokens, x.shape[1]), dtype=x.dtype)
        count = torch.zeros(num_experts, dtype=torch.int32)
        where = {}
        for t in range(x.shape[0]):
            for e in topk_idx[t].tolist():
                if e < 0:
                    continue
                where[(t, e)] = int(count[e])
                recv[e, count[e]] = x[t]
                count[e] += 1
        return recv, count, (where, x.shape[0]), None, None

    def low_latency_combine(self, x, topk_idx, topk_weights, handle):
        where, t = handle
        out = torch.zeros((t, x.shape[2]), dtype=torch.float32)
        for (tok, e), row in where.items():
            k = (topk_idx[tok] == e).nonzero()[0, 0]
            out[tok] += topk_weights[tok, k] * x[e, row].float()
        return out.to(x.dtype), None, None


class _FakeDeepEPBuffer(_OneRankBuffer):
    """deep_ep's flavour: constructed with the group and buffer sizes."""

    get_low_latency_rdma_size_hint = staticmethod(_size_hint)

    def __init__(self, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=False, num_qps_per_rank=1):
        self.low_latency_mode = low_latency_mode


class _FakeNixlEPBuffer(_OneRankBuffer):
    """nixl_ep's flavour: constructed by rank/group, sized and connected explicitly, `ht_*` names."""

    get_rdma_size_hint = staticmethod(_size_hint)

    def __init__(self, rank=0, low_latency_mode=True, group=None):
        self.low_latency_mode, self.connected = low_latency_mode, None

    def update_memory_buffers(self, num_ranks, num_experts_per_rank, num_rdma_bytes, num_nvl_bytes=0):
        self.sized = (num_ranks, num_experts_per_rank)

    def connect_ranks(self, remote_ranks, activate=True):
        self.connected = list(remote_ranks)

    def ht_dispatch(self, *args, **kwargs):
        return self.dispatch(*args, **kwargs)

    def ht_combine(self, *args, **kwargs):
        return self.combine(*args, **kwargs)


@pytest.fixture(scope="module")
def group():
    from engine.ports import free_port

    g = EPGroup(0, 1, f"tcp://127.0.0.1:{free_port()}", torch.device("cpu"))
    yield g
    g.close()


@pytest.mark.parametrize("flavour", ["deep_ep", "nixl_ep"])
@pytest.mark.parametrize("mode", ["normal", "low_latency"])
def test_adapter_turns_the_deepep_contract_into_the_local_moe_output(group, flavour, mode):
    torch.manual_seed(0)
    experts, hidden, inter, top_k, tokens = 8, 32, 16, 2, 12
    w13 = torch.randn(experts, 2 * inter, hidden) * 0.1
    w2 = torch.randn(experts, hidden, inter) * 0.1
    x = torch.randn(tokens, hidden)
    weights, ids = torch.randn(tokens, experts).softmax(-1).topk(top_k, dim=-1)
    ids[3, 1] = -1  # a masked route must contribute nothing
    cls = _FakeDeepEPBuffer if flavour == "deep_ep" else _FakeNixlEPBuffer
    module = types.SimpleNamespace(Buffer=cls, __name__=flavour, topk_idx_t=torch.int64)
    a2a = DeepEPAllToAll(group, experts, hidden, mode=mode, max_tokens_per_rank=tokens, module=module)
    assert a2a.name == f"{flavour}:{mode}" and a2a.graph_safe == (mode == "low_latency")
    if flavour == "nixl_ep":
        assert a2a.buffer.connected == [0] and a2a.buffer.sized == (1, experts)
    sent = a2a.dispatch(x, ids, weights)
    out = a2a.combine(fused_experts_ref(sent.hidden, w13, w2, sent.topk_weights, sent.topk_ids), sent.handle)
    torch.testing.assert_close(out, fused_experts_ref(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-6)
