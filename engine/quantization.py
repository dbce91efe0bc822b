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
* block quantize / dequantize (torch), and `pair_scales`: the checkpoint stream's FP8 weights
  joined with their scales, checked (dtype announced, scale shape, finite) with errors naming
  the tensor.
It must not hold kernels (engine/kernels/fp8_gemm*.py) or layer code (engine/layers/fp8_linear.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, NamedTuple

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


# ---------------------------------------------------------------- checkpoint stream
class Fp8Weight(NamedTuple):
    """An FP8 checkpoint weight with its block scales, as the loaders receive it."""

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]

    @property
    def shape(self):
        return self.data.shape


def _error(msg: str):
    from engine.layers.weights import WeightError
    return WeightError(msg)


def check_scale(name: str, weight: torch.Tensor, scale: torch.Tensor, config: Fp8Config) -> None:
    """A scale tensor must have one finite positive float per block of `weight`."""
    want = config.scale_shape(*weight.shape[-2:])
    if scale.dim() != 2 or tuple(scale.shape) != want:
        raise _error(f"tensor {name!r}: expected block scales of shape {want} for weight {tuple(weight.shape)} "
                     f"with weight_block_size {list(config.block_size)}, got {tuple(scale.shape)}")
    if not scale.is_floating_point():
        raise _error(f"tensor {name!r}: block scales must be floating point, got {scale.dtype}")
    bad = ~torch.isfinite(scale) | (scale <= 0)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise _error(f"tensor {name!r}: block scale at {idx} is {scale[idx].item()} (scales must be finite "
                     f"and positive; is the checkpoint corrupt?)")


def pair_scales(weights: Iterable[tuple[str, torch.Tensor]], config: Fp8Config | None
                ) -> Iterator[tuple[str, Any]]:
    """Join each FP8 `X.weight` with its `X.weight_scale_inv` (in any order, across shards) and
    yield `(X.weight, Fp8Weight)`; everything else passes through. Errors name the tensor: an FP8
    tensor the config does not announce, a scale without a weight, a weight without a scale, a
    scale of the wrong shape or with non-finite values."""
    pending: dict[str, torch.Tensor] = {}  # weight name -> FP8 data waiting for its scale
    scales: dict[str, tuple[str, torch.Tensor]] = {}  # weight name -> (scale name, scale) waiting
    for name, t in weights:
        if name.endswith(SCALE_SUFFIX):
            wname = name[: -len(SCALE_SUFFIX)]
            if config is None:
                raise _error(f"tensor {name!r}: the checkpoint has FP8 block scales but config.json has no "
                             f"quantization_config announcing them")
            if wname in pending:
                data = pending.pop(wname)
                check_scale(name, data, t, config)
                yield wname, Fp8Weight(data, t.float(), config.block_size)
            else:
                scales[wname] = (name, t)
            continue
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
            if config is None or config.online:
                raise _error(f"tensor {name!r} is {t.dtype} but config.json announces no FP8 quantization "
                             f"(quantization_config with quant_method 'fp8')")
            if t.dtype != FP8_DTYPE:
                raise _error(f"tensor {name!r} is {t.dtype} but quantization_config announces e4m3 "
                             f"({FP8_DTYPE})")
            if name in scales:
                sname, s = scales.pop(name)
                check_scale(sname, t, s, config)
                yield name, Fp8Weight(t, s.float(), config.block_size)
            else:
                pending[name] = t
            continue
        yield name, t
    if pending:
        first = sorted(pending)[0]
        raise _error(f"tensor {first!r} is FP8 but the checkpoint has no {first + SCALE_SUFFIX!r} "
                     f"({len(pending)} FP8 weight(s) without scales)")
    if scales:
        sname = sorted(s for s, _ in scales.values())[0]
        raise _error(f"tensor {sname!r}: block scales without their FP8 weight "
                     f"{sname[: -len(SCALE_SUFFIX)]!r} in the checkpoint")


# ---------------------------------------------------------------- FP8 parameters
def fp8_parameters(config: Fp8Config, rows: int, cols: int, stack: int | None = None
                   ) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """Storage of one FP8 matrix `[rows, cols]` (or a stack `[stack, rows, cols]` of experts): the FP8
    weight and its float32 block scales. The weight carries `block_scale` and `quant` so that loaders
    given only the weight find the rest."""
    lead = () if stack is None else (stack,)
    weight = torch.nn.Parameter(torch.empty(*lead, rows, cols, dtype=FP8_DTYPE), requires_grad=False)
    scale = torch.nn.Parameter(torch.empty(*lead, *config.scale_shape(rows, cols), dtype=torch.float32),
                               requires_grad=False)
    weight.block_scale, weight.quant = scale, config
    return weight, scale


def load_fp8_rows(weight: torch.nn.Parameter, src, name: str, start: int = 0, slot: int | None = None) -> None:
    """Copy checkpoint tensor `src` (an `Fp8Weight`, or full precision for online quantization) into
    rows `[start, start + rows)` of FP8 `weight` (of expert `slot` when stacked) and its scales.
    A merged part must start on a block boundary, else its scales would share blocks."""
    from engine.layers.weights import copy_into

    config: Fp8Config = weight.quant
    bn = config.block_size[0]
    if start % bn:
        raise _error(f"tensor {name!r}: its rows start at row {start} of a merged FP8 weight, not on a block "
                     f"boundary; weight_block_size {list(config.block_size)} must divide the sizes of the merged "
                     f"projections")
    if isinstance(src, Fp8Weight):
        data, scale = src.data, src.scale
    elif config.online:
        data, scale = quantize_blocks(src.to(weight.device), config.block_size)
    else:
        raise _error(f"tensor {name!r} is {src.dtype} but quantization_config announces FP8 weights with "
                     f"block scales ({name + SCALE_SUFFIX!r})")
    w = weight.data if slot is None else weight.data[slot]
    s = weight.block_scale.data if slot is None else weight.block_scale.data[slot]
    rows = data.shape[-2]
    copy_into(w[..., start: start + rows, :], data, name)
    copy_into(s[..., start // bn: start // bn + scale.shape[-2], :], scale, name + SCALE_SUFFIX)


def fill_dummy_fp8(weight: torch.Tensor, scale: torch.Tensor, gen: torch.Generator, std: float) -> None:
    """Random FP8 weights drawn directly in FP8 (no full-precision copy): unit normals cast to e4m3
    with every block scale `std`, i.e. N(0, std) quantized."""
    with torch.no_grad():
        for chunk in weight.view(-1).split(1 << 26):
            chunk.copy_(torch.randn(chunk.shape, generator=gen, device=weight.device))
        scale.fill_(std)
