"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`.

Runs the engine loop in this process (tests, scripts, benchmarks). Serving runs the same loop in
its own process behind `engine/engine_client.py`, so tokenization never stalls the GPU.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from engine.engine_core import EngineCore, RequestError
from engine.output_processor import RequestOutput, RequestState
from engine.request import RequestStatus
from engine.sampling_params import SamplingParams
from engine.tokenizer import load_tokenizer


def build_engine_config(model: str, *, dtype: str = "auto", device: str = "auto", load_format: str = "auto",
                        quantization: str | None = None, kv_cache_dtype: str = "auto",
                        seed: int = 0, max_model_len: int | None = None, page_size: int = 16,
                        num_pages: int | None = None, gpu_memory_utilization: float = 0.9,
                        cpu_kv_bytes: int = 1 << 30, enable_prefix_cache: bool = True,
                        max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, max_waiting: int = 4096,
                        enforce_eager: bool = False, overlap_schedule: bool = True, attention_backend: str = "auto",
                        tokenizer: str | None = None, ep_size: int = 1, num_redundant_experts: int = 0,
                        eplb_interval: int = 0, eplb_window: int = 32, eplb_min_gain: float = 0.05,
                        ep_backend: str = "auto", ep_dispatch_capacity: int = 8192, ep_overlap_min_tokens: int = 0,
                        ep_nnodes: int = 1, ep_node_rank: int = 0, ep_master: str | None = None,
                        load_progress: bool | None = None) -> EngineConfig:
    """Keyword form of EngineConfig shared by `LLM`, the CLI and the node servers."""
    return EngineConfig(
        model=model, dtype=dtype, device=device, load_format=load_format, quantization=quantization,
        kv_cache_dtype=kv_cache_dtype, seed=seed,
        max_model_len=max_model_len, attention_backend=attention_backend, enforce_eager=enforce_eager,
        overlap_schedule=overlap_schedule,
        tokenizer=tokenizer, load_progress=load_progress,
        cache=CacheConfig(page_size=page_size, num_pages=num_pages, gpu_memory_utilization=gpu_memory_utilization,
                          cpu_kv_bytes=cpu_kv_bytes, enable_prefix_cache=enable_prefix_cache),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  max_waiting=max_waiting),
        parallel=ParallelConfig(ep_size=ep_size, num_redundant_experts=num_redundant_experts,
                                eplb_interval=eplb_interval, eplb_window=eplb_window,
                                eplb_min_gain=eplb_min_gain, ep_backend=ep_backend,
                                ep_dispatch_capacity=ep_dispatch_capacity,
                                ep_overlap_min_tokens=ep_overlap_min_tokens,
                                ep_nnodes=ep_nnodes, ep_node_rank=ep_node_rank, ep_master=ep_master))


class LLM:
    def __init__(self, model: str, *, model_object: torch.nn.Module | None = None,
                 model_config: ModelConfig | None = None, **kwargs):
        self.config = build_engine_config(model, **kwargs)
        if self.config.parallel.ep_size > 1:
            raise ValueError("LLM runs one engine in this process; for ep_size > 1 use EngineClient "
                             "(one engine process per EP rank) or `pdserve generate --ep-size N`")
        self.core = EngineCore(self.config, model=model_object, model_config=model_config)
        path = self.config.tokenizer or self.core.model_config.path
        self.tokenizer = load_tokenizer(path)
        self._ids = itertools.count()

    @property
    def model_config(self) -> ModelConfig:
        return self.core.model_config

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None) -> list[RequestOutput]:
        """Run prompts (text, or token ids) to completion; results in input order."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        texts = list(prompts) if prompts is not None else [None] * len(prompt_token_ids)
        ids = ([self.tokenizer.encode(t) for t in texts] if prompts is not None
               else [list(map(int, p)) for p in prompt_token_ids])
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"{len(params)} sampling params for {len(ids)} prompts")
        for i, (p, sp) in enumerate(zip(ids, params)):  # refuse the whole call before any state exists
            try:
                self.core.validate_prompt(p, sp, request_id=f"prompt[{i}]")
            except RequestError as e:
                raise RequestError(str(e)) from None
        states: dict[str, RequestState] = {}
        order = []
        for text, p, sp in zip(texts, ids, params):
            rid = f"offline-{next(self._ids)}"
            states[rid] = RequestState(rid, text, p, sp, self.tokenizer)
            self.core.add_request(rid, p, sp, eos_token_ids=self._eos_ids())
            order.append(rid)
        results: dict[str, RequestOutput] = {}
        while len(results) < len(order):
            for out in self.core.step():
                state = states.get(out.request_id)
                if state is None or out.request_id in results:
                    continue  # e.g. the terminal echo of our own stop-string abort
                delta, stopped = state.process(out)
                if stopped:
                    self.core.abort(out.request_id, RequestStatus.FINISHED_STOPPED)
                if delta.finished:
                    results[out.request_id] = state.result(delta)
        return [results[r] for r in order]

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.core.model_config.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None and not self.core.model_config.eos_token_ids:
            ids.add(tok_eos)
        return tuple(sorted(ids))
