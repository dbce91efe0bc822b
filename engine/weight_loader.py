"""Builds a model on its device and fills its weights: from an HF checkpoint directory
(safetensors, single file or sharded with an index), from an in-memory iterable of named tensors
(e.g. an HF model's state dict), or with seeded random values (`load_format="dummy"`).

Every parameter must be filled exactly once; anything missing, unknown or mis-shaped is a
`WeightError` that names the tensor. FP8 (engine/quantization.py): an FP8 checkpoint, or
`quantization="fp8"` on a full-precision one, builds the model inside the FP8 build scope, and
the checkpoint stream's FP8 weights reach the models joined with their block scales. The model classes do the name mapping (`load_weights`);
this module owns files, devices, dtypes and completeness.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Iterable, Iterator

import torch

from engine.config import ConfigError, ModelConfig, ParallelConfig
from engine.layers.weights import dummy_generator
from engine.models import WeightError, get_model_class
from engine.layers.fp8_weights import pair_scales
from engine.quantization import FP8_DTYPE, SCALE_SUFFIX, building_with, fill_dummy_fp8, resolve_quantization

log = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (from its index when sharded)."""
    index = os.path.join(path, _INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise WeightError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return [os.path.join(path, f) for f in files]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise WeightError(f"{path}: no *.safetensors files (use --load-format dummy to run without weights)")
    return [os.path.join(path, f) for f in files]


def iter_safetensors(path: str, progress: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, cpu tensor) for every tensor of the checkpoint directory `path`; with `progress`
    (None: when stderr is a terminal) a tqdm bar counts the bytes read and the shards done."""
    from safetensors import SafetensorError, safe_open

    files = checkpoint_files(path)
    bar = _progress_bar(files, progress)
    try:
        for i, file in enumerate(files):
            done = 0
            try:
                with safe_open(file, framework="pt", device="cpu") as f:
                    for name in f.keys():
                        tensor = f.get_tensor(name)
                        done += tensor.numel() * tensor.element_size()
                        bar.update(tensor.numel() * tensor.element_size())
                        yield name, tensor
            except (SafetensorError, OSError) as e:
                raise WeightError(f"{file}: cannot read safetensors ({e})") from None
            bar.set_postfix_str(f"shard {i + 1}/{len(files)}", refresh=False)
            bar.update(max(0, os.path.getsize(file) - done))  # the shard's header
    finally:
        bar.close()


def _progress_bar(files: list[str], progress: bool | None):
    import sys

    from tqdm import tqdm

    enabled = sys.stderr.isatty() if progress is None else progress
    total = sum(os.path.getsize(f) for f in files)  # file bytes: tensor bytes plus small headers
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading weights",
                disable=not enabled, file=sys.stderr, postfix=f"shard 0/{len(files)}")


def _dummy_fill(model: torch.nn.Module, seed: int, std: float) -> None:
    """Seeded random weights: norms near 1, biases near 0, matrices N(0, std). Each tensor's values
    depend only on (seed, its name), so a model's weights do not change when others are added."""
    own = set()  # parameters of modules that fill themselves (MoE experts: per logical expert)
    for prefix, module in model.named_modules():
        if hasattr(module, "dummy_fill"):
            module.dummy_fill(seed, std, prefix)
            own.update(f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False))
    for name, param in model.named_parameters():
        if name in own:
            continue
        gen = dummy_generator(seed, name, param.device)
        with torch.no_grad():
            if name.endswith(SCALE_SUFFIX):
                continue  # filled with its FP8 weight
            if param.dtype == FP8_DTYPE:
                fill_dummy_fp8(param.data, param.block_scale.data, gen, std)
            elif param.dim() == 1 and "norm" in name:
                noise = torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32)
                param.copy_(1.0 + 0.1 * noise)
            elif param.dim() == 1:
                param.copy_(0.02 * torch.randn(param.shape, generator=gen, device=param.device))
            else:
                for chunk in param.view(-1).split(1 << 26):  # bound the float32 temporary (256 MiB)
                    chunk.copy_(std * torch.randn(chunk.shape, generator=gen, device=param.device))


def _check_complete(model: torch.nn.Module, loaded: set[str], source: str) -> None:
    expected = {name for name, _ in model.named_parameters()}
    missing = sorted(expected - set(loaded))
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise WeightError(f"{source} is missing tensors for: {', '.join(missing[:8])}{more}")


def build_model(model_config: ModelConfig, device: torch.device | str, parallel: ParallelConfig | None = None,
                quantization: str | None = None) -> torch.nn.Module:
    """`model_config`'s architecture on `device` (weights uninitialised; `meta` sizes without memory),
    in `model_config.dtype`, FP8 where the checkpoint or `quantization` says so."""
    cls = get_model_class(model_config.architecture)
    quant = resolve_quantization(quantization, model_config.hf)
    with _default_dtype(model_config.dtype), torch.device(device), building_with(quant):
        model = cls(model_config, parallel or ParallelConfig())
    model.quantization = quant
    return model


def weight_bytes_per_rank(model_config: ModelConfig, parallel: ParallelConfig, quantization=None) -> int:
    """Bytes of weights (and derived buffers) one EP rank holds, counted on a `meta` build: exact,
    FP8 scales, replicated layers and each rank's expert slots included (engine/memory_plan.py)."""
    rank0 = dataclasses.replace(parallel, ep_rank=0, dist_init_method=None)
    model = build_model(model_config, "meta", rank0, quantization)
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _refuse_if_too_big(model_config: ModelConfig, device: torch.device, parallel: ParallelConfig,
                       quantization) -> None:
    """Before allocating: a rank whose weights alone exceed the device is refused, with the numbers."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    need = weight_bytes_per_rank(model_config, parallel, quantization)
    log.info("weights per rank: %.1f GiB of %.1f GiB (EP=%d)", need / 2**30, total / 2**30, parallel.ep_size)
    if need > total:
        raise ConfigError(f"cannot fit {model_config.architecture}: {need / 2**30:.1f} GiB of weights per rank "
                          f"(EP={parallel.ep_size}) on a {total / 2**30:.1f} GiB device; use --quantization fp8, "
                          f"a larger --ep-size or fewer --num-redundant-experts (python -m engine.memory_plan sizes "
                          f"a configuration)")


def load_model(model_config: ModelConfig, device: torch.device | str, load_format: str = "auto",
               seed: int = 0, parallel: ParallelConfig | None = None,
               weights: Iterable[tuple[str, torch.Tensor]] | None = None,
               quantization: str | None = None, progress: bool | None = None) -> torch.nn.Module:
    """Build `model_config`'s architecture on `device` in `model_config.dtype` and fill its weights.
    `quantization="fp8"` quantizes a full-precision checkpoint (or dummy weights) to FP8 blocks;
    `progress` shows a bar of the bytes and shards read (None: when stderr is a terminal)."""
    device = torch.device(device)
    _refuse_if_too_big(model_config, device, parallel or ParallelConfig(), quantization)
    model = build_model(model_config, device, parallel, quantization)
    quant = model.quantization
    if weights is not None:
        source = "the given weights"
        loaded = model.load_weights(pair_scales(iter(weights), quant))
        _check_complete(model, loaded, source)
    elif load_format == "dummy":
        _dummy_fill(model, seed, float(model_config.hf.get("initializer_range", 0.02)))
    else:
        if model_config.path is None:
            raise WeightError(f"model {model_config.architecture} has no checkpoint directory; "
                              f"use --load-format dummy to run a preset with random weights")
        source = f"checkpoint {model_config.path}"
        loaded = model.load_weights(pair_scales(iter_safetensors(model_config.path, progress), quant))
        _check_complete(model, loaded, source)
    if hasattr(model, "process_weights_after_loading"):
        model.process_weights_after_loading()
    model.eval()
    log.info("loaded %s (%s%s) on %s: %.2f B parameters, %.2f GiB", model_config.architecture, load_format,
             ", fp8" if quant else "", device, sum(p.numel() for p in model.parameters()) / 1e9,
             sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30)
    return model
