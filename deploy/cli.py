"""The `pdserve` command. Each subcommand parses its flags into the owning component's typed
config and hands over; no serving logic lives here.

    pdserve generate --model tiny-llama --load-format dummy --prompt "Hello" --max-tokens 8 --json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys


def _add_engine_args(p: argparse.ArgumentParser, default_model: str | None = None) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", required=default_model is None, default=default_model,
                   help="preset name (see `pdserve presets`) or HF checkpoint directory")
    g.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="auto: the checkpoint's safetensors; dummy: seeded random weights (any preset)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: the checkpoint's dtype on CUDA, float32 on CPU")
    g.add_argument("--quantization", choices=["fp8"], default=None,
                   help="fp8: quantize a full-precision checkpoint (or dummy weights) to block-scaled FP8 at load; "
                        "FP8 checkpoints load as FP8 without it")
    g.add_argument("--kv-cache-dtype", choices=["auto", "fp8_e4m3"], default="auto",
                   help="auto: the model's dtype; fp8_e4m3 halves KV memory (a P/D pair must agree)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's, else DeepSeek's)")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    g.add_argument("--num-pages", type=int, default=None, help="KV pool size in pages (default: from memory)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory this process may use (weights + activations + KV)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="max sequences per step")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget per step (chunked prefill)")
    g.add_argument("--no-prefix-cache", action="store_true", help="disable the radix prefix cache")
    g.add_argument("--enforce-eager", action="store_true", help="never capture CUDA graphs")
    g.add_argument("--no-overlap-schedule", dest="overlap_schedule", action="store_false",
                   help="wait for each step's tokens before scheduling the next (no CPU/GPU overlap)")
    g.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (also seeds dummy weights)")
    g.add_argument("--no-progress", action="store_true",
                   help="no weight-loading progress bar (it shows only when stderr is a terminal)")
    e = p.add_argument_group("expert parallelism (MoE models)")
    e.add_argument("--ep-size", type=int, default=1,
                   help="EP ranks of this node: one engine process per GPU (gloo processes on CPU); attention is "
                        "data-parallel over them, MoE experts are split across them")
    e.add_argument("--num-redundant-experts", type=int, default=0,
                   help="extra physical expert slots for EPLB to replicate hot experts into")
    e.add_argument("--eplb-interval", type=int, default=0, help="rebalance experts every N engine steps (0: never)")
    e.add_argument("--eplb-window", type=int, default=32, help="steps of expert load the rebalancer looks at")
    e.add_argument("--eplb-min-gain", type=float, default=0.05,
                   help="move a layer's experts only if its max/mean GPU load drops by this fraction")
    e.add_argument("--ep-nnodes", type=int, default=1,
                   help="hosts one EP group spans (each runs --ep-size / N ranks and serves as its own node)")
    e.add_argument("--ep-node-rank", type=int, default=0, help="this host's index in its EP group (0 = leader)")
    e.add_argument("--ep-master", default=None,
                   help="HOST:PORT where a multi-host EP group's ranks meet (the leader's address)")
    e.add_argument("--ep-backend", choices=["auto", "fixed", "torch", "deepep"], default="auto",
                   help="token all-to-all: DeepEP Buffer API (deep_ep or nixl_ep), fixed-capacity torch.distributed "
                        "(graph-safe) or count-based torch.distributed; auto: DeepEP on CUDA when importable, else fixed")
    e.add_argument("--ep-dispatch-capacity", type=int, default=8192,
                   help="fixed-capacity all-to-all: most tokens per rank in one dispatch (larger steps are split)")
    e.add_argument("--ep-overlap-min-tokens", type=int, default=0,
                   help="steps of at least this many tokens (busiest rank) run as two overlapped micro-batches (0: never)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, load_format=args.load_format, quantization=args.quantization,
                kv_cache_dtype=args.kv_cache_dtype,
                seed=args.seed if args.seed is not None else 0, max_model_len=args.max_model_len,
                page_size=args.page_size, num_pages=args.num_pages,
                gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_cache=not args.no_prefix_cache,
                enforce_eager=args.enforce_eager, overlap_schedule=args.overlap_schedule,
                attention_backend=args.attention_backend, tokenizer=args.tokenizer,
                ep_size=args.ep_size, num_redundant_experts=args.num_redundant_experts,
                eplb_interval=args.eplb_interval, eplb_window=args.eplb_window,
                eplb_min_gain=args.eplb_min_gain, ep_backend=args.ep_backend,
                ep_dispatch_capacity=args.ep_dispatch_capacity, ep_overlap_min_tokens=args.ep_overlap_min_tokens,
                ep_nnodes=args.ep_nnodes, ep_node_rank=args.ep_node_rank, ep_master=args.ep_master,
                load_progress=False if args.no_progress else None)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="run prompts through one engine and print the outputs")
    _add_engine_args(p)
    src = p.add_argument_group("prompts (repeatable; one output per prompt)")
    src.add_argument("--prompt", action="append", default=[], help="prompt text")
    src.add_argument("--prompt-ids", action="append", default=[], type=_parse_ids, help="prompt token ids: 1,2,3")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=16)
    s.add_argument("--min-tokens", type=int, default=0)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="0 or -1 = disabled")
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--stop-token-ids", type=_parse_ids, default=[], help="comma-separated stop token ids")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--logprobs", type=int, default=None, help="top-n logprobs per output token")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--in-process", action="store_true",
                   help="run the engine loop in this process (default: a separate engine process)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM, build_engine_config
    from engine.sampling_params import SamplingParams

    prompts = list(args.prompt) + list(args.prompt_ids)
    if not prompts:
        print("pdserve generate: give at least one --prompt or --prompt-ids", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, seed=args.seed,
            stop=args.stop or None, stop_token_ids=args.stop_token_ids or None, ignore_eos=args.ignore_eos,
            logprobs=args.logprobs)
        kwargs = engine_kwargs(args)
        if args.in_process:
            results = _generate_in_process(LLM(args.model, **kwargs), prompts, params)
        else:
            from engine.engine_client import EngineClient

            client = EngineClient(build_engine_config(args.model, **kwargs))
            try:
                results = client.generate(prompts, params)
            finally:
                client.shutdown()
    except (ValueError, RuntimeError, OSError) as e:
        print(f"pdserve generate: {e}", file=sys.stderr)
        return 2
    for r in results:
        if args.json:
            obj = {"prompt": r.prompt, "prompt_token_ids": r.prompt_token_ids, "token_ids": r.token_ids,
                   "text": r.text, "finish_reason": r.finish_reason, "stop_reason": r.stop_reason}
            if r.error:
                obj["error"] = r.error
            if args.logprobs is not None:
                obj["logprobs"] = _jsonable(r.logprobs)
            print(json.dumps(obj, ensure_ascii=False))
        else:
            status = f"[{r.finish_reason}{': ' + r.error if r.error else ''}]"
            print(f"{r.prompt if r.prompt is not None else r.prompt_token_ids!r} -> {r.text!r} {status}")
    return 1 if any(r.finish_reason == "error" for r in results) else 0


def _generate_in_process(llm, prompts: list, params) -> list:
    """Text prompts and id prompts batch separately; results come back in the order given."""
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    ids = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    out: dict[int, object] = {}
    if texts:
        out.update(zip(texts, llm.generate([prompts[i] for i in texts], params)))
    if ids:
        out.update(zip(ids, llm.generate(prompt_token_ids=[prompts[i] for i in ids], sampling_params=params)))
    return [out[i] for i in range(len(prompts))]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "__dict__"):
        return _jsonable(vars(obj))
    return obj


def _presets_parser(sub) -> None:
    p = sub.add_parser("presets", help="list the named model presets")
    p.set_defaults(func=lambda args: _print_presets())


def _print_presets() -> int:
    from engine.presets import list_presets

    for name in list_presets():
        print(name)
    return 0


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags of `args` as command-line arguments (forwarded by `pdserve up` to nodes)."""
    out = ["--model", args.model, "--load-format", args.load_format, "--dtype", args.dtype, "--device", args.device,
           "--page-size", str(args.page_size), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
           "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--attention-backend", args.attention_backend, "--ep-size", str(args.ep_size),
           "--num-redundant-experts", str(args.num_redundant_experts), "--eplb-interval", str(args.eplb_interval),
           "--eplb-window", str(args.eplb_window), "--eplb-min-gain", str(args.eplb_min_gain),
           "--ep-backend", args.ep_backend, "--ep-dispatch-capacity", str(args.ep_dispatch_capacity),
           "--ep-overlap-min-tokens", str(args.ep_overlap_min_tokens), "--kv-cache-dtype", args.kv_cache_dtype]
    for flag, value in (("--tokenizer", args.tokenizer), ("--max-model-len", args.max_model_len),
                        ("--quantization", args.quantization),
                        ("--num-pages", args.num_pages), ("--seed", args.seed)):
        if value is not None:
            out += [flag, str(value)]
    if args.no_prefix_cache:
        out.append("--no-prefix-cache")
    if args.enforce_eager:
        out.append("--enforce-eager")
    if not args.overlap_schedule:
        out.append("--no-overlap-schedule")
    if args.no_progress:
        out.append("--no-progress")
    return out


def _add_tls_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("TLS")
    t.add_argument("--tls-cert", default=None, help="this process's certificate (PEM): TLS on its gRPC/HTTP endpoints")
    t.add_argument("--tls-key", default=None, help="the private key of --tls-cert (PEM)")
    t.add_argument("--tls-ca", default=None, help="the cluster CA (PEM): nodes accept only clients with a certificate "
                                                  "it signed, and the router verifies nodes against it (mutual TLS)")


def _tls(args):
    from node.grpc_server import TLSFiles

    return TLSFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca)


def _add_front_args(p: argparse.ArgumentParser) -> None:
    """Flags of the router's public API (also taken by `up`, which forwards them)."""
    p.add_argument("--chat-template", default=None,
                   help="Jinja chat template file (default: the tokenizer's own, else DeepSeek-V3's format)")
    p.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (gRPC: metadata authorization) on every public route "
                        "but /health and /metrics (default: env PDSERVE_API_KEY; unset: no key)")


def _node_parser(sub, role: str) -> None:
    p = sub.add_parser(role, help=f"run one {role} node (gRPC) over an engine process")
    _add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    p.add_argument("--kv-transfer-timeout", type=float, default=30.0, help="seconds any KV transfer may take")
    o = p.add_argument_group("operations")
    o.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics and /health over HTTP on this port (0: any free port)")
    o.add_argument("--redis-url", default=None,
                   help="register in this Redis (redis://host:port/db) with expiring heartbeats, so routers "
                        "find this node without --prefill/--decode lists")
    o.add_argument("--node-name", default=None, help="this node's name in metrics and the registry "
                                                     "(default: role-<random>)")
    o.add_argument("--advertise-host", default=None,
                   help="host routers should dial (default: --host, or this machine's name when --host is 0.0.0.0)")
    o.add_argument("--heartbeat-ttl", type=float, default=3.0,
                   help="seconds a Redis registration lives without a heartbeat (heartbeats every TTL/3)")
    o.add_argument("--slo", default=None, help="SLO targets as extra histogram buckets: 'ttft:1000 tpot:50' (ms)")
    _add_tls_args(p)
    p.set_defaults(func=lambda args: _run_node(role, args))


def _run_node(role: str, args) -> int:
    from node.core import NodeOptions
    from engine.llm import build_engine_config

    config = build_engine_config(args.model, **engine_kwargs(args))
    config.kv_transfer_timeout_s = args.kv_transfer_timeout
    options = NodeOptions(metrics_port=args.metrics_port, redis_url=args.redis_url, node_name=args.node_name,
                          advertise_host=args.advertise_host, heartbeat_ttl_s=args.heartbeat_ttl, slo=args.slo,
                          tls=_tls(args))
    if role == "prefill":
        from prefill_node.server import main as run
    else:
        from decode_node.server import main as run
    run(config, args.model, args.host, args.port, options)
    return 0


def _router_parser(sub) -> None:
    p = sub.add_parser("router", help="run the router: gRPC Generate + OpenAI HTTP over prefill/decode nodes")
    p.add_argument("--model", required=True, help="the served model's name (preset or checkpoint directory)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's, else DeepSeek's)")
    p.add_argument("--prefill", action="append", default=[], help="prefill node address host:port (repeatable)")
    p.add_argument("--decode", action="append", default=[], help="decode node address host:port (repeatable)")
    p.add_argument("--redis-url", default=None,
                   help="discover nodes and their load from Redis (nodes started with the same --redis-url); "
                        "several routers can share one cluster this way")
    p.add_argument("--slo", default=None, help="SLO targets as extra histogram buckets: 'ttft:1000 tpot:50' (ms)")
    p.add_argument("--node-name", default=None, help="this router's name in metrics (default: router-<random>)")
    p.add_argument("--collocated", action="store_true",
                   help="no prefill nodes: every request runs whole on one decode node (the collocated baseline)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--policy", choices=["round_robin", "least_load", "prefix_aware"], default="least_load",
                   help="how the prefill node is chosen (decode nodes: least load)")
    _add_front_args(p)
    _add_tls_args(p)
    p.set_defaults(func=_run_router)


def _run_router(args) -> int:
    import os

    from router.server import main as run

    if not args.redis_url and not ((args.prefill or args.collocated) and args.decode):
        print("pdserve router: give --prefill and --decode node addresses (or --collocated with --decode), "
              "or --redis-url", file=sys.stderr)
        return 2
    if args.collocated and args.prefill:
        print("pdserve router: --collocated takes no --prefill nodes", file=sys.stderr)
        return 2
    tokenizer = args.tokenizer or (args.model if os.path.isdir(args.model) else None)
    run(args.prefill, args.decode, tokenizer, args.model, args.host, args.grpc_port, args.http_port, args.policy,
        redis_url=args.redis_url, slo=args.slo, name=args.node_name, collocated=args.collocated,
        chat_template_file=args.chat_template, api_key=args.api_key, tls=_tls(args))
    return 0


def _up_parser(sub) -> None:
    p = sub.add_parser("up", help="start router + prefill + decode processes on this machine")
    _add_engine_args(p, default_model="tiny-llama")
    p.set_defaults(load_format="dummy")
    p.add_argument("--num-prefill", type=int, default=1,
                   help="0: collocated serving (decode nodes run prompts themselves; the baseline to compare)")
    p.add_argument("--num-decode", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--policy", choices=["round_robin", "least_load", "prefix_aware"], default="least_load")
    p.add_argument("--kv-transfer-timeout", type=float, default=30.0, help="seconds any KV transfer may take")
    p.add_argument("--redis-url", default=None, help="nodes register in this Redis and the router discovers them there")
    p.add_argument("--slo", default=None, help="SLO targets as extra histogram buckets: 'ttft:1000 tpot:50' (ms)")
    p.add_argument("--prometheus-targets", default=None,
                   help="write the processes' /metrics endpoints here (Prometheus file_sd JSON; "
                        "see deploy/prometheus/prometheus.yml)")
    _add_front_args(p)
    _add_tls_args(p)
    p.set_defaults(func=_run_up)


def _run_up(args) -> int:
    from deploy.launcher import up

    node_argv = ["--kv-transfer-timeout", str(args.kv_transfer_timeout)]
    if args.slo:
        node_argv += ["--slo", args.slo]
    tls = _tls(args)
    if tls:
        node_argv += tls.argv()
    router_argv = tls.argv() if tls else []
    if args.chat_template:
        router_argv += ["--chat-template", args.chat_template]
    env = {"PDSERVE_API_KEY": args.api_key} if args.api_key else None  # not on command lines (ps shows them)
    return up(engine_argv(args) + node_argv, args.model, args.num_prefill, args.num_decode, args.host,
              args.grpc_port, args.http_port, args.policy, redis_url=args.redis_url, slo=args.slo,
              prometheus_targets=args.prometheus_targets, router_argv=router_argv, router_env=env)


def _ray_parser(sub) -> None:
    p = sub.add_parser("ray", help="run the cluster on Ray: pdserve ray up CONFIG [--address ADDR]", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_run_ray)


def _run_ray(args) -> int:
    from deploy.ray.launcher import main as ray_main

    return ray_main(args.rest)


def _bench_parser(sub) -> None:
    sub.add_parser("bench", add_help=False,
                   help="serving benchmark against an OpenAI-compatible server (vllm bench serve flags; "
                        "pdserve bench --help)")


def _run_bench(argv: list[str]) -> int:
    """The serving benchmark lives in bench/ (it measures the product and is never imported by
    it): run it as its own process with the flags as given."""
    return subprocess.call([sys.executable, "-m", "bench.serving", *argv])


def _planner_parsers(sub) -> None:
    from planner.cli import add_plan_args, add_profile_args

    add_profile_args(sub.add_parser("profile", help="measure a model's step costs on this device (for `pdserve plan`)"))
    p = sub.add_parser("plan", help="simulate cluster shapes from a profile; the best goodput per GPU under an SLO")
    add_plan_args(p)
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    from planner.cli import run_plan

    return run_plan(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve", description="disaggregated prefill/decode LLM serving")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _presets_parser(sub)
    _node_parser(sub, "prefill")
    _node_parser(sub, "decode")
    _router_parser(sub)
    _up_parser(sub)
    _ray_parser(sub)
    _bench_parser(sub)
    _planner_parsers(sub)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _run_bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
