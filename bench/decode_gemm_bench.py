"""Every kernel the decode GEMM tuner (engine/kernels/decode_gemm.py) chooses from, timed at decode
sizes on the linear-layer shapes of Qwen3-8B, Llama-3-8B and DeepSeek-V3, for bf16 weights
(cuBLAS vs the skinny Triton GEMM) and block-scaled FP8 weights with dynamic activation quantization
(the block GEMM's decode tiles vs the skinny GEMM), against the bytes floor of the same run (weight +
activations in and out at the measured HBM copy rate). Times are per call inside a CUDA graph over
rotating weight copies (`decode_gemm.time_choice`: no L2 reuse between calls, as in a model step).
Each row also checks the skinny kernel's output against the torch reference on the device.

    python -m bench.decode_gemm_bench --m 1,2,4 --out DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json

import torch
import torch.nn.functional as F

from bench.device_probe import probe
from bench.record import emit
from engine.kernels import decode_gemm, skinny_gemm
from engine.kernels.fp8_ref import fp8_block_gemm_ref
from engine.quantization import quantize_blocks

SHAPES = {  # label: (N, K)
    "qwen3-8b qkv": (6144, 4096), "qwen3-8b o": (4096, 4096), "qwen3-8b gate_up": (24576, 4096),
    "qwen3-8b down": (4096, 12288), "qwen3-8b lm_head": (151936, 4096),
    "llama-3-8b gate_up": (28672, 4096), "llama-3-8b down": (4096, 14336),
    "dsv3 q_a": (1536, 7168), "dsv3 kv_a": (576, 7168), "dsv3 o": (7168, 16384),
}
BLOCK = (128, 128)


def _label(c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, skinny_gemm.SkinnyTiles):
        return f"skinny n{c.block_n} k{c.block_k} w{c.warps} s{c.stages}"
    split = f" sk{c.split_k}" if c.split_k > 1 else ""
    return f"dot {c.block_m}x{c.block_n} w{c.warps} s{c.stages}{split}{' inq' if c.fuse_quant else ''}"


def _family(c) -> str:
    return "skinny" if isinstance(c, skinny_gemm.SkinnyTiles) else ("cublas" if isinstance(c, str) else "fp8 dot")


def measure(label: str, n: int, k: int, ms: list[int], hbm: float) -> list[dict]:
    w = torch.randn(n, k, device="cuda") * k ** -0.5
    weights = {"bf16": (w.to(torch.bfloat16), None, None)}
    if not label.endswith("lm_head"):  # FP8 checkpoints keep the LM head in bf16
        w8, ws = quantize_blocks(w, BLOCK)
        weights["fp8"] = (w8, ws, BLOCK)
    del w
    rows = []
    for dtype, (wt, ws, block) in weights.items():
        copies = decode_gemm.weight_copies(wt)
        for m in ms:
            times = {}
            for c in decode_gemm.candidates(m, wt, ws, block, True):
                try:
                    times[_label(c)] = (decode_gemm.time_choice(c, m, copies, ws, block, True, torch.bfloat16), _family(c))
                except Exception as e:  # noqa: BLE001 - record, go on
                    times[_label(c)] = (None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), wt.float()) if ws is None else fp8_block_gemm_ref(x, wt, ws, block, True).float()
            got = skinny_gemm.skinny_gemm(x, wt, ws, block, True).float()
            err = ((got - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()
            nbytes = wt.numel() * wt.element_size() + 2 * m * (n + k)
            floor = nbytes / hbm * 1e3
            best = {}
            for name, (t, fam) in times.items():
                if t is not None and (fam not in best or t < best[fam][1]):
                    best[fam] = (name, t)
            rows.append(dict(shape=label, n=n, k=k, m=m, weight=dtype, floor_ms=floor, skinny_rel_err=err,
                             times_ms={name: t for name, (t, _) in times.items()},
                             best={fam: dict(kernel=name, ms=t, floor_over=floor / t) for fam, (name, t) in best.items()}))
            print(json.dumps(rows[-1]["best"] | {"shape": label, "m": m, "weight": dtype, "floor_ms": round(floor, 4),
                                                 "err": f"{err:.1e}"}), flush=True)
    return rows


def markdown(result: dict) -> str:
    lines = [f"HBM copy {result['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s (same run). Floor = (weight + bf16 "
             "activations in/out) / HBM copy rate; per call in a CUDA graph over rotating weight copies.", "",
             "| shape (N x K) | weight | M | floor ms | cuBLAS / FP8 dot ms (of floor) | skinny ms (of floor) | "
             "best skinny tiles | skinny vs other | skinny rel err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        other = r["best"].get("cublas") or r["best"].get("fp8 dot")
        sk = r["best"].get("skinny")
        o = f"{other['ms']:.4f} ({other['floor_over']:.0%})" if other else "–"
        s = f"{sk['ms']:.4f} ({sk['floor_over']:.0%})" if sk else "–"
        ratio = f"{other['ms'] / sk['ms']:.2f}x" if other and sk else "–"
        lines.append(f"| {r['shape']} ({r['n']}x{r['k']}) | {r['weight']} | {r['m']} | {r['floor_ms']:.4f} | {o} | "
                     f"{s} | {sk['kernel'] if sk else '–'} | {ratio} | {r['skinny_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    ap.add_argument("--shapes", default=None, help="comma-separated labels (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    hbm = probe("cuda")["hbm_copy_bytes_per_s"]
    shapes = {s: SHAPES[s] for s in args.shapes.split(",")} if args.shapes else SHAPES
    rows = []
    for label, (n, k) in shapes.items():
        rows += measure(label, n, k, args.m, hbm)
        torch.cuda.empty_cache()
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name(), torch=torch.__version__, hbm_copy_bytes_per_s=hbm, rows=rows,
                  candidates=[dataclasses.asdict(t) for t in skinny_gemm.candidates()])
    emit(result, markdown(result), args.out, "decode_gemm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
