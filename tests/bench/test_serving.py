"""The serving benchmark: report arithmetic on a synthetic trace with known answers, datasets and
arrivals, and a real run against a local cluster."""
from __future__ import annotations

import json
import statistics

import pytest

from bench.serving import datasets
from bench.serving.metrics import RequestResult, parse_goodput, report
from bench.serving.runner import arrival_gaps


def _trace():
    # ttft 0.1/0.2/0.3/0.4 s; 11 tokens each; latency = ttft + 10 * tpot with tpot 10/20/30/40 ms
    out = [RequestResult(True, prompt_len=100, output_len=11, ttft=0.1 * i, itl=[0.01 * i] * 10,
                         latency=0.1 * i + 0.1 * i) for i in (1, 2, 3, 4)]
    out.append(RequestResult(False, prompt_len=100, error="HTTP 503: overloaded"))
    return out


def test_report_arithmetic_on_a_known_trace():
    rep = report(_trace(), duration_s=2.0, slos=parse_goodput(["ttft:250", "tpot:25"]))
    assert rep["completed"] == 4 and rep["failed"] == 1
    assert rep["total_output_tokens"] == 44 and rep["total_input_tokens"] == 400
    assert rep["request_throughput"] == pytest.approx(2.0)
    assert rep["output_throughput"] == pytest.approx(22.0)
    assert rep["mean_ttft_ms"] == pytest.approx(250.0) and rep["median_ttft_ms"] == pytest.approx(250.0)
    assert rep["mean_tpot_ms"] == pytest.approx(25.0)
    assert rep["p99_itl_ms"] == pytest.approx(40.0, abs=0.5)
    assert rep["goodput"] == pytest.approx(1.0)  # requests 1 and 2 meet ttft<=250 and tpot<=25: 2 in 2 s
    assert rep["slo_attainment"] == pytest.approx(2 / 5)
    assert rep["errors"] == ["HTTP 503: overloaded"]


def test_goodput_spec_is_validated():
    assert parse_goodput(["ttft:1000", "e2el:5"]) == {"ttft": 1.0, "e2el": 0.005}
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput(["latency:3"])


def test_arrivals_have_the_asked_rate_and_burstiness():
    gaps = arrival_gaps(20000, rate=4.0, burstiness=1.0, seed=1)
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.03)
    bursty = arrival_gaps(20000, rate=4.0, burstiness=0.25, seed=1)
    assert statistics.mean(bursty) == pytest.approx(0.25, rel=0.06)
    assert statistics.pstdev(bursty) > 1.8 * statistics.pstdev(gaps)  # CV = 1/sqrt(shape)
    assert arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]


def test_datasets_shapes():
    r = datasets.random_requests(50, 100, 20, 0.5, 1000, seed=1)
    assert all(50 <= x.prompt_len <= 150 and 10 <= x.output_len <= 30 for x in r)
    sg = datasets.sharegpt_like(500, 1000)
    lens = sorted(x.prompt_len for x in sg)
    assert 150 < lens[250] < 320 and lens[-1] > 3 * lens[250]  # median near 220, long tail
    sp = datasets.shared_prefix(8, 1000, num_prefixes=2, prefix_len=32, question_len=4)
    assert sp[0].prompt_ids[:32] == sp[2].prompt_ids[:32] != sp[1].prompt_ids[:32]
    mt = datasets.multi_turn(8, 1000, turns=4)
    assert mt[1].prompt_ids[: mt[0].prompt_len] == mt[0].prompt_ids and mt[1].conversation == mt[0].conversation


def test_benchmark_against_a_real_local_cluster(cluster, tmp_path, capfd):
    from deploy.cli import main

    rc = main(["bench", "--base-url", cluster.http, "--num-prompts", "6", "--random-input-len", "16",
               "--random-output-len", "4", "--vocab-size", "1000", "--request-rate", "20", "--goodput", "ttft:60000",
               "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json", "--plot"])
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["completed"] == 6 and rep["failed"] == 0 and rep["total_output_tokens"] == 24, rep["errors"]
    assert rep["goodput"] == pytest.approx(rep["request_throughput"])
    assert "Serving Benchmark Result" in capfd.readouterr().out
    assert (tmp_path / "r_cdf.png").read_bytes()[:4] == b"\x89PNG" and len(rep["per_request"]["ttfts"]) == 6


def test_sweep_plot_is_written(tmp_path):
    from bench.serving.plots import sweep

    runs = [dict(report(_trace(), duration_s=d, slos=parse_goodput(["ttft:250"])), model="m", dataset="random",
                 request_rate=rate) for rate, d in ((1.0, 4.0), (2.0, 2.0), (4.0, 1.5))]
    path = sweep(runs, str(tmp_path / "sweep.png"))
    assert open(path, "rb").read(4) == b"\x89PNG"


def test_benchmark_over_the_routers_grpc_api(cluster, tmp_path):
    from deploy.cli import main

    rc = main(["bench", "--backend", "pdserve-grpc", "--base-url", f"grpc://127.0.0.1:{cluster.grpc_port}",
               "--num-prompts", "5", "--random-input-len", "12", "--random-output-len", "3", "--vocab-size", "1000",
               "--max-concurrency", "2", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "g.json"])
    assert rc == 0
    rep = json.loads((tmp_path / "g.json").read_text())
    assert rep["backend"] == "pdserve-grpc"
    assert rep["completed"] == 5 and rep["failed"] == 0 and rep["total_output_tokens"] == 15, rep["errors"]
    assert all(t > 0 for t in rep["per_request"]["ttfts"])


def test_grpc_backend_needs_a_grpc_address():
    from deploy.cli import main

    assert main(["bench", "--backend", "pdserve-grpc", "--base-url", "http://127.0.0.1:8000/v1"]) == 2


def test_warm_up_prompts_are_not_the_measured_ones_and_the_seed_is_recorded(tmp_path, monkeypatch):
    """A warm-up that sent the run's own first prompts would leave them in the server's prefix cache
    (their prefills measured cached); the warm-up draws its own. No server: `run` is replaced by a
    recorder of what each phase sends."""
    from bench.serving import runner

    sent = []

    async def fake_run(base_url, model, reqs, *a, **k):
        sent.append([r.prompt_ids for r in reqs])
        return [RequestResult(success=True, ttft=0.01, latency=0.02, output_len=4, itl=[0.003] * 3,
                              prompt_len=r.prompt_len) for r in reqs], 1.0
    monkeypatch.setattr(runner, "run", fake_run)
    rc = runner.main(["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--num-prompts", "5", "--seed", "7",
                      "--random-input-len", "32", "--save-result", "--result-dir", str(tmp_path),
                      "--result-filename", "r.json"])
    assert rc == 0
    warm, measured = sent
    assert len(warm) == 2 and len(measured) == 5
    assert not {tuple(p) for p in warm} & {tuple(p) for p in measured}
    assert measured == [r.prompt_ids for r in datasets.build("random", 5, 32000, _ns(seed=7, random_input_len=32))]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["seed"] == 7 and rep["random_input_len"] == 32 and rep["warmup_requests"] == 2


def _ns(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"random_input_len": 1024, "random_output_len": 128, "random_range_ratio": 0.0, **kw})
