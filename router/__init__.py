"""Public API (gRPC + OpenAI HTTP), routing policies, cluster registry, retries and aborts.
Touches no tensors. Filled by the disaggregated-cluster work (issue 9)."""
