"""Measures the two numbers every floor is divided by: HBM copy bandwidth (bytes read + written
per second by a large device-to-device copy) and the dense bf16 matmul rate. CUDA events, warm-up,
median of repeats. `python -m bench.device_probe` prints JSON."""
from __future__ import annotations

import json
import statistics

import torch


def time_ms(fn, repeats: int = 20, warmup: int = 3, before=None) -> float:
    """Median CUDA-event time of `fn()`; `before()` runs untimed ahead of each repeat (e.g. a barrier)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def probe(device: str = "cuda") -> dict:
    n = 1 << 30  # 1 GiB per buffer
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    hbm = 2 * n / (ms / 1e3)
    src = dst = None  # free 2 GiB before the matmul buffers
    size = 8192
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    ms_mm = time_ms(lambda: a @ b, repeats=20)
    flops = 2 * size ** 3 / (ms_mm / 1e3)
    return {"device": torch.cuda.get_device_name(device), "hbm_copy_bytes_per_s": hbm,
            "bf16_matmul_flops_per_s": flops, "copy_ms_1GiB": ms, "matmul_ms_8192": ms_mm}


if __name__ == "__main__":
    print(json.dumps(probe(), indent=1))
