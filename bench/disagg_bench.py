"""Prefill and decode engines as two processes sharing one GPU, KV pushed over NIXL (VRAM→VRAM):
transfer bandwidth per prompt length next to the GPU's copy bandwidth measured in the same run,
and TTFT split into queue (reservation) / prefill / transfer / first decode, against TTFT of the
same model served without disaggregation (the prefill engine running the request alone).

    python -m bench.disagg_bench --model deepseek-v2-lite --lengths 1024,4096,16384 --out DIR

The KV is pushed layer by layer while the last prompt chunk computes; "exposed" is the part of
the transfer still running after the prefill step ended (what it adds to TTFT), "hidden" the rest.

Both TTFT clocks start when the request is handed to the engines and stop when its first token is
known to the client: without a push, at the standalone engine's first token; with one, when the
prefill engine reports the push done (the router relays the first token only then), so the decode
engine's reservation and the push's tail are inside it. Two hand-offs are timed: "dest first"
(reserve on the decode engine, then start the prefill with the destination; the router's order) and
"early" (start the prefill at once, hand it the destination when the decode engine answers).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time

import torch

from bench.record import emit
from engine.config import EngineConfig
from engine.engine_client import EngineClient
from engine.engine_args import build_engine_config
from engine.kv_connector import DESTINATION_FOLLOWS
from engine.request_stream import collect
from engine.sampling_params import SamplingParams


def _client(args, role: str | None) -> EngineClient:
    cfg = build_engine_config(args.model, dtype="bfloat16", device=args.device, load_format="dummy",
                              max_model_len=max(args.lengths) + 64, gpu_memory_utilization=args.gpu_mem,
                              max_num_batched_tokens=args.chunk, enable_prefix_cache=False, max_num_seqs=16,
                              kv_role=role, cuda_graph_max_batch=16,
                              prefill_graph_max_tokens=args.prefill_graph_max_tokens)
    return EngineClient(cfg, detokenize=False)


def _one(prefill: EngineClient, decode: EngineClient, ids: list[int], rid: str, early: bool) -> dict:
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first_params = dataclasses.replace(params, max_tokens=1)
    t0 = time.perf_counter()
    if early:  # the prefill starts now; its destination follows
        pstream = prefill.add_request(ids, first_params, request_id=rid, kv_dest=DESTINATION_FOLLOWS)
        dest, stream = decode.add_remote_request(ids, params, rid)
        t1 = time.perf_counter()
        prefill.set_kv_dest(rid, dest)
    else:
        dest, stream = decode.add_remote_request(ids, params, rid)
        t1 = time.perf_counter()
        pstream = prefill.add_request(ids, first_params, request_id=rid, kv_dest=dest)
    first = collect(pstream)[0]  # n = 1: one choice
    t2 = time.perf_counter()
    second = stream.get(timeout=120)
    t3 = time.perf_counter()
    rest = list(stream) if not second.finished else []
    kv = first.kv_transfer or {}
    transfer = kv.get("seconds", float("nan"))
    exposed = kv.get("exposed_seconds", transfer)
    return {"tokens": len(ids), "reserve_ms": (t1 - t0) * 1e3,
            "prefill_ms": (t2 - (t0 if early else t1) - exposed) * 1e3,
            "transfer_ms": transfer * 1e3, "exposed_ms": exposed * 1e3,
            "hidden": 1.0 - exposed / transfer if transfer else float("nan"), "ttft_ms": (t2 - t0) * 1e3, "first_decode_ms": (t3 - t2) * 1e3,
            "kv_bytes": kv.get("bytes", 0), "descriptors": kv.get("descriptors", 0),
            "bandwidth_gb_s": kv.get("bytes", 0) / transfer / 1e9 if transfer else float("nan"),
            "tokens_out": [first.token_ids[0]] + second.token_ids + [t for d in rest for t in d.token_ids]}


def _collocated(prefill: EngineClient, ids: list[int]) -> dict:
    t0 = time.perf_counter()
    stream = prefill.add_request(ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    first = stream.get(timeout=300)
    t1 = time.perf_counter()
    rest = [first] + (list(stream) if not first.finished else [])
    return {"ttft_ms": (t1 - t0) * 1e3, "tokens_out": [t for d in rest for t in d.token_ids]}


def run(args) -> dict:
    from bench.device_probe import probe

    copy = probe() if args.device == "cuda" else {"device": args.device, "hbm_copy_bytes_per_s": float("nan")}
    decode = _client(args, "decode")
    prefill = _client(args, "prefill")
    gen = torch.Generator().manual_seed(0)
    vocab = prefill.model_config.vocab_size
    rows = []
    for n in args.lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        for w in range(args.warmup):  # compile kernels for this shape; the first few 1k prefills run slow
            _one(prefill, decode, ids, f"warm-{n}-{w}", early=False)
            _collocated(prefill, ids)
        runs: dict[str, list] = {"dest_first": [], "early": [], "collocated": []}
        for i in range(args.repeats):  # interleaved, so drift in clocks or load hits every arm alike
            runs["dest_first"].append(_one(prefill, decode, ids, f"d{n}-{i}", early=False))
            runs["early"].append(_one(prefill, decode, ids, f"e{n}-{i}", early=True))
            runs["collocated"].append(_collocated(prefill, ids))
        best = {k: min(v, key=lambda r: r["ttft_ms"]) for k, v in runs.items()}
        d, e, c = best["dest_first"], best["early"], best["collocated"]
        d["collocated_ttft_ms"] = c["ttft_ms"]
        d["early"] = {k: v for k, v in e.items() if k != "tokens_out"}
        d["same_tokens"] = d["tokens_out"] == c["tokens_out"] == e["tokens_out"]
        # Every arm's tokens, so a mismatch says which path differs (decode engine or collocated decode).
        d["tokens_by_arm"] = {k: [r["tokens_out"] for r in v] for k, v in runs.items()}
        # Medians too: at 1k the run-to-run spread of one arm exceeds the 5% margin, so a best-of-3
        # can land either side of it (bench/results/2026-11-29_h200_final.md, call 3).
        d["median_ttft_ms"] = {k: statistics.median(r["ttft_ms"] for r in v) for k, v in runs.items()}
        d["repeats"] = args.repeats
        rows.append(d)
        print(json.dumps({k: v for k, v in d.items() if k not in ("tokens_out", "tokens_by_arm")}), flush=True)
    prefill.shutdown()
    decode.shutdown()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "model": args.model, "device": copy["device"], "probe": copy, "rows": rows}


def markdown(r: dict) -> str:
    bw = r["probe"]["hbm_copy_bytes_per_s"] / 1e9
    lines = [f"### Disaggregated prefill/decode on one {r['device']}: {r['model']} — {r['date']}", "",
             f"`{r['command']}`", "",
             f"Two engine processes on the same GPU; KV pushed by NIXL (UCX) VRAM→VRAM layer by layer during the "
             f"prefill step. "
             f"Same-run device copy bandwidth: {bw:,.0f} GB/s (read+write).", "",
             "| prompt | KV bytes (descriptors) | transfer (first WRITE → all done) | "
             "exposed after prefill (hidden) | reserve | prefill | TTFT dest first | TTFT early (exposed) | "
             "TTFT no push | early vs no push | median: no push / early (vs) | first decode | same tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in r["rows"]:
        e = d.get("early", {})
        med = d["median_ttft_ms"]
        lines.append(
            f"| {d['tokens']} | {d['kv_bytes'] / 1e6:.1f} MB ({d['descriptors']}) | {d['transfer_ms']:.2f} ms | "
            f"{d['exposed_ms']:.2f} ms ({d['hidden']:.0%}) | {d['reserve_ms']:.1f} ms | {d['prefill_ms']:.1f} ms | "
            f"{d['ttft_ms']:.1f} ms ({d['ttft_ms'] / d['collocated_ttft_ms'] - 1:+.1%}) | "
            f"{e.get('ttft_ms', float('nan')):.1f} ms ({e.get('exposed_ms', float('nan')):.2f}) | "
            f"{d['collocated_ttft_ms']:.1f} ms | {e.get('ttft_ms', float('nan')) / d['collocated_ttft_ms'] - 1:+.1%} | "
            f"{med['collocated']:.1f} / {med['early']:.1f} ms ({med['early'] / med['collocated'] - 1:+.1%}, "
            f"n={d['repeats']}) | "
            f"{d['first_decode_ms']:.1f} ms | {d['same_tokens']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deepseek-v2-lite")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=3, help="timed requests per arm (best and median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed requests per arm and length first")
    ap.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--gpu-mem", type=float, default=0.46, help="each engine's share of the GPU")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the hand-off (tiny models)")
    ap.add_argument("--prefill-graph-max-tokens", type=int, default=EngineConfig.prefill_graph_max_tokens,
                    help="the prefill engines replay CUDA graphs up to this many tokens (0: eager prefill; "
                         "default: the engine's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    r = run(args)
    emit(r, markdown(r), args.out, f"disagg_{args.model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
