"""The decode role over `node/`: reserve pages for a prompt's KV, wait for it, decode and stream
tokens; run whole requests when collocated (`server.py`: the `DecodeNode` servicer and its metrics)."""
