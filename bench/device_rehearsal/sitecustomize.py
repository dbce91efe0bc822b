"""CPU rehearsal of a device script's imports: with this folder first on PYTHONPATH, every Python
process (and its children) sees only the modules the device machine has (Python 3.12, torch,
triton, transformers and their dependencies, grpc 1.84, protobuf, prometheus-client) plus what
the carried wheels in $DEVSIM_WHEELS (default ./.whldev) provide; any other top-level module looks
absent (find_spec None, import fails), and its name is appended to $DEVSIM_LOG.

    PYTHONPATH=$PWD/bench/device_rehearsal:$PWD DEVICE=cpu ... bash bench/run_planner_validation_gpu.sh
"""
import importlib.abc
import os
import pathlib
import sys
import zipfile

_DEVICE = set("""torch torchgen functorch triton numpy transformers huggingface_hub tokenizers safetensors tqdm yaml
regex packaging filelock fsspec httpx httpcore anyio sniffio h11 certifi hf_xet typer click rich shellingham
markdown_it mdurl pygments typing_extensions sympy mpmath networkx jinja2 markupsafe prometheus_client google grpc
setuptools pkg_resources _distutils_hack pip nvidia cuda idna charset_normalizer urllib3 requests""".split())
_REPO = set("engine proto node prefill_node decode_node router kvtransfer deploy bench planner tests".split())


def _wheel_modules(folder: str) -> set:
    names = set()
    for wheel in pathlib.Path(folder).glob("*.whl"):
        for n in zipfile.ZipFile(wheel).namelist():
            top = n.split("/")[0]
            if not top.endswith((".dist-info", ".data")):
                names.add(top.removesuffix(".py").split(".")[0])
    return names


_OK = (_DEVICE | _REPO | _wheel_modules(os.environ.get("DEVSIM_WHEELS", ".whldev")) | set(sys.stdlib_module_names)
       | {"sitecustomize", "usercustomize", "__main__"})


class _Filtered(importlib.abc.MetaPathFinder):
    """Wraps a finder so modules off the device look absent."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if not (top in _OK or top.startswith("_")):
            with open(os.environ.get("DEVSIM_LOG", "/tmp/devsim_blocked.log"), "a") as f:
                f.write(f"{os.getpid()} {name}\n")
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None

    def invalidate_caches(self):
        if hasattr(self.inner, "invalidate_caches"):
            self.inner.invalidate_caches()


sys.meta_path[:] = [_Filtered(f) for f in sys.meta_path]
