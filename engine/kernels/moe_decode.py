"""Triton MoE expert computation for decode-sized batches (a few tokens): two kernels, no expert
alignment, with the contract of `fused_moe_ref.fused_experts_ref` (shared output included).

At a handful of tokens the routed experts are memory-bound matrix-vector products: what matters is
reading each selected expert's weights once and launching few kernels. The grouped GEMM path
(`fused_moe.py`) spends six kernels around its two GEMMs here (three alignment kernels, SiLU-and-mul,
a zero fill, the k-slot sum) and one more for the shared-expert add. This path runs:

1. `_up_kernel`, one program per (slot, tile of the intermediate dim): `x @ w13[e]^T` for the gate
   and up rows of the slot's expert, `silu(gate) * up` in the epilogue → `act [T*k, I]`; one more
   program row per token does the same for the shared experts' merged gate/up weight, when given;
2. `_down_combine_kernel`, one program per (token, tile of the hidden dim): for all k slots of the
   token at once (a `[k, BLOCK_N, BLOCK_K]` tile, so the k experts' loads are in flight together),
   `act @ w2[e]^T` scaled by the routing weight, summed over the slots, plus the shared experts'
   down projection (or their given output) → `[T, H]`.

With the shared experts' weights the whole DeepSeekMoE block after routing is these two kernels.

Rounding follows the grouped path step by step (gate/up, the activation and each slot's weighted
output are rounded to the activation dtype; the k-slot sum is float32, rounded once; the shared
output — the shared MLP's result rounded as `GatedMLP` rounds it — is added after that rounding, as
`routed + shared` in torch). Slots whose expert id is
outside `[0, E)` (another EP rank's) load nothing and add nothing. Launch shapes depend only on T
(CUDA-graph safe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOKENS = 4  # batches up to this size take this path (the grouped GEMM above)


@triton.jit
def _gate_up_tile(x_row, w, n, inter, hidden, stride_wn, dt, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`silu(x @ w[n]^T) * (x @ w[inter + n]^T)` for the rows `n` of one [2*inter, hidden] matrix,
    rounded to `dt` where the unfused GEMM + SiLU-and-mul would round."""
    n_ok = n < inter
    kk = tl.arange(0, BLOCK_K)
    wg_ptr = w + n[:, None] * stride_wn + kk[None, :]
    wu_ptr = wg_ptr + inter * stride_wn
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = (k0 + kk) < hidden
        xv = tl.load(x_row + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        m = n_ok[:, None] & k_ok[None, :]
        acc_g += tl.load(wg_ptr + k0, mask=m, other=0.0).to(tl.float32) * xv
        acc_u += tl.load(wu_ptr + k0, mask=m, other=0.0).to(tl.float32) * xv
    g = tl.sum(acc_g, axis=1).to(dt).to(tl.float32)
    u = tl.sum(acc_u, axis=1).to(dt).to(tl.float32)
    return ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt), n_ok


@triton.jit
def _up_kernel(x, w13, ids, act, sw13, sact, inter, s_inter, hidden, num_experts, num_slots, stride_x, stride_we,
               stride_wn, stride_a, stride_swn, stride_sa, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    slot = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dt = act.dtype.element_ty
    if slot < num_slots:  # a routed slot
        e = tl.load(ids + slot)
        # Unrouted slots (the down kernel never reads their rows) and tiles past the width do nothing.
        if (e >= 0) & (e < num_experts) & (tl.program_id(1) * BLOCK_N < inter):
            a, n_ok = _gate_up_tile(x + (slot // TOP_K) * stride_x, w13 + e.to(tl.int64) * stride_we, n, inter,
                                    hidden, stride_wn, dt, BLOCK_N, BLOCK_K)
            tl.store(act + slot * stride_a + n, a, mask=n_ok)
    else:  # token (slot - num_slots)'s shared experts
        t = slot - num_slots
        if tl.program_id(1) * BLOCK_N < s_inter:
            a, n_ok = _gate_up_tile(x + t * stride_x, sw13, n, s_inter, hidden, stride_swn, dt, BLOCK_N, BLOCK_K)
            tl.store(sact + t * stride_sa + n, a, mask=n_ok)


@triton.jit
def _down_combine_kernel(act, w2, ids, weights, shared, sact, sw2, out, inter, s_inter, hidden, num_experts,
                         stride_a, stride_we, stride_wn, stride_s, stride_sa, stride_swn, stride_o,
                         TOP_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SBLOCK_K: tl.constexpr, SHARED: tl.constexpr):
    """SHARED: 0 none, 1 add the given output `shared`, 2 compute it from `sact` and `sw2`."""
    t = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden
    j = tl.arange(0, BLOCK_S)
    j_in = j < TOP_K
    e = tl.load(ids + t * TOP_K + j, mask=j_in, other=-1)
    ok = j_in & (e >= 0) & (e < num_experts)
    wt = tl.load(weights + t * TOP_K + j, mask=ok, other=0.0).to(tl.float32)
    slots = t * TOP_K + j
    kk = tl.arange(0, BLOCK_K)
    w_ptr = (w2 + tl.where(ok, e, 0).to(tl.int64)[:, None, None] * stride_we + n[None, :, None] * stride_wn
             + kk[None, None, :])
    a_ptr = act + slots.to(tl.int64)[:, None] * stride_a + kk[None, :]
    acc = tl.zeros([BLOCK_S, BLOCK_N], tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = (k0 + kk) < inter
        av = tl.load(a_ptr + k0, mask=ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        m = ok[:, None, None] & n_ok[None, :, None] & k_ok[None, None, :]
        wv = tl.load(w_ptr + k0, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(wv * av[:, None, :], axis=2)
    dt = out.dtype.element_ty
    per_slot = (acc * wt[:, None]).to(dt).to(tl.float32)  # each slot's weighted output, as stored
    y = tl.sum(tl.where(ok[:, None], per_slot, 0.0), axis=0).to(dt)
    if SHARED == 1:
        y = (y.to(tl.float32) + tl.load(shared + t * stride_s + n, mask=n_ok, other=0.0).to(tl.float32)).to(dt)
    if SHARED == 2:
        sk = tl.arange(0, SBLOCK_K)
        sw_ptr = sw2 + n[:, None] * stride_swn + sk[None, :]
        sacc = tl.zeros([BLOCK_N, SBLOCK_K], tl.float32)
        for k0 in range(0, s_inter, SBLOCK_K):
            k_ok = (k0 + sk) < s_inter
            av = tl.load(sact + t * stride_sa + k0 + sk, mask=k_ok, other=0.0).to(tl.float32)
            sacc += tl.load(sw_ptr + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32) * av[None, :]
        s_out = tl.sum(sacc, axis=1).to(dt).to(tl.float32)  # the shared MLP's output, as GatedMLP returns it
        y = (y.to(tl.float32) + s_out).to(dt)
    tl.store(out + t * stride_o + n, y, mask=n_ok)


def decode_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, shared_output: torch.Tensor | None = None,
                   shared_weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """hidden `[T, H]`, w13 `[E, 2I, H]`, w2 `[E, H, I]`, topk_weights/ids `[T, k]`; the shared
    experts as their output `[T, H]` or as their weights (gate/up `[2Is, H]`, down `[H, Is]`), or
    neither → routed output (+ shared) `[T, H]` in hidden's dtype."""
    t, k = topk_ids.shape
    num_experts, two_i, h = w13.shape
    inter = two_i // 2
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("decode_experts needs the expert weights' last dimension contiguous")
    hidden = hidden.contiguous()
    out = torch.empty_like(hidden)
    if t == 0:
        return out
    ids = topk_ids.to(torch.int32).contiguous()
    wts = topk_weights.float().contiguous()
    act = torch.empty(t * k, inter, dtype=hidden.dtype, device=hidden.device)
    mode, sw13, sw2, s_inter, sact = 0, w13, w2, 0, act
    if shared_weights is not None:
        sw13, sw2 = (w.contiguous() for w in shared_weights)
        s_inter = sw2.shape[1]
        mode, sact = 2, torch.empty(t, s_inter, dtype=hidden.dtype, device=hidden.device)
    shared = out
    if shared_output is not None and mode == 0:
        mode, shared = 1, shared_output.contiguous()
    on_cpu = hidden.device.type == "cpu"
    bn1, bk1 = (16, 32) if on_cpu else (16, 256)
    rows = t * k + (t if mode == 2 else 0)
    _up_kernel[(rows, triton.cdiv(max(inter, s_inter), bn1))](
        hidden, w13, ids, act, sw13, sact, inter, s_inter, h, num_experts, t * k, hidden.stride(0), w13.stride(0),
        w13.stride(1), act.stride(0), sw13.stride(0), sact.stride(0), TOP_K=k, BLOCK_N=bn1, BLOCK_K=bk1,
        num_warps=4)
    # Small N tiles: at one token the down projection has only H / BLOCK_N programs to spread the
    # k experts' reads over (16 rows gave 128 programs and a third of the HBM bandwidth).
    bn2, bk2 = (4, 16) if on_cpu else (4, 256)
    _down_combine_kernel[(t, triton.cdiv(h, bn2))](
        act, w2, ids, wts, shared, sact, sw2, out, inter, s_inter, h, num_experts, act.stride(0), w2.stride(0),
        w2.stride(1), shared.stride(0), sact.stride(0), sw2.stride(0), out.stride(0), TOP_K=k,
        BLOCK_S=triton.next_power_of_2(k), BLOCK_N=bn2, BLOCK_K=bk2, SBLOCK_K=4 * bk2, SHARED=mode, num_warps=4)
    return out
