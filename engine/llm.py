"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`.

Runs the engine loop in this process (tests, scripts, benchmarks). Serving runs the same loop in
its own process behind `engine/engine_client.py`, so tokenization never stalls the GPU.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch

from engine.config import ModelConfig
from engine.engine_args import build_engine_config
from engine.engine_core import EngineCore, RequestError
from engine.output_processor import RequestState
from engine.outputs import RequestOutput
from engine.request import RequestStatus
from engine.sampling_params import SamplingParams
from engine.tokenizer import load_tokenizer


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
        """Run prompts (text, or token ids) to completion; results in input order. A prompt whose
        params ask for `n` > 1 choices gives n results in a row (its prompt computed once), choice
        `i` in the one whose `index` is i, drawn with seed `seed + i` when a seed is set."""
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
        states: dict[tuple[str, int], RequestState] = {}
        order = []
        for text, p, sp in zip(texts, ids, params):
            rid = f"offline-{next(self._ids)}"
            for i in range(sp.n):
                states[rid, i] = RequestState(rid, text, p, sp, self.tokenizer, index=i)
                order.append((rid, i))
            self.core.add_request(rid, p, sp, eos_token_ids=self._eos_ids())
        results: dict[tuple[str, int], RequestOutput] = {}
        while len(results) < len(order):
            for out in self.core.step():
                key = (out.request_id, out.index)
                state = states.get(key)
                if state is None or key in results:
                    continue  # e.g. the terminal echo of our own stop-string abort
                delta, stopped = state.process(out)
                if stopped:
                    self.core.abort(out.request_id, RequestStatus.FINISHED_STOPPED, index=out.index)
                if delta.finished:
                    results[key] = state.result(delta)
        return [results[k] for k in order]

    def _eos_ids(self) -> tuple[int, ...]:
        ids = set(self.core.model_config.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None and not self.core.model_config.eos_token_ids:
            ids.add(tok_eos)
        return tuple(sorted(ids))
