"""On CUDA: greedy tokens of tiny models with the fused kernels (CUDA graphs on) against the same
engine on the same device with every fused op switched to its torch reference (eager), float32.
Usage: python -m tests.engine.kernels.check_fused_engine [device] [model,model,...]"""
from __future__ import annotations

import sys

from engine.engine_core import EngineCore
from engine.layers import fused_ops
from engine.llm import build_engine_config
from engine.sampling_params import SamplingParams

# The 160-token prompt makes the first step a prefill of 211 tokens: MLA models attend decompressed there
# (mla.DECOMPRESS_MIN_TOKENS), all four sequences from that step's own entries.
PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 8], [11, 12], list(range(400, 440)), list(range(600, 760))]
MODELS = ("tiny-llama", "tiny-qwen3", "tiny-qwen3-moe", "tiny-deepseek-v2", "tiny-deepseek-v3")


def generate(model: str, fused: bool, device: str) -> list[list[int]]:
    """Greedy tokens through the engine core in-process (no tokenizer needed)."""
    fused_ops._fused = (lambda x: x.is_cuda) if fused else (lambda x: False)  # the seam's one switch
    config = build_engine_config(model, load_format="dummy", dtype="float32", device=device, page_size=16,
                                 num_pages=64, enforce_eager=not fused, max_num_batched_tokens=256, max_num_seqs=8)
    return greedy(EngineCore(config), PROMPTS)


def greedy(core: EngineCore, prompts: list[list[int]], max_tokens: int = 12, first: int = 0) -> list[list[int]]:
    """Every prompt's greedy tokens (`max_tokens` each), the engine stepped until all are done (request
    ids from `first` on)."""
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts, first):
        core.add_request(str(i), p, sp)
    reqs = [core.requests[str(i)] for i in range(first, first + len(prompts))]
    while core.has_unfinished():
        core.step()
    return [list(r.output_token_ids) for r in reqs]


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    models = sys.argv[2].split(",") if len(sys.argv) > 2 else MODELS
    bad = 0
    for model in models:
        ref, got = generate(model, False, device), generate(model, True, device)
        ok = ref == got and all(len(t) == 12 for t in ref)
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {model}: fused+graphs vs torch ops eager on {device}"
              + ("" if ok else f" ref={ref} got={got}"), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
