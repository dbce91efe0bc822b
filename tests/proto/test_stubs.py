"""The committed gRPC stubs are exactly what the .proto generates (no drift)."""
from __future__ import annotations

import os

from proto.build import ROOT, build


def test_generated_stubs_match_the_proto(tmp_path):
    build(str(tmp_path))
    for name in ("pdserve_pb2.py", "pdserve_pb2_grpc.py"):
        fresh = (tmp_path / "proto" / name).read_text()
        with open(os.path.join(ROOT, "proto", name)) as f:
            assert f.read() == fresh, f"proto/{name} is stale: run `python -m proto.build`"
