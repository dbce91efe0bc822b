"""Chat templates rendered by the router give exactly the token ids of `transformers`'
`apply_chat_template` on the same checkpoint (real Qwen3, Llama-3.1 and DeepSeek-V3 templates)."""
from __future__ import annotations

import pytest

from engine.tokenizer import Tokenizer, load_tokenizer
from router.chat_template import ChatTemplate, ChatTemplateError
from tests.router.chat_checkpoints import FIXTURES, build_chat_checkpoint

transformers = pytest.importorskip("transformers")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather at a place.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}

CONVERSATIONS = {
    "one_user_turn": dict(messages=[{"role": "user", "content": "Hello, who are you?"}]),
    "system_and_turns": dict(messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3 — ünïcode?"}]),
    "no_generation_prompt": dict(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                 add_generation_prompt=False),
}
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 21}'},
]


def _hf_ids(path, conv: dict, **kwargs) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(path)
    out = tok.apply_chat_template(conv["messages"], add_generation_prompt=conv.get("add_generation_prompt", True),
                                  tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _our_ids(path, conv: dict, **kwargs) -> list[int]:
    return ChatTemplate.load(path).encode(Tokenizer(path), conv["messages"],
                                          add_generation_prompt=conv.get("add_generation_prompt", True), **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {f: build_chat_checkpoint(f, root / f) for f in ("qwen3", "llama3", "deepseek_v3")}


@pytest.mark.parametrize("family", ["qwen3", "llama3", "deepseek_v3"])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_rendered_ids_equal_transformers(checkpoints, family, name):
    conv = CONVERSATIONS[name]
    ours = _our_ids(checkpoints[family], conv)
    assert ours == _hf_ids(checkpoints[family], conv)
    assert len(ours) > 3


@pytest.mark.parametrize("thinking", [True, False])
def test_qwen3_enable_thinking_kwarg(checkpoints, thinking):
    conv = CONVERSATIONS["system_and_turns"]
    ours = _our_ids(checkpoints["qwen3"], conv, chat_template_kwargs={"enable_thinking": thinking})
    assert ours == _hf_ids(checkpoints["qwen3"], conv, enable_thinking=thinking)
    text = Tokenizer(checkpoints["qwen3"]).decode(ours, skip_special_tokens=False)
    assert text.endswith("<think>\n\n</think>\n\n") != thinking


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_tools_and_tool_messages_equal_transformers(checkpoints, family):
    conv = dict(messages=[{"role": "system", "content": "Use tools."}] + TOOL_TURNS)
    ours = _our_ids(checkpoints[family], conv, tools=[WEATHER])
    assert ours == _hf_ids(checkpoints[family], conv, tools=[WEATHER])
    assert "get_weather" in Tokenizer(checkpoints[family]).decode(ours)


def test_deepseek_tool_outputs_equal_transformers(checkpoints):
    turns = [TOOL_TURNS[0], {"role": "assistant", "content": "Let me look."}, TOOL_TURNS[2],
             {"role": "tool", "content": "second output"}]
    conv = dict(messages=turns)
    assert _our_ids(checkpoints["deepseek_v3"], conv) == _hf_ids(checkpoints["deepseek_v3"], conv)
    # V3's template reads `content` of a tool-call turn, which None-dropping removes: both refuse it.
    with pytest.raises(ChatTemplateError):
        _our_ids(checkpoints["deepseek_v3"], dict(messages=TOOL_TURNS))
    with pytest.raises(Exception):
        _hf_ids(checkpoints["deepseek_v3"], dict(messages=TOOL_TURNS))


def test_preset_without_template_renders_deepseek_v3(checkpoints):
    """The DeepSeek tokenizer ships no template: DeepSeek-V3's format, as transformers renders it."""
    tok = load_tokenizer(None)
    template = ChatTemplate.load(tok.directory)
    conv = CONVERSATIONS["system_and_turns"]
    # The default tokenizer's config has no template; transformers gets the fixture on the same tokenizer.
    assert template.encode(tok, conv["messages"]) == _hf_ids(checkpoints["deepseek_v3"], conv)


def test_override_file_wins(checkpoints, tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}")
    t = ChatTemplate.load(checkpoints["qwen3"], str(f))
    assert t.render([{"role": "user", "content": "x"}]) == "[user]x<|im_end|>"


def test_template_exceptions_and_bad_messages_are_client_errors(checkpoints):
    llama = ChatTemplate.load(checkpoints["llama3"])
    two_calls = [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "a", "arguments": {}}}, {"function": {"name": "b", "arguments": {}}}]}]
    with pytest.raises(ChatTemplateError, match="single tool-calls"):
        llama.render(two_calls)
    for bad in ([], "hi", [{"content": "no role"}]):
        with pytest.raises(ChatTemplateError):
            llama.render(bad)


def test_sandbox_refuses_python_internals():
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(Exception):
        t.render([{"role": "user", "content": "x"}])


def test_strftime_now_and_tojson_match_transformers():
    src = "{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}"
    msgs = [{"role": "user", "content": "<é>"}]
    hf = transformers.utils.chat_template_utils.render_jinja_template([msgs], chat_template=src)[0][0]
    assert ChatTemplate(src).render(msgs, add_generation_prompt=False) == hf


def test_fixture_templates_are_the_ones_checkpoints_carry(checkpoints):
    import json
    import os
    with open(os.path.join(checkpoints["qwen3"], "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == open(os.path.join(FIXTURES, "qwen3.jinja")).read()
