"""gRPC server running an engine in the prefill role; pushes KV through `kvtransfer`.
Filled by the disaggregated-cluster work (issue 9)."""
