"""On CUDA: the one-call varlen flash prefill (engine/attention/dense_prefill.py `varlen_flash`) against
the per-sequence SDPA path it replaces, at real GQA and MLA-decompressed shapes (bf16), then greedy
tokens of tiny models in bf16 through the engine with the varlen path on and off.
Usage: python -m tests.engine.kernels.check_varlen_prefill [device]"""
from __future__ import annotations

import sys

import torch

from engine.attention import dense_prefill


def check_kernel(lens: list[int], hq: int, hkv: int, d: int, device: str, g: torch.Generator,
                 prefix: list[int] | None = None) -> bool:
    """Sequences of `lens` new tokens after `prefix` cached ones (keys = prefix + new)."""
    prefix = prefix or [0] * len(lens)
    k_lens = [n + p for n, p in zip(lens, prefix)]
    q = torch.randn(sum(lens), hq, d, generator=g).to(device, torch.bfloat16)
    k = torch.randn(sum(k_lens), hkv, d, generator=g).to(device, torch.bfloat16)
    v = torch.randn(sum(k_lens), hkv, d, generator=g).to(device, torch.bfloat16)
    cu_q = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    outs = []
    for varlen in (True, False):
        dense_prefill.VARLEN = varlen
        outs.append(dense_prefill.causal_varlen(q, k, v, cu_q, cu_k, lens, k_lens, d ** -0.5))
    dense_prefill.VARLEN = True
    got, ref = outs
    err = (got.float() - ref.float()).abs().max().item()
    ok = err < 2e-2 and got.shape == ref.shape
    shown = lens if len(lens) < 6 else f"{len(lens)} seqs"
    print(f"{'ok ' if ok else 'BAD'} varlen flash lens={shown}{f' after {prefix}' if any(prefix) else ''} "
          f"Hq={hq} Hkv={hkv} D={d}: max abs err {err:.1e}", flush=True)
    return ok


PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 8], [11, 12], list(range(400, 440)), list(range(600, 760))]


def generate(model: str, device: str, dtype: str, backend: str = "auto", max_tokens: int = 12,
             first: list[list[int]] | tuple = tuple(PROMPTS)) -> list[list[int]]:
    """Greedy tokens through the engine core: one prefill step of the `first` prompts (their last is the
    160-token one, so MLA's first step attends decompressed); that prompt again with 150 new tokens after
    it finished (its first 160 come from the prefix cache: a chunk over a cached prefix); then once more
    while another request decodes (one step of a decode and such a chunk: GQA's gathered varlen path)."""
    from engine.engine_core import EngineCore
    from engine.llm import build_engine_config
    from engine.sampling_params import SamplingParams
    config = build_engine_config(model, load_format="dummy", dtype=dtype, device=device, page_size=16, num_pages=64,
                                 max_num_batched_tokens=256, max_num_seqs=8, attention_backend=backend)
    core = EngineCore(config)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    long = list(first[-1])
    rounds = [list(first), [long + list(range(800, 950))], [list(range(1000, 1010))], [long + list(range(1100, 1140))]]
    reqs = []
    for n, batch in enumerate(rounds):
        for prompt in batch:
            rid = str(len(reqs))
            core.add_request(rid, prompt, sp)
            reqs.append(core.requests[rid])
        if n == 2:  # one step: this request is then decoding when the next round's chunk arrives
            core.step()
            continue
        while core.has_unfinished():
            core.step()
    return [list(r.output_token_ids) for r in reqs]


def check_engine(model: str, device: str) -> bool:
    runs = []
    for varlen in (False, True):
        dense_prefill.VARLEN = varlen
        runs.append(generate(model, device, "bfloat16"))
    dense_prefill.VARLEN = True
    ok = runs[0] == runs[1]
    print(f"{'ok ' if ok else 'BAD'} {model} bf16: greedy tokens with varlen flash prefill = per-sequence SDPA"
          + ("" if ok else f" per-seq={runs[0]} varlen={runs[1]}"), flush=True)
    return ok


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    g = torch.Generator().manual_seed(0)
    results = [check_kernel([2048], 32, 8, 128, device, g),  # Qwen3-8B / Llama-3-8B
               check_kernel([1, 7, 300, 129, 1000], 32, 8, 128, device, g),
               check_kernel([37] * 40, 32, 8, 128, device, g),  # a ShareGPT-like prefill batch
               check_kernel([2048], 16, 16, 192, device, g),  # DeepSeek-V2-Lite decompressed (values padded)
               check_kernel([5, 700, 64], 128, 128, 192, device, g),  # DeepSeek-V3 decompressed
               check_kernel([3, 100, 256], 32, 8, 128, device, g, prefix=[50, 400, 0]),  # bottom-right causal
               check_kernel([150, 1], 16, 16, 192, device, g, prefix=[160, 33])]
    results += [check_engine(m, device) for m in ("tiny-qwen3", "tiny-deepseek-v2")]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
