"""Chat messages → prompt token ids, the way the checkpoint's own chat template says.

The template comes from `--chat-template FILE`, else the tokenizer directory's `chat_template.jinja`,
else `chat_template` in its `tokenizer_config.json` (a string, or a list of named templates of which
`default` is used); a tokenizer without one (the presets' DeepSeek tokenizer) gets DeepSeek-V3's
format (`chat_templates/deepseek_v3.jinja`). Rendering follows `transformers.apply_chat_template`:
a sandboxed Jinja environment with `trim_blocks`/`lstrip_blocks` and loop controls, its `tojson`
(no HTML escaping), `raise_exception` and `strftime_now`, messages with None-valued keys dropped,
the named special tokens (`bos_token`, `eos_token`, ...) and the request's `chat_template_kwargs`
(e.g. Qwen3's `enable_thinking`) as variables, and the rendered text tokenized without adding
special tokens. Runs once, in the router; the engine only ever sees token ids.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

_DEFAULT_TEMPLATE = os.path.join(os.path.dirname(__file__), "chat_templates", "deepseek_v3.jinja")
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_RESERVED_KWARGS = {"messages", "tools", "documents", "add_generation_prompt"}


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered (bad messages, or the template raised): an HTTP 400."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without dunder/underscore attributes (they lead to interpreter internals)."""

    def __init__(*args, **kwargs):  # noqa: N805 — jinja's own signature, so namespace(self=...) works
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set attribute {name!r} on a namespace")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


def _plain(value: Any) -> Any:
    """Only JSON data reaches the template (it is untrusted code running on what clients sent)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    raise ChatTemplateError(f"unsupported value of type {type(value).__name__} in the conversation")


def _normalize(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ChatTemplateError("each message must be an object with a role")
        m = {k: _plain(v) for k, v in m.items() if v is not None}  # OpenAI clients send content=None
        reasoning = next((m[k] for k in _REASONING_KEYS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _template_from_config(cfg: dict) -> str | None:
    t = cfg.get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        return named.get("default")
    return t if isinstance(t, str) else None


def _special_tokens(cfg: dict) -> dict[str, str]:
    out = {}
    for name in _SPECIAL_TOKEN_NAMES:
        v = cfg.get(name)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[name] = v
    return out


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "<string>"):
        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"chat template {origin}: {e}") from None

    @classmethod
    def load(cls, tokenizer_dir: str | None, override_file: str | None = None) -> "ChatTemplate":
        """The template for a tokenizer directory (see the module docstring for the order)."""
        cfg: dict = {}
        if tokenizer_dir and os.path.isfile(os.path.join(tokenizer_dir, "tokenizer_config.json")):
            with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
                cfg = json.load(f)
        tokens = _special_tokens(cfg)
        if override_file:
            with open(override_file) as f:
                return cls(f.read(), tokens, override_file)
        jinja_file = os.path.join(tokenizer_dir, "chat_template.jinja") if tokenizer_dir else None
        if jinja_file and os.path.isfile(jinja_file):
            with open(jinja_file) as f:
                return cls(f.read(), tokens, jinja_file)
        source = _template_from_config(cfg)
        if source is not None:
            return cls(source, tokens, f"{tokenizer_dir}/tokenizer_config.json")
        with open(_DEFAULT_TEMPLATE) as f:
            return cls(f.read(), tokens, _DEFAULT_TEMPLATE)

    def render(self, messages: Any, add_generation_prompt: bool = True, tools: list | None = None,
               documents: list | None = None, continue_final_message: bool = False,
               chat_template_kwargs: dict | None = None) -> str:
        """The conversation as the prompt text the model was trained on."""
        kwargs = dict(chat_template_kwargs or {})
        if not isinstance(kwargs, dict) or _RESERVED_KWARGS & set(kwargs):
            raise ChatTemplateError(f"chat_template_kwargs must be an object without {sorted(_RESERVED_KWARGS)}")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ChatTemplateError("tools must be a list of objects")
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt exclude each other")
        messages = _normalize(messages)
        marker = "\x00CONTINUE_FINAL_MESSAGE\x00"
        if continue_final_message:
            last = messages[-1]
            if not isinstance(last.get("content"), str):
                raise ChatTemplateError("continue_final_message needs a final message with text content")
            messages[-1] = {**last, "content": last["content"] + marker}
        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            text = self._template.render(messages=messages, tools=_plain(tools), documents=_plain(documents),
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
        except (TypeError, KeyError, AttributeError, IndexError) as e:
            raise ChatTemplateError(f"the chat template failed on the conversation: {type(e).__name__}: {e}") from None
        if continue_final_message:
            # Cut everything the template appended after the final message (its end-of-turn tokens).
            text = text[:text.rindex(marker)] if marker in text else text
        return text

    def encode(self, tokenizer, messages: Any, **kwargs) -> list[int]:
        """Rendered and tokenized; the template already placed every special token it wants."""
        return tokenizer.encode(self.render(messages, **kwargs), add_special_tokens=False)
