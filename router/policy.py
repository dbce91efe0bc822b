"""The routing policies as pure functions over plain node objects: which prefill (or decode) node
a request goes to. The router's registries call `pick_node` on their live nodes; the cluster
simulator (`planner/`) calls the same function on simulated nodes, so a simulated cluster routes
exactly as the real one does. Nothing here does I/O or touches gRPC.

A node is anything with `load` (requests in flight plus running), `served` (requests routed to it
so far) and `prefixes` (a `PrefixIndex`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

POLICIES = ("round_robin", "least_load", "prefix_aware")
PREFIX_BLOCK = 16


class NoNodeAvailable(RuntimeError):
    pass


def prefix_hashes(ids: list[int]):
    """Chained hashes of `ids`' 16-token-aligned prefixes (ints: stable across processes, so
    several routers agree on them)."""
    h = 0
    for k in range(len(ids) // PREFIX_BLOCK):
        h = hash((h, tuple(ids[k * PREFIX_BLOCK:(k + 1) * PREFIX_BLOCK])))
        yield h


class PrefixIndex:
    """Approximate record of the prompt prefixes a node has seen (hashes of 16-token-aligned
    prefixes, LRU-bounded): the router's guess at what the node's radix cache holds."""

    BLOCK = PREFIX_BLOCK

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._seen: OrderedDict[int, None] = OrderedDict()

    def match_tokens(self, ids: list[int]) -> int:
        n = 0
        for h in prefix_hashes(ids):
            if h not in self._seen:
                break
            n += self.BLOCK
        return n

    def insert(self, ids: list[int]) -> None:
        for h in prefix_hashes(ids):
            self._seen[h] = None
            self._seen.move_to_end(h)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)


def pick_node(nodes: list, policy: str, round_robin: Iterator[int], prompt_ids: list[int] | None = None,
              remote: dict | None = None):
    """One of `nodes` (non-empty, all eligible) for a request. `round_robin` is the caller's counter
    for this role; `remote` maps nodes to prefix tokens other routers sent there."""
    if policy == "round_robin":
        return nodes[next(round_robin) % len(nodes)]
    if policy == "prefix_aware" and prompt_ids:  # prefill nodes (or decode nodes when collocated)
        # The node that most likely caches the longest prefix of this prompt, unless it is
        # clearly busier than the least-loaded node; ties go to the least loaded.
        remote = remote or {}

        def match(n) -> int:
            return max(n.prefixes.match_tokens(prompt_ids), remote.get(n, 0))
        least = min(nodes, key=lambda n: (n.load, n.served))
        best = max(nodes, key=lambda n: (match(n), -n.load, -n.served))
        chosen = best if match(best) and best.load <= least.load + 4 else least
        chosen.prefixes.insert(prompt_ids)
        return chosen
    return min(nodes, key=lambda n: (n.load, n.served))
