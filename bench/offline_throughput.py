"""Offline throughput on ShareGPT-like requests: our engine (continuous batching, per-request
output lengths) against HF `transformers` `generate` on the same weights at its best batch size
(static batches padded to the longest prompt and run to the longest output; only the tokens the
requests asked for count as useful). HF is timed on a subsample — it is far slower — and its
useful tokens/s compared with ours over the whole set.

    python -m bench.offline_throughput --model qwen3-8b --num-prompts 1000 --hf-sample 64 --hf-batch 32,64
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import sys
import time

import torch

from bench import hf_baseline
from bench.record import emit
from bench.serving.datasets import sharegpt_like
from engine.llm import LLM
from engine.presets import resolve_model
from engine.sampling_params import SamplingParams
from engine.weight_loader import load_model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def hf_throughput(model, reqs, batch: int, device: str) -> dict:
    useful, t0 = 0, time.perf_counter()
    for i in range(0, len(reqs), batch):
        group = reqs[i: i + batch]
        width = max(r.prompt_len for r in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(group):  # left padding, as generate expects for decoder-only models
            ids[j, width - r.prompt_len:] = torch.tensor(r.prompt_ids)
            mask[j, width - r.prompt_len:] = 1
        new = max(r.output_len for r in group)
        model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)
        useful += sum(r.output_len for r in group)
    _sync(device)
    dt = time.perf_counter() - t0
    return {"batch": batch, "requests": len(reqs), "seconds": dt, "useful_tok_s": useful / dt}


def run(args) -> dict:
    device = args.device
    mc = resolve_model(args.model, args.dtype)
    if device == "cpu":
        mc = dataclasses.replace(mc, dtype=torch.float32)
    reqs = sharegpt_like(args.num_prompts, min(mc.vocab_size, 32000), max_input=args.max_input,
                         max_output=args.max_output, seed=args.seed)
    hf = hf_baseline.build_hf_model(mc.hf, device, mc.dtype)
    sample = reqs[: args.hf_sample]
    hf_throughput(hf, sample[: min(2, len(sample))], 2, device)  # warm-up
    hf_runs = [hf_throughput(hf, sample, b, device) for b in args.hf_batch]
    model = load_model(mc, device, weights=hf.state_dict().items())
    del hf
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    llm = LLM(args.model, model_object=model, model_config=mc, dtype=str(mc.dtype).removeprefix("torch."),
              device=device, max_model_len=args.max_input + args.max_output + 8, enable_prefix_cache=False,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=8192, gpu_memory_utilization=0.85,
              num_pages=args.num_pages)
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in reqs]
    llm.generate(prompt_token_ids=[r.prompt_ids for r in reqs[:4]], sampling_params=params[:4])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=[r.prompt_ids for r in reqs], sampling_params=params)
    _sync(device)
    dt = time.perf_counter() - t0
    produced = sum(len(o.token_ids) for o in outs)
    best = max(hf_runs, key=lambda h: h["useful_tok_s"])
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "model": args.model, "dtype": str(mc.dtype),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "num_prompts": len(reqs), "input_tokens": sum(r.prompt_len for r in reqs),
            "output_tokens": produced, "ours_seconds": dt, "ours_tok_s": produced / dt,
            "ours_req_s": len(reqs) / dt, "hf": hf_runs, "hf_best_batch": best["batch"],
            "ratio_vs_hf": (produced / dt) / best["useful_tok_s"],
            "all_finished": all(o.finish_reason == "length" for o in outs)}


def markdown(r: dict) -> str:
    lines = [f"### Offline throughput, {r['model']} ({r['dtype']}) on {r['device']} — {r['date']}", "",
             f"`{r['command']}`", "",
             f"{r['num_prompts']} ShareGPT-like requests ({r['input_tokens']:,} prompt tokens, "
             f"{r['output_tokens']:,} output tokens, greedy, ignore_eos, every request its own length).", "",
             "| engine | batch | requests timed | output tok/s (useful) | ratio |", "|---|---|---|---|---|",
             f"| pdserve engine (continuous batching) | up to {r.get('max_num_seqs', '')} | {r['num_prompts']} | "
             f"{r['ours_tok_s']:,.0f} | {r['ratio_vs_hf']:.1f}× HF best |"]
    for h in r["hf"]:
        lines.append(f"| HF transformers generate | {h['batch']} (static, padded) | {h['requests']} | "
                     f"{h['useful_tok_s']:,.0f} | {'best' if h['batch'] == r['hf_best_batch'] else ''} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--max-input", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--hf-sample", type=int, default=64)
    ap.add_argument("--hf-batch", type=lambda s: [int(x) for x in s.split(",")], default=[32, 64])
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    r = run(args)
    r["max_num_seqs"] = args.max_num_seqs
    emit(r, markdown(r), args.out, f"offline_{args.model}")
    return 0 if r["all_finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
