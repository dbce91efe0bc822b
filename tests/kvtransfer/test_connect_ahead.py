"""The prefill engine connects to a decode engine's NIXL agent as soon as a destination naming it is
known, on its connect thread, not inside the request's first WRITE (200 ms of the sender's CPU on an
H100): two engines in this process (tiny model, CPU), real NIXL between their KV pools (UCX, DRAM).
NIXL's `add_remote_agent` is wrapped to count the connections and, where a test needs it, to hold
one under way."""
from __future__ import annotations

import threading

import pytest

from engine.kv_connector import DESTINATION_FOLLOWS
from engine.llm import LLM

pytest.importorskip("nixl")
from tests.kvtransfer.test_early_destination import KW, PROMPT, _core, _ended, _greedy, _pools_full, _step  # noqa: E402


@pytest.fixture(scope="module")
def decode():
    return _core("decode", timeout_s=30.0)


@pytest.fixture(scope="module")
def reference() -> list[int]:
    return LLM("tiny-llama", **KW).generate(prompt_token_ids=[PROMPT], sampling_params=_greedy(5))[0].token_ids


def _count_connections(monkeypatch, connector, gate: threading.Event | None = None) -> tuple[list, threading.Event]:
    """Each `add_remote_agent` call's thread name, in order, and an event set when the first one starts;
    with `gate`, a call does not return before it is set."""
    nixl_agent = connector.agent.agent
    real, calls, entered = nixl_agent.add_remote_agent, [], threading.Event()

    def add_remote_agent(metadata):
        calls.append(threading.current_thread().name)
        entered.set()
        if gate is not None:
            assert gate.wait(30), "the test never released the connection"
        return real(metadata)

    monkeypatch.setattr(nixl_agent, "add_remote_agent", add_remote_agent)
    return calls, entered


def _record_writes(monkeypatch, connector, calls: list) -> list:
    """The number of connections made when each WRITE was posted."""
    writes, real = [], connector.agent.write
    monkeypatch.setattr(connector.agent, "write", lambda *a, **kw: writes.append(len(calls)) or real(*a, **kw))
    return writes


def test_admission_connects_on_the_connect_thread_before_the_first_write(decode, reference, monkeypatch):
    prefill = _core("prefill")
    calls, entered = _count_connections(monkeypatch, prefill.connector)
    writes = _record_writes(monkeypatch, prefill.connector, calls)
    dest = decode.add_remote_request("a", PROMPT, _greedy(5))
    prefill.add_request("a", PROMPT, _greedy(1), kv_dest=dest)
    assert entered.wait(10)  # with neither engine stepped: the admission started it
    outputs: dict = {}
    _step([prefill, decode], outputs, lambda: _ended(outputs, "a") and "a" not in decode.requests)
    assert [t for o in outputs["a"] for t in o.token_ids] == reference
    assert len(calls) == 1 and calls[0].startswith("kv-connect")  # not the engine loop's thread
    assert writes and all(n == 1 for n in writes)  # every WRITE found the connection made, none made another
    assert _pools_full(prefill, decode)


def test_writes_and_admissions_during_a_connection_under_way_wait_for_it_and_connect_once(decode, reference,
                                                                                         monkeypatch):
    """The connection to D is held under way: the first request's WRITE and a second request to the same
    D (its destination following) wait for that one connection instead of making their own."""
    prefill = _core("prefill")
    conn, gate = prefill.connector, threading.Event()
    calls, entered = _count_connections(monkeypatch, conn, gate)
    asked_by, real_connection = [], conn._connection
    monkeypatch.setattr(conn, "_connection",
                        lambda dest: asked_by.append(threading.current_thread().name) or real_connection(dest))
    dest_a, dest_b = (decode.add_remote_request(rid, PROMPT, _greedy(5)) for rid in ("a", "b"))
    prefill.add_request("a", PROMPT, _greedy(1), kv_dest=dest_a)
    prefill.add_request("b", PROMPT, _greedy(1), kv_dest=DESTINATION_FOLLOWS)
    prefill.set_kv_dest("b", dest_b)
    assert entered.wait(10)
    outputs: dict = {}
    stepper = threading.Thread(target=_step, args=([prefill], outputs, lambda: bool(outputs.get("a")) and
                                                   bool(outputs.get("b"))), name="engine-loop")
    stepper.start()
    try:
        for _ in range(1000):  # until the engine loop's WRITE asks for the connection (it then waits)
            if "engine-loop" in asked_by:
                break
            stepper.join(0.01)
        assert "engine-loop" in asked_by
        assert not any(push.transfers for push in list(conn.pushes.values()))  # nothing posted while connecting
    finally:
        gate.set()
        stepper.join(30)
    assert not stepper.is_alive()
    _step([prefill, decode], outputs, lambda: all(_ended(outputs, r) and r not in decode.requests for r in "ab"))
    for rid in "ab":
        assert [t for o in outputs[rid] for t in o.token_ids] == reference
    assert len(calls) == 1
    assert _pools_full(prefill, decode)


def test_a_failed_connection_fails_the_request_with_the_layout_mismatch_and_is_tried_again(monkeypatch, caplog):
    prefill, decode = _core("prefill"), _core("decode")  # D's reservation is held until its timeout
    calls, _ = _count_connections(monkeypatch, prefill.connector)
    dest = decode.add_remote_request("bad", PROMPT, _greedy(5))
    wrong = dict(dest, layout=dict(dest["layout"], page_size=8))  # a receiver with another page size
    outputs: dict = {}
    with caplog.at_level("WARNING", logger="kvtransfer.nixl_connector"):
        prefill.add_request("bad", PROMPT, _greedy(1), kv_dest=wrong)
        _step([prefill], outputs, lambda: _ended(outputs, "bad"))
    end = [o for o in outputs["bad"] if o.finished]
    assert len(end) == 1 and end[0].finish_reason == "error"
    assert "KV transfer failed: KV layouts differ (page_size: ours 4 vs theirs 8)" in end[0].error
    assert any("connecting to KV receiver" in r.getMessage() and "page_size" in r.getMessage() for r in caplog.records)
    assert calls == []  # refused before any metadata was loaded
    assert not prefill.connector._connections  # forgotten: the next destination naming the peer tries again
    decode.abort("bad")
    assert _pools_full(prefill)
