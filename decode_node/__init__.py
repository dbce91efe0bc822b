"""gRPC server running an engine in the decode role; receives KV and streams tokens.
Filled by the disaggregated-cluster work (issue 9)."""
