"""FP8 weight quantization in DeepSeek's block format: what it is and how checkpoints carry it.

A quantized matrix `W [N, K]` is stored as `weight` in `float8_e4m3fn` plus `weight_scale_inv`
float32 `[ceil(N / bn), ceil(K / bk)]`, one scale per `bn x bk` block (`weight_block_size`
`[bn, bk]` of the checkpoint's `quantization_config`); `W ~= weight * weight_scale_inv` block by
block (the name is DeepSeek's: it is the inverse of the quantizing scale). Activations are
quantized per token and per `bk`-column group on the fly (`activation_scheme: dynamic`).

This module owns:
* `Fp8Config` (from `quantization_config`, or `--quantization fp8` for online quantization of a
  bf16 checkpoint) and the *build scope*: `load_model` builds the model inside
  `building_with(config)`, and `Linear` / `FusedMoE` read `build_quantization()` once, in their
  constructors, to allocate FP8 storage. It is the only quantization state, set in one place;
  nothing reads it at run time.
* block quantize / dequantize and FP8 dummy weights (torch).
It must not hold kernels (engine/kernels/fp8_*.py), layer code (engine/layers/fp8_linear.py) or
checkpoint loading (engine/layers/fp8_weights.py), and imports nothing else of the engine but
its config, so that layers, kernels and the loader all build on it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import ConfigError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIX = "_scale_inv"
_FORMATS = {"e4m3": torch.float8_e4m3fn}


@dataclass(frozen=True)
class Fp8Config:
    """Block-scaled FP8 weights. `activation_scheme`: `dynamic` quantizes activations per token
    and `block_size[1]` columns (W8A8, what the GPU kernels run); `none` keeps activations in the
    compute dtype (weight-only; the reference the tests compare with HF). `online`: the checkpoint
    holds full-precision weights, quantized as they load."""

    block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    online: bool = False

    def __post_init__(self):
        bn, bk = self.block_size
        if bn < 1 or bk < 1:
            raise ConfigError(f"quantization_config.weight_block_size must be positive, got {list(self.block_size)}")
        if self.activation_scheme not in ("dynamic", "none"):
            raise ConfigError(f"quantization_config.activation_scheme {self.activation_scheme!r} is not supported "
                              f"(dynamic | none)")

    @property
    def quantize_activations(self) -> bool:
        return self.activation_scheme == "dynamic"

    def scale_shape(self, rows: int, cols: int) -> tuple[int, int]:
        bn, bk = self.block_size
        return (-(-rows // bn), -(-cols // bk))


def from_hf_config(hf: dict[str, Any]) -> Fp8Config | None:
    """The checkpoint's own `quantization_config` (None when it has none)."""
    q = hf.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"quantization_config.quant_method {method!r} is not supported (only 'fp8')")
    fmt = q.get("fmt", "e4m3")
    if fmt not in _FORMATS:
        raise ConfigError(f"quantization_config.fmt {fmt!r} is not supported (only 'e4m3')")
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) for b in block)):
        raise ConfigError(f"quantization_config.weight_block_size must be [rows, cols] (per-tensor FP8 is not "
                          f"supported), got {block!r}")
    return Fp8Config(tuple(block), q.get("activation_scheme", "dynamic"))


def resolve_quantization(requested: "str | Fp8Config | None", hf: dict[str, Any]) -> Fp8Config | None:
    """`--quantization` (None | fp8) combined with the checkpoint: an FP8 checkpoint loads as FP8
    whatever was asked; `fp8` on a full-precision checkpoint quantizes it online (128x128 blocks, or
    the blocks of an `Fp8Config` given instead of the name)."""
    if isinstance(requested, Fp8Config):
        return from_hf_config(hf) or Fp8Config(requested.block_size, requested.activation_scheme, online=True)
    if requested not in (None, "none", "fp8"):
        raise ConfigError(f"unknown quantization {requested!r} (none | fp8)")
    own = from_hf_config(hf)
    if own is not None or requested in (None, "none"):
        return own
    return Fp8Config(online=True)


def hf_quantization_config(config: Fp8Config) -> dict[str, Any]:
    """The `quantization_config` entry of a checkpoint in this format."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": config.activation_scheme,
            "weight_block_size": list(config.block_size)}


# ---------------------------------------------------------------- build scope
_BUILD: list[Fp8Config | None] = [None]


@contextlib.contextmanager
def building_with(config: Fp8Config | None):
    """Layers constructed inside take `config` (None: full precision)."""
    _BUILD.append(config)
    try:
        yield
    finally:
        _BUILD.pop()


def build_quantization() -> Fp8Config | None:
    return _BUILD[-1]


# ---------------------------------------------------------------- block quantization (torch)
def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [..., N, K]` → (FP8 `[..., N, K]`, float32 scales `[..., ceil(N/bn), ceil(K/bk)]`); each
    block's absolute maximum maps to the largest FP8 value."""
    if w.dim() > 2:
        pairs = [quantize_blocks(x, block) for x in w]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    n, k = w.shape
    bn, bk = block
    sn, sk = -(-n // bn), -(-k // bk)
    padded = torch.zeros(sn * bn, sk * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(sn, bn, sk, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(sn * bn, sk * bk)[:n, :k]
    return q.to(FP8_DTYPE), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_blocks` for one matrix `[N, K]` (or a stack `[E, N, K]`)."""
    if q.dim() > 2:
        return torch.stack([dequantize_blocks(a, b, block, dtype) for a, b in zip(q, scale)])
    n, k = q.shape
    return (q.float() * _expand(scale.float(), n, k, block)).to(dtype)


def fill_dummy_fp8(weight: torch.Tensor, scale: torch.Tensor, gen: torch.Generator, std: float) -> None:
    """Random FP8 weights drawn directly in FP8 (no full-precision copy): unit normals cast to e4m3
    with every block scale `std`, i.e. N(0, std) quantized."""
    with torch.no_grad():
        for chunk in weight.view(-1).split(1 << 26):
            chunk.copy_(torch.randn(chunk.shape, generator=gen, device=weight.device))
        scale.fill_(std)
