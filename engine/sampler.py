"""Turns a step's logits into next tokens, one row per sampling request.

Order of processing (vLLM's): penalties (repetition over prompt + output, presence/frequency over
output), min_tokens (EOS and stop ids masked until reached), temperature, top-k, top-p, min-p,
then a draw. Draws use the exponential race (`argmax(p / E)` with `E ~ Exp(1)` per token id),
which samples exactly from `p`; a seeded request's noise comes from a generator seeded with
(seed, number of tokens generated so far) alone, so the same seed gives the same tokens whatever
else is in the batch. All-greedy batches without penalties are a single argmax. Logprobs are the
raw model's (log_softmax of the unprocessed logits), as vLLM returns by default.

Decode steps replayed from CUDA graphs sample inside the graph (`draw` over device settings) when
`graph_sampling(requests)` allows it: greedy rows, and unseeded temperature / top-k / top-p / min-p
rows; penalties, min_tokens masks, structured output, logprobs and seeds take `Sampler` on the
graph's logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.structured_output import apply_token_bitmask, step_bitmask


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict | None] | None  # per row, None where not asked for; None if no row asked


def graph_sampling(requests: list) -> str | None:
    """How a decode graph may sample these rows: "greedy" (argmax), "sample" (`draw` in the graph),
    or None: the host-driven `Sampler` must (it reads token history, grammars, seeds or logprobs)."""
    mode = "greedy"
    for r in requests:
        p = r.sampling_params
        if (p.has_penalties or p.logprobs is not None or r.grammar is not None
                or len(r.output_token_ids) < p.min_tokens):
            return None
        if not p.is_greedy:
            if p.seed is not None:
                return None
            mode = "sample"
    return mode


def _seed_for(seed: int, step: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class Sampled:
    """One step's draws, still on the device: token ids and, where asked for, logprob tensors."""
    token_ids: torch.Tensor  # [rows] int64
    params: list
    logprobs: tuple | None = None  # (chosen, ranks, top_vals, top_ids) tensors

    def tensors(self) -> list[torch.Tensor]:
        return [self.token_ids, *(self.logprobs or ())]

    def to_host(self, host: list | None = None) -> SamplerOutput:
        """Lists from the device tensors (or from `host`, copies of `tensors()` already made)."""
        host = host if host is not None else self.tensors()
        token_ids = host[0].tolist()
        if self.logprobs is None:
            return SamplerOutput(token_ids, None)
        chosen, ranks, top_vals, top_ids = (t.tolist() for t in host[1:])
        out = []
        for row, p in enumerate(self.params):
            if p.logprobs is None:
                out.append(None)
                continue
            top = {int(t): float(v) for t, v in zip(top_ids[row][: p.logprobs], top_vals[row][: p.logprobs])}
            out.append({"token_id": token_ids[row], "logprob": float(chosen[row]), "rank": int(ranks[row]),
                        "top_logprobs": top})
        return SamplerOutput(token_ids, out)


class Sampler:
    def sample(self, logits: torch.Tensor, requests: list) -> SamplerOutput:
        if not requests:
            return SamplerOutput([], None)
        return self.sample_on_device(logits, requests).to_host()

    def sample_on_device(self, logits: torch.Tensor, requests: list) -> Sampled:
        params = [r.sampling_params for r in requests]
        raw = logits.float()
        x = raw
        if any(p.has_penalties for p in params) or any(
                len(r.output_token_ids) < r.sampling_params.min_tokens for r in requests):
            x = raw.clone()
            self._apply_penalties(x, requests)
            self._mask_until_min_tokens(x, requests)
        grammar = step_bitmask(requests)
        if grammar is not None:  # structured output: what the constraint forbids cannot be drawn
            x = apply_token_bitmask(x if x is not raw else raw.clone(), grammar.to(x.device, non_blocking=True))
        if all(p.is_greedy for p in params):
            ids = x.argmax(dim=-1)
        else:
            ids = self._draw(x, requests)
        logprobs = None
        if any(p.logprobs is not None for p in params):
            logprobs = self._logprobs(raw, ids, params)
        return Sampled(ids, params, logprobs)

    # ---------------------------------------------------------------- processing
    @staticmethod
    def _apply_penalties(x: torch.Tensor, requests: list) -> None:
        vocab = x.shape[1]
        for row, r in enumerate(requests):
            p = r.sampling_params
            if not p.has_penalties:
                continue
            out = torch.tensor([t for t in r.output_token_ids if t < vocab], dtype=torch.long, device=x.device)
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted({t for t in r.prompt_token_ids + r.output_token_ids if t < vocab}),
                                    dtype=torch.long, device=x.device)
                vals = x[row, seen]
                x[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if out.numel() and (p.presence_penalty or p.frequency_penalty):
                counts = torch.bincount(out, minlength=vocab).to(x.dtype)
                x[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)

    @staticmethod
    def _mask_until_min_tokens(x: torch.Tensor, requests: list) -> None:
        vocab = x.shape[1]
        for row, r in enumerate(requests):
            p = r.sampling_params
            if len(r.output_token_ids) >= p.min_tokens:
                continue
            banned = [t for t in set(r.eos_token_ids) | set(p.stop_token_ids) if 0 <= t < vocab]
            if banned:
                x[row, banned] = float("-inf")

    def _draw(self, x: torch.Tensor, requests: list) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        dev = x.device
        greedy = torch.tensor([p.is_greedy for p in params], device=dev)
        temps = torch.tensor([1.0 if p.is_greedy else p.temperature for p in params], device=dev)
        truncation = None
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
            vocab = x.shape[1]
            truncation = (torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev),
                          torch.tensor([p.top_p for p in params], device=dev),
                          torch.tensor([p.min_p for p in params], device=dev))
        noise = torch.empty_like(x).exponential_()
        for row, r in enumerate(requests):
            p = r.sampling_params
            if p.seed is not None and not p.is_greedy:
                gen = torch.Generator(device=dev)
                gen.manual_seed(_seed_for(p.seed, len(r.output_token_ids)))
                noise[row] = torch.empty(x.shape[1], device=dev).exponential_(generator=gen)
        return draw(x, greedy, temps, truncation, noise)

    # ---------------------------------------------------------------- logprobs
    @staticmethod
    def _logprobs(raw: torch.Tensor, ids: torch.Tensor, params: list) -> tuple:
        lp = raw.log_softmax(dim=-1)
        chosen = lp.gather(1, ids[:, None])[:, 0]
        ranks = (lp > chosen[:, None]).sum(dim=-1) + 1
        n_top = max(p.logprobs or 0 for p in params)
        top_vals, top_ids = lp.topk(max(n_top, 1), dim=-1)
        return chosen, ranks, top_vals, top_ids


def draw(x: torch.Tensor, greedy: torch.Tensor, temps: torch.Tensor, truncation: tuple | None,
         noise: torch.Tensor) -> torch.Tensor:
    """Next tokens from processed logits `x` `[rows, vocab]` with per-row device settings: greedy rows
    take the argmax; the others draw from softmax(x / temperature), truncated by (top_k, top_p, min_p)
    when given, by the exponential race against `noise` (`E ~ Exp(1)` per token). Fixed shapes, no host
    reads: the CUDA-graph decode step runs the same function (engine/cuda_graph.py)."""
    scaled = x / temps[:, None]
    if truncation is not None:
        scaled = truncate(scaled, *truncation)
    drawn = (scaled.softmax(dim=-1) / noise).argmax(dim=-1)
    return torch.where(greedy, x.argmax(dim=-1), drawn)


def truncate(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p / min-p set to -inf (`top_k` = vocab, `top_p` = 1 and
    `min_p` = 0 keep everything)."""
    vocab = scaled.shape[1]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    rank = torch.arange(vocab, device=scaled.device)[None, :]
    drop = rank >= top_k[:, None]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)  # rounding must not cut a top_p = 1 row
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)
