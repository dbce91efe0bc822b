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

from deploy.node_args import add_node_args, add_tls_args
from engine.engine_args import add_engine_args, build_engine_config, engine_argv, engine_kwargs


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="run prompts through one engine and print the outputs")
    add_engine_args(p)
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
    s.add_argument("--n", type=int, default=1, help="choices per prompt, the prompt computed once (choice i: seed + i)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--in-process", action="store_true",
                   help="run the engine loop in this process (default: a separate engine process)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM
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
            logprobs=args.logprobs, n=args.n)
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
            if params.n > 1:
                obj["index"] = r.index
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
    """Text prompts and id prompts batch separately; results come back in the order given (n per prompt)."""
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    ids = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    n = params.n
    out: dict[int, list] = {}

    def place(order: list[int], results: list) -> None:
        out.update((i, results[k * n:(k + 1) * n]) for k, i in enumerate(order))

    if texts:
        place(texts, llm.generate([prompts[i] for i in texts], params))
    if ids:
        place(ids, llm.generate(prompt_token_ids=[prompts[i] for i in ids], sampling_params=params))
    return [r for i in range(len(prompts)) for r in out[i]]


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
    add_node_args(p)
    p.set_defaults(func=lambda args: _run_node(role, args))


def _model_cannot_serve(args) -> str | None:
    """Why the engine flags cannot work with this model (read from its config.json alone), before any
    process starts: a --max-model-len beyond the positions the model can encode, an unknown model."""
    from engine.config import ConfigError
    from engine.presets import check_model

    try:
        check_model(args.model, args.max_model_len)
    except ConfigError as e:
        return str(e)
    return None


def _run_node(role: str, args) -> int:
    from node.core import NodeOptions

    if (why := _model_cannot_serve(args)) is not None:
        print(f"pdserve {role}: {why}", file=sys.stderr)
        return 2
    config = build_engine_config(args.model, **engine_kwargs(args))
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
    add_tls_args(p)
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
    add_engine_args(p, default_model="tiny-llama", node=True)
    p.set_defaults(load_format="dummy")
    p.add_argument("--num-prefill", type=int, default=1,
                   help="0: collocated serving (decode nodes run prompts themselves; the baseline to compare)")
    p.add_argument("--num-decode", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--policy", choices=["round_robin", "least_load", "prefix_aware"], default="least_load")
    p.add_argument("--redis-url", default=None, help="nodes register in this Redis and the router discovers them there")
    p.add_argument("--slo", default=None, help="SLO targets as extra histogram buckets: 'ttft:1000 tpot:50' (ms)")
    p.add_argument("--prometheus-targets", default=None,
                   help="write the processes' /metrics endpoints here (Prometheus file_sd JSON; "
                        "see deploy/prometheus/prometheus.yml)")
    _add_front_args(p)
    add_tls_args(p)
    p.set_defaults(func=_run_up)


def _run_up(args) -> int:
    from deploy.launcher import up

    if (why := _model_cannot_serve(args)) is not None:
        print(f"pdserve up: {why}", file=sys.stderr)
        return 2
    node_argv = ["--slo", args.slo] if args.slo else []
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
