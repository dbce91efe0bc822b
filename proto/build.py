"""Regenerates the Python stubs from the .proto files (`python -m proto.build [OUT_DIR]`).
The generated files are committed; tests/proto checks they do not drift from the .proto."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(out_dir: str = ROOT) -> None:
    # A subprocess: grpc_tools' bundled protoc must not share a process with other native protobuf
    # copies (NIXL ships its own libprotobuf; loading both crashes).
    args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", os.path.join(ROOT, "proto", "pdserve.proto")]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"protoc failed: {r.stderr}")


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else ROOT)
