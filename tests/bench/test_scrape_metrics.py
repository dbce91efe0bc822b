"""bench/scrape_metrics.py: histogram sums and counts from Prometheus text, summed over label sets,
and the per-run mean between two scrapes (a node missing or unreachable in one of them is skipped)."""
from __future__ import annotations

import pytest

from bench.scrape_metrics import diff, parse

TEXT = """# HELP pdserve:kv_transfer_exposed_seconds x
# TYPE pdserve:kv_transfer_exposed_seconds histogram
pdserve:kv_transfer_exposed_seconds_bucket{node="p0",le="0.1"} 3
pdserve:kv_transfer_exposed_seconds_sum{node="p0",rank="0"} 0.25
pdserve:kv_transfer_exposed_seconds_count{node="p0",rank="0"} 4
pdserve:kv_transfer_exposed_seconds_sum{node="p0",rank="1"} 0.05
pdserve:kv_transfer_exposed_seconds_count{node="p0",rank="1"} 1
pdserve:time_to_first_token_seconds_sum 1.5
pdserve:time_to_first_token_seconds_count 10
pdserve:engine_steps_total 99
"""


def test_parse_sums_every_label_set_and_keeps_only_the_histograms_it_splits_ttft_by():
    got = parse(TEXT)
    assert got["kv_transfer_exposed_seconds"] == pytest.approx([0.30, 5.0])
    assert got["time_to_first_token_seconds"] == pytest.approx([1.5, 10.0])
    assert "engine_steps_total" not in got and len(got) == 3  # the two histograms and the counters
    assert got["counters"] == {"engine_steps_total": 99.0}


def test_the_counters_give_tokens_and_wall_time_per_step_between_two_scrapes():
    text = ('pdserve:engine_steps_total{rank="0"} %d\npdserve:generation_tokens_total %d\n'
            'pdserve:request_time_per_output_token_seconds_sum 0.5\npdserve:request_time_per_output_token_seconds_count 5\n')
    before = {"time": 100.0, "nodes": {"d0": parse(text % (50, 400))}}
    after = {"time": 102.0, "nodes": {"d0": parse(text % (250, 2400))}}
    got = diff(before, after)["d0"]
    assert got["engine_steps_total"]["count"] == 200 and got["generation_tokens_total"]["count"] == 2000
    assert got["generated_tokens_per_step"]["mean"] == pytest.approx(10.0)  # the mean decode batch
    assert got["wall_seconds_per_step"]["mean_ms"] == pytest.approx(10.0)
    assert "request_time_per_output_token_seconds" not in got  # no request finished in between


def test_diff_gives_the_mean_of_the_requests_between_two_scrapes():
    before = {"nodes": {"p0": {"kv_transfer_exposed_seconds": [0.10, 2.0]}, "gone": {"error": "refused"}}}
    after = {"nodes": {"p0": {"kv_transfer_exposed_seconds": [0.40, 5.0], "time_to_first_token_seconds": [1.0, 4.0]},
                       "gone": {"error": "refused"}, "new": {"time_to_first_token_seconds": [0.0, 0.0]}}}
    got = diff(before, after)
    assert got["p0"]["kv_transfer_exposed_seconds"] == {"count": 3, "mean_ms": pytest.approx(100.0)}
    assert got["p0"]["time_to_first_token_seconds"] == {"count": 4, "mean_ms": pytest.approx(250.0)}
    assert "gone" not in got and "new" not in got  # unreachable, or nothing observed in between
    counts = diff({"nodes": {"p0": {"kv_writes_per_push": [27.0, 1.0]}}},
                  {"nodes": {"p0": {"kv_writes_per_push": [81.0, 3.0]}}})
    assert counts["p0"]["kv_writes_per_push"] == {"count": 2, "mean": pytest.approx(27.0)}  # not a time
