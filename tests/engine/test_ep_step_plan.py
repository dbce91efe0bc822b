"""The fixed-capacity EP path one MoE layer at a time, on real gloo ranks: the step plan, the
padded rows of a CUDA-graph bucket (masked on the device, as a replay runs them), an idle rank
that still serves a bucket, a step split into more dispatches than one capacity holds, the
two-micro-batch pipeline, two micro-batches interleaved by the two-batch baton, and FP8 dispatch
— each compared with the same layer holding every expert on one rank (`ep_size` 1, the torch
reference GEMM; with FP8 dispatch, over the FP8-rounded activations)."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from engine.ep.step_plan import StepPlan, plan_step

E, K, H, I = 8, 2, 16, 24


def test_plan_uses_the_graph_bucket_when_the_busiest_rank_fits_one():
    assert plan_step(3, 2048, 512, (1, 2, 4, 8, 16)) == StepPlan(4, 1, bucket=True)
    assert plan_step(16, 2048, 512, (1, 2, 4, 8, 16)) == StepPlan(16, 1, bucket=True)


def test_plan_splits_a_step_over_the_capacity_and_overlaps_large_ones():
    assert plan_step(17, 2048, 512, (1, 2, 4, 8, 16)) == StepPlan(17, 1)  # past the buckets: eager, one dispatch
    assert plan_step(10, 4, 0) == StepPlan(4, 3)  # 10 tokens, capacity 4: three dispatches, none dropped
    assert plan_step(600, 2048, 512) == StepPlan(300, 2)  # two micro-batches from 512 tokens on
    assert plan_step(5000, 2048, 512) == StepPlan(1667, 3)
    for tokens in range(1, 40):
        plan = plan_step(tokens, 7, 5)
        assert plan.capacity * plan.num_chunks >= tokens and plan.capacity <= 7


def test_two_batch_plan_covers_half_the_busiest_rank_within_the_capacity():
    assert plan_step(16, 2048, 0, (1, 2, 4, 8, 16), two_batch_min_tokens=8) == StepPlan(16, 1, bucket=True)
    assert plan_step(7, 2048, 0, two_batch_min_tokens=8) == StepPlan(7, 1)  # below the threshold
    assert plan_step(4096, 2048, 512, two_batch_min_tokens=1024) == StepPlan(2048, 1, two_batch=True)
    for tokens in range(2, 40):
        plan = plan_step(tokens, 3, 0, two_batch_min_tokens=2)
        assert plan.two_batch and plan.capacity <= 3 and plan.capacity * plan.num_chunks >= -(-tokens // 2)


def test_split_chunks_halves_the_tokens_in_order_and_samples_once():
    from engine.ep.two_batch import split_chunks
    from engine.scheduler import ScheduledChunk

    chunks = [ScheduledChunk("a", 5, 1, True), ScheduledChunk("b", 0, 6, True), ScheduledChunk("c", 3, 4, False)]
    first, second = split_chunks(chunks)  # 11 tokens: 6 + 5, chunk b split after 5 of its 6
    assert [(c.request, c.start, c.num_new_tokens, c.sample) for c in first] == [("a", 5, 1, True), ("b", 0, 5, False)]
    assert [(c.request, c.start, c.num_new_tokens, c.sample) for c in second] == [("b", 5, 1, True),
                                                                                 ("c", 3, 4, False)]
    assert split_chunks([ScheduledChunk("a", 9, 1, True)]) == ([ScheduledChunk("a", 9, 1, True)], [])


def test_baton_interleaves_two_micro_batches_at_each_switch():
    from engine.ep.two_batch import Baton

    baton, order = Baton(), []

    def micro_batch(name: str, steps: int):
        def run():
            for i in range(steps):
                order.append(f"{name}{i}")
                baton.switch()
            return name
        return run
    assert baton.run(micro_batch("a", 3), micro_batch("b", 5)) == ("a", "b")
    assert order == ["a0", "b0", "a1", "b1", "a2", "b2", "b3", "b4"]  # b runs on alone once a is done


def _moe(parallel):
    from engine.layers.moe import FusedMoE

    moe = FusedMoE(E, K, H, I, layer_id=0, parallel=parallel)
    moe.dummy_fill(seed=3, std=0.3, prefix="moe")
    return moe


def _inputs(rank: int, tokens: int):
    gen = torch.Generator().manual_seed(100 + rank)
    hidden = torch.randn(tokens, H, generator=gen)
    weights, ids = torch.randn(tokens, E, generator=gen).softmax(-1).topk(K, dim=-1)
    return hidden, weights, ids.to(torch.int32)


def _rank(rank: int, world: int, init: str, failures) -> None:
    from engine.config import ParallelConfig
    from engine.ep.runtime import ExpertParallel

    try:
        torch.manual_seed(0)
        reference = _moe(ParallelConfig())
        par = ParallelConfig(ep_size=world, ep_rank=rank, num_redundant_experts=world, dist_init_method=init,
                             ep_backend="fixed")
        moe = _moe(par)
        ep = ExpertParallel(par, torch.nn.ModuleList([moe]), torch.device("cpu"), H)

        def check(what, hidden, weights, ids, real):
            got = moe(hidden, weights, ids)
            want = reference(hidden[:real], weights[:real], ids[:real])
            torch.testing.assert_close(got[:real], want, atol=1e-5, rtol=1e-5, msg=what)
            return got

        # A graph bucket of 8 rows: rank 0 has 5 real rows, the others none (idle ranks replay it too).
        ep.capture_plan(8)
        real = 5 if rank == 0 else 0
        hidden, weights, ids = _inputs(rank, 8)
        hidden[real:] = 1e4  # padding rows hold whatever the static buffers held: never routed, never counted
        ep.prepare_replay(real)
        check("padded bucket", hidden, weights, ids, real)
        assert int(ep.recorder.step_load.sum()) == real * K
        ep.step_end()

        # Uneven eager steps: 13 tokens on rank 0, 6 on rank 1, ...; capacity 4 -> 4 dispatches,
        # and a 2-micro-batch overlapped step.
        tokens = [13, 6, 0, 9][rank]
        hidden, weights, ids = _inputs(rank, tokens)
        for plan in (plan_step(13, 4, 0), plan_step(13, 2048, 8), plan_step(13, 2048, 0)):
            ep.plan = plan
            check(f"plan {plan}", hidden, weights, ids, tokens)
            ep.step_end()

        # Two micro-batches interleaved by the baton (each within the half-step plan: 7 tokens,
        # capacity 4 -> two dispatches each), rank 2 idle in both.
        ep.plan = plan_step(13, 4, 0, two_batch_min_tokens=2)
        half = tokens - tokens // 2
        parts = ep.run_two_batches(lambda: moe(hidden[:half], weights[:half], ids[:half]),
                                   lambda: moe(hidden[half:], weights[half:], ids[half:]))
        torch.testing.assert_close(torch.cat(parts), reference(hidden, weights, ids), atol=1e-5, rtol=1e-5)
        ep.step_end()

        # FP8 dispatch: the experts see the FP8-rounded activations, and nothing else changes.
        from engine.ep.fixed_all_to_all import FixedCapacityAllToAll, dequantize_rows, quantize_rows

        ep.all_to_all = FixedCapacityAllToAll(ep.group, ep.slots_per_rank, fp8=True)
        rounded = dequantize_rows(*quantize_rows(hidden), hidden.dtype)
        for plan in (plan_step(13, 4, 0), plan_step(13, 4, 0, two_batch_min_tokens=2)):
            ep.plan = plan
            got = (torch.cat(ep.run_two_batches(lambda: moe(hidden[:half], weights[:half], ids[:half]),
                                                lambda: moe(hidden[half:], weights[half:], ids[half:])))
                   if plan.two_batch else moe(hidden, weights, ids))
            torch.testing.assert_close(got, reference(rounded, weights, ids), atol=1e-5, rtol=1e-5)
            if tokens:
                assert not torch.allclose(rounded, hidden)  # FP8 really rounded what travelled
            ep.step_end()
        ep.group.barrier()  # no rank tears the group (and rank 0's store) down while others still use it
        ep.close()
    except BaseException as exc:  # reported to the parent; a failing rank must not hang the others
        failures.put(f"rank {rank}: {exc!r}")
        raise


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_fixed_capacity_layer_matches_one_rank(world):
    from engine.ports import free_port

    ctx = mp.get_context("spawn")
    failures = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank, args=(r, world, init, failures)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors and not alive, errors or "a rank hung"
    assert all(p.exitcode == 0 for p in procs)
