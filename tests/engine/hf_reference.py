"""Reference harness: tiny random HF `transformers` checkpoints of each architecture, their logits,
and ours for the same tokens computed through the paged KV cache (prefill, optionally chunked,
then one decode step per token)."""
from __future__ import annotations

import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend
from engine.forward_batch import ForwardBatch
from engine.kv_cache import KVPool
from engine.presets import resolve_model
from engine.weight_loader import load_model

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)

_DEEPSEEK = dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                 n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                 qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1,
                 routed_scaling_factor=1.0, norm_topk_prob=False)

CONFIGS = {
    "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "Qwen3ForCausalLM": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
    "DeepseekV2ForCausalLM": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(_DEEPSEEK, topk_method="greedy")),
    "DeepseekV3ForCausalLM": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        _DEEPSEEK, num_hidden_layers=3, q_lora_rank=24, n_group=2, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.5)),
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """HF init leaves norms at 1 and biases at 0; randomise every tensor so mistakes show."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or not p.is_floating_point():
                continue
            if p.dim() == 1:
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def build_hf_checkpoint(arch: str, path, seed: int = 0, shard: bool = False, **overrides):
    """A tiny float32 random HF model of `arch`, saved (safetensors) in `path`."""
    import transformers

    cfg_name, model_name, extra = CONFIGS[arch]
    kw = dict(_COMMON)
    kw.update(extra)
    kw.update(overrides)
    config = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float().eval()
    _perturb(model, seed)
    model.save_pretrained(str(path), max_shard_size="200KB" if shard else "5GB")
    return model, str(path)


@torch.no_grad()
def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    out = hf_model(torch.tensor([token_ids]), use_cache=False)
    return out.logits[0].float()


def load_ours(path: str):
    mc = resolve_model(path, "float32")
    return load_model(mc, "cpu"), mc


@torch.no_grad()
def engine_logits(model, model_config, token_ids: list[int], prompt_len: int, page_size: int = 4,
                  chunk_size: int | None = None, kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Logits at every position: prefill of the first `prompt_len` tokens (in chunks when asked),
    then one decode step per remaining token, all through a fresh paged KV pool (of `kv_dtype`,
    default the model's)."""
    n = len(token_ids)
    num_pages = -(-n // page_size) + 1
    pool = KVPool(model_config.kv_spec(page_size, kv_dtype), num_pages, "cpu")
    pages = list(range(1, num_pages))[::-1]  # non-contiguous, reversed page order on purpose
    backend = TorchAttentionBackend()
    steps = []
    chunk = chunk_size or prompt_len
    start = 0
    while start < prompt_len:
        steps.append((start, min(chunk, prompt_len - start)))
        start += steps[-1][1]
    steps += [(p, 1) for p in range(prompt_len, n)]
    rows = []
    for start, q in steps:
        meta = AttentionMetadata.build([q], [start + q], [pages], page_size)
        ids = torch.tensor(token_ids[start: start + q])
        pos = torch.arange(start, start + q)
        hidden = model(ids, pos, ForwardBatch(meta, pool.layers, backend))
        rows.append(model.compute_logits(hidden))
    return torch.cat(rows)
