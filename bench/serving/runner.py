"""Drives a serving run against any OpenAI-compatible server (ours or a peer) or pdserve's gRPC
`Generate` API: arrivals at a rate (Poisson, or gamma with `burstiness`) or as fast as
`max_concurrency` allows, streamed requests, bounded in count and time, and the report.
`pdserve bench` is the CLI."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

import aiohttp
from tqdm import tqdm

from bench.serving import datasets
from bench.serving.metrics import RequestResult, format_report, parse_goodput, report


def _on_tokens(res: RequestResult, t0: float, last: float | None) -> float:
    """A streamed chunk with tokens arrived: the first sets TTFT, later ones add an ITL gap."""
    now = time.perf_counter()
    if last is None:
        res.ttft = now - t0
    else:
        res.itl.append(now - last)
    return now


async def send(session: aiohttp.ClientSession, url: str, model: str, req: datasets.SampleRequest,
               ignore_eos: bool, timeout_s: float) -> RequestResult:
    body = {"model": model, "prompt": req.prompt_ids, "max_tokens": req.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    res = RequestResult(success=False, prompt_len=req.prompt_len)
    t0 = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"].get("message"))[:200]
                    return res
                if msg.get("usage"):
                    res.output_len = msg["usage"].get("completion_tokens", res.output_len)
                choices = msg.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("token_ids")):
                    last = _on_tokens(res, t0, last)
                    chunks += 1
        res.latency = time.perf_counter() - t0
        res.output_len = res.output_len or chunks
        res.success = last is not None
        if not res.success:
            res.error = "no tokens received"
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
    return res


async def send_grpc(stub, model: str, req: datasets.SampleRequest, ignore_eos: bool,
                    timeout_s: float, metadata: tuple = ()) -> RequestResult:
    """One streamed request over the router's gRPC `Generate` API (token ids in, token ids out)."""
    import grpc

    from proto import pdserve_pb2 as pb

    msg = pb.GenerateRequest(model=model or "", sampling=pb.SamplingParams(
        max_tokens=req.output_len, temperature=0.0, ignore_eos=ignore_eos))
    msg.token_ids.ids.extend(req.prompt_ids)
    res = RequestResult(success=False, prompt_len=req.prompt_len)
    t0 = time.perf_counter()
    last = None
    try:
        async for delta in stub.Generate(msg, timeout=timeout_s, metadata=metadata or None):
            if delta.token_ids:
                last = _on_tokens(res, t0, last)
                res.output_len += len(delta.token_ids)
            if delta.finished:
                if delta.finish_reason == "error":
                    res.error = delta.error[:200] or "error"
                    return res
                break
        res.latency = time.perf_counter() - t0
        res.success = last is not None
        if not res.success:
            res.error = "no tokens received"
    except grpc.aio.AioRpcError as e:
        res.error = f"gRPC {e.code().name}: {e.details()}"[:200]
    return res


class _Sender:
    """`openai`: streamed /v1/completions over HTTP; `pdserve-grpc`: the router's gRPC Generate."""

    def __init__(self, backend: str, base_url: str, model: str, ignore_eos: bool, timeout_s: float,
                 api_key: str | None = None):
        self.backend, self.model, self.ignore_eos, self.timeout_s = backend, model, ignore_eos, timeout_s
        self.base_url = base_url
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def __aenter__(self):
        if self.backend == "pdserve-grpc":
            import grpc

            from proto import pdserve_pb2_grpc as pb_grpc

            self.channel = grpc.aio.insecure_channel(grpc_target(self.base_url))
            self.stub = pb_grpc.GenerateStub(self.channel)
        else:
            headers = {"Authorization": self.metadata[0][1]} if self.metadata else None
            self.session = aiohttp.ClientSession(headers=headers)
            self.url = self.base_url.rstrip("/") + "/completions"
        return self

    async def __aexit__(self, *exc):
        if self.backend == "pdserve-grpc":
            await self.channel.close()
        else:
            await self.session.close()

    async def send(self, req: datasets.SampleRequest) -> RequestResult:
        if self.backend == "pdserve-grpc":
            return await send_grpc(self.stub, self.model, req, self.ignore_eos, self.timeout_s, self.metadata)
        return await send(self.session, self.url, self.model, req, self.ignore_eos, self.timeout_s)


def grpc_target(base_url: str) -> str:
    """`grpc://host:port` (or plain `host:port`) → `host:port`."""
    target = base_url.removeprefix("grpc://").rstrip("/")
    if "://" in target or ":" not in target:
        raise ValueError(f"--backend pdserve-grpc needs --base-url grpc://HOST:PORT, got {base_url!r}")
    return target


def arrival_gaps(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps between request starts: 0 for rate=inf, else gamma(shape=burstiness, mean=1/rate)
    (burstiness 1 = Poisson)."""
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]


async def run(base_url: str, model: str, reqs: list, rate: float, burstiness: float, max_concurrency: int | None,
              ignore_eos: bool, seed: int, timeout_s: float, max_duration_s: float, progress: bool = True,
              backend: str = "openai", api_key: str | None = None):
    sem = asyncio.Semaphore(max_concurrency or len(reqs) or 1)
    results: list[RequestResult] = []
    gaps = arrival_gaps(len(reqs), rate, burstiness, seed)
    conv_locks: dict[int, asyncio.Lock] = {}
    async with _Sender(backend, base_url, model, ignore_eos, timeout_s, api_key) as sender:
        async def one(r):
            lock = conv_locks.setdefault(r.conversation, asyncio.Lock()) if r.conversation >= 0 else None
            async with sem:
                if lock:
                    async with lock:  # the turns of one conversation go in order
                        res = await sender.send(r)
                else:
                    res = await sender.send(r)
            results.append(res)
            bar.update(1)
        bar = tqdm(total=len(reqs), desc="requests", unit="req", disable=not progress, file=sys.stderr)
        t0 = time.perf_counter()
        tasks = []
        for r, gap in zip(reqs, gaps):
            if time.perf_counter() - t0 > max_duration_s:
                break
            tasks.append(asyncio.create_task(one(r)))
            await asyncio.sleep(gap)
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=max(1.0, max_duration_s + timeout_s))
        finally:
            bar.close()
        duration = time.perf_counter() - t0
    return results, duration


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["openai", "pdserve-grpc"], default="openai",
                   help="openai: streamed /v1/completions of any OpenAI-compatible server; pdserve-grpc: the "
                        "router's gRPC Generate API (--base-url grpc://HOST:PORT)")
    p.add_argument("--base-url", default=None,
                   help="server to load (default: http://127.0.0.1:8000/v1, or grpc://127.0.0.1:50051 for gRPC)")
    p.add_argument("--model", default=None, help="model name (default: the server's first /v1/models entry)")
    p.add_argument("--dataset-name", choices=["random", "sharegpt", "prefix", "multiturn"], default="random")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=32000, help="prompt token ids are drawn below this")
    p.add_argument("--goodput", nargs="*", default=None, help="SLOs, e.g. ttft:1000 tpot:50 e2el:20000 (ms)")
    p.add_argument("--warmup-requests", type=int, default=2)
    p.add_argument("--no-ignore-eos", action="store_true", help="let EOS end outputs early")
    p.add_argument("--seed", type=int, default=0,
                   help="prompts and arrivals; give each run against one server its own (a server's prefix cache "
                        "keeps an earlier run's prompts, so a repeated seed measures cached prefills)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--max-duration", type=float, default=3600.0, help="stop issuing requests after this many s")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-dir", default=".")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--plot", action="store_true", help="with --save-result: also a PNG of latency CDFs (matplotlib)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar of requests done")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (gRPC: metadata) (default: env OPENAI_API_KEY)")


_WARMUP_SEED = 1_000_003  # warm-up prompts come from seed + this


def main_args(args) -> int:
    slos = parse_goodput(args.goodput)
    if args.base_url is None:
        args.base_url = "grpc://127.0.0.1:50051" if args.backend == "pdserve-grpc" else "http://127.0.0.1:8000/v1"
    if args.backend == "pdserve-grpc":
        grpc_target(args.base_url)  # validates
        model = args.model or ""  # empty: the router's served model
    else:
        model = args.model or _first_model(args.base_url, args.api_key)
    reqs = datasets.build(args.dataset_name, args.num_prompts, args.vocab_size, args)
    ignore_eos = not args.no_ignore_eos
    if args.warmup_requests:  # prompts of their own: a warm-up must not leave the measured prompts cached
        warm_args = argparse.Namespace(**{**vars(args), "seed": args.seed + _WARMUP_SEED})
        warm = datasets.build(args.dataset_name, args.warmup_requests, args.vocab_size, warm_args)
        asyncio.run(run(args.base_url, model, warm, float("inf"), 1.0, None, ignore_eos,
                        args.seed, args.request_timeout, args.max_duration, progress=False, backend=args.backend,
                        api_key=args.api_key))
    results, duration = asyncio.run(run(args.base_url, model, reqs, args.request_rate, args.burstiness,
                                        args.max_concurrency, ignore_eos, args.seed, args.request_timeout,
                                        args.max_duration, progress=not args.disable_tqdm, backend=args.backend,
                                        api_key=args.api_key))
    rep = report(results, duration, slos)
    ok = [r for r in results if r.success]
    rep["per_request"] = {"ttfts": [r.ttft for r in ok], "tpots": [r.tpot for r in ok], "e2els": [r.latency for r in ok],
                          "output_lens": [r.output_len for r in ok]}
    rep.update(model=model, dataset=args.dataset_name, request_rate=args.request_rate, burstiness=args.burstiness,
               max_concurrency=args.max_concurrency, num_prompts=args.num_prompts, base_url=args.base_url,
               backend=args.backend, seed=args.seed, warmup_requests=args.warmup_requests,
               random_input_len=args.random_input_len, random_output_len=args.random_output_len,
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(format_report(rep))
    if args.save_result:
        os.makedirs(args.result_dir, exist_ok=True)
        name = args.result_filename or f"bench-{args.dataset_name}-{args.request_rate}qps-{int(time.time())}.json"
        with open(os.path.join(args.result_dir, name), "w") as f:
            json.dump(rep, f, indent=1)
        if args.plot:
            from bench.serving.plots import latency_cdfs
            print(latency_cdfs(rep, os.path.join(args.result_dir, name.removesuffix(".json") + "_cdf.png")))
    return 0 if rep["completed"] else 1


def _first_model(base_url: str, api_key: str | None = None) -> str:
    import urllib.request

    req = urllib.request.Request(base_url.rstrip("/") + "/models",
                                 headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["data"][0]["id"]


def main(argv: list[str] | None = None) -> int:
    """`pdserve bench` (the console runs `python -m bench.serving` with its flags)."""
    p = argparse.ArgumentParser(prog="pdserve bench",
                                description="serving benchmark against an OpenAI-compatible server or the router's "
                                            "gRPC API (vllm bench serve flags)")
    add_args(p)
    try:
        return main_args(p.parse_args(argv))
    except ValueError as e:
        print(f"pdserve bench: {e}", file=sys.stderr)
        return 2
