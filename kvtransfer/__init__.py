"""Moving KV pages between nodes (NIXL agents, registration, descriptor lists, handshake,
completion notices, timeouts). Knows the KV layout description (engine.config.KVCacheSpec.describe)
and nothing else of the model. Filled by the disaggregated-cluster work (issue 9)."""
