"""Regenerates the Python stubs from the .proto files (`python -m proto.build [OUT_DIR]`).
The generated files are committed; tests/proto checks they do not drift from the .proto."""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(out_dir: str = ROOT) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            os.path.join(ROOT, "proto", "pdserve.proto")]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else ROOT)
