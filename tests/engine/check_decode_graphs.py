"""On CUDA: the decode-graph step (one packed upload, pending ids gathered and tokens drawn inside
real captured graphs) against the same engine with graphs off (eager), tiny-llama in float32 on
the same device: the mixed workload of tests/engine/test_overlap_schedule.py (seeded sampling,
penalties, logprobs, min_tokens, aborts, chunked prefill; overlap on and off), in-graph sampling
truncated to one token (must equal greedy) and hot in-graph sampling (must leave the argmax).
Usage: python -m tests.engine.check_decode_graphs [device]"""
from __future__ import annotations

import sys
from types import SimpleNamespace

from engine.engine_core import EngineCore
from engine.llm import build_engine_config
from engine.sampling_params import SamplingParams
from tests.engine import test_overlap_schedule
from tests.engine.test_overlap_schedule import _run, _workload


def _core(device: str, graphs: bool, overlap: bool = True, **kw) -> SimpleNamespace:
    base = dict(load_format="dummy", dtype="float32", device=device, page_size=4, num_pages=40,
                max_num_batched_tokens=24, max_num_seqs=6, max_model_len=64, overlap_schedule=overlap,
                enforce_eager=not graphs)
    base.update(kw)
    core = EngineCore(build_engine_config("tiny-llama", **base))
    modes = {}
    if graphs:
        run = core.runner.graphs.run

        def counted(chunks, prev, mode):
            modes[mode] = modes.get(mode, 0) + 1
            return run(chunks, prev, mode)
        core.runner.graphs.run = counted
    return SimpleNamespace(core=core, modes=modes)


class _Probe:
    """What `_workload`'s greedy probe needs of an `LLM`, without a tokenizer (none on the device)."""

    def __init__(self, device: str, **kw):
        self.holder = _core(device, False, overlap=False, **kw)

    def generate(self, prompt_token_ids, sampling_params):
        tokens = _generate(self.holder, prompt_token_ids, [sampling_params] * len(prompt_token_ids))
        return [SimpleNamespace(token_ids=t) for t in tokens]


def _tokens(results):
    return {rid: ([t for t, _ in toks], end) for rid, (toks, end) in results.items()}


def _generate(holder, prompts, params) -> list[list[int]]:
    core = holder.core
    for i, (p, sp) in enumerate(zip(prompts, params)):
        core.add_request(str(i), p, sp)
    reqs = [core.requests[str(i)] for i in range(len(prompts))]
    while core.has_unfinished():
        core.step()
    return [list(r.output_token_ids) for r in reqs]


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    bad = 0
    test_overlap_schedule._llm = lambda overlap, **kw: _Probe(device, **kw)
    work = _workload()
    aborts = {3: 2, 8: 1, 11: 0}
    for overlap in (True, False):
        ref = _run(_core(device, False, overlap), work, aborts)
        g = _core(device, True, overlap)
        got = _run(g, work, aborts)
        ok = _tokens(ref) == _tokens(got) and g.modes.get("greedy", 0) + g.modes.get(None, 0) > 10
        for rid in ref:
            for (_, a), (_, b) in zip(ref[rid][0], got[rid][0]):
                ok &= (a is None) == (b is None) and (a is None or abs(a["logprob"] - b["logprob"]) < 1e-3)
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} mixed workload, overlap={overlap}: graphs vs eager, replays {g.modes}",
              flush=True)
    prompts = [[5, 17, 30, 42, 7], [11, 12, 13], [1, 2, 3, 4, 5, 6, 7, 8, 9], [200, 100, 50]]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = _generate(_core(device, False, num_pages=128), prompts, [greedy] * 4)
    for trunc in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        hot = SamplingParams(temperature=1.5, max_tokens=12, ignore_eos=True, **trunc)
        g = _core(device, True, num_pages=128)
        got = _generate(g, prompts, [hot if i % 2 else greedy for i in range(4)])
        ok = got == ref and g.modes.get("sample", 0) > 5
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} in-graph sampling {trunc} = greedy, replays {g.modes}", flush=True)
    g = _core(device, True, num_pages=128)
    got = _generate(g, prompts, [SamplingParams(temperature=5.0, max_tokens=12, ignore_eos=True)] * 4)
    ok = got != ref and g.modes.get("sample", 0) > 5
    bad += not ok
    print(f"{'ok ' if ok else 'BAD'} hot in-graph sampling leaves the argmax, replays {g.modes}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
