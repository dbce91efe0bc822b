"""On CUDA: dense prefill steps replayed from the per-layer CUDA graphs (engine/prefill_graph.py)
against the same step run eagerly, for tiny models in bf16: the logits, every KV page written, the
per-layer hook's calls and events; the same for a step over cached prefixes replayed from the piecewise
graphs (attention eager between them); then greedy tokens through the engine with prefill graphs on and
off, over fresh prompts and over prefix-cache hits and a chunked prompt.
Usage: python -m tests.engine.kernels.check_prefill_graph [model,model,...]"""
from __future__ import annotations

import sys

import torch

from engine.engine_core import EngineCore
from engine.llm import build_engine_config
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from tests.engine.kernels.check_fused_engine import PROMPTS, greedy

MODELS = ("tiny-llama", "tiny-qwen3", "tiny-qwen3-moe", "tiny-deepseek-v2", "tiny-deepseek-v3")


def _core(model: str, graphs: bool) -> EngineCore:
    config = build_engine_config(model, load_format="dummy", dtype="bfloat16", device="cuda", page_size=16,
                                 num_pages=160, max_num_batched_tokens=512, max_num_seqs=8,
                                 prefill_graph_max_tokens=512 if graphs else 0)
    return EngineCore(config)


SHARED = list(range(500, 548))  # three pages of 16: the cached prefix of the piecewise checks (CPU tests too)
# Over SHARED: at least 128 new tokens each, so MLA attends decompressed eagerly too (as the graphs do)
PREFIX_TAILS = [list(range(1000, 1130)), list(range(2000, 2200))]
CHUNKED = list(range(3000, 3700))  # 700 tokens over a 512-token step budget: a later chunk of 188


def _prefix_chunks(core: EngineCore, tails: list[list[int]]) -> list:
    """A prompt of SHARED run to the end (its pages enter the prefix cache), then SHARED + each tail
    scheduled: their chunks start after the cached pages."""
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    core.add_request("warm", SHARED + [7, 7, 7], one)
    while core.has_unfinished():
        core.step()
    for i, tail in enumerate(tails):
        core.add_request(f"p{i}", SHARED + tail, one)
    return core.scheduler.schedule().chunks


def check_step(model: str, prefix: bool = False) -> bool:
    core = _core(model, True)
    runner = core.runner
    if runner.prefill_graphs is None or (prefix and not runner.prefill_graphs.pieces):
        print(f"BAD {model}: prefill graphs{' (piecewise)' if prefix else ''} were not captured", flush=True)
        return False
    if prefix:
        chunks = _prefix_chunks(core, PREFIX_TAILS)
        if [c.start for c in chunks] != [len(SHARED)] * len(PREFIX_TAILS):
            print(f"BAD {model}: expected chunks after a cached prefix, got starts {[c.start for c in chunks]}")
            return False
    else:
        sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        for i, p in enumerate(PROMPTS):
            core.add_request(str(i), p, sp)
        chunks = core.scheduler.schedule().chunks
    pools = runner.kv_pool.layers
    with torch.inference_mode():
        before = [p.clone() for p in pools]
        eager = runner._run_eager(chunks, ModelRunner._inputs(chunks), None, None).float()
        eager_kv = [p.clone() for p in pools]
        for p, b in zip(pools, before):
            p.copy_(b)
        events = []

        def hook(i):
            ev = torch.cuda.Event()
            ev.record()
            events.append((i, ev))
        assert runner.prefill_graphs.can_run(chunks)
        got = runner.prefill_graphs.run(ModelRunner._inputs(chunks), hook).float()
        torch.cuda.synchronize()
    err = ((got - eager).abs().max() / eager.abs().max()).item()
    kv_err = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
                 for a, b in zip(pools, eager_kv))
    layers_ok = [i for i, _ in events] == list(range(len(pools))) and all(ev.query() for _, ev in events)
    ok = err < 2e-2 and kv_err < 2e-2 and layers_ok and got.shape == eager.shape
    what = "piecewise-replayed prefill step over cached prefixes" if prefix else "graph-replayed prefill step"
    print(f"{'ok ' if ok else 'BAD'} {model} bf16: {what} vs eager: logits rel err {err:.1e}, "
          f"KV rel err {kv_err:.1e}, hook per layer {layers_ok}, buckets {runner.prefill_graphs.sizes}", flush=True)
    return ok


def generate(model: str, graphs: bool) -> list[list[int]]:
    """Greedy tokens of PROMPTS, then of a second wave hitting the prefix cache and a chunked prompt, then
    of prompts arriving while others decode (mixed steps, their decode tokens pending on the host)."""
    core = _core(model, graphs)
    first = greedy(core, PROMPTS)
    second = greedy(core, [SHARED + list(range(4000, 4002))] + [SHARED + t for t in PREFIX_TAILS] + [CHUNKED],
                    first=len(PROMPTS))
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    arrivals = {0: list(range(5000, 5040)), 2: list(range(5100, 5300)), 5: list(range(5400, 5420)),
                6: SHARED + list(range(5500, 5530))}
    reqs, step = [], 0
    while step in arrivals or core.has_unfinished():
        if step in arrivals:
            core.add_request(f"m{step}", arrivals[step], sp)
            reqs.append(core.requests[f"m{step}"])
        core.step()
        step += 1
    return first + second + [list(r.output_token_ids) for r in reqs]


def main() -> int:
    models = sys.argv[1].split(",") if len(sys.argv) > 1 else MODELS
    bad = 0
    for model in models:
        try:
            bad += not check_step(model)
            bad += not check_step(model, prefix=True)
            ref, got = generate(model, False), generate(model, True)
        except Exception as e:  # report and go on to the next model
            print(f"BAD {model}: {type(e).__name__}: {e}", flush=True)
            bad += 1
            continue
        same = sum(a == b for a, b in zip(ref, got))
        print(f"{'ok ' if ref == got else 'BAD'} {model} bf16: greedy tokens with prefill graphs = eager prefill "
              f"({same}/{len(ref)} sequences equal)" + ("" if ref == got else f" eager={ref} graphs={got}"), flush=True)
        bad += ref != got
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
