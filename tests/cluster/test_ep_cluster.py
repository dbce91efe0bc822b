"""Expert parallelism inside the disaggregated cluster: `pdserve up --ep-size 2` on CPU runs each
node as two gloo EP ranks (attention data-parallel, MoE expert-parallel); every rank pushes its
requests' KV to whichever decode rank reserved the pages, and the greedy outputs equal a single
engine's. The nodes export the EP backend they use and per-rank engine metrics."""
from __future__ import annotations

import concurrent.futures as cf
import json
import urllib.request

import pytest

from engine import LLM, SamplingParams
from tests.cluster.conftest import OFFLINE_KW, Cluster, wait_for

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 8], [11, 12], list(range(400, 422)), [9, 9, 9, 9],
           [70, 71, 72, 73, 74, 75, 76], [123, 456, 789, 1011, 1213]]


def test_ep2_nodes_serve_the_single_engine_tokens(tmp_path):
    offline = [o.token_ids for o in LLM("tiny-qwen3-moe", **OFFLINE_KW).generate(
        prompt_token_ids=PROMPTS, sampling_params=SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))]
    targets = tmp_path / "targets.json"
    cluster = Cluster(extra=["--model", "tiny-qwen3-moe", "--ep-size", "2", "--num-redundant-experts", "2",
                             "--eplb-interval", "4", "--eplb-window", "2", "--prometheus-targets", str(targets)])
    try:
        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(lambda p: cluster.generate(p, max_tokens=8), PROMPTS))
        assert [toks for toks, _ in results] == offline
        assert all(last.finish_reason == "length" for _, last in results)
        nodes = [t for t in json.loads(targets.read_text()) if t["labels"]["role"] != "router"]

        def scrape(target):
            with urllib.request.urlopen(f"http://{target['targets'][0]}/metrics", timeout=10) as r:
                return r.read().decode()
        for t in nodes:
            text = scrape(t)
            assert 'ep_backend="torch"' in text and 'ep_size="2"' in text
            ranks = {line.split('rank="')[1].split('"')[0] for line in text.splitlines()
                     if line.startswith("pdserve:engine_steps_total")}
            assert ranks == {"0", "1"}
        # Both decode ranks took requests, and every page on every rank came back.
        decode = scrape(next(t for t in nodes if t["labels"]["role"] == "decode"))
        steps = [float(line.rsplit(" ", 1)[1]) for line in decode.splitlines()
                 if line.startswith("pdserve:engine_steps_total")]
        assert len(steps) == 2 and min(steps) > 0

        def usage_zero():
            lines = [line for t in nodes for line in scrape(t).splitlines()
                     if line.startswith("pdserve:num_requests_running")]
            return lines and all(line.endswith(" 0.0") for line in lines)
        assert wait_for(usage_zero)
    finally:
        cluster.stop()
    assert wait_for(lambda: not cluster.descendants(), timeout=30), "processes left behind"
