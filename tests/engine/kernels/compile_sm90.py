"""Compiles, on a machine without a GPU, every Triton kernel a check script launches, for an sm_90
(H100/H200) target down to a cubin (Triton's own ptxas), instead of launching it: a kernel that only the
interpreter accepts (a global read from compiled code, a shape the compiler refuses, a register budget
ptxas cannot meet) fails here, before a device call. Results are not computed, so the check script's
comparisons are meaningless in this mode (outputs stay zero); what counts is that no compile raised. Prints one line per
distinct compiled specialization with ptxas' register and spill counts.

    python -m tests.engine.kernels.compile_sm90 tests.engine.kernels.check_skinny_gemm cpu small
"""
from __future__ import annotations

import runpy
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

TARGET = GPUTarget("cuda", 90, 32)
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
           torch.float8_e4m3fn: "fp8e4nv", torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16",
           torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
_seen: dict[tuple, str] = {}
failures: list[str] = []


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument of type {type(value).__name__}")


def _ptxas_usage(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        bin_dir = __import__("os").path.join(__import__("os").path.dirname(triton.__file__), "backends", "nvidia", "bin")
        out = subprocess.run([f"{bin_dir}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    return " ".join(line.strip() for line in out.splitlines() if "REG" in line)[:160]


def _compile_instead(self: JITFunction, *args, grid, warmup, **kwargs):
    num_warps, num_stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
    kwargs.pop("launch_pdl", None)  # a launch flag, not a compile option
    params = self.params
    bound = dict(zip([p.name for p in params], args)) | kwargs
    signature, constexprs = {}, {}
    for i, p in enumerate(params):
        value = bound.get(p.name, p.default if hasattr(p, "default") else None)
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = value
        elif value is None:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = None
        else:
            signature[p.name] = _arg_type(value)
    key = (self.fn.__qualname__, tuple(signature.items()), tuple(sorted((k[0], repr(v)) for k, v in constexprs.items())),
           num_warps, num_stages)
    if key in _seen:
        return None
    try:
        kernel = triton.compile(ASTSource(fn=self, signature=signature, constexprs=constexprs), target=TARGET,
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        _seen[key] = _ptxas_usage(kernel.asm["cubin"])
        consts = {params[k[0]].name: v for k, v in constexprs.items() if params[k[0]].is_constexpr}
        print(f"compiled {self.fn.__name__} w{num_warps} s{num_stages} {consts}: {_seen[key]}", flush=True)
    except Exception as e:  # noqa: BLE001 - every failing specialization is listed
        _seen[key] = "FAILED"
        failures.append(f"{self.fn.__name__}: {type(e).__name__}: {str(e)[:400]}")
        print(f"FAILED {self.fn.__name__} w{num_warps} s{num_stages}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    return None


def main() -> int:
    module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
    JITFunction.run = _compile_instead
    # Kernels compile with their programmatic-dependent-launch wait/signal, as they run on an sm_90
    # (engine/kernels/pdl.py), though the check launches them for the CPU.
    from engine.kernels import pdl
    pdl.enabled = lambda device: True
    # Outputs the kernels would have written stay as allocated: zeros, so a check's own consistency
    # asserts (two entry points giving equal outputs) hold and it goes on to its next case.
    torch.empty, torch.empty_like = torch.zeros, torch.zeros_like
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit:
        pass  # the check's own verdict compares uncomputed outputs: not this tool's
    print(f"{len(_seen)} specializations compiled for sm_90, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
