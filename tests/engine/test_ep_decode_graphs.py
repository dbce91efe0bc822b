"""EP decode steps through the CUDA-graph path's logic, on CPU gloo ranks: the bucket every rank
replays is agreed at `step_begin`, busy ranks replay it over padded static buffers, idle ranks
replay it with no real rows, and a rank whose step cannot replay (a prefill chunk) runs eagerly
with the same dispatch capacity — and the greedy tokens equal the one-rank engine's.

CPU has no CUDA graphs, so `ReplayedGraphs` stands in for them: "capturing" a bucket records the
forward over the static buffers with the capture-time dispatch plan, and "replaying" runs that
forward again (reading the buffers as a graph would). What this checks is the engine-side logic
(bucket agreement, padding masks on device counts, idle replays); NCCL capture itself is measured
on the device (`bench/ep_engine_check.py`)."""
from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from engine import LLM, SamplingParams
from tests.engine.hf_reference import build_hf_checkpoint

pytestmark = pytest.mark.slow

KW = dict(page_size=4, num_pages=128, max_model_len=128, device="cpu")
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
SHORT = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
# Rank 0 serves five requests, rank 1 one short one (then idles while rank 0 decodes on).
PROMPTS = [[[5, 17, 30, 42, 7, 99, 100, 3, 8], [11, 12, 13], [1, 2, 3, 4, 5, 6], [200, 100, 50], [7, 7, 7, 9]],
           [[3, 1, 4, 1, 5]]]
PARAMS = [GREEDY, SHORT]


def _replayed_graphs(runner, max_batch: int):
    from engine.cuda_graph import DecodeGraphs

    class _Replay:
        def __init__(self, graphs, bs):
            self.graphs, self.bs = graphs, bs

        def replay(self):
            self.graphs.logits[(self.bs, "greedy", None)].copy_(self.graphs.forward_as_captured(self.bs))

    class ReplayedGraphs(DecodeGraphs):
        def _metadata(self, bs, bound=None):
            # The torch attention reference reads lengths on the host (the Triton kernels that
            # run in real graphs read the device buffer); hand it the buffer's current values.
            meta = super()._metadata(bs, bound)
            meta.seq_lens_cpu = self.seq_lens[:bs].tolist()
            return meta

        def forward_as_captured(self, bs):
            ep = self.runner.ep
            plan = ep.plan
            ep.capture_plan(bs)  # a real graph holds the capture-time plan (and its padding mask)
            try:
                return self._body(bs, "greedy")
            finally:
                ep.plan = plan

        def capture(self):
            for bs in reversed(self.sizes):  # collective, in the same order on every rank
                self.logits[(bs, "greedy", None)] = self.forward_as_captured(bs)
                self.graphs[(bs, "greedy", None)] = _Replay(self, bs)
            self.runner.ep.graphs_captured(self.sizes)

    graphs = ReplayedGraphs(runner, max_batch)
    graphs.capture()
    return graphs


def _rank(rank: int, world: int, init: str, path: str, queue) -> None:
    from dataclasses import replace

    from engine.engine_core import EngineCore
    from engine.llm import build_engine_config

    try:
        config = build_engine_config(path, ep_size=world, max_num_seqs=8, **KW)
        core = EngineCore(replace(config, parallel=replace(config.parallel, ep_rank=rank, dist_init_method=init)))
        core.runner.graphs = _replayed_graphs(core.runner, 8)
        ep = core.runner.ep
        replays = {"busy": 0, "idle": 0}
        run, run_idle = core.runner.graphs.run, core.runner.graphs.run_idle

        def counted_run(*args):
            replays["busy"] += 1
            return run(*args)

        def counted_idle():
            replayed = run_idle()
            replays["idle"] += replayed
            return replayed
        core.runner.graphs.run, core.runner.graphs.run_idle = counted_run, counted_idle
        mine = PROMPTS[rank] if rank < len(PROMPTS) else []
        for i, prompt in enumerate(mine):
            core.add_request(f"r{i}", prompt, PARAMS[rank])
        tokens = {f"r{i}": [] for i in range(len(mine))}
        while ep.group.agree(core.has_unfinished(), False)[0]:
            for out in core.step():
                tokens[out.request_id].extend(out.token_ids)
        queue.put((rank, [tokens[f"r{i}"] for i in range(len(mine))], replays))
    except BaseException as exc:
        queue.put((rank, repr(exc), None))
        raise


@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_graph_buckets_agreed_across_busy_and_idle_ranks_give_single_rank_tokens(tmp_path, arch):
    from engine.ports import free_port

    _, path = build_hf_checkpoint(arch, tmp_path)
    llm = LLM(path, **KW)
    reference = [[r.token_ids for r in llm.generate(prompt_token_ids=p, sampling_params=sp)]
                 for p, sp in zip(PROMPTS, PARAMS)]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank, args=(r, 2, init, path, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict((rank, (tokens, replays)) for rank, tokens, replays in (queue.get(timeout=240) for _ in procs))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for rank in range(2):
        tokens, replays = results[rank]
        assert replays is not None, f"rank {rank} failed: {tokens}"
        assert tokens == reference[rank]
    assert results[0][1]["busy"] > 0  # rank 0 decoded through the replayed bucket
    assert results[1][1]["idle"] > 0  # rank 1, done early, replayed the others' buckets with no rows
