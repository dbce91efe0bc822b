"""The flags of `pdserve profile` and `pdserve plan` (registered by deploy/cli.py). Building the
parsers imports nothing heavy; each command imports its module when it runs."""
from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="preset name or HF checkpoint directory (weights: dummy)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", choices=["fp8"], default=None, help="as for `pdserve generate`")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8_e4m3"], default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--prefill-tokens", type=_ints, default=[128, 512, 2048, 8192])
    p.add_argument("--cached", type=_ints, default=[0, 2048, 8192], help="cached prefix lengths (page multiples)")
    p.add_argument("--decode-batch", type=_ints, default=[1, 4, 16, 64, 128, 256])
    p.add_argument("--decode-context", type=_ints, default=[128, 1024, 4096])
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-pages", type=int, default=None, help="KV pool size (default: from memory)")
    p.add_argument("--kv-pages", type=_ints, default=[16, 64, 256, 1024],
                   help="KV transfer sizes in pages ('' to skip)")
    p.add_argument("--ep-ranks", type=_ints, default=None,
                   help="EP sizes to time the all-to-all at (default: 2,4,8 up to the GPUs present; '' to skip)")
    p.add_argument("--ep-tokens", type=_ints, default=[16, 128, 1024, 4096])
    p.add_argument("--interference", action="store_true",
                   help="also time a prefill and a decode engine sharing the GPU, alone and side by side "
                        "(planner/interference.py: 256- and 2048-token prefills beside decode batches 4 and 32 at 1024; with NIXL "
                        "also the KV hand-off's exposed time, alone and beside the decode)")
    p.add_argument("--serving-prompts", type=_ints, default=[],
                   help="also measure the serving path's fixed TTFT overhead with these prompt lengths through an "
                        "idle `pdserve up` (disaggregated and collocated; starts two clusters in turn)")
    p.set_defaults(func=run_profile)


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help="profile JSON written by `pdserve profile`")
    p.add_argument("--model", default=None, help="model name (checked against the profile's)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the cluster to plan")
    p.add_argument("--slo", required=True, help='SLO targets, e.g. "ttft:1000 tpot:50" (ms)')
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet the SLOs")
    p.add_argument("--ep-sizes", type=_ints, default=None,
                   help="EP sizes to try per role (default 1, and 2,4,8 up to --gpus for MoE models)")
    p.add_argument("--chunk-budgets", type=_ints, default=[2048, 8192], help="max_num_batched_tokens to try")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="KV pool per GPU as at this memory share (default: the profile's)")
    p.add_argument("--policy", choices=["round_robin", "least_load", "prefix_aware"], default="least_load")
    p.add_argument("--kv-link", default="rdma", help="prefill → decode KV link: nvlink, pcie, rdma or NAME:GBPS:US")
    p.add_argument("--ep-link", default="nvlink", help="link inside an EP group (when the profile has no EP table)")
    p.add_argument("--no-collocated", action="store_true", help="only disaggregated shapes")
    p.add_argument("--iterations", type=int, default=5,
                   help="bisection steps per shape (the rate is found to 1.5×bound / 2^N)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--plot", default=None, help="PNG of goodput per GPU against offered rate for the top 3")
    p.add_argument("--json", default=None, help="write every evaluation here")
    d = p.add_argument_group("workload (the datasets and arrivals of `pdserve bench`)")
    d.add_argument("--dataset", dest="dataset_name", choices=["random", "sharegpt", "prefix", "multiturn"],
                   default="random")
    d.add_argument("--num-prompts", type=int, default=300)
    d.add_argument("--random-input-len", type=int, default=1024)
    d.add_argument("--random-output-len", type=int, default=128)
    d.add_argument("--random-range-ratio", type=float, default=0.0)
    d.add_argument("--vocab-size", type=int, default=32000)
    d.add_argument("--burstiness", type=float, default=1.0)
    d.add_argument("--seed", type=int, default=0)


def run_profile(args) -> int:
    from planner.profiler import main_args
    return main_args(args)


def run_plan(args) -> int:
    from planner.datasets import build
    from planner.plan import main_args
    try:
        return main_args(args, build(args.dataset_name, args.num_prompts, args.vocab_size, args))
    except ValueError as e:
        print(f"pdserve plan: {e}", file=sys.stderr)
        return 2
