"""Programmatic dependent launch (PDL, Hopper and later) for the decode-path kernels.

At batch 1 a decode step is ~150 weight-streaming GEMMs of 1-100 MB each, and each one paid ~6 µs
beyond its bytes at the copy rate (H100, bench/results/2026-12-07c_*): the launch after the previous
kernel's last block, the ramp until HBM streams at full rate, the tail while the last blocks drain.
With PDL a kernel launched with `launch_pdl=True` may start while the kernel before it is still
running, once that one's blocks have all signalled (`gdc_launch_dependents`) or exited. Each kernel
here that takes part does, in this order:

1. what needs nothing from earlier kernels: loading its first weight tile (weights are written only
   at load time), and asking L2 for the next bytes of its weight rows (`prefetch_rows`), which HBM
   then streams while the kernels ahead finish;
2. `gdc_launch_dependents()`: the next PDL kernel may launch once every block of this one has got
   here, and do its own step 1 on the SMs this one leaves free (its wait, step 3, still orders it
   after this kernel's end, so signalling before waiting is safe);
3. `gdc_wait()`: blocks until the previous kernel has finished and its writes are visible. Every
   participating kernel calls it, unconditionally and before reading any activation or writing
   anything, so the chain stays ordered transitively;
4. the rest.

Taking part: the skinny GEMM and `skinny_bmm`, the FP8 block GEMM and activation quantization at
≤ 64 tokens, RMSNorm at ≤ 64 rows, the MoE router's logits and MLA's absorbed query.
A kernel launched without the flag (torch's, cuBLAS, our others) waits for full completion as usual.
CUDA graph capture keeps the programmatic edges. `PDSERVE_PDL=0` turns it off (kernels then compile
without the wait/signal and launch normally); off as well on CPU, under the Triton interpreter and
before sm_90.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

DECODE_MAX_TOKENS = 64  # `launch_args` keeps larger launches plain: prefill tiles keep their loop
# Weight bytes a PDL-launched GEMM asks L2 for before its wait (`prefetch_rows`), over all its programs:
# read from HBM while the kernels ahead of it finish, so its own start does not wait a DRAM latency and
# a ramp. PDSERVE_L2_PREFETCH_MB=0 turns it off.
L2_PREFETCH_BYTES = int(float(os.environ.get("PDSERVE_L2_PREFETCH_MB", "8")) * 2**20)


@triton.jit
def signal_then_wait(USE_PDL: tl.constexpr):
    """Steps 2 and 3 above, for a kernel launched with `launch_args` (a no-op without PDL)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def prefetch_rows(ptrs, nbytes, USE_PDL: tl.constexpr):
    """Under PDL (sm_90+), before `signal_then_wait`: ask L2 for `nbytes` (a multiple of 16; 0 asks
    nothing) from each address of `ptrs` (16-byte aligned; weight row starts), one bulk prefetch per
    address. A hint: it loads nothing into registers and orders nothing. See `prefetch_bytes`."""
    if USE_PDL:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptrs, tl.full(ptrs.shape, 0, tl.int32) + nbytes], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_bytes(weight: torch.Tensor, rows: int, row_bytes: int) -> int:
    """Bytes per weight row for `prefetch_rows`: `L2_PREFETCH_BYTES` spread over `rows`, at most
    `row_bytes`, a multiple of 16; 0 (no prefetch) where the rows are not 16-byte aligned."""
    if weight.data_ptr() % 16 or any(st * weight.element_size() % 16 for st in weight.stride()[:-1]):
        return 0
    return min(L2_PREFETCH_BYTES // max(rows, 1), row_bytes) // 16 * 16


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


_off = 0  # > 0 inside `disabled()`
# read once: `enabled` runs at every launch of these kernels outside graph replay
_ENV_OFF = os.environ.get("PDSERVE_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def disabled():
    """Launch plainly inside this block: the kernel tuners time candidates without PDL, since back-to-back
    copies of one GEMM would overlap each other's ramp and tail by more than a step's mix of kernels does."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (and compile its wait/signal in)."""
    if _off or _ENV_OFF or device.type != "cuda":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device, tokens: int | None = None) -> dict:
    """Keyword arguments for launching a participating kernel (one with a `USE_PDL` constexpr): the
    constexpr, and Triton's launch flag where it is on. A launch over more than `DECODE_MAX_TOKENS`
    `tokens` stays plain."""
    wanted = tokens is None or tokens <= DECODE_MAX_TOKENS
    return {"USE_PDL": True, "launch_pdl": True} if wanted and enabled(device) else {"USE_PDL": False}
