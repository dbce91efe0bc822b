"""Triton kernels compiled after an engine reported ready, logged with how long the compile held the step.

Triton compiles a kernel once per specialization: its constexprs, and for integer arguments whether they
are 1 or divisible by 16. Start-up (decode CUDA graphs, prefill graph buckets, the tuners) compiles what
those shapes need; a served step of a new kind (an eager prefill of an odd token count, a tile class no
graph bucket reached) compiles on its first arrival, and every request in that step waits. The first
ShareGPT-like run of a fresh DeepSeek-V2-Lite cluster had a few TTFTs of seconds that later runs did not
(bench/results/2026-12-07i_mla_push.md); this names such compiles in the node's log instead of leaving
them to be guessed.

`install()` chains onto Triton's JIT hooks (`knobs.runtime.jit_cache_hook` before a compile,
`jit_post_compile_hook` after it; kernels already in memory call neither); `serving()` marks the end of
start-up. A compile after it that takes longer than `PDSERVE_JIT_LOG_S` (default 0.2 s; an on-disk cache
hit takes milliseconds) is logged as a warning.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

SLOW_S = float(os.environ.get("PDSERVE_JIT_LOG_S", "0.2"))

_started: dict[str, float] = {}  # kernel specialization (Triton's repr) -> when its compile began
_serving = False
compiles_while_serving = 0  # compiles after `serving()` over SLOW_S


def serving() -> None:
    """Start-up is over: slow compiles from now on are logged."""
    global _serving
    _serving = True


def _on_compile_start(**kwargs) -> None:
    _started[kwargs.get("repr", "")] = time.monotonic()


def _on_compiled(**kwargs) -> None:
    global compiles_while_serving
    began = _started.pop(kwargs.get("repr", ""), None)
    if began is None or not _serving:
        return
    seconds = time.monotonic() - began
    if seconds > SLOW_S:
        compiles_while_serving += 1
        fn = kwargs.get("fn")
        log.warning("Triton compiled %s while serving: %.2f s held the step (%s)", getattr(fn, "name", "a kernel"),
                    seconds, kwargs.get("repr", "")[:300])


def install() -> None:
    """Chain onto Triton's JIT hooks (once per process; a no-op without Triton's hook knobs)."""
    try:
        from triton import knobs
    except ImportError:
        return
    rt = knobs.runtime
    if getattr(rt.jit_cache_hook, "pdserve", False):
        return
    before, after = rt.jit_cache_hook, rt.jit_post_compile_hook

    def cache_hook(*args, **kwargs):
        _on_compile_start(**kwargs)
        return before(*args, **kwargs) if before else None  # a true result skips the compile: theirs decides

    def post_compile_hook(*args, **kwargs):
        _on_compiled(**kwargs)
        return after(*args, **kwargs) if after else None

    cache_hook.pdserve = True
    rt.jit_cache_hook, rt.jit_post_compile_hook = cache_hook, post_compile_hook
