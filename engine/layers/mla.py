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
from torch.nn.attention import SDPBackend

from engine.attention.dense_prefill import causal_varlen, is_dense_prefill

from engine.forward_batch import ForwardBatch
from engine.kernels import decode_gemm
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
        # kv_b_proj's weight in the compute dtype, per head [nope key rows ++ value rows, R] (`w_kvb`):
        # decompression multiplies by all of it in one GEMM, the absorbed query by its key rows (`w_uk`, a
        # view). An FP8 kv_b_proj is dequantized once into a buffer; otherwise `w_kvb` is the weight itself.
        # `w_uv` is the value rows transposed, a copy: cuBLAS/MKL take the transposed view too, but not
        # bit for bit as the contiguous one, and EP runs must give the one-rank tokens.
        self._kvb_buffer = self.kv_b_proj.quant is not None
        if self._kvb_buffer:
            self.register_buffer("_w_kvb", torch.empty(h, self.dn + self.dv, self.rank), persistent=False)
        self.register_buffer("w_uv", torch.empty(h, self.rank, self.dv), persistent=False)

    @property
    def w_kvb(self) -> torch.Tensor:
        """`[H, dn + dv, R]`."""
        if self._kvb_buffer:
            return self._w_kvb
        return self.kv_b_proj.weight.view(self.num_heads, self.dn + self.dv, self.rank)

    @property
    def w_uk(self) -> torch.Tensor:
        """`[H, dn, R]`: q_nope → latent (the absorbed key up-projection)."""
        return self.w_kvb[:, : self.dn]

    @torch.no_grad()
    def process_weights_after_loading(self) -> None:
        if self._kvb_buffer:
            self._w_kvb.copy_(self.kv_b_proj.dense_weight(self._w_kvb.dtype).view_as(self._w_kvb))
        self.w_uv.copy_(self.w_kvb[:, self.dn:].transpose(1, 2))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        t, h = hidden.shape[0], self.num_heads
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        else:
            q = self.q_proj(hidden)
        q = q.view(t, h, self.dn + self.dr)
        kv_cache, meta = batch.kv_caches[self.layer_id], batch.attn
        # [T, R + P]: normed latent ++ rotated rope key, what the cache stores (written there too)
        entry = fused_ops.mla_kv_entry(self.kv_a_proj_with_mqa(hidden), positions, self.rope.cos, self.rope.sin,
                                       self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, self.rope.interleaved,
                                       kv_cache, meta.slot_mapping)
        backend = batch.backend
        out = batch.attend(lambda m, q_, p_, e_: self._attention(q_, p_, e_, kv_cache, m, backend), q, positions,
                           entry, out_shape=(t, h, self.dv))
        return self.o_proj(out.reshape(t, h * self.dv))

    def _attention(self, q, positions, entry, kv_cache, meta, backend) -> torch.Tensor:
        """`[T, H, dv]` from the queries `[T, H, dn + P]` (before rotation) and the step's cache entries:
        prefill chunks of `DECOMPRESS_MIN_TOKENS` or more new tokens in all decompressed, a step's decodes
        (and smaller steps) absorbed. Everything that depends on the step's lengths is here, so a
        piecewise prefill graph runs it eagerly over each replayed step's metadata (`ForwardBatch.attend`)."""
        t, nd = q.shape[0], meta.num_decodes
        if t - nd >= DECOMPRESS_MIN_TOKENS:  # prefill chunks decompressed; a step's decodes, if any, absorbed
            decode_meta, prefill_meta = meta.split(nd) if nd else (None, meta)
            # q_nope ++ rotated q_pe in one kernel (the same one that builds the absorbed query)
            query = fused_ops.mla_query(q[nd:, :, : self.dn], q[nd:], positions[nd:], self.rope.cos, self.rope.sin,
                                        self.rope.interleaved)
            out = self._prefill_decompressed(query, entry[nd:], kv_cache, prefill_meta)
            if nd:
                out = torch.cat([self._absorbed(q[:nd], positions[:nd], entry[:nd], kv_cache, decode_meta, backend),
                                 out])
            return out
        return self._absorbed(q, positions, entry, kv_cache, meta, backend)

    def _absorbed(self, q, positions, entry, kv_cache, meta, backend) -> torch.Tensor:
        """Weight-absorbed attention (decode; short prefill chunks): `[T, H, dv]`."""
        # q_nope @ W_UK ++ rotated q_pe: one kernel at decode sizes (the rotation alone is ~10 torch kernels)
        query = fused_ops.mla_absorbed_query(q, self.w_uk, positions, self.rope.cos, self.rope.sin,
                                             self.rope.interleaved)
        out = backend.mla(query, entry, kv_cache, meta, self.scale, self.rank, kv_written=True)
        # `[T, H, R]` through W_UV per head: at a few tokens on CUDA the tuner's pick of torch.bmm and the
        # skinny kernel reading `w_kvb`'s value rows in place and writing `[T, H, dv]` (no transposes)
        w_vu = self.w_kvb[:, self.dn:]
        return decode_gemm.run_bmm(decode_gemm.choose_bmm(out, w_vu, self.w_uv), out, w_vu, self.w_uv)

    def _decompress(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached entries `ctx [S, R + P]` → per-head keys `[S, H, dn + P]` (up-projected latent ++ the
        shared rope key) and values `[S, H, dv]`: one GEMM over `kv_b_proj`'s weight and one concat."""
        s, h = ctx.shape[0], self.num_heads
        lat, kpe = ctx.split([self.rank, self.dr], dim=-1)
        kv = torch.mm(lat, self.w_kvb.view(-1, self.rank).t()).view(s, h, self.dn + self.dv)
        k = torch.cat([kv[..., : self.dn], kpe.unsqueeze(1).expand(s, h, self.dr)], dim=-1)
        return k, kv[..., self.dn:]

    def _prefill_decompressed(self, query, entry, kv_cache, meta) -> torch.Tensor:
        """Causal attention of each prefill chunk over its whole sequence (cached prefix + chunk),
        with keys and values up-projected from the cached latents. `query [T, H, dn + P]` (rotated).
        Returns `[T, H, dv]`. Without cached prefixes (the usual prefill) the keys and values come
        from this step's own entries; otherwise every sequence is read back from the pages in one
        gather (`AttentionMetadata.context_index`). Either way: one decompression GEMM for the step,
        values padded to the key width once (the flash kernel needs equal widths), one varlen
        attention call (per sequence only off CUDA / in float32)."""
        width = self.dn + self.dr
        if is_dense_prefill(meta):
            ctx, cu_k = entry, meta.query_start_loc
        else:
            pages, offsets, cu_k = meta.context_index()
            ctx = kv_cache[pages, 0, offsets, 0]  # [sum of seq_lens, R + P]
        k, v = self._decompress(ctx.to(query.dtype))
        v = F.pad(v, (0, width - self.dv))
        o = causal_varlen(query, k, v, meta.query_start_loc, cu_k, meta.query_lens_cpu, meta.seq_lens_cpu,
                          self.scale, _DENSE_BACKENDS)
        return o[..., : self.dv]

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
