"""Triton MoE expert computation for decode-sized batches (a few tokens): two kernels, no expert
alignment, with the contract of `fused_moe_ref.fused_experts_ref` (shared output included), or with
block-scaled FP8 experts that of `fp8_ref.fused_experts_fp8_ref` (`decode_experts_fp8`).

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

FP8 (`QUANT`: 1 weight-only, 2 W8A8): each K step is one scale block of `bk` columns (`K_GROUPS`
of them unrolled per loop iteration, so their loads are in flight together); the weight tile is
widened and multiplied by its block scale, and in W8A8 the activation tile the program loads (x in
the up kernel, the rounded `silu(gate) * up` rows in the down kernel) is quantized per token/slot
and `bk` columns on the spot — `quantize_activation_ref`'s values, no extra launch — and multiplied
dequantized. The shared experts' weights are FP8 with the same blocks (`GatedMLP` of FP8 linears);
their down projection takes eight scale blocks per step (`_SHARED_STEP_BYTES`), their scales broadcast
over each block's columns.

Rounding follows the grouped path step by step (gate/up, the activation and each slot's weighted
output are rounded to the activation dtype; the k-slot sum is float32, rounded once; the shared
output — the shared MLP's result rounded as `GatedMLP` rounds it — is added after that rounding, as
`routed + shared` in torch). Slots whose expert id is
outside `[0, E)` (another EP rank's) load nothing and add nothing. Launch shapes depend only on T
(CUDA-graph safe).
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from engine.kernels import tuning_cache
from engine.kernels.decode_gemm import bucket
from engine.kernels.fp8_gemm import _quantize_tile
from engine.kernels.graph_timing import graph_time_ms
from engine.quantization import FP8_MAX

log = logging.getLogger(__name__)

MAX_TOKENS = 4  # batches up to this size take this path (the grouped GEMM above)


class DecodeMoeTiles(NamedTuple):
    """Launch shapes of the two kernels. `*_k`: BLOCK_K columns per K step in bf16/fp16; in FP8 the
    number of `bk`-column scale blocks per K step (each padded to a power of two)."""
    up_n: int
    up_k: int
    down_n: int
    down_k: int
    up_warps: int = 4
    down_warps: int = 4


# What the tuner times per (token bucket, shapes, dtype, FP8 mode) on a GPU: (BLOCK_N, K, warps) of each
# kernel. The first of each list is the default. bf16 at one token: the up kernel at 16 x 256 read 73%
# of the HBM rate on DeepSeek-V2-Lite, the down kernel at 4 x 256 53% (2026-12-07_h200_today: 786 and
# 545 us over 26 layers for 92 and 46 MB a step); K = 1408 wastes half of its sixth 256-column step,
# which 128-column steps do not. Every candidate compiles for sm_90 without spilling at V2-Lite's sizes
# (tests/engine/kernels/compile_sm90.py; 32-row bf16 up tiles, 32 x 4 FP8 up and 8 x 4 FP8 down tiles
# at 8 warps spilled 192-344 bytes a thread and are left out).
UP_CANDIDATES = {False: [(16, 256, 4), (8, 256, 4), (8, 512, 4), (16, 128, 4), (16, 512, 8), (8, 1024, 8),
                         (4, 512, 4)],
                 True: [(8, 4, 4), (16, 2, 4), (16, 1, 4), (8, 2, 4), (8, 4, 8), (16, 4, 8), (4, 4, 4)]}
DOWN_CANDIDATES = {False: [(4, 256, 4), (4, 128, 4), (2, 256, 4), (8, 128, 4), (2, 512, 4), (4, 512, 8),
                           (8, 256, 8)],
                   True: [(4, 2, 4), (4, 1, 4), (2, 2, 4), (2, 4, 4), (8, 2, 8), (4, 4, 8)]}
_chosen: dict[tuple, DecodeMoeTiles] = {}
# Columns of the shared experts' down projection per K step of the down kernel in FP8 (whole scale
# blocks): the bf16 kernel's 1,024 (4 x its 256-column routed step) in one-byte weights.
_SHARED_STEP_BYTES = 1024


@triton.jit
def _act_operand(v, QUANT: tl.constexpr, FP8_MAX: tl.constexpr):
    """float32 activation tile `[R, K]` (one scale group per row) → what the weights multiply: `v`, or
    in W8A8 its FP8 quantization per row, dequantized (`quantize_activation_ref`'s values)."""
    if QUANT == 2:
        q, s = _quantize_tile(v, FP8_MAX)
        v = q.to(tl.float8e4nv).to(tl.float32) * s[:, None]
    return v


@triton.jit
def _gate_up_tile(x_row, w, ws, n, inter, hidden, stride_wn, stride_sn, dt, QUANT: tl.constexpr,
                  FP8_MAX: tl.constexpr, SCALE_N: tl.constexpr, GROUP_K: tl.constexpr, K_GROUPS: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`silu(x @ w[n]^T) * (x @ w[inter + n]^T)` for the rows `n` of one [2*inter, hidden] matrix
    (FP8 with block scales `ws` when QUANT), rounded to `dt` where the unfused GEMM + SiLU-and-mul
    would round. Each K step covers K_GROUPS groups of GROUP_K (≤ BLOCK_K) columns."""
    n_ok = n < inter
    kk = tl.arange(0, BLOCK_K)
    lane_ok = kk < GROUP_K
    wg_ptr = w + n[:, None] * stride_wn + kk[None, :]
    wu_ptr = wg_ptr + inter * stride_wn
    sg_ptr = ws + (n // SCALE_N) * stride_sn
    su_ptr = ws + ((inter + n) // SCALE_N) * stride_sn
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k_step in range(0, hidden, GROUP_K * K_GROUPS):
        for gi in tl.static_range(K_GROUPS):
            k0 = k_step + gi * GROUP_K
            k_ok = lane_ok & ((k0 + kk) < hidden)
            xv = _act_operand(tl.load(x_row + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :], QUANT, FP8_MAX)
            m = n_ok[:, None] & k_ok[None, :]
            wg = tl.load(wg_ptr + k0, mask=m, other=0.0).to(tl.float32)
            wu = tl.load(wu_ptr + k0, mask=m, other=0.0).to(tl.float32)
            if QUANT != 0:  # past the end the tiles are zero: any scale in range will do
                kb = tl.minimum(k0, hidden - 1) // GROUP_K
                wg = wg * tl.load(sg_ptr + kb, mask=n_ok, other=0.0)[:, None]
                wu = wu * tl.load(su_ptr + kb, mask=n_ok, other=0.0)[:, None]
            acc_g += wg * xv
            acc_u += wu * xv
    g = tl.sum(acc_g, axis=1).to(dt).to(tl.float32)
    u = tl.sum(acc_u, axis=1).to(dt).to(tl.float32)
    return ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt), n_ok


@triton.jit
def _up_kernel(x, w13, s13, ids, act, sw13, ss13, sact, inter, s_inter, hidden, num_experts, num_slots, stride_x,
               stride_we, stride_wn, stride_se, stride_sn, stride_a, stride_swn, stride_ssn, stride_sa,
               TOP_K: tl.constexpr, QUANT: tl.constexpr, FP8_MAX: tl.constexpr, SCALE_N: tl.constexpr,
               GROUP_K: tl.constexpr, K_GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    slot = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dt = act.dtype.element_ty
    if slot < num_slots:  # a routed slot
        e = tl.load(ids + slot)
        # Unrouted slots (the down kernel never reads their rows) and tiles past the width do nothing.
        if (e >= 0) & (e < num_experts) & (tl.program_id(1) * BLOCK_N < inter):
            e64 = e.to(tl.int64)
            a, n_ok = _gate_up_tile(x + (slot // TOP_K) * stride_x, w13 + e64 * stride_we, s13 + e64 * stride_se, n,
                                    inter, hidden, stride_wn, stride_sn, dt, QUANT, FP8_MAX, SCALE_N, GROUP_K, K_GROUPS,
                                    BLOCK_N, BLOCK_K)
            tl.store(act + slot * stride_a + n, a, mask=n_ok)
    else:  # token (slot - num_slots)'s shared experts
        t = slot - num_slots
        if tl.program_id(1) * BLOCK_N < s_inter:
            a, n_ok = _gate_up_tile(x + t * stride_x, sw13, ss13, n, s_inter, hidden, stride_swn, stride_ssn, dt,
                                    QUANT, FP8_MAX, SCALE_N, GROUP_K, K_GROUPS, BLOCK_N, BLOCK_K)
            tl.store(sact + t * stride_sa + n, a, mask=n_ok)


@triton.jit
def _down_combine_kernel(act, w2, s2, ids, weights, shared, sact, sw2, ss2, out, inter, s_inter, hidden, num_experts,
                         stride_a, stride_we, stride_wn, stride_se, stride_sn, stride_s, stride_sa, stride_swn,
                         stride_ssn, stride_o, TOP_K: tl.constexpr, QUANT: tl.constexpr, FP8_MAX: tl.constexpr,
                         SCALE_N: tl.constexpr,
                         GROUP_K: tl.constexpr, K_GROUPS: tl.constexpr, SGROUP_K: tl.constexpr,
                         SK_GROUPS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SBLOCK_K: tl.constexpr, SHARED: tl.constexpr):
    """SHARED: 0 none, 1 add the given output `shared`, 2 compute it from `sact` and `sw2`, SK_GROUPS
    groups of SGROUP_K (≤ SBLOCK_K) columns per step (FP8: one scale block each)."""
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
    lane_ok = kk < GROUP_K
    e64 = tl.where(ok, e, 0).to(tl.int64)
    w_ptr = w2 + e64[:, None, None] * stride_we + n[None, :, None] * stride_wn + kk[None, None, :]
    s_ptr = s2 + e64[:, None] * stride_se + (n // SCALE_N)[None, :] * stride_sn
    a_ptr = act + slots.to(tl.int64)[:, None] * stride_a + kk[None, :]
    acc = tl.zeros([BLOCK_S, BLOCK_N], tl.float32)
    for k_step in range(0, inter, GROUP_K * K_GROUPS):
        for gi in tl.static_range(K_GROUPS):
            k0 = k_step + gi * GROUP_K
            k_ok = lane_ok & ((k0 + kk) < inter)
            av = _act_operand(tl.load(a_ptr + k0, mask=ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32), QUANT,
                              FP8_MAX)
            m = ok[:, None, None] & n_ok[None, :, None] & k_ok[None, None, :]
            part = tl.sum(tl.load(w_ptr + k0, mask=m, other=0.0).to(tl.float32) * av[:, None, :], axis=2)
            if QUANT != 0:  # one weight scale per (slot, row) in this K step
                part = part * tl.load(s_ptr + tl.minimum(k0, inter - 1) // GROUP_K, mask=ok[:, None] & n_ok[None, :],
                                      other=0.0)
            acc += part
    dt = out.dtype.element_ty
    per_slot = (acc * wt[:, None]).to(dt).to(tl.float32)  # each slot's weighted output, as stored
    y = tl.sum(tl.where(ok[:, None], per_slot, 0.0), axis=0).to(dt)
    if SHARED == 1:
        y = (y.to(tl.float32) + tl.load(shared + t * stride_s + n, mask=n_ok, other=0.0).to(tl.float32)).to(dt)
    if SHARED == 2:
        # SK_GROUPS groups per step, their loads in flight together (FP8: one 128-column scale block
        # per step read 512 bytes a program and left the step latency-bound)
        WIDE: tl.constexpr = SK_GROUPS * SBLOCK_K
        sk = tl.arange(0, WIDE)
        lane = sk % SBLOCK_K
        col = (sk // SBLOCK_K) * SGROUP_K + lane  # the step's columns, group by group
        sw_ptr = sw2 + n[:, None] * stride_swn + col[None, :]
        g = tl.arange(0, SK_GROUPS)
        ss_ptr = ss2 + (n // SCALE_N)[:, None] * stride_ssn + g[None, :]
        sacc = tl.zeros([BLOCK_N, WIDE], tl.float32)
        for k0 in range(0, s_inter, SGROUP_K * SK_GROUPS):
            k_ok = (lane < SGROUP_K) & ((k0 + col) < s_inter)
            av = tl.load(sact + t * stride_sa + k0 + col, mask=k_ok, other=0.0).to(tl.float32)
            av = tl.reshape(_act_operand(tl.reshape(av, [SK_GROUPS, SBLOCK_K]), QUANT, FP8_MAX), [1, WIDE])
            wv = tl.load(sw_ptr + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if QUANT != 0:  # one scale per (row, group); groups past the end load none (their tiles are zero)
                kb = k0 // SGROUP_K
                ws = tl.load(ss_ptr + kb, mask=n_ok[:, None] & ((kb + g) * SGROUP_K < s_inter)[None, :], other=0.0)
                wv = tl.reshape(tl.reshape(wv, [BLOCK_N, SK_GROUPS, SBLOCK_K]) * ws[:, :, None], [BLOCK_N, WIDE])
            sacc += wv * av
        s_out = tl.sum(sacc, axis=1).to(dt).to(tl.float32)  # the shared MLP's output, as GatedMLP returns it
        y = (y.to(tl.float32) + s_out).to(dt)
    tl.store(out + t * stride_o + n, y, mask=n_ok)


def decode_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, shared_output: torch.Tensor | None = None,
                   shared_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                   tiles: tuple[int, ...] | None = None) -> torch.Tensor:
    """hidden `[T, H]`, w13 `[E, 2I, H]`, w2 `[E, H, I]`, topk_weights/ids `[T, k]`; the shared
    experts as their output `[T, H]` or as their weights (gate/up `[2Is, H]`, down `[H, Is]`), or
    neither → routed output (+ shared) `[T, H]` in hidden's dtype. `tiles`: a `DecodeMoeTiles`;
    default: tuned on a GPU (`choose_tiles`)."""
    shared = None if shared_weights is None else (shared_weights[0], None, shared_weights[1], None)
    return _launch(hidden, (w13, None, w2, None), topk_weights, topk_ids, shared_output, shared, None, False,
                   tiles)


def decode_experts_fp8(hidden: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                       w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       block_size: tuple[int, int], quantize_activations: bool = True,
                       shared_output: torch.Tensor | None = None,
                       shared_weights: tuple[torch.Tensor, ...] | None = None,
                       tiles: tuple[int, ...] | None = None) -> torch.Tensor:
    """`fp8_ref.fused_experts_fp8_ref`'s contract: FP8 experts w13 `[E, 2I, H]`, w2 `[E, H, I]` with
    block scales `[E, ceil(2I/bn), ceil(H/bk)]`, `[E, ceil(H/bn), ceil(I/bk)]`; the shared experts as
    their output or as FP8 weights with the same blocks (gate/up `[2Is, H]`, its scales, down
    `[H, Is]`, its scales). `tiles`: a `DecodeMoeTiles` (or its first four fields); default: tuned."""
    return _launch(hidden, (w13, w13_scale, w2, w2_scale), topk_weights, topk_ids, shared_output, shared_weights,
                   tuple(block_size), quantize_activations, tiles)


def fp8_decode_tiles(on_cpu: bool) -> DecodeMoeTiles:
    """The FP8 kernels' default tiles. A K group is one `bk`-column scale block; four per loop iteration
    read 512 one-byte columns, about the bytes in flight of the bf16 kernels' 256 two-byte columns.
    Sized so that ptxas fits them without spilling (tests/engine/kernels/compile_sm90.py: 8 rows x 4
    groups up, 4 rows x 2 groups down at 168-242 registers; 16 x 4 and 4 x 4 spilled 120-216 bytes a
    thread)."""
    return DecodeMoeTiles(16, 1, 16, 1) if on_cpu else _tiles_of(UP_CANDIDATES[True][0], DOWN_CANDIDATES[True][0])


def default_tiles(fp8: bool, on_cpu: bool) -> DecodeMoeTiles:
    """Tiles before (or without) tuning: small ones under the CPU interpreter, else each list's first."""
    if fp8:
        return fp8_decode_tiles(on_cpu)
    if on_cpu:
        return DecodeMoeTiles(16, 32, 4, 16)
    return _tiles_of(UP_CANDIDATES[False][0], DOWN_CANDIDATES[False][0])


def _tiles_of(up: tuple[int, int, int], down: tuple[int, int, int]) -> DecodeMoeTiles:
    return DecodeMoeTiles(up[0], up[1], down[0], down[1], up[2], down[2])


def choose_tiles(hidden, experts, topk_ids, shared_output, shared, block_size, quantize_activations) -> DecodeMoeTiles:
    """The tiles for this call: timed once per (device, token bucket, shapes, dtypes, FP8 mode, shared
    form) on a GPU, outside CUDA-graph capture (the engine's warm-up forward at each batch size comes
    first), as `decode_gemm.choose` does for linear layers, and shared with the machine's other processes
    (`tuning_cache.py`); a call under capture without a timed choice,
    or off CUDA, takes the default. The up kernel's candidates are timed with the default down tiles,
    then the down kernel's with the chosen up tiles: each timing is both kernels, replayed from a CUDA
    graph over rotating expert ids (consecutive calls read disjoint experts where there are enough, so
    the selected experts' weights come from HBM as in a model step, not from L2)."""
    fp8 = block_size is not None
    on_cpu = hidden.device.type != "cuda"
    default = default_tiles(fp8, on_cpu)
    if on_cpu:
        return default
    t, k = topk_ids.shape
    w13, _, w2, _ = experts
    shape = (bucket(t), k, tuple(w13.shape), tuple(w2.shape), w13.dtype, hidden.dtype, block_size,
             quantize_activations, shared_output is not None, None if shared is None else tuple(shared[2].shape))

    def tune() -> DecodeMoeTiles:
        choice = _tune(hidden, experts, topk_ids, shared_output, shared, block_size, quantize_activations, fp8, default)
        log.info("decode MoE tiles for %d token(s), experts %s: %s", bucket(t), tuple(w13.shape), choice)
        return choice
    return tuning_cache.tuned(_chosen, "moe_decode", hidden.device, shape, {"DecodeMoeTiles": DecodeMoeTiles}, tune,
                              default)


def _tune(hidden, experts, topk_ids, shared_output, shared, block_size, quantize_activations, fp8, default):
    t, k = bucket(topk_ids.shape[0]), topk_ids.shape[1]
    num_experts = experts[0].shape[0]
    dev = hidden.device
    x = hidden[:1].expand(t, -1).contiguous() if hidden.shape[0] < t else hidden[:t].contiguous()
    sh = None
    if shared_output is not None:
        sh = shared_output[:1].expand(t, -1).contiguous() if shared_output.shape[0] < t else shared_output[:t]
    calls = max(4, min(8, num_experts // (t * k)))
    ids = [((torch.arange(t * k, device=dev) + c * t * k) % num_experts).view(t, k).to(torch.int32)
           for c in range(calls)]
    wts = torch.full((t, k), 1.0 / k, device=dev)
    state = {"i": 0}

    def timed(tiles: DecodeMoeTiles) -> float:
        def call():
            state["i"] = (state["i"] + 1) % calls
            _launch(x, experts, wts, ids[state["i"]], sh, shared, block_size, quantize_activations, tiles)
        try:
            return graph_time_ms(call, calls=calls)
        except Exception as e:  # noqa: BLE001 - a tiling this device cannot compile or fit is skipped
            log.warning("decode MoE tiles %s failed for experts %s: %s", tiles, tuple(experts[0].shape), e)
            return float("inf")

    return search(timed, fp8, default)


def search(measure, fp8: bool, default: DecodeMoeTiles) -> DecodeMoeTiles:
    """The up kernel's candidates with the default down tiles, then the down kernel's with the fastest
    up tiles; `measure(tiles)` → ms (inf: failed). Each measurement is taken once. The default if
    nothing ran."""
    times: dict[DecodeMoeTiles, float] = {}

    def ms(tiles: DecodeMoeTiles) -> float:
        if tiles not in times:
            times[tiles] = measure(tiles)
        return times[tiles]
    down0 = (default.down_n, default.down_k, default.down_warps)
    best_up = min(UP_CANDIDATES[fp8], key=lambda up: ms(_tiles_of(up, down0)))
    best = min((_tiles_of(best_up, down) for down in DOWN_CANDIDATES[fp8]), key=ms)
    return best if ms(best) < float("inf") else default


def _launch(hidden, experts, topk_weights, topk_ids, shared_output, shared, block_size, quantize_activations,
            tiles=None) -> torch.Tensor:
    w13, s13, w2, s2 = experts
    t, k = topk_ids.shape
    num_experts, two_i, h = w13.shape
    inter = two_i // 2
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("decode_experts needs the expert weights' last dimension contiguous")
    hidden = hidden.contiguous()
    out = torch.empty_like(hidden)
    if t == 0:
        return out
    fp8 = block_size is not None
    quant = (2 if quantize_activations else 1) if fp8 else 0
    # Scale pointers of the bf16 kernels are never read: the weights stand in for them.
    s13, s2 = (s13.contiguous(), s2.contiguous()) if fp8 else (w13, w2)
    ids = topk_ids.to(torch.int32).contiguous()
    wts = topk_weights.float().contiguous()
    act = torch.empty(t * k, inter, dtype=hidden.dtype, device=hidden.device)
    mode, sw13, ss13, sw2, ss2, s_inter, sact = 0, w13, s13, w2, s2, 0, act
    if shared is not None:
        sw13, ss13, sw2, ss2 = shared if fp8 else (shared[0], shared[0], shared[2], shared[2])
        sw13, ss13, sw2, ss2 = (w.contiguous() for w in (sw13, ss13, sw2, ss2))
        s_inter = sw2.shape[1]
        mode, sact = 2, torch.empty(t, s_inter, dtype=hidden.dtype, device=hidden.device)
    shared_out = out
    if shared_output is not None and mode == 0:
        mode, shared_out = 1, shared_output.contiguous()
    if tiles is None:
        tiles = choose_tiles(hidden, experts, topk_ids, shared_output, shared, block_size, quantize_activations)
    tiles = DecodeMoeTiles(*tiles)
    if fp8:  # a K group is one scale block (masked up to a power of two)
        scale_n, group_k = block_size
        bn1, kg1, bn2, kg2 = tiles[:4]
        bk1 = bk2 = sbk = triton.next_power_of_2(group_k)
        group1 = group2 = sgroup = group_k
        skg = max(1, _SHARED_STEP_BYTES // sbk)  # one-byte weights
    else:
        # Small N tiles for the down kernel: at one token it has only H / BLOCK_N programs to spread
        # the k experts' reads over (16 rows gave 128 programs and a third of the HBM bandwidth).
        scale_n, kg1, kg2 = 1, 1, 1
        bn1, bk1, bn2, bk2 = tiles[:4]
        group1, group2, sbk = bk1, bk2, 4 * bk2
        sgroup, skg = sbk, 1
    rows = t * k + (t if mode == 2 else 0)
    _up_kernel[(rows, triton.cdiv(max(inter, s_inter), bn1))](
        hidden, w13, s13, ids, act, sw13, ss13, sact, inter, s_inter, h, num_experts, t * k, hidden.stride(0),
        w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(-2), act.stride(0), sw13.stride(0),
        ss13.stride(-2), sact.stride(0), TOP_K=k, QUANT=quant, FP8_MAX=FP8_MAX, SCALE_N=scale_n,
        GROUP_K=group1, K_GROUPS=kg1, BLOCK_N=bn1, BLOCK_K=bk1, num_warps=tiles.up_warps)
    _down_combine_kernel[(t, triton.cdiv(h, bn2))](
        act, w2, s2, ids, wts, shared_out, sact, sw2, ss2, out, inter, s_inter, h, num_experts, act.stride(0),
        w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(-2), shared_out.stride(0), sact.stride(0),
        sw2.stride(0), ss2.stride(-2), out.stride(0), TOP_K=k, QUANT=quant, FP8_MAX=FP8_MAX, SCALE_N=scale_n,
        GROUP_K=group2, K_GROUPS=kg2, SGROUP_K=sgroup, SK_GROUPS=skg, BLOCK_S=triton.next_power_of_2(k), BLOCK_N=bn2,
        BLOCK_K=bk2, SBLOCK_K=sbk, SHARED=mode, num_warps=tiles.down_warps)
    return out
