"""OpenAI wire formats built from the router's deltas: request bodies → SamplingParams and prompts,
logprobs in the completions shape (`tokens` / `token_logprobs` / `top_logprobs` / `text_offset`)
and the chat shape (`content: [{token, logprob, bytes, top_logprobs}]`), and `usage`. Pure functions
over plain data; the HTTP handlers in `http_api.py` call them."""
from __future__ import annotations

import time

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

_PARAM_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                 "include_stop_str_in_output", "skip_special_tokens")


def sampling_params(body: dict, chat: bool) -> SamplingParams:
    """The engine's parameters for one body (ValueError names the offending field)."""
    kw = {k: body[k] for k in _PARAM_FIELDS if k in body and body[k] is not None}
    if chat and body.get("max_completion_tokens") is not None:
        kw["max_tokens"] = body["max_completion_tokens"]
    kw.setdefault("temperature", 1.0)
    lp = body.get("logprobs")
    if chat:
        top = body.get("top_logprobs")
        if lp:
            kw["logprobs"] = int(top or 0)
        elif top:
            raise ValueError("top_logprobs needs logprobs: true")
    elif lp is not None and lp is not False:
        if isinstance(lp, bool) or not isinstance(lp, int):
            raise ValueError(f"logprobs must be an integer in [0, 20], got {lp!r}")
        kw["logprobs"] = lp
        if body.get("echo"):
            kw["prompt_logprobs"] = lp
    if body.get("prompt_logprobs") is not None:  # vLLM's extension, on both endpoints
        kw["prompt_logprobs"] = body["prompt_logprobs"]
    n = body.get("n")
    if n is not None:
        kw["n"] = n  # SamplingParams refuses anything but an integer >= 1; the router bounds it
    best_of = body.get("best_of")
    if best_of is not None and best_of != (1 if n is None else n):
        raise ValueError(f"best_of must equal n ({1 if n is None else n}) when given; got {best_of!r} "
                         "(choosing the best of more samples is not supported)")
    return SamplingParams(**kw)


def completion_prompts(prompt) -> list:
    """`prompt` as a list of prompts, each a string or a list of token ids (OpenAI accepts all four forms)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in p)) for p in prompt):
        return list(prompt)
    raise ValueError("prompt must be a string, a list of token ids, or a non-empty list of either")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


class LogprobFormatter:
    """Token ids → the text pieces OpenAI clients expect next to each logprob."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)], skip_special_tokens=False)

    def completion(self, entries: list, text_offset: int = 0, prompt: tuple[list, list] | None = None) -> dict:
        """Completions `logprobs` for sampled-token entries, after (echo) the prompt's tokens and logprobs."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = text_offset
        rows = []
        if prompt is not None:
            ids, lps = prompt
            rows += [(t, (lp or {}).get("logprob"), (lp or {}).get("top_logprobs")) for t, lp in zip(ids, lps)]
        rows += [(e["token_id"], e["logprob"], e["top_logprobs"]) for e in entries]
        for token_id, logprob, top in rows:
            piece = self.token(token_id)
            out["tokens"].append(piece)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(None if top is None else
                                       {self.token(t): float(v) for t, v in sorted(top.items(), key=lambda kv: -kv[1])})
            out["text_offset"].append(offset)
            offset += len(piece)
        return out

    def chat(self, entries: list) -> dict:
        def item(token_id, logprob):
            piece = self.token(token_id)
            return {"token": piece, "logprob": float(logprob), "bytes": list(piece.encode("utf-8"))}

        content = []
        for e in entries:
            top = sorted(e["top_logprobs"].items(), key=lambda kv: -kv[1])
            content.append({**item(e["token_id"], e["logprob"]), "top_logprobs": [item(t, v) for t, v in top]})
        return {"content": content}


class Choice:
    """One choice of one prompt of a request (a batch has several prompts, `n` > 1 several choices
    per prompt; OpenAI numbers them prompt-major: `index` = prompt * n + choice) and what came back
    for it so far. The prompt's tokens count once in `usage`, on its choice 0."""

    def __init__(self, index: int, rid: str, prompt: str | None, ids: list[int], choice: int = 0):
        self.index, self.rid, self.prompt, self.ids = index, rid, prompt, ids
        self.choice = choice  # which of its prompt's n choices
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.prompt_logprobs: list | None = None
        self.reason: str | None = None
        self.error: str | None = None
        self.usage = (len(ids), 0, 0)
        self.sent_prompt = False  # streaming: the echoed prompt went out with the first chunk

    def add(self, d: RequestOutput) -> None:
        self.text.append(d.text)
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs
        if d.prompt_logprobs:
            self.prompt_logprobs = d.prompt_logprobs
        if d.finished:
            self.reason, self.error = d.finish_reason, d.error
            self.usage = (d.num_prompt_tokens, d.num_output_tokens, d.num_cached_tokens)


class ResponseBuilder:
    """Response bodies and stream chunks of one completions or chat request."""

    def __init__(self, rid: str, model: str, chat: bool, echo: bool, tokenizer, params: SamplingParams,
                 return_token_ids: bool = False):
        self.rid, self.model, self.chat, self.echo, self.params = rid, model, chat, echo, params
        self.tokenizer = tokenizer
        self.fmt = LogprobFormatter(tokenizer)
        self.return_token_ids = return_token_ids
        self.created = int(time.time())

    def _prompt_text(self, c: Choice) -> str:
        return c.prompt if c.prompt is not None else self.tokenizer.decode(c.ids, skip_special_tokens=False)

    def _logprobs(self, c: Choice, entries: list, with_prompt: bool, offset: int):
        if self.params.logprobs is None:
            return None
        if self.chat:
            return self.fmt.chat(entries)
        prompt = (c.ids, c.prompt_logprobs or [None] * len(c.ids)) if with_prompt else None
        return self.fmt.completion(entries, offset, prompt)

    def _choice(self, c: Choice, text: str, entries: list, reason, token_ids: list, first: bool) -> dict:
        echo = self.echo and first and not c.sent_prompt
        if echo:
            c.sent_prompt = True
        prompt_text = self._prompt_text(c) if echo else ""
        out: dict = {"index": c.index, "finish_reason": reason}
        if self.chat:
            out["logprobs"] = self._logprobs(c, entries, False, 0)
        else:  # text_offset counts from the start of the choice's whole text (echoed prompt included)
            offset = 0 if echo else (len(self._prompt_text(c)) if self.echo else 0) + sum(map(len, c.text))
            out["logprobs"] = self._logprobs(c, entries, echo, offset)
        if self.chat:
            key = "message" if token_ids is None else "delta"
            out[key] = {"role": "assistant", "content": text} if (first or key == "message") else {"content": text}
        else:
            out["text"] = prompt_text + text
        return out

    def response(self, choices: list[Choice]) -> dict:
        body_choices = []
        for c in choices:
            ch = self._choice(c, "".join(c.text), c.logprobs, c.reason, None, True)
            ch["token_ids"] = c.token_ids  # extension: exact token accounting for benchmarks
            if self.return_token_ids:
                ch["prompt_token_ids"] = c.ids
            if self.params.prompt_logprobs is not None:  # vLLM's extension; the engine's entries, None first
                ch["prompt_logprobs"] = c.prompt_logprobs
            body_choices.append(ch)
        body = {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": body_choices,
                "usage": self.total_usage(choices)}
        if len(choices) == 1:
            body["token_ids"] = choices[0].token_ids  # the single-prompt form clients of earlier versions read
        return body

    def chunk(self, c: Choice, d: RequestOutput) -> dict:
        first = not c.token_ids and not c.text
        ch = self._choice(c, d.text, d.logprobs, d.finish_reason, d.token_ids, first)
        ch["token_ids"] = d.token_ids
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [ch]}

    def total_usage(self, choices: list[Choice]) -> dict:
        """Prompt tokens once per prompt, completion tokens summed over every choice."""
        prompt = sum(c.usage[0] for c in choices if c.choice == 0)
        completion = sum(c.usage[1] for c in choices)
        return usage(prompt, completion, sum(c.usage[2] for c in choices if c.choice == 0))

    def usage_chunk(self, choices: list[Choice]) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.total_usage(choices)}

