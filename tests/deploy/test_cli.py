"""`pdserve generate` as a user runs it: a real subprocess, JSON out, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

BASE = [sys.executable, "-m", "deploy.cli", "generate", "--model", "tiny-llama", "--load-format", "dummy",
        "--num-pages", "64", "--page-size", "4"]


def _run(args, timeout=180):
    return subprocess.run(BASE + args, capture_output=True, text=True, timeout=timeout)


def test_generate_json_prints_one_object_per_prompt():
    r = _run(["--prompt", "Hello there", "--prompt-ids", "1,2,3", "--max-tokens", "4", "--ignore-eos", "--json"])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) == 2
    for obj in lines:
        assert len(obj["token_ids"]) == 4 and isinstance(obj["text"], str) and obj["finish_reason"] == "length"
    assert lines[1]["prompt_token_ids"] == [1, 2, 3]


def test_generate_in_process_matches_the_engine_process():
    args = ["--prompt-ids", "5,6,7,8", "--max-tokens", "5", "--ignore-eos", "--json"]
    a, b = _run(args), _run(args + ["--in-process"])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_generate_n_prints_each_choice_in_and_out_of_process():
    args = ["--prompt-ids", "5,6,7,8,9", "--prompt", "Hi", "--max-tokens", "4", "--ignore-eos", "--json", "--n", "2",
            "--temperature", "1", "--seed", "3"]
    a, b = _run(args), _run(args + ["--in-process"])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    lines = [json.loads(line) for line in a.stdout.splitlines() if line.strip()]
    assert [o["index"] for o in lines] == [0, 1, 0, 1] and lines[2]["prompt_token_ids"] == [5, 6, 7, 8, 9]
    assert lines == [json.loads(line) for line in b.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--n", "0"], "n must be"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--top-p", "0"], "top_p"),
])
def test_invalid_sampling_parameters_exit_with_a_clear_error(args, message):
    r = _run(args)
    assert r.returncode == 2 and message in r.stderr


def test_unknown_model_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "deploy.cli", "generate", "--model", "no-such-model", "--prompt", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no-such-model" in r.stderr


def test_over_long_prompt_reports_an_error_for_that_prompt():
    r = _run(["--prompt-ids", ",".join(["7"] * 40), "--prompt-ids", "1,2", "--max-model-len", "32",
              "--max-tokens", "2", "--json"])
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert r.returncode == 1
    assert lines[0]["finish_reason"] == "error" and "context limit" in lines[0]["error"]
    assert lines[1]["finish_reason"] in ("length", "stop")
