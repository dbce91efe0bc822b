"""Programmatic dependent launch (PDL, Hopper and later) for the decode-path kernels.

At batch 1 a decode step is ~150 weight-streaming GEMMs of 1-100 MB each, and each one paid ~6 µs
beyond its bytes at the copy rate (H100, bench/results/2026-12-07c_*): the launch after the previous
kernel's last block, the ramp until HBM streams at full rate, the tail while the last blocks drain.
With PDL a kernel launched with `launch_pdl=True` may start while the kernel before it is still
running, once that one's blocks have all signalled (`gdc_launch_dependents`) or exited. Each kernel
here that takes part does, in this order:

1. what needs nothing from earlier kernels: loading its first weight tile (weights are written only
   at load time);
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


@triton.jit
def signal_then_wait(USE_PDL: tl.constexpr):
    """Steps 2 and 3 above, for a kernel launched with `launch_args` (a no-op without PDL)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


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
