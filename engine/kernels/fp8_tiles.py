"""Which launch configuration the FP8 block GEMM (engine/kernels/fp8_gemm.py) runs for a decode-sized
call: the candidates for each token-count bucket, timed once on the device the first time a weight
shape meets that bucket, the fastest kept for the process.

Decode GEMMs stream the weight once, and which tiling reaches HBM speed depends on the weight's
shape (rows to spread over the SMs, K to walk) more than any rule we could write down; the same
holds for vLLM's and SGLang's per-device JSON tables. Timing the few candidates costs milliseconds
per (bucket, N, K), once. Tuning runs only outside CUDA-graph capture (the engine's warm-up forward
comes first, engine/cuda_graph.py); a call without a timed choice takes `gemm_tiles`' default.
Prefill sizes (M > 64) always take the default. Owns only that choice and its cache, not kernels.
"""
from __future__ import annotations

import logging

import torch

from engine.kernels.fp8_gemm import GemmTiles, fp8_block_gemm, gemm_tiles
from engine.kernels.graph_timing import graph_time_ms

log = logging.getLogger(__name__)

DECODE_MAX_M = 64
_chosen: dict[tuple, GemmTiles] = {}


def bucket(m: int) -> int:
    return 1 << (m - 1).bit_length()


def candidates(m: int, quantize_activations: bool) -> list[GemmTiles]:
    """Tiles worth timing for tokens `m` (≤ DECODE_MAX_M)."""
    bm = max(16, bucket(m))
    out = [GemmTiles(bm, bn, 4, st, fuse_quant=False) for bn, st in ((32, 6), (64, 4))]
    out.append(GemmTiles(bm, 64, 4, 4, fuse_quant=False, split_k=4))
    if m == 1 and quantize_activations:  # one launch fewer; measured ahead for narrow, deep weights
        out.append(GemmTiles(16, 128, 4, 4, fuse_quant=True, split_k=4))
    return out


def tiles_for(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, block_size: tuple[int, int],
              quantize_activations: bool) -> GemmTiles:
    """The tiles to run `x [M, K] @ weight [N, K]^T` with: timed once per (device, bucket, N, K)."""
    m, k = x.shape
    n = weight.shape[0]
    if x.device.type != "cuda" or m > DECODE_MAX_M or m == 0:
        return gemm_tiles(m, n, k, x.device.type == "cpu")
    key = (x.device.index, bucket(m), n, k, block_size, quantize_activations, x.dtype)
    if key not in _chosen:
        if torch.cuda.is_current_stream_capturing():
            return gemm_tiles(m, n, k, False)
        probe = torch.randn(bucket(m), k, device=x.device, dtype=x.dtype)
        timed = []
        for i, t in enumerate(candidates(bucket(m), quantize_activations)):
            try:
                timed.append((graph_time_ms(lambda t=t: fp8_block_gemm(probe, weight, weight_scale, block_size,
                                                               quantize_activations, t)), i, t))
            except Exception as e:  # noqa: BLE001 - a tiling this device cannot compile or fit is skipped
                log.warning("FP8 GEMM tiles %s failed for N=%d K=%d: %s", t, n, k, e)
        _chosen[key] = min(timed)[2] if timed else gemm_tiles(m, n, k, False)
    return _chosen[key]


def chosen() -> dict[tuple, GemmTiles]:
    """The choices made so far in this process (for benches to record)."""
    return dict(_chosen)
