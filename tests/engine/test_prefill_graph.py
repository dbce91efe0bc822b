"""Dense prefill CUDA graphs (engine/prefill_graph.py) on CPU: the padded static-buffer forward they
capture, run eagerly (`capture=False`), against the runner's eager step — logits, every KV page written
(and nothing written for the padding), the per-layer hook's calls. CUDA graphs themselves need a GPU:
tests/engine/kernels/check_prefill_graph.py replays them there against the eager engine. torch's
FlashAttention-2 op runs only on CUDA, so its varlen form is replaced here by the reference of
tests/engine/test_varlen_prefill.py (a mock: the real op cannot run on this machine)."""
from __future__ import annotations

import pytest
import torch

from engine.attention import dense_prefill, triton_backend
from engine.kernels import kv_write_ref
from engine.model_runner import ModelRunner
from engine.prefill_graph import PrefillGraphs, token_buckets
from tests.engine.kernels.check_prefill_graph import SHARED, _prefix_chunks  # the GPU check's, shared
from tests.engine.test_attention_kernels import _run
from tests.engine.test_varlen_prefill import fa2_reference

PROMPTS = [list(range(3, 8)), list(range(100, 140)), list(range(200, 300))]  # 145 tokens: bucket 256


def test_token_buckets_are_powers_of_two_from_128():
    assert token_buckets(2048) == [128, 256, 512, 1024, 2048]
    assert token_buckets(100) == [128]
    assert token_buckets(1500) == [128, 256, 512, 1024, 2048]


@pytest.fixture
def varlen_mock(monkeypatch):
    calls = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        calls.append((cu_q.tolist(), max_q))
        return fa2_reference(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    monkeypatch.setattr(dense_prefill, "_flash_forward", fake)
    monkeypatch.setattr(dense_prefill, "varlen_applies", lambda q, d: True)
    monkeypatch.setattr(triton_backend, "varlen_applies", lambda q, d: True)
    monkeypatch.setattr(triton_backend, "write_kv", kv_write_ref.write_kv)  # the Triton write needs a GPU
    return calls


def _core(model: str, backend: str, max_num_seqs: int = 8):
    from engine.engine_core import EngineCore
    from engine.llm import build_engine_config
    config = build_engine_config(model, load_format="dummy", dtype="float32", device="cpu", page_size=16,
                                 num_pages=64, max_num_batched_tokens=512, max_num_seqs=max_num_seqs,
                                 attention_backend=backend)
    return EngineCore(config)


def _schedule(core, prompts):
    from engine.sampling_params import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(str(i), p, sp)
    return core.scheduler.schedule().chunks


def _graph_step_matches_eager(runner, chunks, graphs: PrefillGraphs, varlen_mock) -> None:
    """The runner's eager step over `chunks`, then (the KV pools put back as they were) the same step
    through `graphs`: the same logits, the same pages written (at the right offsets, and none for the
    padding rows), the hook after every layer."""
    pools = runner.kv_pool.layers
    before = [p.clone() for p in pools]
    eager = runner._run_eager(chunks, ModelRunner._inputs(chunks), None, None)
    eager_kv = [p.clone() for p in pools]
    for p, b in zip(pools, before):
        p.copy_(b)
    assert graphs.can_run(chunks)
    layers = []
    varlen_mock.clear()
    got = graphs.run(ModelRunner._inputs(chunks), layer_hook=layers.append)
    assert got.shape == eager.shape == (len(chunks), runner.model_config.vocab_size)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    for want, after in zip(eager_kv, pools):
        torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
    assert layers == list(range(len(pools)))


@pytest.mark.parametrize("model,backend", [("tiny-qwen3", "triton"), ("tiny-deepseek-v2", "torch")])
def test_padded_graph_forward_matches_the_eager_step(varlen_mock, model, backend):
    """GQA through the Triton backend's dense path, MLA through its decompressed prefill (any backend)."""
    core = _core(model, backend)
    runner = core.runner
    chunks = _schedule(core, PROMPTS)
    assert [c.start for c in chunks] == [0, 0, 0]
    _graph_step_matches_eager(runner, chunks, PrefillGraphs(runner, max_tokens=512, max_seqs=4, capture=False),
                              varlen_mock)
    # one varlen call per layer over the padded layout: 3 sequences, 1 empty slot, the padding sequence
    assert varlen_mock and all(c == ([0, 5, 45, 145, 145, 256], 256) for c in varlen_mock)


def test_steps_that_do_not_fit_run_eagerly():
    core = _core("tiny-qwen3", "torch")
    graphs = PrefillGraphs(core.runner, max_tokens=256, max_seqs=2, capture=False, piecewise=False)
    assert not graphs.can_run(_schedule(core, PROMPTS))  # three sequences, two logits slots
    graphs.piecewise = True
    core = _core("tiny-qwen3", "torch")
    assert graphs.can_run(_schedule(core, PROMPTS))  # piecewise: logits after the graphs, any number
    graphs = PrefillGraphs(core.runner, max_tokens=128, max_seqs=2, capture=False)
    core = _core("tiny-qwen3", "torch")
    assert not graphs.can_run(_schedule(core, [list(range(1, 200))]))  # over the largest bucket
    core = _core("tiny-qwen3", "torch")
    chunks = _schedule(core, [list(range(1, 100))])
    assert graphs.can_run(chunks)
    chunks[0].start, chunks[0].num_new_tokens = 16, 83  # a chunk over a cached prefix: the piecewise graphs'
    assert graphs.can_run(chunks)
    graphs.piecewise = False
    assert not graphs.can_run(chunks)
    chunks[0].start, chunks[0].num_new_tokens = 0, 99
    chunks[0].request.sampling_params.prompt_logprobs = 1  # every row's hidden state wanted: piecewise only
    assert not graphs.can_run(chunks)
    graphs.piecewise = True
    assert graphs.can_run(chunks)


def test_generation_with_prefill_graphs_gives_the_eager_tokens(varlen_mock):
    """The engine loop with the graph path taking every prefill step (MLA; decodes on the torch
    backend): the same greedy tokens, and the graph path really ran."""
    def generate(with_graphs: bool):
        core = _core("tiny-deepseek-v2", "torch")
        if with_graphs:
            core.runner.prefill_graphs = PrefillGraphs(core.runner, max_tokens=256, max_seqs=4, capture=False)
        _schedule_all(core)
        return [list(core.requests[str(i)].output_token_ids) for i in range(len(PROMPTS))]

    def _schedule_all(core):
        from engine.sampling_params import SamplingParams
        sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        for i, p in enumerate(PROMPTS):
            core.add_request(str(i), p, sp)
        reqs = dict(core.requests)
        while core.has_unfinished():
            core.step()
        core.requests.update(reqs)

    ref = generate(False)
    varlen_mock.clear()
    got = generate(True)
    assert got == ref and all(len(t) == 4 for t in got)
    assert any(max_q == 256 for _, max_q in varlen_mock)  # the padded bucket's call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_replayed_prefill_graphs_match_the_eager_step_on_gpu():
    r = _run(["-m", "tests.engine.kernels.check_prefill_graph"], interpret=False, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU (graphs need a GPU): records the capture and replay calls."""
    log: list = []

    def __init__(self):
        self.id = len([e for e in _FakeGraph.log if e[0] == "new"])
        _FakeGraph.log.append(("new", self.id))

    def capture_begin(self, pool=None):
        _FakeGraph.log.append(("begin", self.id, pool))

    def capture_end(self):
        _FakeGraph.log.append(("end", self.id))

    def replay(self):
        _FakeGraph.log.append(("replay", self.id))


@pytest.fixture
def fake_graphs(monkeypatch):
    """torch.cuda's graph and stream API replaced by `_FakeGraph`'s recorder (a mock: CUDA graphs cannot
    run here); the forward between begin and end runs eagerly on CPU."""
    import contextlib
    stream = type("S", (), {"wait_stream": lambda self, other: None})()
    _FakeGraph.log = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool",))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


def test_a_failed_piecewise_capture_keeps_the_whole_graphs_and_turns_piecewise_off(varlen_mock, fake_graphs,
                                                                                   monkeypatch, caplog):
    core = _core("tiny-qwen3", "triton")
    graphs = PrefillGraphs(core.runner, max_tokens=256, max_seqs=4)

    def broken(self, t, stream):
        raise KeyError("a bug in the piecewise capture")
    monkeypatch.setattr(PrefillGraphs, "_capture_pieces", broken)
    assert graphs.capture()
    assert sorted(graphs.graphs) == [128, 256] and not graphs.pieces and not graphs.piecewise
    assert "piecewise prefill CUDA graphs not captured (KeyError" in caplog.text
    assert not graphs.can_run(_prefix_chunks(core, [list(range(3, 50))]))  # those steps run eagerly now


def test_capture_cuts_one_graph_per_layer_and_replay_interleaves_the_hook(varlen_mock, fake_graphs, monkeypatch):
    """The capture/replay bookkeeping with the recorder in place of CUDA graphs: per bucket L + 1 graphs,
    each begun in the shared pool and ended once, in order; a replay runs them in order with the layer
    hook after each of the first L."""
    core = _core("tiny-qwen3", "triton")
    runner = core.runner
    layers = len(runner.kv_pool.layers)
    graphs = PrefillGraphs(runner, max_tokens=256, max_seqs=4, piecewise=False)
    assert graphs.capture()
    assert sorted(graphs.graphs) == [128, 256] and all(len(g) == layers + 1 for g in graphs.graphs.values())
    assert not graphs.pieces
    events = [e for e in _FakeGraph.log if e[0] in ("begin", "end")]
    assert len(events) == 2 * 2 * (layers + 1)
    for i in range(0, len(events), 2):  # never nested: each graph ends before the next begins
        begin, end = events[i], events[i + 1]
        assert begin[0] == "begin" and begin[2] == ("pool",) and end == ("end", begin[1])
    assert graphs.logits[256].shape == (4, runner.model_config.vocab_size)

    _FakeGraph.log = []
    chunks = _schedule(core, PROMPTS)
    out = graphs.run(ModelRunner._inputs(chunks), layer_hook=lambda i: _FakeGraph.log.append(("hook", i)))
    ids = [g.id for g in graphs.graphs[256]]
    expected = []
    for i, gid in enumerate(ids):
        expected.append(("replay", gid))
        if i < layers:
            expected.append(("hook", i))
    assert _FakeGraph.log == expected
    assert out.shape == (3, runner.model_config.vocab_size)

    # Piecewise: per bucket a program of 2L + 1 graphs, cut at every layer's attention and after every
    # layer; a step over cached prefixes replays it with the eager attention and the hook in between.
    _FakeGraph.log = []
    graphs = PrefillGraphs(runner, max_tokens=256, max_seqs=4)
    assert graphs.capture() and graphs.piecewise
    kinds = ["graph"] + ["attend", "graph", "hook", "graph"] * layers
    assert sorted(graphs.pieces) == [128, 256]
    assert all([e[0] for e in prog] == kinds for prog in graphs.pieces.values())
    assert [e[1] for e in graphs.pieces[256] if e[0] == "hook"] == list(range(layers))
    events = [e for e in _FakeGraph.log if e[0] in ("begin", "end")]
    assert len(events) == 2 * 2 * (layers + 1) + 2 * 2 * (2 * layers + 1)
    for i in range(0, len(events), 2):
        assert events[i][0] == "begin" and events[i + 1] == ("end", events[i][1])
    _FakeGraph.log = []
    attend = graphs._attend
    monkeypatch.setattr(graphs, "_attend", lambda *a: _FakeGraph.log.append(("attend",)) or attend(*a))
    core = _core("tiny-qwen3", "triton")
    graphs.runner = core.runner
    out = graphs.run(ModelRunner._inputs(_prefix_chunks(core, [list(range(3, 100))])),
                     layer_hook=lambda i: _FakeGraph.log.append(("hook", i)))
    expected = [("replay", e[1].id) if e[0] == "graph" else ("attend",) if e[0] == "attend" else ("hook", e[1])
                for e in graphs.pieces[128]]
    assert _FakeGraph.log == expected and out.shape == (1, runner.model_config.vocab_size)


# ------------------------------------------------------------------ piecewise graphs (cached prefixes)
@pytest.mark.parametrize("model,backend", [("tiny-qwen3", "triton"), ("tiny-deepseek-v2", "torch")])
def test_piecewise_forward_over_cached_prefixes_matches_the_eager_step(varlen_mock, model, backend):
    """A prefill step whose chunks start after cached prefixes: the piecewise forward (its attention
    handed out at each layer, run over the step's real metadata, staged and unstaged through the static
    buffers) against the runner's eager step — logits, the pages written, the hook per layer."""
    core = _core(model, backend)
    runner = core.runner
    chunks = _prefix_chunks(core, [list(range(10, 15)), list(range(20, 60)), list(range(3, 100))])
    assert [c.start for c in chunks] == [48, 48, 48]
    graphs = PrefillGraphs(runner, max_tokens=512, max_seqs=4, capture=False)
    _graph_step_matches_eager(runner, chunks, graphs, varlen_mock)
    # per layer one varlen call over the real sequences (prefix + chunk keys), not the padded bucket
    assert varlen_mock and all(c == ([0, 5, 45, 142], 97) for c in varlen_mock)
    assert graphs._step_meta is None


def test_fresh_prompts_beyond_the_logits_slots_run_piecewise(varlen_mock, monkeypatch):
    core = _core("tiny-qwen3", "triton")
    runner = core.runner
    chunks = _schedule(core, PROMPTS)
    inputs = ModelRunner._inputs(chunks)
    eager = runner._run_eager(chunks, inputs, None, None)
    graphs = PrefillGraphs(runner, max_tokens=256, max_seqs=2, capture=False)
    pieces = []
    orig = PrefillGraphs._run_pieces
    monkeypatch.setattr(PrefillGraphs, "_run_pieces", lambda self, *a, **k: pieces.append(1) or orig(self, *a, **k))
    got = graphs.run(ModelRunner._inputs(chunks))
    assert pieces and got.shape == eager.shape == (3, runner.model_config.vocab_size)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


def test_piecewise_padding_rows_keep_finite_values_and_a_second_step_reuses_the_buffers(varlen_mock):
    core = _core("tiny-qwen3", "triton")
    runner = core.runner
    graphs = PrefillGraphs(runner, max_tokens=256, max_seqs=4, capture=False)
    chunks = _prefix_chunks(core, [list(range(3, 200))])
    first = graphs.run(ModelRunner._inputs(chunks))
    buffers = {k: v.data_ptr() for k, v in graphs._staging.items()}
    outs = {k: v.data_ptr() for k, v in graphs._attn_out.items()}
    assert all(torch.isfinite(v).all() for v in graphs._attn_out.values())
    core2 = _core("tiny-qwen3", "triton")
    graphs.runner = core2.runner  # the same static buffers serve another step of fewer tokens
    second = graphs.run(ModelRunner._inputs(_prefix_chunks(core2, [list(range(3, 20))])))
    assert first.shape == second.shape == (1, runner.model_config.vocab_size)
    assert torch.isfinite(second).all()
    assert {k: v.data_ptr() for k, v in graphs._staging.items()} == buffers
    assert {k: v.data_ptr() for k, v in graphs._attn_out.items()} == outs


@pytest.fixture
def decode_mock(monkeypatch):
    """The Triton GQA decode kernel needs a GPU: the torch reference in its place (a mock)."""
    from engine.attention.metadata import AttentionMetadata
    from engine.attention.torch_backend import paged_attention_ref

    def decode_ref(q, kv_cache, tables, seq_lens, scale, k_comp, v_comp, da, db, out, max_seq_len=None):
        meta = AttentionMetadata.build([1] * len(q), seq_lens.tolist(), [r.tolist() for r in tables],
                                       kv_cache.shape[2])
        out.copy_(paged_attention_ref(q, kv_cache, meta, scale, v_comp, da))
    monkeypatch.setattr(triton_backend, "decode_attention", decode_ref)


def test_generation_with_piecewise_graphs_gives_the_eager_tokens(varlen_mock, decode_mock, monkeypatch):
    """The engine loop over prefix-cache hits and a prompt chunked by the step budget: every prefill step
    through the graph paths (fresh: whole graphs, later chunks and cached prefixes: piecewise) gives the
    eager engine's greedy tokens, and the piecewise path really ran."""
    from engine.sampling_params import SamplingParams
    ran = []
    orig = PrefillGraphs._run_pieces
    monkeypatch.setattr(PrefillGraphs, "_run_pieces", lambda self, *a, **k: ran.append(1) or orig(self, *a, **k))

    def generate(with_graphs: bool, model: str, backend: str):
        from engine.engine_core import EngineCore
        from engine.llm import build_engine_config
        config = build_engine_config(model, load_format="dummy", dtype="float32", device="cpu", page_size=16,
                                     num_pages=96, max_num_batched_tokens=160, max_num_seqs=8,
                                     attention_backend=backend)
        core = EngineCore(config)
        if with_graphs:
            core.runner.prefill_graphs = PrefillGraphs(core.runner, max_tokens=256, max_seqs=4, capture=False)
        sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        waves = [[SHARED + list(range(900, 1200))],  # 348 tokens: chunks of 160, 160, 28
                 [SHARED + list(range(10, 30)), SHARED + list(range(900, 940)), list(range(40, 60))]]
        out = []
        for w, prompts in enumerate(waves):
            ids = [f"{w}-{i}" for i in range(len(prompts))]
            for rid, p in zip(ids, prompts):
                core.add_request(rid, p, sp)
            reqs = {rid: core.requests[rid] for rid in ids}
            while core.has_unfinished():
                core.step()
            out += [list(reqs[rid].output_token_ids) for rid in ids]
        return out

    for model, backend in (("tiny-qwen3", "triton"), ("tiny-deepseek-v2", "torch")):
        ref = generate(False, model, backend)
        ran.clear()
        got = generate(True, model, backend)
        assert got == ref and all(len(t) == 4 for t in got), model
        assert len(ran) >= 3, model  # the two later chunks and the second wave's prefix hits


def _mixed_core(model: str, backend: str, overlap: bool):
    from engine.engine_core import EngineCore
    from engine.llm import build_engine_config
    config = build_engine_config(model, load_format="dummy", dtype="float32", device="cpu", page_size=16,
                                 num_pages=96, max_num_batched_tokens=256, max_num_seqs=8,
                                 attention_backend=backend, overlap_schedule=overlap)
    return EngineCore(config)


@pytest.mark.parametrize("model,backend", [("tiny-qwen3", "triton"), ("tiny-deepseek-v2", "torch")])
def test_piecewise_forward_of_decodes_beside_a_prefill_matches_the_eager_step(varlen_mock, decode_mock, model,
                                                                               backend):
    """Two sequences decoding while a third prompt prefills (150 tokens: MLA's prefill rows decompressed,
    its decode rows absorbed, as the eager step splits them) through the piecewise forward: the eager
    step's logits for all three, and the same pages written."""
    from engine.sampling_params import SamplingParams
    core = _mixed_core(model, backend, overlap=False)
    runner = core.runner
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    core.add_request("a", list(range(3, 40)), sp)
    core.add_request("b", list(range(50, 70)), sp)
    for _ in range(3):
        core.step()
    core.add_request("c", list(range(100, 250)), sp)
    chunks = core.scheduler.schedule().chunks
    assert [c.num_new_tokens for c in chunks] == [1, 1, 150] and chunks[0].start > 0
    assert not ModelRunner._inputs(chunks).pending
    graphs = PrefillGraphs(runner, max_tokens=256, max_seqs=4, capture=False)
    _graph_step_matches_eager(runner, chunks, graphs, varlen_mock)
    graphs.piecewise = False  # without piecewise graphs such a step is not theirs
    assert not graphs.can_run(chunks)


@pytest.mark.parametrize("model,backend", [("tiny-qwen3", "triton"), ("tiny-deepseek-v2", "torch")])
def test_overlapped_generation_with_prompts_joining_decodes_gives_the_eager_tokens(varlen_mock, decode_mock,
                                                                                    monkeypatch, model, backend):
    """The overlap scheduler with prompts arriving while others decode: mixed steps whose decode tokens are
    still pending on the host replay the piecewise graphs (the draws patched into their static inputs on
    the device) and give the eager engine's greedy tokens."""
    from engine.sampling_params import SamplingParams
    pending = []
    orig = PrefillGraphs._run_pieces
    monkeypatch.setattr(PrefillGraphs, "_run_pieces",
                        lambda self, inputs, *a: pending.append(len(inputs.pending)) or orig(self, inputs, *a))

    def generate(with_graphs: bool):
        core = _mixed_core(model, backend, overlap=True)
        if with_graphs:
            core.runner.prefill_graphs = PrefillGraphs(core.runner, max_tokens=256, max_seqs=4, capture=False)
        sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        arrivals = {0: ("a", list(range(3, 40))), 2: ("b", list(range(100, 240))), 4: ("c", list(range(7, 30)))}
        reqs, step = {}, 0
        while step in arrivals or core.has_unfinished():
            if step in arrivals:
                rid, prompt = arrivals[step]
                core.add_request(rid, prompt, sp)
                reqs[rid] = core.requests[rid]
            core.step()
            step += 1
        return {rid: list(r.output_token_ids) for rid, r in reqs.items()}

    ref = generate(False)
    pending.clear()
    got = generate(True)
    assert got == ref and all(len(t) == 6 for t in got.values())
    assert any(n > 0 for n in pending)  # a replayed step took decode tokens still pending on the host



def test_a_decode_node_plans_prefill_graphs_only_when_it_serves_collocated():
    """A decode node's prompts arrive as KV, so it captures no prefill graphs, unless it runs prompts
    itself (collocated: `pdserve up --num-prefill 0` passes --collocated). The runner's rule, asked of a
    stand-in GPU runner (the capture itself needs a GPU)."""
    import dataclasses
    from types import SimpleNamespace

    from engine.llm import build_engine_config
    base = build_engine_config("tiny-qwen3", load_format="dummy", dtype="bfloat16", device="cpu")

    def planned(**kw) -> bool:
        runner = SimpleNamespace(device=torch.device("cuda"), config=dataclasses.replace(base, **kw), ep=None,
                                 backend=SimpleNamespace(name="triton"),
                                 model_config=SimpleNamespace(dtype=torch.bfloat16))
        return ModelRunner._prefill_graphs_planned(runner)
    assert planned(kv_role=None) and planned(kv_role="prefill")
    assert not planned(kv_role="decode")
    assert planned(kv_role="decode", collocated=True)
    assert not planned(kv_role="decode", collocated=True, prefill_graph_max_tokens=0)


def test_pdserve_up_without_prefill_nodes_starts_its_decode_nodes_collocated(monkeypatch):
    """The launcher's node command lines, recorded instead of started (Component replaced by a recorder
    that stops the launch at the router; the signal handlers left as they are)."""
    import signal
    from deploy import launcher
    started = {}

    class Recorder:
        def __init__(self, name, argv, ready, gpus=None, env=None):
            if name == "router":
                raise KeyboardInterrupt
            started[name] = argv

        def stop(self):
            pass
    monkeypatch.setattr(launcher, "Component", Recorder)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    for num_prefill, collocated in ((0, True), (1, False)):
        started.clear()
        with pytest.raises(KeyboardInterrupt):
            launcher.up(["--device", "cpu"], "tiny-llama", num_prefill, 1, "127.0.0.1", 0, 0, "round_robin")
        assert ("--collocated" in started["decode0"]) == collocated
        assert all("--collocated" not in argv for name, argv in started.items() if name.startswith("prefill"))


def test_parallel_sampling_prompts_run_through_the_prefill_graphs(varlen_mock, decode_mock, monkeypatch):
    """A step with n > 1 prompts (their forks compute nothing and draw from the prompt's row) takes the
    graph path for the chunks that compute; every choice gets the eager engine's tokens (seeded
    sampling: choice i draws with seed + i)."""
    from engine import LLM, SamplingParams
    ran = []
    orig = PrefillGraphs.run
    monkeypatch.setattr(PrefillGraphs, "run", lambda self, inputs, *a: ran.append(len(inputs.query_lens))
                        or orig(self, inputs, *a))
    prompts = [list(range(3, 40)), list(range(100, 150))]
    params = [SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True),
              SamplingParams(n=2, temperature=0, max_tokens=5, ignore_eos=True)]

    def generate(with_graphs: bool):
        llm = LLM("tiny-qwen3", load_format="dummy", dtype="float32", device="cpu", page_size=16, num_pages=64,
                  max_num_seqs=8, attention_backend="triton")
        if with_graphs:
            llm.core.runner.prefill_graphs = PrefillGraphs(llm.core.runner, max_tokens=256, max_seqs=4, capture=False)
        return [(o.index, o.token_ids) for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)]

    ref = generate(False)
    ran.clear()
    got = generate(True)
    assert got == ref and len(got) == 5 and all(len(t) == 5 for _, t in got)
    assert ran and ran[0] == 2  # the step of both prompts (five choices) through the graphs


def test_prompt_logprobs_come_from_the_piecewise_graphs_hidden_states(varlen_mock, decode_mock, monkeypatch):
    """A fresh prompt asking for prompt logprobs (and one over a cached prefix) takes the piecewise path,
    whose final hidden states the collector reads after the graphs: the eager engine's prompt logprobs
    and tokens."""
    from engine import LLM, SamplingParams
    ran = []
    orig = PrefillGraphs._run_pieces
    monkeypatch.setattr(PrefillGraphs, "_run_pieces",
                        lambda self, inputs, t, hook=None, chunks=None: ran.append(bool(chunks))
                        or orig(self, inputs, t, hook, chunks))
    prompts = [list(range(3, 40)), list(range(3, 20)) + list(range(60, 90))]  # the second reuses one cached page
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)

    def generate(with_graphs: bool):
        llm = LLM("tiny-qwen3", load_format="dummy", dtype="float32", device="cpu", page_size=16, num_pages=64,
                  max_num_seqs=8, attention_backend="triton")
        if with_graphs:
            llm.core.runner.prefill_graphs = PrefillGraphs(llm.core.runner, max_tokens=256, max_seqs=4, capture=False)
        return [llm.generate(prompt_token_ids=[p], sampling_params=sp)[0] for p in prompts]

    ref = generate(False)
    ran.clear()
    got = generate(True)
    assert ran.count(True) == 2  # each prompt's step, with its chunks for the collector
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids and len(a.prompt_logprobs) == len(b.prompt_logprobs) > 1
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x["token_id"] == y["token_id"] and x["rank"] == y["rank"]
            assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-4)
            assert set(x["top_logprobs"]) == set(y["top_logprobs"])

