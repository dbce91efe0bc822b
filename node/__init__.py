"""The node runtime both roles share: a gRPC server over an engine process, engine stats,
the HTTP metrics/health endpoint and the Redis registry heartbeat. `prefill_node/` and
`decode_node/` add their role's servicer on top; nothing here launches processes."""
