"""Host time of the parts of preparing a step that grow with its token count: the attention metadata
(`AttentionMetadata.build`) and the runner's flattened inputs (`ModelRunner._inputs`). CPU only; no
device involved.

    python -m bench.host_prep_bench --out DIR
"""
from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time

import torch

from bench.record import emit
from engine.attention.metadata import AttentionMetadata

PAGE = 16
# name: (new tokens per sequence, cached tokens before them)
CASES = {"one 2k-token prompt": ([2048], 0), "40 prompts of 200 tokens": ([200] * 40, 0),
         "64 decodes at 1k context": ([1] * 64, 1023), "8 chunks of 1k over 8k prefixes": ([1024] * 8, 8192)}


def _per_call_ms(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def time_build(lens: list[int], prefix: int, repeats: int) -> float:
    seq_lens = [n + prefix for n in lens]
    tables, nxt = [], 0
    for s in seq_lens:
        n = -(-s // PAGE)
        tables.append(list(range(nxt, nxt + n)))
        nxt += n
    return _per_call_ms(lambda: AttentionMetadata.build(lens, seq_lens, tables, PAGE), repeats)


class _Request:
    def __init__(self, rid: str, tokens: list[int], page: int):
        self.request_id, self.tokens, self.page_ids = rid, tokens, list(range(len(tokens) // page + 1))

    def token_slice(self, start: int, end: int) -> list[int]:
        return self.tokens[start:end]


class _Chunk:
    def __init__(self, request: _Request):
        self.request, self.start, self.num_new_tokens, self.sample = request, 0, len(request.tokens), True


def time_inputs(lens: list[int], repeats: int) -> float:
    from engine.model_runner import ModelRunner
    chunks = [_Chunk(_Request(f"r{i}", list(range(5, 5 + n)), PAGE)) for i, n in enumerate(lens)]
    return _per_call_ms(lambda: ModelRunner._inputs(chunks), repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = {name: time_build(lens, prefix, args.repeats) for name, (lens, prefix) in CASES.items()}
    inputs = {name: time_inputs(lens, args.repeats) for name, (lens, prefix) in CASES.items()
              if not prefix}  # whole prompts: the chunks `_inputs` scans
    r = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
         "command": " ".join(sys.argv), "cpu": platform.processor() or platform.machine(),
         "threads": torch.get_num_threads(), "build_ms": rows, "inputs_ms": inputs}
    md = [f"# AttentionMetadata.build host time ({r['date']}, {commit}, CPU, {r['threads']} threads)", "",
          "| batch | ms per build |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in rows.items()]
    md += ["", "| prompt chunks | ms per `ModelRunner._inputs` |", "|---|---:|"]
    md += [f"| {k} | {v:.3f} |" for k, v in inputs.items()]
    emit(r, "\n".join(md) + "\n", args.out, "host_prep")
    return 0


if __name__ == "__main__":
    sys.exit(main())
