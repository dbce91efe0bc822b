"""bench/validate_simulator.py re-predicts a recorded sweep run from a profile: measured against
predicted with the relative error per run, and the shared-GPU model chosen by flag or profile."""
from __future__ import annotations

import json

import pytest

from bench import validate_simulator
from planner.profile import constant

PREFILL_S, DECODE_S = 0.05, 0.01


def _run_file(tmp_path, tpot_ms: float, prefix: str = "sweep_") -> str:
    rep = {"model": "synthetic", "dataset": "random", "request_rate": 2.0, "burstiness": 1.0, "num_prompts": 8,
           "completed": 8, "failed": 0, "total_input_tokens": 8 * 512, "total_output_tokens": 8 * 32,
           "median_ttft_ms": 60.0, "median_tpot_ms": tpot_ms, "goodput": 1.5, "request_throughput": 1.5,
           "slos_ms": {"ttft": 1000.0, "tpot": 50.0}}
    path = tmp_path / f"{prefix}synthetic_random_2.json"
    path.write_text(json.dumps(rep))
    return str(path)


def _profile(tmp_path, interference, **kw) -> str:
    path = tmp_path / "profile.json"
    constant(PREFILL_S, DECODE_S, interference=interference, **kw).save(str(path))
    return str(path)


def _rows(tmp_path, capsys, interference, *flags, **profile_kw):
    out = tmp_path / "out"
    assert validate_simulator.main(["--profile", _profile(tmp_path, interference, **profile_kw),
                                    _run_file(tmp_path, 12.0),
                                    "--kv-link", "nvlink", "--out", str(out), *flags]) == 0
    text = capsys.readouterr().out
    assert "sweep_synthetic_random_2.json" in text and "12.0 / " in text  # measured / predicted (error)
    return json.load(open(out / "validate_synthetic.json"))["rows"]


def test_each_run_gets_measured_predicted_and_relative_error(tmp_path, capsys):
    (row,) = _rows(tmp_path, capsys, None)
    tpot = row["median_tpot_ms"]
    assert tpot["measured"] == 12.0
    assert tpot["error"] == pytest.approx((tpot["predicted"] - 12.0) / 12.0)
    assert row["shape"].endswith("(one GPU)")


def test_measured_interference_replaces_turns_unless_turns_are_asked_for(tmp_path, capsys):
    free = {"decode_slowdown": 1.0, "prefill_slowdown": 1.0}
    (inter,) = _rows(tmp_path, capsys, free)
    (turns,) = _rows(tmp_path, capsys, free, "--shared-gpu", "turns")
    # Concurrent roles without slowdown: decode keeps its own pace; turns stall it for prefills.
    assert inter["median_tpot_ms"]["predicted"] == pytest.approx(DECODE_S * 1e3, rel=0.05)
    assert turns["median_tpot_ms"]["predicted"] > inter["median_tpot_ms"]["predicted"]


def test_an_idle_http_probe_gives_the_overhead_beyond_the_profiled_prefill(tmp_path, capsys):
    probe = tmp_path / "probe_http.json"
    probe.write_text(json.dumps({"total_input_tokens": 4 * 512, "completed": 4, "median_ttft_ms": 80.0}))
    (row,) = _rows(tmp_path, capsys, None, "--http-probe", str(probe))
    (plain,) = _rows(tmp_path, capsys, None, "--request-overhead-ms", "0")
    # Overhead 80 - 50 ms is added to every request's arrival at the nodes, so to its TTFT.
    assert row["median_ttft_ms"]["predicted"] - plain["median_ttft_ms"]["predicted"] == pytest.approx(30.0, abs=0.5)


def test_per_prompt_overheads_apply_unless_the_single_figure_is_asked_for(tmp_path, capsys):
    over = dict(serving_overhead={"disaggregated": 0.010},
                serving_overhead_by_prompt={"disaggregated": [[256, 0.040], [1024, 0.030]]})
    (per,) = _rows(tmp_path, capsys, None, **over)
    (single,) = _rows(tmp_path, capsys, None, "--overhead-single", **over)
    (plain,) = _rows(tmp_path, capsys, None, "--request-overhead-ms", "0", **over)
    # the runs' 512-token prompts sit log-midway between the probed 256 and 1,024: 35 ms; the single figure 10 ms
    assert per["median_ttft_ms"]["predicted"] - plain["median_ttft_ms"]["predicted"] == pytest.approx(35.0, abs=0.5)
    assert single["median_ttft_ms"]["predicted"] - plain["median_ttft_ms"]["predicted"] == pytest.approx(10.0, abs=0.5)


def test_the_served_decode_steps_from_the_scrapes_beside_a_run_go_next_to_the_simulated(tmp_path, capsys):
    """The validation script scrapes the cluster around each run; its engine counters give the served
    decode engine's steps, mean batch and wall time per step, printed beside the simulator's."""
    def scrape(t, steps, tokens):
        return {"time": t, "nodes": {"decode0": {"counters": {"engine_steps_total": steps,
                                                              "generation_tokens_total": tokens}},
                                     "router": {"time_to_first_token_seconds": [0.0, 0.0]}}}
    (tmp_path / "metrics_before_sweep_synthetic_random_2.json").write_text(json.dumps(scrape(10.0, 100, 300)))
    (tmp_path / "metrics_after_sweep_synthetic_random_2.json").write_text(json.dumps(scrape(14.0, 500, 2300)))
    (row,) = _rows(tmp_path, capsys, None)
    served, sim = row["decode_steps"]["measured"], row["decode_steps"]["predicted"]
    assert served == {"steps": 400, "tokens_per_step": pytest.approx(5.0), "wall_ms_per_step": pytest.approx(10.0)}
    assert sim["steps"] > 0 and sim["tokens_per_step"] >= 1.0 and sim["ms_per_step"] >= DECODE_S * 1e3 * 0.99
    md = open(tmp_path / "out" / "validate_synthetic.md").read()
    assert "| sweep_synthetic_random_2.json | 400 / " in md and "5.0 / " in md and "10.00 / " in md


def test_a_collocated_run_is_simulated_collocated_and_its_node_steps_compared(tmp_path, capsys):
    """`COLLOC=1` of the validation script names its runs sweepc_*: one collocated node with the GPU to
    itself; the served node is `decode0`, the simulated role `collocated`."""
    def scrape(t, steps, tokens):
        return {"time": t, "nodes": {"decode0": {"counters": {"engine_steps_total": steps,
                                                              "generation_tokens_total": tokens}}}}
    (tmp_path / "metrics_before_sweepc_synthetic_random_2.json").write_text(json.dumps(scrape(10.0, 100, 300)))
    (tmp_path / "metrics_after_sweepc_synthetic_random_2.json").write_text(json.dumps(scrape(14.0, 500, 2300)))
    out = tmp_path / "out"
    assert validate_simulator.main(["--profile", _profile(tmp_path, None), _run_file(tmp_path, 12.0, "sweepc_"),
                                    "--out", str(out)]) == 0
    (row,) = json.load(open(out / "validate_synthetic.json"))["rows"]
    assert row["shape"].startswith("1×colloc") and "one GPU" not in row["shape"]
    assert row["decode_steps"]["measured"]["steps"] == 400 and row["decode_steps"]["predicted"]["steps"] > 0

