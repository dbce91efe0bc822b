"""GPU time of a kernel call as the engine runs it: replayed from a CUDA graph, so launch cost does
not rank candidates (the FP8 tile tuner at warm-up) or skew the kernel benches that use it."""
from __future__ import annotations

import statistics

import torch


def graph_time_ms(fn, calls: int = 10, reps: int = 5) -> float:
    """Median per-call ms of `fn` replayed from a CUDA graph of `calls` calls (a 10 us GEMM costs
    less than the host's launch, so eager timing would rank by launch count). Thread-local capture:
    other threads (NCCL's watchdog) may touch CUDA meanwhile."""
    fn()  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)
