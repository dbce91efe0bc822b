"""The prefill role over `node/`: run prompts, sample the first token, push the prompt's KV into
the decode node's reserved pages (`server.py`: the `PrefillNode` servicer and its metrics)."""
