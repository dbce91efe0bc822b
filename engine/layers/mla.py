"""Multi-head latent attention (DeepSeek-V2/V3): weight-absorbed for decode, decompressed for prefill.

The KV cache holds one entry per token: the normalised compressed latent (`kv_lora_rank` = R
channels) followed by the rotated shared rope key (P channels) — nothing per head. Queries are
moved into latent space by absorbing the key up-projection (`W_UK`, from `kv_b_proj`) into the
no-rope part of each head's query, so attention is multi-query over the cached entries with
key = the whole entry and value = its first R channels; the value up-projection (`W_UV`) is
applied to the attention output afterwards. The absorbed matrices are derived from `kv_b_proj`
by `process_weights_after_loading()` (the weight loader calls it after filling weights).

Prefill-only steps of at least `DECOMPRESS_MIN_TOKENS` new tokens take the other form: the
cached latents of each sequence (prefix + new) are up-projected to per-head keys and values and
ordinary causal attention runs over them (torch SDPA). Absorbed prefill attends in the R + P =
576-wide latent space for every head; decompressed it is 192-wide keys and 128-wide values — about
3x fewer FLOPs, and it runs on tuned attention kernels. Decode (one query per sequence, where the
latent is read once for all heads) stays absorbed. The cache holds latents either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from engine.attention.torch_backend import gather_kv

from engine.forward_batch import ForwardBatch
from engine.layers import fused_ops
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, yarn_softmax_scale
from engine.layers.weights import WeightTable, into


DECOMPRESS_MIN_TOKENS = 128  # prefill steps this large attend decompressed
# Dense causal prefill without a prefix: the flash kernel the value padding is for (torch 2.11 picked
# cuDNN's on the H200 by itself); the fallbacks keep CPU and other shapes working.
_DENSE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class MLAttention(nn.Module):
    def __init__(self, hf: dict, layer_id: int, rope: RotaryEmbedding):
        super().__init__()
        hidden = hf["hidden_size"]
        bias = bool(hf.get("attention_bias", False))
        self.layer_id = layer_id
        self.num_heads = hf["num_attention_heads"]
        self.dn, self.dr, self.dv = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"], hf["v_head_dim"]
        self.rank = hf["kv_lora_rank"]
        self.q_lora_rank = hf.get("q_lora_rank")
        h, qk = self.num_heads, self.dn + self.dr
        if self.q_lora_rank:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = Linear(self.q_lora_rank, h * qk)
        else:
            self.q_proj = Linear(hidden, h * qk)
        self.kv_a_proj_with_mqa = Linear(hidden, self.rank + self.dr, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = Linear(self.rank, h * (self.dn + self.dv))
        self.o_proj = Linear(h * self.dv, hidden, bias=bias)
        self.rope = rope
        self.scale = yarn_softmax_scale(hf, qk)
        self.register_buffer("w_uk", torch.empty(h, self.dn, self.rank), persistent=False)  # q_nope → latent
        self.register_buffer("w_uv", torch.empty(h, self.rank, self.dv), persistent=False)  # latent → v

    @torch.no_grad()
    def process_weights_after_loading(self) -> None:
        w = self.kv_b_proj.dense_weight(self.w_uk.dtype).view(self.num_heads, self.dn + self.dv, self.rank)
        self.w_uk.copy_(w[:, : self.dn])
        self.w_uv.copy_(w[:, self.dn:].transpose(1, 2))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        t, h = hidden.shape[0], self.num_heads
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        else:
            q = self.q_proj(hidden)
        q = q.view(t, h, self.dn + self.dr)
        q_nope = q[..., : self.dn]
        kv_cache, meta = batch.kv_caches[self.layer_id], batch.attn
        # [T, R + P]: normed latent ++ rotated rope key, what the cache stores (written there too)
        entry = fused_ops.mla_kv_entry(self.kv_a_proj_with_mqa(hidden), positions, self.rope.cos, self.rope.sin,
                                       self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, self.rope.interleaved,
                                       kv_cache, meta.slot_mapping)
        if meta.num_decodes == 0 and t >= DECOMPRESS_MIN_TOKENS:
            q_pe = self.rope.rotate(q[..., self.dn:], positions)
            out = self._prefill_decompressed(q_nope, q_pe, entry, kv_cache, meta)
        else:
            # q_nope @ W_UK ++ rotated q_pe: one kernel at decode sizes (the rotation alone is ~10 torch kernels)
            query = fused_ops.mla_absorbed_query(q, self.w_uk, positions, self.rope.cos, self.rope.sin,
                                                 self.rope.interleaved)
            out = batch.backend.mla(query, entry, kv_cache, meta, self.scale, self.rank, kv_written=True)
            out = torch.bmm(out.transpose(0, 1), self.w_uv).transpose(0, 1)  # [T, H, dv]
        return self.o_proj(out.reshape(t, h * self.dv))

    def _prefill_decompressed(self, q_nope, q_pe, entry, kv_cache, meta) -> torch.Tensor:
        """Causal attention of each prefill chunk over its whole sequence (cached prefix + chunk),
        with keys and values up-projected from the cached latents. Returns `[T, H, dv]`."""
        h = self.num_heads
        out = q_nope.new_empty(q_nope.shape[0], h, self.dv)
        starts = [0]  # from the host lists: reading query_start_loc back would sync once per layer
        for qlen in meta.query_lens_cpu:
            starts.append(starts[-1] + qlen)
        for b, (qlen, slen) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
            rows = slice(starts[b], starts[b] + qlen)
            if qlen == slen:  # no cached prefix: the step's own entries (no gather back from the pages)
                ctx = entry[rows].to(q_nope.dtype)  # [S, R + P]
            else:
                ctx = gather_kv(kv_cache, 0, meta.block_tables[b], slen)[:, 0].to(q_nope.dtype)
            lat, kpe = ctx.split([self.rank, self.dr], dim=-1)
            k_nope = torch.einsum("hdr,sr->hsd", self.w_uk, lat)  # [H, S, dn]
            v = torch.einsum("sr,hrv->hsv", lat, self.w_uv)  # [H, S, dv]
            k = torch.cat([k_nope, kpe.unsqueeze(0).expand(h, -1, -1)], dim=-1)
            # 4-D [1, H, L, D]: the fused SDPA kernels take only batched 4-D inputs (3-D falls back
            # to a materialised score matrix).
            q = torch.cat([q_nope[rows], q_pe[rows]], dim=-1).transpose(0, 1).unsqueeze(0)
            k, v = k.unsqueeze(0), v.unsqueeze(0)
            if qlen == slen:  # no cached prefix: plain causal, values padded to the key width so the
                # flash kernel applies
                vp = F.pad(v, (0, q.shape[-1] - self.dv))
                with sdpa_kernel(_DENSE_BACKENDS):
                    o = F.scaled_dot_product_attention(q, k, vp, is_causal=True, scale=self.scale)[..., : self.dv]
            else:  # bottom-right causal: the chunk's queries sit at the last Q of the S positions
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(qlen, slen),
                                                   scale=self.scale)
            out[rows] = o[0].transpose(0, 1)
        return out

    def register_weights(self, table: WeightTable, prefix: str) -> None:
        names = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
        names += ["q_a_proj", "q_b_proj"] if self.q_lora_rank else ["q_proj"]
        for n in names:
            lin = getattr(self, n)
            table.add(f"{prefix}.{n}.weight", into(lin.weight))
            if lin.bias is not None:
                table.add(f"{prefix}.{n}.bias", into(lin.bias))
        table.add(f"{prefix}.kv_a_layernorm.weight", into(self.kv_a_layernorm.weight))
        if self.q_lora_rank:
            table.add(f"{prefix}.q_a_layernorm.weight", into(self.q_a_layernorm.weight))
