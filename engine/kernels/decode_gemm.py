"""Which kernel a decode-sized linear layer runs, and with which tiles: the candidates for each
token-count bucket, timed once on the device the first time a weight shape meets that bucket, the
fastest kept for the process.

* bf16/fp16 weights, up to `skinny_gemm.MAX_M` tokens: cuBLAS (`F.linear`) or the skinny Triton
  GEMM (`skinny_gemm.py`) in one of its tilings; more tokens always take cuBLAS.
* FP8 block-scaled weights, up to `DECODE_MAX_M` tokens: the block GEMM (`fp8_gemm.py`) in one of
  its decode tilings, or the skinny GEMM at ≤ `skinny_gemm.MAX_M`; at prefill sizes the block GEMM in
  one of two prefill tilings, timed at token buckets up to `PREFILL_TUNE_MAX_M`. At every size, where
  the weight allows it (`fp8_gemm.scaled_mm_supported`), cuBLASLt's block-scaled FP8 GEMM too.

Decode GEMMs stream the weight once, and which kernel reaches HBM speed depends on the weight's
shape (rows to spread over the SMs, K to walk) more than any rule we could write down; vLLM and
SGLang keep per-device JSON tables for the same reason. Candidates are timed inside a CUDA graph
(launch cost must not rank them) over rotating copies of the weight, so that a weight small enough
to stay in L2 between back-to-back calls is still read from HBM, as it is in a model step where the
other layers' weights pass through L2 in between. Timing costs milliseconds per (bucket, N, K),
once, and shared with the machine's other engine processes through `tuning_cache.py` (so they all run
the same kernels and round alike). Tuning runs only outside CUDA-graph capture (the engine's warm-up
forward at each batch size comes first, engine/cuda_graph.py); a call without a timed choice takes the
default.
Owns that choice and its cache, not kernels.
"""
from __future__ import annotations

import itertools
import logging
from typing import Union

import torch
import torch.nn.functional as F

from engine.kernels import pdl
from engine.kernels import skinny_gemm as sk
from engine.kernels import tuning_cache
from engine.kernels.fp8_gemm import (GemmTiles, fp8_block_gemm, gated_supported, gemm_tiles, scaled_mm_gemm,
                                     scaled_mm_supported)
from engine.kernels.graph_timing import graph_time_ms
from engine.kernels.norm_act import silu_and_mul

log = logging.getLogger(__name__)

DECODE_MAX_M = 64
PREFILL_TUNE_MAX_M = 2048  # FP8 steps above DECODE_MAX_M are timed at their bucket up to this, then take its choice
CUBLAS = "cublas"  # the choice of F.linear for full-precision weights
SCALED_MM = "scaled_mm"  # FP8 W8A8 through cuBLASLt's block-scaled GEMM (`fp8_gemm.scaled_mm_gemm`)
Choice = Union[str, GemmTiles, sk.SkinnyTiles]
ROTATE_BYTES = 2 * 64 * 2**20  # weight copies cycled while timing: twice an H100/H200's 50-60 MB L2
_chosen: dict[tuple, Choice] = {}  # linear layers' choices, by (device index, *`choose`'s shape key)
_chosen_bmm: dict[tuple, Choice] = {}  # `choose_bmm`'s
_timed: dict[tuple, list[tuple[float, Choice]]] = {}  # what this process's tuning measured, fastest first


def bucket(m: int) -> int:
    return 1 << (m - 1).bit_length()


def fp8_candidates(m: int, quantize_activations: bool) -> list[GemmTiles]:
    """Block-GEMM tiles worth timing for tokens `m` (≤ DECODE_MAX_M)."""
    bm = max(16, bucket(m))
    out = [GemmTiles(bm, bn, 4, st, fuse_quant=False) for bn, st in ((32, 6), (64, 4))]
    out.append(GemmTiles(bm, 64, 4, 4, fuse_quant=False, split_k=4))
    if m == 1 and quantize_activations:  # one launch fewer: the one row quantized by every program
        out += [GemmTiles(16, 128, 4, 4, fuse_quant=True, split_k=4),
                GemmTiles(16, 32, 4, 6, fuse_quant=True), GemmTiles(16, 64, 4, 4, fuse_quant=True)]
    return out


def run(choice: Choice, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
        block_size: tuple[int, int] | None, quantize_activations: bool, gated: bool = False) -> torch.Tensor:
    """x `[M, K]` @ weight^T with the chosen kernel (scales only for FP8 weights); `gated` (only where
    `gated_fused(choice)`): x is `[gate | up]` and the input is `silu(gate) * up`."""
    if isinstance(choice, sk.SkinnyTiles):
        return sk.skinny_gemm(x, weight, weight_scale, block_size, quantize_activations, choice, gated)
    if choice == SCALED_MM:
        return scaled_mm_gemm(x, weight, weight_scale, gated)
    if weight_scale is None:
        return F.linear(x, weight)
    return fp8_block_gemm(x, weight, weight_scale, block_size, quantize_activations, choice, gated)


def gated_fused(choice: Choice, quantize_activations: bool = False) -> bool:
    """Whether `choice` can take the SwiGLU input `[gate | up]` itself (`run(..., gated=True)`): the
    skinny GEMM always; the FP8 block GEMM where its activations are quantized ahead (that launch
    applies the activation too), and so cuBLAS's block-scaled GEMM."""
    if choice == SCALED_MM:
        return True
    if isinstance(choice, GemmTiles):
        return gated_supported(choice, quantize_activations)
    return isinstance(choice, sk.SkinnyTiles)


def _default(m: int, weight: torch.Tensor, weight_scale, block_size, on_cpu: bool) -> Choice:
    if weight_scale is None:
        return CUBLAS
    return gemm_tiles(m, weight.shape[0], weight.shape[1], on_cpu)


def prefill_fp8_candidates(m: int, n: int, k: int) -> list[GemmTiles]:
    """Block-GEMM tiles worth timing above DECODE_MAX_M tokens: the default and the other of its two
    prefill tilings (128x128 with 8 warps, 64x128 with 4), activations quantized ahead."""
    default = gemm_tiles(m, n, k, False)
    return [default] + [t for t in (GemmTiles(128, 128, 8, 4, fuse_quant=False),
                                    GemmTiles(64, 128, 4, 4, fuse_quant=False)) if t != default]


def candidates(m: int, weight: torch.Tensor, weight_scale, block_size, quantize_activations: bool) -> list[Choice]:
    fp8 = weight_scale is not None
    if fp8 and m > DECODE_MAX_M:
        out: list[Choice] = list(prefill_fp8_candidates(m, *weight.shape))
    else:
        out = [CUBLAS] if not fp8 else fp8_candidates(m, quantize_activations)
        out += [t for t in sk.candidates(fp8, quantize_activations)
                if sk.supports(m, weight, block_size if fp8 else None, t)]
    if fp8 and scaled_mm_supported(weight, weight_scale, block_size, quantize_activations):
        out.append(SCALED_MM)
    return out


def weight_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """The weight and enough scratch copies of its shape (contents unset: timing does not read them) to
    cycle through while timing, so no call finds its weight still in L2."""
    nbytes = weight.numel() * weight.element_size()
    copies = [weight]
    try:
        while len(copies) < 8 and len(copies) * nbytes < ROTATE_BYTES:
            copies.append(torch.empty_like(weight))
    except torch.OutOfMemoryError:  # timing from L2 then: a ranking still, if an optimistic one
        pass
    return copies


def time_choice(choice: Choice, m: int, copies: list[torch.Tensor], weight_scale, block_size,
                quantize_activations: bool, x_dtype: torch.dtype, gated: bool = False) -> float:
    """Graph-timed ms of one call, cycling over `weight_copies(weight)`. `gated`: the input is SwiGLU's
    `[gate | up]`, and a choice that cannot take it is timed with the SiLU-and-mul launch it needs."""
    k = copies[0].shape[1]
    probe = torch.randn(m, 2 * k if gated else k, device=copies[0].device, dtype=x_dtype)
    cycle = itertools.cycle(copies)
    if gated and gated_fused(choice, quantize_activations):
        def call():
            return run(choice, probe, next(cycle), weight_scale, block_size, quantize_activations, gated=True)
    else:
        def call():
            x = silu_and_mul(probe) if gated else probe
            return run(choice, x, next(cycle), weight_scale, block_size, quantize_activations)
    return graph_time_ms(call, calls=max(4, len(copies)))


def choose(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
           block_size: tuple[int, int] | None = None, quantize_activations: bool = False) -> Choice:
    """The kernel to run `x [M, K] @ weight [N, K]^T` with: timed once per (device, bucket, N, K, dtypes,
    whether x is SwiGLU's `[M, 2K]` input to a down projection, `Linear.forward_gated`). FP8 weights are
    timed at prefill sizes too (Triton block GEMM tilings against cuBLAS's block-scaled GEMM), at buckets
    up to PREFILL_TUNE_MAX_M tokens; larger steps take that bucket's choice (timing there would hold
    gigabytes of probes, and both kernels are compute-bound by then)."""
    m = x.shape[0]
    gated = x.shape[1] == 2 * weight.shape[1]
    on_cpu = x.device.type != "cuda"
    limit = PREFILL_TUNE_MAX_M if weight_scale is not None else sk.MAX_M
    if on_cpu or m == 0 or (m > limit and weight_scale is None):
        return _default(m, weight, weight_scale, block_size, on_cpu)
    size = min(bucket(m), PREFILL_TUNE_MAX_M) if weight_scale is not None else bucket(m)
    shape = (size, tuple(weight.shape), weight.dtype, block_size, quantize_activations, x.dtype, gated)
    default = _default(size, weight, weight_scale, block_size, False)

    def tune() -> Choice:
        copies = weight_copies(weight)  # allocated once for all candidates
        return _fastest((x.device.index, *shape), weight,
                        candidates(size, weight, weight_scale, block_size, quantize_activations),
                        lambda c: time_choice(c, size, copies, weight_scale, block_size, quantize_activations,
                                              x.dtype, gated), default)
    return tuning_cache.tuned(_chosen, "decode_gemm", x.device, shape, TYPES, pdl.disabled()(tune), default)


TYPES = {"GemmTiles": GemmTiles, "SkinnyTiles": sk.SkinnyTiles}  # the choices' classes, for the tuning cache


def _fastest(key: tuple, weight: torch.Tensor, cands: list[Choice], time_one, default: Choice) -> Choice:
    """The candidate `time_one` times fastest (a tiling that fails to compile or run is skipped), its
    timings kept under `key` for `timings()`; `default` if none ran. Callers run it with PDL off
    (`pdl.disabled()`): back-to-back copies of one GEMM would overlap each other's ramp and tail by more
    than a step's mix of kernels does."""
    timed = []
    for i, c in enumerate(cands):
        try:
            timed.append((time_one(c), i, c))
        except Exception as e:  # noqa: BLE001 - a tiling this device cannot compile or fit is skipped
            log.warning("decode GEMM candidate %s failed for weight %s: %s", c, tuple(weight.shape), e)
    _timed[key] = [(ms, c) for ms, _, c in sorted(timed)]
    return min(timed)[2] if timed else default


def chosen() -> dict[tuple, Choice]:
    """The linear layers' choices made so far in this process (for benches to record)."""
    return dict(_chosen)


def chosen_bmm() -> dict[tuple, Choice]:
    """`choose_bmm`'s choices made so far in this process."""
    return dict(_chosen_bmm)


def timings() -> dict[tuple, list[tuple[float, Choice]]]:
    """Per key, every candidate this process timed (ms, choice), fastest first; empty for keys whose
    choice came from the tuning cache."""
    return dict(_timed)


BMM = "bmm"  # the choice of torch.bmm (cuBLAS) for a batch of small products


def run_bmm(choice: Choice, x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """`skinny_bmm`'s product, x `[M, B, K]` through weight `[B, N, K]` → `[M, B, N]`, with the chosen
    kernel; torch.bmm multiplies by `weight_t`, the same matrices stored `[B, K, N]`."""
    if isinstance(choice, sk.SkinnyTiles):
        return sk.skinny_bmm(x, weight, choice)
    return torch.bmm(x.transpose(0, 1), weight_t).transpose(0, 1)


def choose_bmm(x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor) -> Choice:
    """The kernel for `run_bmm` at a few tokens on CUDA (torch.bmm elsewhere): torch.bmm or the skinny
    kernel in one of its tilings, timed once per (device, bucket, B, N, K, dtype) like `choose`, with
    rotating copies of both weight layouts."""
    m = x.shape[0]
    if x.device.type != "cuda" or not 0 < m <= sk.MAX_M or x.stride(-1) != 1 or weight.stride(-1) != 1:
        return BMM
    shape = (bucket(m), tuple(weight.shape), weight.dtype, x.dtype)

    def tune() -> Choice:
        pairs = list(zip(weight_copies(weight), weight_copies(weight_t)))
        probe = torch.randn(bucket(m), *x.shape[1:], device=x.device, dtype=x.dtype)

        def time_one(c) -> float:
            cycle = itertools.cycle(pairs)
            return graph_time_ms(lambda: run_bmm(c, probe, *next(cycle)), calls=max(4, len(pairs)))
        cands = [BMM] + [t for t in sk.candidates() if sk.supports(bucket(m), weight, None, t)]
        return _fastest((x.device.index, *shape), weight, cands, time_one, BMM)
    return tuning_cache.tuned(_chosen_bmm, "decode_bmm", x.device, shape, TYPES, pdl.disabled()(tune), BMM)
