"""The prefill starts before the decode engine has named where its KV goes (the destination
follows, SGLang's bootstrap): two engines in this process (tiny model, CPU), real NIXL between
their KV pools (UCX, DRAM). The decode engine's tokens equal the standalone engine's whether the
destination comes before, during or after the prefill; a destination that never comes, or comes
for a request that already ended, ends every request once and returns every page on both sides."""
from __future__ import annotations

import time

import pytest

from engine.engine_args import build_engine_config
from engine.engine_core import EngineCore
from engine.kv_connector import DESTINATION_FOLLOWS
from engine.llm import LLM
from engine.sampling_params import SamplingParams

pytest.importorskip("nixl")
from kvtransfer.nixl_connector import NixlConnector  # noqa: E402

KW = dict(load_format="dummy", page_size=4, num_pages=64, max_model_len=64, max_num_batched_tokens=8)
PROMPT = list(range(11, 31))  # 20 tokens: three chunks of at most 8


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _core(role: str, timeout_s: float = 30.0) -> EngineCore:
    core = EngineCore(build_engine_config("tiny-llama", kv_role=role, kv_transfer_timeout_s=timeout_s, **KW))
    core.attach_connector(NixlConnector.for_engine(core))
    return core


def _step(cores, outputs: dict, until, limit_s: float = 20.0) -> None:
    """Step both engines (as their loops do) until `until()`; outputs by request id."""
    deadline = time.monotonic() + limit_s
    while not until():
        assert time.monotonic() < deadline, "engines did not get there in time"
        for core in cores:
            if core.has_unfinished() or core.has_kv_in_flight():
                for out in core.step():
                    outputs.setdefault(out.request_id, []).append(out)


def _ended(outputs: dict, rid: str) -> bool:
    return any(o.finished for o in outputs.get(rid, []))


def _pools_full(*cores) -> bool:
    for core in cores:
        s = core.scheduler
        s.block_pool.check_invariants()
        evictable = s.radix.num_evictable_pages() if s.radix else 0
        if s.block_pool.num_free_pages + evictable != s.block_pool.num_pages:
            return False
    return True


@pytest.fixture(scope="module")
def engines():
    # P gives up on a missing destination after 1 s; D's reservations would last 30 s (so an early
    # free on D can only come from a notice)
    return _core("prefill", timeout_s=1.0), _core("decode", timeout_s=30.0)


@pytest.fixture(scope="module")
def reference() -> list[int]:
    return LLM("tiny-llama", **KW).generate(prompt_token_ids=[PROMPT], sampling_params=_greedy(5))[0].token_ids


def _handoff(engines, rid: str, dest_after: str, outputs: dict) -> list[int]:
    """Add the request to P with its destination to follow, reserve on D, hand P the destination
    at `dest_after` ("admission", "first chunk" or "prefill"), and return D's tokens."""
    prefill, decode = engines
    prefill.add_request(rid, PROMPT, _greedy(1), kv_dest=DESTINATION_FOLLOWS)
    dest = decode.add_remote_request(rid, PROMPT, _greedy(5))
    if dest_after == "first chunk":
        _step([prefill], outputs, lambda: prefill.requests[rid].num_computed_tokens > 0)
    elif dest_after == "prefill":  # computed, first token sampled: the push waits for its destination
        _step([prefill], outputs, lambda: bool(outputs.get(rid)))
        assert prefill.requests[rid].status.value == "sending_kv"
    prefill.set_kv_dest(rid, dest)
    _step(engines, outputs, lambda: _ended(outputs, rid) and rid not in decode.requests)
    return [t for o in outputs[rid] for t in o.token_ids]


@pytest.mark.parametrize("dest_after", ["admission", "first chunk", "prefill"])
def test_decode_tokens_equal_the_standalone_engine_whenever_the_destination_comes(engines, reference, dest_after):
    outputs: dict = {}
    tokens = _handoff(engines, f"r-{dest_after}", dest_after, outputs)
    # P reports the first token and then its end; D's stream carries the tokens from the second on
    assert tokens[0] == reference[0] and tokens[1:] == reference[1:]
    ends = [o for o in outputs[f"r-{dest_after}"] if o.finished]
    assert len(ends) == 2 and all(o.error is None for o in ends)  # one from each engine
    kv = next(o.kv_transfer for o in ends if o.kv_transfer)  # P's: what its push took
    assert min(kv[k] for k in ("destination_wait_seconds", "exposed_seconds", "write_tail_seconds",
                               "post_delay_seconds", "write_lock_wait_seconds", "write_call_seconds")) >= 0.0
    assert kv["writes"] >= 1 and kv["write_call_seconds"] > 0  # posting took time inside NIXL
    # the post delay is the first WRITE's lock wait and call, so it cannot exceed the push's sums of them by more
    # than the Python between (generous on a loaded CI machine)
    assert kv["post_delay_seconds"] <= kv["write_lock_wait_seconds"] + kv["write_call_seconds"] + 0.05
    assert kv["write_tail_seconds"] <= kv["seconds"] + 1e-6  # the tail is the end of the span
    # a destination handed over after the compute is waited for; one known from admission is not (after the
    # first chunk, the overlapped scheduler may already have run the last chunk on this CPU: either way)
    if dest_after != "first chunk":
        assert (kv["destination_wait_seconds"] > 0.0) == (dest_after == "prefill")
    assert _pools_full(*engines)


def test_the_notice_goes_out_while_the_prefill_loop_stands_still(engines, reference, monkeypatch):
    """P's completion thread tells D as soon as the last WRITE is DONE: D decodes while P's loop is not
    stepped after the step that sampled the first token (on a busy prefill node that loop is inside
    its next step, tens of ms). The wire is made slow by a stand-in — each WRITE reads as in flight for
    its first 50 ms, as a loaded link would — so the step's own poll cannot already have seen it DONE."""
    prefill, decode = engines
    conn = prefill.connector
    real_poll, first_seen = conn.agent.poll, {}

    def slow_poll(transfer):
        state = real_poll(transfer)
        seen = first_seen.setdefault(id(transfer), time.monotonic())
        return "PROC" if state == "DONE" and time.monotonic() - seen < 0.05 else state

    monkeypatch.setattr(conn.agent, "poll", slow_poll)
    outputs: dict = {}
    dest = decode.add_remote_request("busy", PROMPT, _greedy(5))
    prefill.add_request("busy", PROMPT, _greedy(1), kv_dest=dest)
    _step([prefill], outputs, lambda: bool(outputs.get("busy")))  # computed, first token out, push in flight
    assert not any(o.finished for o in outputs["busy"]) and "busy" in conn.pushes
    _step([decode], outputs, lambda: "busy" not in decode.requests, limit_s=10.0)  # P's loop stands still
    assert [t for o in outputs["busy"] for t in o.token_ids] == reference
    assert "busy" in conn.pushes  # P's loop has not reported it yet; it frees P's pages when it next runs
    _step([prefill], outputs, lambda: not prefill.has_kv_in_flight())
    ends = [o for o in outputs["busy"] if o.finished]
    assert len(ends) == 2 and all(o.error is None for o in ends)
    assert _pools_full(*engines)


def test_destination_that_never_comes_fails_the_prefill_and_a_late_one_frees_the_decode_pages(engines):
    prefill, decode = engines
    outputs: dict = {}
    prefill.add_request("late", PROMPT, _greedy(1), kv_dest=DESTINATION_FOLLOWS)
    dest = decode.add_remote_request("late", PROMPT, _greedy(5))
    _step([prefill], outputs, lambda: _ended(outputs, "late"))
    end = [o for o in outputs["late"] if o.finished]
    assert len(end) == 1 and end[0].finish_reason == "error" and "no KV destination" in end[0].error
    assert _pools_full(prefill) and not _pools_full(decode)
    outputs.clear()
    prefill.set_kv_dest("late", dest)  # it ended: the receiver is told to free at once, not at its deadline
    _step([decode], outputs, lambda: _ended(outputs, "late"), limit_s=5.0)
    assert [o.finish_reason for o in outputs["late"]] == ["error"] and "abandoned" in outputs["late"][0].error
    assert _pools_full(prefill, decode)


def test_abort_before_the_destination_comes_ends_once_and_frees_both_sides(engines):
    prefill, decode = engines
    outputs: dict = {}
    prefill.add_request("gone", PROMPT, _greedy(1), kv_dest=DESTINATION_FOLLOWS)
    dest = decode.add_remote_request("gone", PROMPT, _greedy(5))
    _step([prefill], outputs, lambda: prefill.requests["gone"].num_computed_tokens > 8)  # mid-prefill
    assert prefill.abort("gone") and not prefill.abort("gone")
    prefill.set_kv_dest("gone", dest)
    _step(engines, outputs, lambda: not prefill.has_kv_in_flight() and "gone" not in decode.requests, limit_s=5.0)
    ends = [o for o in outputs["gone"] if o.finished]
    assert [o.finish_reason for o in ends] == ["abort", "error"]  # P's abort, D's abandoned reservation
    assert _pools_full(prefill, decode)


def test_unreachable_decode_engine_fails_the_waiting_push_and_frees_the_prefill_pages(engines):
    """D died between its reservation and P's WRITE: its agent cannot be reached (here: metadata no
    agent answers to). The push that waited for the destination fails; P's pages come back."""
    prefill, decode = engines
    outputs: dict = {}
    prefill.add_request("dead", PROMPT, _greedy(1), kv_dest=DESTINATION_FOLLOWS)
    dest = decode.add_remote_request("dead", PROMPT, _greedy(5))
    _step([prefill], outputs, lambda: bool(outputs.get("dead")))  # computed, waiting for its destination
    decode.abort("dead")  # D's side is gone with it; its pages wait out their hold
    prefill.set_kv_dest("dead", dict(dest, agent_name="pdserve-decode-gone", agent_metadata=b"not an agent"))
    _step([prefill], outputs, lambda: _ended(outputs, "dead"), limit_s=10.0)
    end = [o for o in outputs["dead"] if o.finished]
    assert len(end) == 1 and end[0].finish_reason == "error" and "KV transfer failed" in end[0].error
    assert _pools_full(prefill)


class _Event:
    """A CUDA event's two calls the sender thread makes, on the CPU: done, or done once waited on."""

    def __init__(self, done: bool, log: list):
        self.done, self.log = done, log

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.log.append("wait")
        self.done = True


def test_sender_posts_the_layers_done_by_now_as_one_write_then_waits_for_each_next(engines, monkeypatch):
    """The GPU path's sender, after the step's layers were all launched: layers 0-2 finished while the
    engine thread launched, 3 and 4 not yet."""
    prefill, decode = engines
    connector, log = prefill.connector, []
    dest = decode.add_remote_request("events", PROMPT, _greedy(2))
    prefill.add_request("events", PROMPT, _greedy(1), kv_dest=dest)
    push = connector._new_push(prefill.requests["events"], layered=True)
    push.pending_jobs = 1
    monkeypatch.setattr(connector, "_write", lambda rid, p, layers: log.append(list(layers)))
    events = [(i, _Event(i < 3, log)) for i in range(5)]
    connector._send_step(events, ["events"])
    assert log == [[0, 1, 2], "wait", [3], "wait", [4]] and push.pending_jobs == 0
    prefill.abort("events")
    decode.abort("events")


def test_prefill_graph_path_pushes_every_layer_and_decode_continues_exactly(monkeypatch, reference):
    """The prefill engine's step through the prefill graphs' padded forward (engine/prefill_graph.py, run
    eagerly: CUDA graphs need a GPU) with the destination known up front: the layer-wise push posts each
    layer from the hook between layers, and D's tokens equal the standalone engine's. The FA2 varlen op
    is the reference mock of tests/engine/test_varlen_prefill.py (it runs only on CUDA)."""
    from engine.attention import dense_prefill, triton_backend
    from engine.kernels import kv_write_ref
    from engine.prefill_graph import PrefillGraphs
    from tests.engine.test_varlen_prefill import fa2_reference
    monkeypatch.setattr(dense_prefill, "_flash_forward", fa2_reference)
    monkeypatch.setattr(dense_prefill, "varlen_applies", lambda q, d: True)
    monkeypatch.setattr(triton_backend, "varlen_applies", lambda q, d: True)
    monkeypatch.setattr(triton_backend, "write_kv", kv_write_ref.write_kv)
    kw = dict(KW, max_num_batched_tokens=32)  # the whole prompt in one step
    prefill = EngineCore(build_engine_config("tiny-llama", kv_role="prefill", attention_backend="triton", **kw))
    prefill.attach_connector(NixlConnector.for_engine(prefill))
    graphs = prefill.runner.prefill_graphs = PrefillGraphs(prefill.runner, max_tokens=128, max_seqs=4, capture=False)
    ran = []
    run = graphs.run
    monkeypatch.setattr(graphs, "run",
                        lambda inputs, hook=None, *rest: ran.append(hook is not None) or run(inputs, hook, *rest))
    posted = []
    post = prefill.connector._post_layers
    monkeypatch.setattr(prefill.connector, "_post_layers",
                        lambda layers, rids: posted.extend(layers) or post(layers, rids))
    decode = _core("decode")
    outputs: dict = {}
    dest = decode.add_remote_request("g", PROMPT, _greedy(5))
    prefill.add_request("g", PROMPT, _greedy(1), kv_dest=dest)
    _step([prefill, decode], outputs, lambda: _ended(outputs, "g") and "g" not in decode.requests)
    tokens = [t for o in outputs["g"] for t in o.token_ids]
    assert tokens == reference
    assert ran == [True]  # one prefill step, through the graph path, with the per-layer hook
    assert posted == list(range(len(prefill.runner.kv_pool.layers)))
    assert _pools_full(prefill, decode)


def test_a_slow_post_is_logged_with_where_its_time_went(engines, reference, monkeypatch, caplog):
    """Every post counts as slow at a 0 s threshold: the warning names the request and splits the
    time into the lock wait and NIXL's calls (the tool for a push whose first WRITE waits)."""
    import kvtransfer.nixl_connector as nc

    monkeypatch.setattr(nc, "SLOW_POST_S", 0.0)
    engines[0].connector._slow_post_warnings.at = 0.0  # an earlier test's warning must not rate-limit this one
    outputs: dict = {}
    with caplog.at_level("WARNING", logger="kvtransfer.nixl_connector"):
        tokens = _handoff(engines, "r-slow", "admission", outputs)
    assert tokens == reference
    lines = [r.getMessage() for r in caplog.records if "slow KV WRITE post for r-slow" in r.getMessage()]
    assert len(lines) == 1, lines  # rate-limited to one a second
    for part in ("on this thread's CPU", "lock wait", "connect", "build", "descs", "init", "transfer", "descriptors",
                 "pushes in flight"):
        assert part in lines[0]


def test_a_slow_push_is_logged_with_its_timeline(engines, reference, monkeypatch, caplog):
    """At a threshold below any push's duration the push that ends logs where its time went."""
    import kvtransfer.nixl_connector as nc

    monkeypatch.setattr(nc, "SLOW_PUSH_S", -1.0)
    engines[0].connector._slow_push_warnings.at = 0.0
    outputs: dict = {}
    with caplog.at_level("WARNING", logger="kvtransfer.nixl_connector"):
        assert _handoff(engines, "r-slow-push", "admission", outputs) == reference
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("slow KV push")]
    assert len(lines) == 1, lines
    for part in ("destination", "first layer seen", "first post", "last post", "notice", "WRITEs", "lock wait"):
        assert part in lines[0]
