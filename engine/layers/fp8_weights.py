"""Loading FP8 weights in DeepSeek's block format (engine/quantization.py): FP8 parameters with
their block scales, and the checkpoint stream's FP8 tensors joined with their `weight_scale_inv`.

`pair_scales` turns the stream's `X.weight` (e4m3) + `X.weight_scale_inv` into one `Fp8Weight`,
whatever their order or shard, and checks them; `fp8_parameters` allocates an FP8 matrix (or
expert stack) whose weight carries `load_rows`, so engine/layers/weights.py's loaders copy an
`Fp8Weight` (or, online, a full-precision tensor they quantize) into it with its scales. Every
error is a `WeightError` naming the tensor: an FP8 tensor the config does not announce, a scale
without a weight or a weight without a scale, a scale of the wrong shape or not finite and
positive, a merged projection that does not start on a block boundary, a full-precision tensor
where the config announces FP8.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Iterator, NamedTuple

import torch

from engine.layers.weights import WeightError, copy_into
from engine.quantization import FP8_DTYPE, SCALE_SUFFIX, Fp8Config, dequantize_blocks, quantize_blocks


class Fp8Weight(NamedTuple):
    """An FP8 checkpoint weight with its block scales, as the loaders receive it."""

    data: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]

    @property
    def shape(self):
        return self.data.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_blocks(self.data, self.scale, self.block, dtype)


def check_scale(name: str, weight: torch.Tensor, scale: torch.Tensor, config: Fp8Config) -> None:
    """A scale tensor must have one finite positive float per block of `weight`."""
    want = config.scale_shape(*weight.shape[-2:])
    if scale.dim() != 2 or tuple(scale.shape) != want:
        raise WeightError(f"tensor {name!r}: expected block scales of shape {want} for weight {tuple(weight.shape)} "
                     f"with weight_block_size {list(config.block_size)}, got {tuple(scale.shape)}")
    if not scale.is_floating_point():
        raise WeightError(f"tensor {name!r}: block scales must be floating point, got {scale.dtype}")
    bad = ~torch.isfinite(scale) | (scale <= 0)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise WeightError(f"tensor {name!r}: block scale at {idx} is {scale[idx].item()} (scales must be finite "
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
                raise WeightError(f"tensor {name!r}: the checkpoint has FP8 block scales but config.json has no "
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
                raise WeightError(f"tensor {name!r} is {t.dtype} but config.json announces no FP8 quantization "
                             f"(quantization_config with quant_method 'fp8')")
            if t.dtype != FP8_DTYPE:
                raise WeightError(f"tensor {name!r} is {t.dtype} but quantization_config announces e4m3 "
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
        raise WeightError(f"tensor {first!r} is FP8 but the checkpoint has no {first + SCALE_SUFFIX!r} "
                     f"({len(pending)} FP8 weight(s) without scales)")
    if scales:
        sname = sorted(s for s, _ in scales.values())[0]
        raise WeightError(f"tensor {sname!r}: block scales without their FP8 weight "
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
    weight.load_rows = functools.partial(load_fp8_rows, weight)  # what engine/layers/weights.load_rows calls
    return weight, scale


def load_fp8_rows(weight: torch.nn.Parameter, src, name: str, start: int = 0, slot: int | None = None) -> None:
    """Copy checkpoint tensor `src` (an `Fp8Weight`, or full precision for online quantization) into
    rows `[start, start + rows)` of FP8 `weight` (of expert `slot` when stacked) and its scales.
    A merged part must start on a block boundary, else its scales would share blocks."""
    config: Fp8Config = weight.quant
    bn = config.block_size[0]
    if start % bn:
        raise WeightError(f"tensor {name!r}: its rows start at row {start} of a merged FP8 weight, not on a block "
                     f"boundary; weight_block_size {list(config.block_size)} must divide the sizes of the merged "
                     f"projections")
    if isinstance(src, Fp8Weight):
        data, scale = src.data, src.scale
    elif config.online:
        data, scale = quantize_blocks(src.to(weight.device), config.block_size)
    else:
        raise WeightError(f"tensor {name!r} is {src.dtype} but quantization_config announces FP8 weights with "
                     f"block scales ({name + SCALE_SUFFIX!r})")
    w = weight.data if slot is None else weight.data[slot]
    s = weight.block_scale.data if slot is None else weight.block_scale.data[slot]
    rows = data.shape[-2]
    copy_into(w[..., start: start + rows, :], data, name)
    copy_into(s[..., start // bn: start // bn + scale.shape[-2], :], scale, name + SCALE_SUFFIX)
