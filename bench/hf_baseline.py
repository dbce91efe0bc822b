"""The baseline: HF `transformers` on the same config and the same weights, timed with `generate`
(decode) and a plain forward (prefill). The model is built with random weights on the device;
its state dict then seeds our engine (`load_model(..., weights=...)`) so both run identical weights."""
from __future__ import annotations

import time

import torch

_CONFIGS = {"LlamaForCausalLM": "LlamaConfig", "Qwen3ForCausalLM": "Qwen3Config",
            "Qwen3MoeForCausalLM": "Qwen3MoeConfig", "DeepseekV2ForCausalLM": "DeepseekV2Config",
            "DeepseekV3ForCausalLM": "DeepseekV3Config"}


def build_hf_model(hf: dict, device: str, dtype: torch.dtype):
    import transformers

    arch = hf["architectures"][0]
    fields = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    config = getattr(transformers, _CONFIGS[arch])(**fields)
    with torch.device(device):
        model = getattr(transformers, arch)._from_config(config, dtype=dtype)
    return model.eval()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_decode(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, device: str) -> dict:
    """Decode tokens/s from generate(N) − generate(1) (the difference cancels the prefill)."""
    ids = torch.randint(0, vocab, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)

    def run(n):
        _sync(device)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t0

    run(2)  # warm-up
    t1, tn = run(1), run(new_tokens)
    step = (tn - t1) / (new_tokens - 1)
    return {"batch": batch, "ms_per_step": step * 1e3, "tok_s": batch / step}


@torch.no_grad()
def time_prefill(model, tokens: int, vocab: int, device: str, repeats: int = 3) -> dict:
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    model(ids, use_cache=False)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"tokens": tokens, "seconds": best, "tok_s": tokens / best}
