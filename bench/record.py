"""Writing a benchmark's result: the Markdown table to stdout and, with an output directory,
`<stem>.md` and `<stem>.json` there (what `bench/results/` files are made from)."""
from __future__ import annotations

import json
import os


def emit(result: dict, md: str, out_dir: str | None, stem: str) -> None:
    print(md, flush=True)
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(result, f, indent=1)
