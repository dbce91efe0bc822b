"""Tiny FP8 checkpoints in DeepSeek's block format, built from the tiny random HF checkpoints of
hf_reference.py, with the dequantized twin HF transformers runs as the reference.

The quantizer here is written independently of engine/quantization.py: per `[bn, bk]` block,
scale = amax / 448, weight = (w / scale) cast to e4m3, saved as `X.weight` + `X.weight_scale_inv`
(float32, `[ceil(N/bn), ceil(K/bk)]`), `quantization_config` in config.json, like DeepSeek-V3.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from tests.engine.hf_reference import build_hf_checkpoint

FP8 = torch.float8_e4m3fn


def is_quantized(name: str, t: torch.Tensor) -> bool:
    """Which tensors DeepSeek-V3's FP8 release quantizes: every projection, not embeddings, LM head,
    norms or the MoE router."""
    return t.dim() == 2 and name.endswith(".weight") and not any(
        s in name for s in ("embed_tokens", "lm_head", "mlp.gate.weight", "norm"))


def _expand(s: torch.Tensor, n: int, k: int, block) -> torch.Tensor:
    return s.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]


def quantize(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    bn, bk = block
    s = torch.empty(-(-n // bn), -(-k // bk))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            s[i, j] = (w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max() / 448.0).clamp(min=1e-12)
    q = (w / _expand(s, n, k, block)).clamp(-448, 448).to(FP8)
    return q, s


def dequantize(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    return q.float() * _expand(s, *q.shape, block)


def write_checkpoint(path: str, tensors: dict, config: dict, shards: int = 1) -> None:
    """Save `tensors` as `shards` safetensors files (scales in the last one, apart from their weights)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    names = sorted(tensors, key=lambda n: n.endswith("_scale_inv"))
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n].contiguous() for n in names[i * per:(i + 1) * per]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file(part, os.path.join(path, fname))
        weight_map.update({n: fname for n in part})
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


def build_fp8_checkpoint(arch: str, root, block=(16, 32), shards: int = 2, **overrides):
    """→ (HF model running the dequantized weights, FP8 checkpoint dir, full-precision checkpoint dir)."""
    import transformers

    _, hf_dir = build_hf_checkpoint(arch, os.path.join(root, "bf16"), **overrides)
    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    fp8, deq = {}, {}
    for name, t in state.items():
        if is_quantized(name, t):
            q, s = quantize(t.float(), block)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            deq[name] = dequantize(q, s, block)
        else:
            fp8[name] = deq[name] = t
    fp8_dir, deq_dir = os.path.join(root, "fp8"), os.path.join(root, "dequantized")
    write_checkpoint(fp8_dir, fp8, dict(config, quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}),
        shards)
    write_checkpoint(deq_dir, deq, config)
    hf = transformers.AutoModelForCausalLM.from_pretrained(deq_dir, dtype=torch.float32).eval()
    return hf, fp8_dir, hf_dir
