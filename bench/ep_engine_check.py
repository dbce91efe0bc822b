"""Expert parallelism end to end on the GPUs of one host: the same prompts through an engine with
EP = 1 (one GPU) and EP = N (one engine process per GPU, NCCL all-to-all), greedy tokens compared.
Tiny models in float32 must agree exactly; a real model in bf16 reports the fraction of equal
tokens (summation order differs across ranks) and the wall time of both. Prints JSON."""
from __future__ import annotations

import argparse
import json
import time


def compare(model: str, dtype: str, ep: int, num_prompts: int, max_tokens: int, load: str = "dummy",
            extra: dict | None = None, ep_extra: dict | None = None) -> dict:
    from engine.engine_client import EngineClient
    from engine.engine_args import build_engine_config
    from engine.sampling_params import SamplingParams

    prompts = [[(7 * i + 13 * j) % 1000 + 10 for j in range(24 + (i % 5) * 9)] for i in range(num_prompts)]
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    out = {}
    for size in (1, ep):
        kw = dict(load_format=load, dtype=dtype, device="cuda", max_model_len=1024, ep_size=size,
                  gpu_memory_utilization=0.85, **(extra or {}), **((ep_extra or {}) if size > 1 else {}))
        client = EngineClient(build_engine_config(model, **kw))
        try:
            client.generate(prompts[:2], sp)  # warm-up
            t0 = time.perf_counter()
            res = client.generate(prompts, sp)
            wall = time.perf_counter() - t0
            backend = client.engine_stats()["ranks"][0].get("ep_backend", "local")
        finally:
            client.shutdown()
        out[size] = dict(tokens=[r.token_ids for r in res], wall_s=wall, backend=backend)
    a, b = out[1]["tokens"], out[ep]["tokens"]
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(len(r) for r in a)

    def common_prefix(x, y):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n
    prefixes = [common_prefix(ra, rb) for ra, rb in zip(a, b)]
    return dict(model=model, dtype=dtype, ep=ep, prompts=num_prompts, max_tokens=max_tokens,
                identical_sequences=sum(ra == rb for ra, rb in zip(a, b)), equal_token_fraction=same / total,
                first_token_equal=sum(p > 0 for p in prefixes), mean_common_prefix=sum(prefixes) / len(prefixes),
                wall_s_ep1=out[1]["wall_s"], wall_s_epN=out[ep]["wall_s"], backend_epN=out[ep]["backend"],
                output_tok_s_ep1=total / out[1]["wall_s"], output_tok_s_epN=total / out[ep]["wall_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only-real", action="store_true", help="skip the tiny float32 models")
    args = ap.parse_args()
    # Tiny models in float32 use the torch attention reference (the Triton kernels are built for bf16/fp16).
    exact = dict(attention_backend="torch", enforce_eager=True)  # the torch reference is not graph-safe
    results = [] if args.only_real else [compare("tiny-deepseek-v3", "float32", args.ep, 8, 16, extra=exact),
               compare("tiny-qwen3-moe", "float32", args.ep, 8, 16,
                       extra=exact, ep_extra=dict(num_redundant_experts=args.ep * 2, eplb_interval=4, eplb_window=4))]
    results.append(compare("deepseek-v2-lite", "bfloat16", args.ep, 32, 32))
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(f"{args.out}/ep_engine.json", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
