"""Checkpoint-name → parameter mapping shared by the layers and the model files.

A model lists every HF tensor name it accepts in a `WeightTable`, each with the function that
copies it into place and the *slots* it fills (a slot is one parameter or one shard of a merged
parameter). Alternative spellings of the same slots (e.g. transformers-5's fused in-memory MoE
expert tensors next to the per-expert names of checkpoints on disk) are aliases. Loading fails
with a `WeightError` naming the tensor on an unknown name or a shape mismatch, and naming the
missing tensors when a slot was never filled.
"""
from __future__ import annotations

import zlib
from typing import Callable, Hashable, Iterable

import torch


class WeightError(ValueError):
    """A checkpoint tensor that is missing, unknown or mis-shaped; the message names it."""


Loader = Callable[[torch.Tensor, str], None]


def dummy_generator(seed: int, name: str, device) -> torch.Generator:
    """The random stream of dummy weights for tensor `name`: depends only on (seed, name), so a
    tensor's values do not change when others are added, and every copy of it matches."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def copy_into(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if not isinstance(src, torch.Tensor):  # an FP8 checkpoint weight (fp8_weights.Fp8Weight) for a
        src = src.dequantize(dst.dtype)  # parameter kept in full precision
    if tuple(src.shape) != tuple(dst.shape):
        raise WeightError(f"tensor {name!r}: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def load_rows(param: torch.Tensor, src, name: str, start: int = 0, size: int | None = None,
              slot: int | None = None) -> None:
    """Copy `src` into `param` (expert `slot` of a stacked one; rows `[start, start + size)` of a
    merged one); a parameter with its own `load_rows` (FP8 weights: engine/layers/fp8_weights.py)
    copies itself, scales included."""
    own = getattr(param, "load_rows", None)
    if own is not None:
        return own(src, name, start, slot)
    dst = param.data if slot is None else param.data[slot]
    copy_into(dst if size is None else dst[start: start + size], src, name)


def into(dst: torch.Tensor) -> Loader:
    return lambda t, name: load_rows(dst, t, name)


class WeightTable:
    def __init__(self, owner: str):
        self.owner = owner
        self.entries: dict[str, tuple[Loader, list[Hashable]]] = {}
        self.required: dict[Hashable, str] = {}  # slot -> the canonical tensor name that fills it

    def add(self, name: str, loader: Loader, slots: list[Hashable] | None = None, optional: bool = False) -> None:
        slots = slots if slots is not None else [name]
        self.entries[name] = (loader, slots)
        if not optional:
            for s in slots:
                self.required.setdefault(s, name)

    def alias(self, name: str, loader: Loader, slots: list[Hashable]) -> None:
        """Another spelling that fills existing slots (not required by itself)."""
        self.entries[name] = (loader, slots)

    def load(self, weights: Iterable[tuple[str, torch.Tensor]], skip: Callable[[str], bool] = lambda n: False) -> None:
        filled: set[Hashable] = set()
        for name, tensor in weights:
            if skip(name):
                continue
            entry = self.entries.get(name)
            if entry is None:
                raise WeightError(f"{self.owner}: unexpected checkpoint tensor {name!r}")
            loader, slots = entry
            loader(tensor, name)
            filled.update(slots)
        missing = sorted({name for slot, name in self.required.items() if slot not in filled})
        if missing:
            more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
            raise WeightError(f"{self.owner}: checkpoint is missing tensor(s) {', '.join(missing[:8])}{more}")


def into_shard(merged, index: int, param: str = "weight") -> Loader:
    """Copy into slice `index` of a `MergedLinear`'s weight (or bias)."""
    target = getattr(merged, param)
    start, size = merged.offsets[index], merged.out_sizes[index]
    return lambda t, name: load_rows(target, t, name, start, size)
