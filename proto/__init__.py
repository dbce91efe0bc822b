"""The .proto files (public Generate API, internal node APIs, KV handshake) and their generated
stubs. No logic. Filled by the disaggregated-cluster work (issue 9)."""
