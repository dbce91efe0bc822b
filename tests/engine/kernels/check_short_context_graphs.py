"""On CUDA: greedy tokens of tiny models (float32, fused kernels, CUDA graphs) with short-context
decode graphs (`decode_graph_short_context`: split-KV launches sized for contexts up to N) against the
same engine without them. The prompts start below N and decode past it, so both graph kinds serve.
Usage: python -m tests.engine.kernels.check_short_context_graphs [model,model,...]"""
from __future__ import annotations

import sys

from engine.engine_core import EngineCore
from engine.llm import build_engine_config
from tests.engine.kernels.check_fused_engine import PROMPTS, greedy

SHORT = 64  # the 9-, 2- and 40-token prompts decode across it; the 160-token one never fits it


def generate(model: str, short: int) -> list[list[int]]:
    config = build_engine_config(model, load_format="dummy", dtype="float32", device="cuda", page_size=16,
                                 num_pages=64, max_num_batched_tokens=256, max_num_seqs=8,
                                 attention_backend="triton", decode_graph_short_context=short)
    return greedy(EngineCore(config), PROMPTS, max_tokens=40)


def main() -> int:
    models = sys.argv[1].split(",") if len(sys.argv) > 1 else ("tiny-qwen3", "tiny-deepseek-v2")
    bad = 0
    for m in models:
        ref, got = generate(m, 0), generate(m, SHORT)
        ok = ref == got
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {m}: greedy tokens with short-context decode graphs (N={SHORT}) = without "
              f"({sum(a == b for a, b in zip(ref, got))}/{len(ref)} sequences equal)", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
