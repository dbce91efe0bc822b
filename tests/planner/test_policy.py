"""The router's policies as one pure function (`router.policy.pick_node`), as the registry and
the simulator both call it."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from router.policy import PrefixIndex, pick_node


@dataclass(eq=False)
class _Node:
    load: int = 0
    served: int = 0
    prefixes: PrefixIndex = field(default_factory=PrefixIndex)


def test_least_load_then_fewest_served():
    a, b, c = _Node(2, 0), _Node(1, 5), _Node(1, 3)
    assert pick_node([a, b, c], "least_load", itertools.count()) is c


def test_round_robin_cycles():
    nodes = [_Node(), _Node(), _Node()]
    rr = itertools.count()
    assert [pick_node(nodes, "round_robin", rr) for _ in range(4)] == nodes + nodes[:1]


def test_prefix_aware_prefers_the_node_holding_the_prefix_unless_much_busier():
    ids = list(range(64))
    a, b = _Node(load=3), _Node(load=0)
    a.prefixes.insert(ids)
    assert pick_node([a, b], "prefix_aware", itertools.count(), ids) is a
    a.load = 10  # more than 4 above the least loaded: the prefix is not worth the queue
    assert pick_node([a, b], "prefix_aware", itertools.count(), ids + [1]) is b
    assert b.prefixes.match_tokens(ids) == 64  # the chosen node now records the prompt
