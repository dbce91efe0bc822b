"""Compares the fused Triton kernels (norm_act, rope_kv incl. the absorbed MLA query, moe_routing incl.
router logits) with their torch references (interpreter on CPU, native on CUDA). Prints one
`ok`/`BAD` line per case.
Usage: python -m tests.engine.kernels.check_fused_ops [device] [small|real|decode]"""
from __future__ import annotations

import sys

import torch

from engine.kernels import moe_routing, moe_routing_ref, norm_act, norm_act_ref, rope_kv, rope_kv_ref

RESULTS: list[bool] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append(ok)
    print(f"{'ok ' if ok else 'BAD'} {name} {detail}", flush=True)


def close(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    """Within one rounding step of the activation dtype (reduction order differs)."""
    tol = 1e-5 if ref.dtype == torch.float32 else 2 ** -7
    err = ((got.float() - ref.float()).abs() / (ref.float().abs() + 1)).max().item() if ref.numel() else 0.0
    report(name, err <= tol and got.dtype == ref.dtype and got.shape == ref.shape, f"rel err {err:.1e}")


def check_norm_act(rows: list[int], hidden: int, inter: int, dtype, device, g) -> None:
    for t in rows:
        x = torch.randn(t, hidden, generator=g).to(device, dtype)
        r = torch.randn(t, hidden, generator=g).to(device, dtype)
        w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
        close(f"rms_norm T={t} D={hidden} {dtype}", norm_act.rms_norm(x, w, 1e-6), norm_act_ref.rms_norm(x, w, 1e-6))
        (o, s), (ro, rs) = norm_act.add_rms_norm(x, r, w, 1e-6), norm_act_ref.add_rms_norm(x, r, w, 1e-6)
        close(f"add_rms_norm T={t} D={hidden} {dtype}", torch.cat([o, s]), torch.cat([ro, rs]))
        gu = torch.randn(t, 2 * inter, generator=g).to(device, dtype)
        close(f"silu_and_mul T={t} I={inter} {dtype}", norm_act.silu_and_mul(gu), norm_act_ref.silu_and_mul(gu))


def check_rope_kv(t: int, hq: int, hkv: int, d: int, qk_norm: bool, interleaved: bool, dtype, device, g) -> None:
    page, pages, max_pos = 4, 2 * t + 4, 64 + t
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(device, dtype)
    pos = torch.randint(0, max_pos, (t,), generator=g).to(device)
    freqs = torch.outer(torch.arange(max_pos).double(), 1.0 / 1e4 ** (torch.arange(0, d, 2).double() / d))
    cos, sin = freqs.cos().float().to(device), freqs.sin().float().to(device)
    qn = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype) if qk_norm else None
    kn = (1 + 0.1 * torch.randn(d, generator=g)).to(device, dtype) if qk_norm else None
    slots = torch.randperm(pages * page, generator=g)[:t].to(device)
    slots[::3] = -1  # tokens whose KV is not written
    caches = [torch.zeros(pages, 2, page, hkv, d, dtype=dtype, device=device) for _ in range(2)]
    got = rope_kv.qk_norm_rope_write_kv(qkv, pos, cos, sin, qn, kn, 1e-6, caches[0], slots, hq, hkv, interleaved)
    ref = rope_kv_ref.qk_norm_rope_write_kv(qkv, pos, cos, sin, qn, kn, 1e-6, caches[1], slots, hq, hkv,
                                            interleaved)
    name = f"rope_kv T={t} Hq={hq} Hkv={hkv} D={d} norm={qk_norm} interleaved={interleaved} {dtype}"
    close(name + " q,k", torch.cat([got[0], got[1]], 1), torch.cat([ref[0], ref[1]], 1))
    close(name + " cache", caches[0], caches[1])


def check_mla_entry(t: int, r: int, p: int, dtype, device, g) -> None:
    max_pos = 32 + t
    kv_a = torch.randn(t, r + p, generator=g).to(device, dtype)
    pos = torch.randint(0, max_pos, (t,), generator=g).to(device)
    freqs = torch.outer(torch.arange(max_pos).double(), 1.0 / 1e4 ** (torch.arange(0, p, 2).double() / p))
    cos, sin = freqs.cos().float().to(device), freqs.sin().float().to(device)
    w = (1 + 0.1 * torch.randn(r, generator=g)).to(device, dtype)
    close(f"mla_kv_entry T={t} R={r} P={p} {dtype}", rope_kv.mla_kv_entry(kv_a, pos, cos, sin, w, 1e-6),
          rope_kv_ref.mla_kv_entry(kv_a, pos, cos, sin, w, 1e-6))
    # written into the MLA pool [pages, 1, page, 1, R + P] at the slots (-1: not written) in the same kernel
    page = 4
    slots = torch.randperm(4 * t + 8, generator=g)[:t].to(device)
    slots[::3] = -1
    caches = [torch.zeros(t + 3, 1, page, 1, r + p, dtype=dtype, device=device) for _ in range(2)]
    entries = [impl(kv_a, pos, cos, sin, w, 1e-6, True, cache, slots)
               for impl, cache in zip((rope_kv.mla_kv_entry, rope_kv_ref.mla_kv_entry), caches)]
    close(f"mla_kv_entry + cache write T={t} R={r} P={p} {dtype}", caches[0], caches[1])
    close(f"mla_kv_entry + cache write, entry T={t} {dtype}", entries[0], entries[1])


def check_mla_query(t: int, h: int, r: int, nope: int, p: int, interleaved: bool, dtype, device, g,
                    latent_is_nope: bool = False) -> None:
    """`latent_is_nope`: the decompressed prefill's query, q's own no-rope part (a view) ++ rotated q_pe."""
    max_pos = 32 + t
    q_latent = torch.randn(h, t, r, generator=g).to(device, dtype).transpose(0, 1)  # a bmm's output layout
    q = torch.randn(t, h * (nope + p), generator=g).to(device, dtype).view(t, h, nope + p)
    if latent_is_nope:
        q_latent, r = q[..., :nope], nope
    pos = torch.randint(0, max_pos, (t,), generator=g).to(device)
    freqs = torch.outer(torch.arange(max_pos).double(), 1.0 / 1e4 ** (torch.arange(0, p, 2).double() / p))
    cos, sin = freqs.cos().float().to(device), freqs.sin().float().to(device)
    close(f"mla_query T={t} H={h} R={r} nope={nope} P={p} interleaved={interleaved} {dtype}"
          + (" (latent = q's nope view)" if latent_is_nope else ""),
          rope_kv.mla_query(q_latent, q, pos, cos, sin, interleaved),
          rope_kv_ref.mla_query(q_latent, q, pos, cos, sin, interleaved))


def check_mla_absorbed_query(t: int, h: int, r: int, nope: int, p: int, interleaved: bool, dtype, device, g) -> None:
    max_pos = 32 + t
    q = torch.randn(t, h * (nope + p), generator=g).to(device, dtype).view(t, h, nope + p)
    w_uk = (torch.randn(h, nope, r, generator=g) * nope ** -0.5).to(device, dtype)
    pos = torch.randint(0, max_pos, (t,), generator=g).to(device)
    freqs = torch.outer(torch.arange(max_pos).double(), 1.0 / 1e4 ** (torch.arange(0, p, 2).double() / p))
    cos, sin = freqs.cos().float().to(device), freqs.sin().float().to(device)
    close(f"mla_absorbed_query T={t} H={h} R={r} nope={nope} P={p} interleaved={interleaved} {dtype}",
          rope_kv.mla_absorbed_query(q, w_uk, pos, cos, sin, interleaved),
          rope_kv_ref.mla_absorbed_query(q, w_uk, pos, cos, sin, interleaved))


def check_routing(t: int, e: int, k: int, device, g, scoring="softmax", renorm=False, groups=1, topk_groups=1,
                  bias=False, scale=1.0, gs="max", ties=False) -> None:
    logits = torch.randn(t, e, generator=g)
    if ties:  # exact ties between experts: both paths must keep the lower id
        logits = logits.round(decimals=0)
    logits = logits.to(device)
    cb = (0.3 * torch.randn(e, generator=g)).to(device) if bias else None
    args = (logits, k, scoring, renorm, groups, topk_groups, cb, scale, gs)
    w, ids = moe_routing.select_experts(*args)
    rw, rids = moe_routing_ref.select_experts(*args)
    # compare as sets per token (order of equal-score experts is not specified)
    if ties:  # torch.topk leaves the order of equal scores unspecified; the kernel keeps the lower id
        torch_agrees = torch.equal(ids.sort(dim=1).values, rids.sort(dim=1).values)
        print(f"info: on exact ties torch.topk {'agrees' if torch_agrees else 'differs'} (T={t} E={e} k={k})")
        rids = logits.float().softmax(-1).sort(dim=-1, descending=True, stable=True).indices[:, :k].to(torch.int32)
    so, ro = ids.sort(dim=1), rids.sort(dim=1)
    same = torch.equal(so.values, ro.values)
    if ties:  # equal scores give equal weights: compare them sorted by value
        w, rw, so, ro = w.sort(dim=1).values, rw.sort(dim=1).values, None, None
    err = ((w if so is None else w.gather(1, so.indices)) - (rw if ro is None else rw.gather(1, ro.indices)))
    err = err.abs().max().item() if same else float("inf")
    report(f"routing T={t} E={e} k={k} {scoring} renorm={renorm} groups={groups}/{topk_groups} bias={bias}"
           f" {gs} ties={ties}", same and err < 1e-5 and w.dtype == rw.dtype, f"ids equal={same} max err {err:.1e}")


def check_router_logits(t: int, e: int, h: int, dtype, device, g) -> None:
    x = torch.randn(t, h, generator=g).to(device, dtype)
    w = (0.05 * torch.randn(e, h, generator=g)).to(device)  # the router weight is held in float32
    close(f"router_logits T={t} E={e} H={h} {dtype}", moe_routing.router_logits(x, w),
          moe_routing_ref.router_logits(x, w))


def check_align(t: int, e: int, k: int, block_m: int, device, g) -> None:
    ids = torch.randint(0, e, (t, k), generator=g, dtype=torch.int32)
    ids[::3, 0] = -1  # experts on another rank
    ids = ids.to(device)
    got = moe_routing.align_by_expert(ids, e, block_m)
    ref = moe_routing_ref.align_by_expert(ids, e, block_m)
    ok = all(torch.equal(a, b) for a, b in zip(got, ref))
    report(f"align T={t} E={e} k={k} block_m={block_m}", ok)


def main() -> int:
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    size = sys.argv[2] if len(sys.argv) > 2 else "small"
    g = torch.Generator().manual_seed(0)
    if size == "small":
        check_norm_act([1, 3], 48, 40, torch.float32, device, g)
        check_rope_kv(5, 4, 2, 16, True, False, torch.float32, device, g)
        check_rope_kv(3, 2, 1, 8, False, True, torch.float32, device, g)
        check_mla_entry(3, 24, 8, torch.float32, device, g)
        check_mla_query(3, 2, 24, 16, 8, True, torch.float32, device, g)
        check_mla_query(2, 3, 32, 8, 8, False, torch.float32, device, g)
        check_mla_query(5, 3, 0, 16, 8, True, torch.float32, device, g, latent_is_nope=True)
        check_mla_absorbed_query(1, 2, 24, 16, 8, True, torch.float32, device, g)  # partial R block
        check_mla_absorbed_query(3, 3, 32, 12, 8, False, torch.float32, device, g)  # partial nope block
        check_routing(7, 16, 4, device, g, renorm=True)
        check_routing(5, 16, 3, device, g, ties=True)
        check_routing(6, 16, 3, device, g, groups=4, topk_groups=2)
        check_routing(6, 32, 4, device, g, "sigmoid", True, 8, 3, True, 2.5, "top2sum")
        check_align(70, 8, 2, 4, device, g)
        check_align(3, 6, 2, 4, device, g)
        check_align(300, 256, 8, 16, device, g)  # 38 chunks: the offset scan takes several blocks of chunks
        check_router_logits(1, 12, 80, torch.float32, device, g)  # partial expert block and K step
        check_router_logits(3, 16, 64, torch.bfloat16, device, g)
        check_router_logits(9, 16, 64, torch.bfloat16, device, g)  # above the GEMV's sizes: cuBLAS
    elif size == "decode":  # the decode-size kernels of the V2-Lite branch alone, at real sizes
        for t in (1, 4):
            check_mla_absorbed_query(t, 16, 512, 128, 64, True, torch.bfloat16, device, g)  # DeepSeek-V2-Lite
            check_mla_absorbed_query(t, 128, 512, 128, 64, True, torch.bfloat16, device, g)  # DeepSeek-V3
        for t in (1, 4, 64):  # router logits: the GEMV up to 4 tokens, cuBLAS at 64
            check_router_logits(t, 64, 2048, torch.bfloat16, device, g)  # DeepSeek-V2-Lite
            check_router_logits(t, 256, 7168, torch.bfloat16, device, g)  # DeepSeek-V3
    else:
        bf = torch.bfloat16
        check_norm_act([1, 64, 2048], 4096, 12288, bf, device, g)  # Qwen3-8B
        check_rope_kv(1, 32, 8, 128, True, False, bf, device, g)
        check_rope_kv(2048, 32, 8, 128, True, False, bf, device, g)
        check_rope_kv(64, 32, 8, 128, False, False, bf, device, g)  # Llama-3-8B
        check_mla_entry(64, 512, 64, bf, device, g)  # DeepSeek-V2/V3
        for t in (1, 64):
            check_mla_query(t, 16, 512, 128, 64, True, bf, device, g)  # DeepSeek-V2-Lite
        check_mla_query(2048, 16, 0, 128, 64, True, bf, device, g, latent_is_nope=True)  # V2-Lite decompressed prefill
        for t in (1, 4):
            check_mla_absorbed_query(t, 16, 512, 128, 64, True, bf, device, g)  # DeepSeek-V2-Lite
            check_mla_absorbed_query(t, 128, 512, 128, 64, True, bf, device, g)  # DeepSeek-V3
        for t in (1, 64, 4096):
            check_routing(t, 64, 6, device, g)  # DeepSeek-V2-Lite greedy
            check_routing(t, 128, 8, device, g, renorm=True)  # Qwen3-30B-A3B
            check_routing(t, 256, 8, device, g, "sigmoid", True, 8, 4, True, 2.5, "top2sum")  # V3
            check_align(t, 64, 6, 16 if t < 64 else 64, device, g)
            check_align(t, 256, 8, 16, device, g)
        check_routing(64, 64, 6, device, g, ties=True)
        for t in (1, 4, 64):
            check_router_logits(t, 64, 2048, bf, device, g)  # DeepSeek-V2-Lite
            check_router_logits(t, 256, 7168, bf, device, g)  # DeepSeek-V3
    return 0 if all(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
