"""FP8 against bf16 on the same random weights: the bf16 model generates N tokens greedily, then
both models score that whole sequence (one prefill step each) and we report top-1 agreement, the
first position where FP8's choice differs, and the max logit error.

The same weights: `--load-format dummy` draws each tensor from a stream seeded by (seed, name);
bf16 stores `std * z`, FP8 stores `z` cast to e4m3 with block scales `std` — the bf16 weights
rounded to FP8 (engine/quantization.py `fill_dummy_fp8`).

    python -m bench.fp8_accuracy --model qwen3-8b --tokens 512 [--kv-cache-dtype fp8_e4m3] --out DIR
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import torch

from engine.attention.backend import select_backend
from engine.attention.metadata import AttentionMetadata
from engine.config import kv_cache_dtype
from engine.engine_args import build_engine_config
from engine.engine_core import EngineCore
from engine.forward_batch import ForwardBatch
from engine.kv_cache import KVPool
from engine.presets import resolve_model
from engine.sampling_params import SamplingParams
from engine.weight_loader import load_model


@torch.no_grad()
def sequence_logits(model, mc, ids: list[int], device, kv_dtype=None, page_size: int = 16) -> torch.Tensor:
    """Float32 logits at every position of `ids`, from one prefill step through a fresh KV pool."""
    n = len(ids)
    pages = -(-n // page_size)
    pool = KVPool(mc.kv_spec(page_size, kv_dtype), pages + 1, device)
    meta = AttentionMetadata.build([n], [n], [list(range(1, pages + 1))], page_size, device)
    batch = ForwardBatch(meta, pool.layers, select_backend(device))
    hidden = model(torch.tensor(ids, device=device), torch.arange(n, device=device), batch)
    return model.compute_logits(hidden).float()


def run(model_name: str, dtype: str, device: str, prompt_len: int, tokens: int, seed: int, kv: str) -> dict:
    device = torch.device(device)
    mc = resolve_model(model_name, dtype)
    ref = load_model(mc, device, "dummy", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, mc.vocab_size, (prompt_len,), generator=gen).tolist()
    # EngineCore, not LLM: token ids in and out, so no tokenizer is needed (the device has none of DeepSeek's).
    core = EngineCore(build_engine_config(model_name, device=str(device), dtype=dtype, load_format="dummy",
                                          max_model_len=prompt_len + tokens + 16, max_num_seqs=1,
                                          num_pages=-(-(prompt_len + tokens) // 16) + 8),
                      model=ref, model_config=mc)
    core.add_request("acc", prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    req = core.requests["acc"]
    generated = []
    while core.has_unfinished():
        core.step()
        generated = list(req.output_token_ids)
    seq = prompt + generated[:tokens]
    del core
    base = sequence_logits(ref, mc, seq, device)[prompt_len - 1: -1]
    del ref
    fp8 = load_model(mc, device, "dummy", seed=seed, quantization="fp8")
    got = sequence_logits(fp8, mc, seq, device, kv_cache_dtype(kv, mc.dtype))[prompt_len - 1: -1]
    agree = got.argmax(-1) == base.argmax(-1)
    err = (got - base).abs()
    first = int((~agree).nonzero()[0]) if not bool(agree.all()) else None
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), model=model_name,
                dtype=dtype, kv_cache_dtype=kv, device=torch.cuda.get_device_name(device) if device.type == "cuda"
                else "cpu", prompt_len=prompt_len, tokens=tokens, top1_agreement=agree.float().mean().item(),
                first_disagreement=first, max_logit_error=err.max().item(), mean_logit_error=err.mean().item(),
                max_abs_logit=base.abs().max().item())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8_e4m3"], default="auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    r = run(args.model, args.dtype, args.device, args.prompt_len, args.tokens, args.seed, args.kv_cache_dtype)
    print(json.dumps(r, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"fp8_accuracy_{args.model}.json"), "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
