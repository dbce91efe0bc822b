"""One MLA layer's prefill in both forms the engine has: weight-absorbed (attention in the 576-wide
latent space, the Triton paged kernel) and decompressed (per-head 192/128-wide keys and values
up-projected from the cached latents, torch SDPA). Same random weights and tokens; reports the
time of each, their agreement, and the attention-FLOPs floor of the decompressed form over the
measured matmul rate. Shapes: DeepSeek-V3 (128 heads) and DeepSeek-V2-Lite (16 heads).
`python -m bench.mla_prefill_bench --out DIR`."""
from __future__ import annotations

import argparse

import torch

from bench.device_probe import probe, time_ms
from bench.record import emit


def _layer(preset: str, device, dtype):
    from engine.layers.mla import MLAttention
    from engine.layers.rotary import RotaryEmbedding
    from engine.presets import resolve_model

    mc = resolve_model(preset)
    hf = mc.hf
    rope = RotaryEmbedding(hf["qk_rope_head_dim"], 16384, hf, interleaved=bool(hf.get("rope_interleave", True)))
    with torch.device(device):
        layer = MLAttention(hf, 0, rope).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen, device=device))
    layer.process_weights_after_loading()
    return layer.to(device), mc


def run_case(preset: str, tokens: int, rate: float, repeats: int) -> dict:
    import engine.layers.mla as mla
    from engine.attention.metadata import AttentionMetadata
    from engine.attention.triton_backend import TritonAttentionBackend
    from engine.forward_batch import ForwardBatch
    from engine.kv_cache import KVPool

    dev, dt = torch.device("cuda"), torch.bfloat16
    layer, mc = _layer(preset, dev, dt)
    page = 16
    pages = -(-tokens // page)
    pool = KVPool(mc.kv_spec(page, dt), pages + 1, dev)
    meta = AttentionMetadata.build([tokens], [tokens], [list(range(1, pages + 1))], page, dev)
    batch = ForwardBatch(meta, [pool.layers[0]], TritonAttentionBackend())
    x = torch.randn(tokens, mc.hf["hidden_size"], device=dev, dtype=dt)
    pos = torch.arange(tokens, device=dev)
    results = {}
    for form, threshold in (("absorbed", 10 ** 9), ("decompressed", 1)):
        mla.DECOMPRESS_MIN_TOKENS = threshold
        with torch.inference_mode():
            results[form] = (layer(pos, x, batch).float(), time_ms(lambda: layer(pos, x, batch), repeats))
    mla.DECOMPRESS_MIN_TOKENS = 128
    (a, t_abs), (d, t_dec) = results["absorbed"], results["decompressed"]
    hf = mc.hf
    heads, qk, v = hf["num_attention_heads"], hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"], hf["v_head_dim"]
    flops = 2 * heads * (tokens * (tokens + 1) // 2) * (qk + v)
    return dict(model=preset, tokens=tokens, heads=heads, absorbed_ms=t_abs, decompressed_ms=t_dec,
                speedup=t_abs / t_dec, rel_diff=float((a - d).norm() / a.norm()), attn_flops=flops,
                floor_ms=flops / rate * 1e3, decompressed_pct_of_floor=100 * flops / rate * 1e3 / t_dec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    p = probe()
    rate = p["bf16_matmul_flops_per_s"]
    rows = [run_case(m, t, rate, args.repeats) for m in ("deepseek-v3", "deepseek-v2-lite") for t in (2048, 8192)]
    md = [f"Device: {p['device']}; bf16 matmul {rate / 1e12:.0f} TFLOP/s (same run). One layer, whole-layer time "
          f"(projections + attention + output), bf16.", "",
          "| model | tokens | absorbed ms | decompressed ms | speedup | rel. diff | attention floor ms | decompressed % of floor |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['model']} ({r['heads']} heads) | {r['tokens']} | {r['absorbed_ms']:.2f} | "
                  f"{r['decompressed_ms']:.2f} | {r['speedup']:.1f}× | {r['rel_diff']:.1e} | {r['floor_ms']:.2f} | "
                  f"{r['decompressed_pct_of_floor']:.0f}% |")
    emit({"device": p, "rows": rows}, "\n".join(md) + "\n", args.out, "mla_prefill")


if __name__ == "__main__":
    main()
