"""Memory sizing before loading: the bytes of weights (and KV per token) one rank holds for a
model, a quantization and an EP size, and whether that fits a device.

Weights are counted exactly by building the model on the `meta` device (no memory) with the same
code that loads it (`weight_loader.weight_bytes_per_rank`), so FP8 scales, replicated
attention/dense layers, each rank's expert slots (redundant ones included) and derived buffers
(MLA's absorbed matrices, rotary tables) are all in. `load_model` refuses, before a byte is
allocated, a rank whose weights exceed its device; `python -m engine.memory_plan --model deepseek-v3 --quantization fp8 --ep-size 8 16` prints plans.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from engine.config import ModelConfig, ParallelConfig
from engine.quantization import resolve_quantization
from engine.weight_loader import weight_bytes_per_rank

H200_BYTES = 143771 * 2**20  # what an H200 reports (141 GB of HBM3e)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    model: str
    quantization: str
    ep_size: int
    weight_bytes: int  # per rank
    kv_bytes_per_token: int  # per rank: every rank holds the KV of its own sequences
    device_bytes: int
    utilization: float = 0.9

    @property
    def kv_budget_bytes(self) -> int:
        return int(self.device_bytes * self.utilization) - self.weight_bytes

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV that fit beside the weights (activations not counted)."""
        return max(0, self.kv_budget_bytes // self.kv_bytes_per_token)

    def fits(self, min_kv_tokens: int) -> bool:
        return self.kv_tokens >= min_kv_tokens

    def describe(self) -> str:
        gib = 2**30
        return (f"{self.model} {self.quantization} EP={self.ep_size}: {self.weight_bytes / gib:.1f} GiB of weights "
                f"per rank, {self.kv_bytes_per_token / 1024:.1f} KiB of KV per token; on a "
                f"{self.device_bytes / gib:.1f} GiB device at {self.utilization:.0%}: "
                f"{self.kv_budget_bytes / gib:.1f} GiB left for KV ({self.kv_tokens} tokens)")


def plan(model_config: ModelConfig, parallel: ParallelConfig, quantization: str | None, device_bytes: int,
         utilization: float = 0.9, kv_dtype: torch.dtype | None = None) -> MemoryPlan:
    quant = resolve_quantization(quantization, model_config.hf)
    kv = model_config.kv_spec(16, kv_dtype or model_config.dtype).bytes_per_token
    return MemoryPlan(model_config.architecture if model_config.path is None else model_config.path,
                      "fp8" if quant else str(model_config.dtype).removeprefix("torch."), parallel.ep_size,
                      weight_bytes_per_rank(model_config, parallel, quantization), kv, device_bytes, utilization)


def gpus_needed(model: str = "deepseek-v3", quantization: str | None = "fp8", ep_sizes=(8, 16),
                device_bytes: int = H200_BYTES, min_kv_tokens: int | None = None) -> dict[int, MemoryPlan | None]:
    """For each EP size: its plan when one rank's weights plus KV for `min_kv_tokens` (default: one
    sequence of the model's full context) fit `device_bytes` at 90%, else None. With EP=N a role
    needs N such GPUs (experts split N ways, attention data-parallel on each)."""
    from engine.presets import resolve_model

    mc = resolve_model(model, "bfloat16")
    need = mc.max_model_len if min_kv_tokens is None else min_kv_tokens
    out = {}
    for ep in ep_sizes:
        p = plan(mc, ParallelConfig(ep_size=ep), quantization, device_bytes)
        out[ep] = p if p.fits(need) else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek-v3")
    ap.add_argument("--quantization", choices=["none", "fp8"], default="fp8")
    ap.add_argument("--ep-size", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8_e4m3"], default="auto")
    ap.add_argument("--device-gib", type=float, default=H200_BYTES / 2**30, help="device memory (default: H200)")
    args = ap.parse_args(argv)
    from engine.config import kv_cache_dtype
    from engine.presets import resolve_model

    mc = resolve_model(args.model, "bfloat16")
    kv = kv_cache_dtype(args.kv_cache_dtype, mc.dtype)
    for ep in args.ep_size:
        p = plan(mc, ParallelConfig(ep_size=ep), args.quantization, int(args.device_gib * 2**30), kv_dtype=kv)
        verdict = "fits" if p.fits(mc.max_model_len) else "DOES NOT FIT"
        print(f"{p.describe()} -> {verdict} ({ep} GPUs per role)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
