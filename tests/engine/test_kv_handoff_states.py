"""The KV hand-off as scheduler states (no model, no NIXL): a decode-role request waits in
WAITING_FOR_REMOTE_KV with its pages until the sender's notice names its transfer; a prefill-role
request with a destination ends in SENDING_KV holding its pages until its push ends. No path frees
a page a WRITE may still target or read; the pool returns to full after every mix."""
from __future__ import annotations

import random

from engine.request import RequestStatus
from tests.engine.test_scheduler import _req, _scheduler, _step


def _full(s) -> bool:
    s.block_pool.check_invariants()
    evictable = s.radix.num_evictable_pages() if s.radix else 0
    return s.block_pool.num_free_pages + evictable == s.block_pool.num_pages


def test_remote_request_runs_after_its_notice_with_the_first_token():
    s = _scheduler()
    req = _req("d1", range(10, 19), max_tokens=4)
    assert s.add_remote(req, "d1#a", deadline=100.0)
    assert req.status is RequestStatus.WAITING_FOR_REMOTE_KV and len(req.page_ids) == 3
    assert not s.schedule().chunks  # nothing to compute until the KV is there
    assert s.remote_kv_arrived("other#x", 5) == []  # a notice for another transfer changes nothing
    assert s.remote_kv_arrived("d1#a", 7) == []
    assert req.status is RequestStatus.RUNNING and req.output_token_ids == [7]
    assert req.num_computed_tokens == 9
    out = s.schedule()
    assert [(c.request, c.start, c.num_new_tokens) for c in out.chunks] == [(req, 9, 1)]


def test_first_token_that_stops_ends_the_request_and_frees_its_pages():
    s = _scheduler(prefix=False)
    req = _req("d1", range(10, 19), max_tokens=1)
    s.add_remote(req, "d1#a", deadline=100.0)
    assert s.remote_kv_arrived("d1#a", 7) == [req]
    assert req.status is RequestStatus.FINISHED_LENGTH and not req.page_ids and _full(s)


def test_no_free_pages_refuses_and_keeps_nothing():
    s = _scheduler(num_pages=4)
    assert not s.add_remote(_req("big", range(40)), "big#a", deadline=100.0)
    assert not s.remote_kv and _full(s)


def test_aborted_while_waiting_keeps_pages_until_the_notice():
    s = _scheduler(prefix=False)
    req = _req("d1", range(10, 19))
    s.add_remote(req, "d1#a", deadline=100.0)
    assert s.abort("d1", now=50.0) is req
    assert req.status is RequestStatus.FINISHED_ABORTED
    assert req.page_ids and not _full(s)  # a WRITE may still be landing
    assert s.abort("d1", now=51.0) is None  # idempotent
    assert s.remote_kv_arrived("d1#a", 7) == []  # the sender's last WRITE is done: free now
    assert _full(s)


def test_aborted_while_waiting_frees_after_a_full_timeout_without_a_notice():
    s = _scheduler(prefix=False)
    s.kv_timeout_s = 30.0
    req = _req("d1", range(10, 19))
    s.add_remote(req, "d1#a", deadline=10.0)
    s.abort("d1", now=9.0)
    assert s.expire_remote(now=20.0) == [] and not _full(s)  # abort extended the hold to 39 s
    assert s.expire_remote(now=40.0) == [] and _full(s)


def test_kv_that_never_arrives_fails_at_the_deadline_then_drains():
    s = _scheduler(prefix=False)
    s.kv_timeout_s = 5.0
    req = _req("d1", range(10, 19))
    s.add_remote(req, "d1#a", deadline=10.0)
    assert s.expire_remote(now=9.0) == []
    assert s.expire_remote(now=11.0) == [req]
    assert req.status is RequestStatus.FINISHED_ERROR and "did not arrive" in req.error
    assert not _full(s)
    assert s.expire_remote(now=17.0) == [] and _full(s)


def test_abandon_notice_fails_a_waiting_request_at_once():
    s = _scheduler(prefix=False)
    req = _req("d1", range(10, 19))
    s.add_remote(req, "d1#a", deadline=100.0)
    assert s.remote_kv_arrived("d1#a", None) == [req]
    assert req.status is RequestStatus.FINISHED_ERROR and _full(s)


def _prefill_request(s, rid="p1", n=9):
    req = _req(rid, range(10, 10 + n), max_tokens=1)
    req.kv_dest = {"transfer_id": f"{rid}#t"}
    s.add_request(req)
    return req


def test_prefill_request_holds_its_pages_while_sending_then_finishes_with_its_status():
    s = _scheduler()
    req = _prefill_request(s)
    out = s.schedule()
    done = s.update(out, {"p1": 42})
    assert done == [req] and req.status is RequestStatus.SENDING_KV
    assert req.kv_final_status is RequestStatus.FINISHED_LENGTH and req.page_ids
    assert not s.has_unfinished() and s.has_kv_in_flight()
    assert s.finish_sending("p1") is req
    assert req.status is RequestStatus.FINISHED_LENGTH and _full(s)


def test_failed_push_ends_with_an_error_and_frees():
    s = _scheduler()
    req = _prefill_request(s)
    s.update(s.schedule(), {"p1": 42})
    assert s.finish_sending("p1", "KV transfer failed: boom") is req
    assert req.status is RequestStatus.FINISHED_ERROR and _full(s)


def test_abort_mid_push_reports_once_and_frees_only_when_the_push_ends():
    s = _scheduler()
    req = _prefill_request(s)
    s.update(s.schedule(), {"p1": 42})
    assert s.abort("p1") is req and req.status is RequestStatus.FINISHED_ABORTED
    assert req.page_ids and not _full(s)
    assert s.finish_sending("p1") is None  # its end was reported at the abort
    assert _full(s)


def test_abort_of_a_running_request_whose_push_started_holds_its_pages():
    s = _scheduler(budget=4)
    req = _prefill_request(s, n=9)
    s.update(s.schedule(), {})  # a first chunk: nothing pushed yet
    req.kv_push_started = True  # the connector posted layer WRITEs during a step that then failed
    s.abort("p1", RequestStatus.FINISHED_ERROR, "step failed")
    assert req.page_ids and not _full(s) and "p1" in s.sending
    assert s.finish_sending("p1") is None and _full(s)


def test_random_mix_of_remote_and_sending_requests_returns_every_page():
    rng = random.Random(0)
    s = _scheduler(num_pages=64, budget=32)
    s.kv_timeout_s = 3.0
    now, live = 0.0, []
    for i in range(200):
        now += 1.0
        kind = rng.random()
        if kind < 0.3:
            req = _req(f"d{i}", range(i, i + rng.randint(1, 20)), max_tokens=rng.randint(1, 4))
            if s.add_remote(req, f"d{i}#t", deadline=now + rng.choice([2.0, 50.0])):
                live.append(("remote", req))
        elif kind < 0.55:
            live.append(("send", _prefill_request(s, f"p{i}", rng.randint(1, 20))))
        elif live and kind < 0.7:
            _, req = live.pop(rng.randrange(len(live)))
            s.abort(req.request_id, now=now)
        elif live and kind < 0.85:
            what, req = rng.choice(live)
            if what == "remote" and req.kv_transfer_id in s.remote_kv:
                s.remote_kv_arrived(req.kv_transfer_id, rng.choice([None, 5]))
            elif what == "send" and req.request_id in s.sending:
                s.finish_sending(req.request_id, rng.choice([None, "boom"]))
        s.expire_remote(now)
        if s.has_unfinished():
            _step(s)
        s.block_pool.check_invariants()
    for _, req in live:
        s.abort(req.request_id, now=now)
    for rid in list(s.sending):
        s.finish_sending(rid)
    while s.has_unfinished():
        _step(s)
    for _ in range(3):
        now += 100.0
        s.expire_remote(now)
    for rid in list(s.sending):
        s.finish_sending(rid)
    assert not s.remote_kv and not s.sending and _full(s)
