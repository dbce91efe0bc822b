"""Radix prefix cache over page-aligned token prefixes.

Each edge of the tree is one full page of tokens (`page_size` ids) and each node owns the KV
page holding them, so a path from the root spells a cached prefix and lists its pages in order.
The tree holds one reference on each of its pages (in the block pool); a request that reuses a
prefix takes its own reference. A page whose only reference is the tree is *evictable*; eviction
takes least-recently-used leaves first and never frees a page that a request still holds.
Only whole pages are cached: a page is shared only once every one of its slots is written.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from engine.block_pool import BlockPool


@dataclass(eq=False)
class _Node:
    key: tuple[int, ...]
    page: int
    parent: "_Node | None"
    children: dict[tuple[int, ...], "_Node"] = field(default_factory=dict)
    last_access: int = 0


class RadixCache:
    def __init__(self, block_pool: BlockPool, page_size: int):
        self.pool = block_pool
        self.page_size = page_size
        self.root = _Node(key=(), page=-1, parent=None)
        self._clock = itertools.count(1)
        self._num_nodes = 0
        # Childless nodes: eviction looks only at these (and their parents as they empty), never the
        # whole tree — a full pool of cached pages made every allocation scan every page.
        self._leaves: set[_Node] = set()
        self.num_queries_tokens = 0  # prompt tokens looked up
        self.num_hit_tokens = 0  # of which found cached

    @property
    def num_cached_pages(self) -> int:
        return self._num_nodes

    def _keys(self, token_ids: list[int], num_pages: int):
        ps = self.page_size
        for i in range(num_pages):
            yield tuple(token_ids[i * ps: (i + 1) * ps])

    def match(self, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
        """Pages of the longest cached page-aligned prefix of `token_ids` (at most `max_tokens`
        tokens). The caller gets a reference on each returned page and must `decref` it later."""
        limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
        node, pages, now = self.root, [], next(self._clock)
        for key in self._keys(token_ids, limit // self.page_size):
            child = node.children.get(key)
            if child is None:
                break
            child.last_access = now
            pages.append(child.page)
            node = child
        self.num_queries_tokens += limit
        self.num_hit_tokens += len(pages) * self.page_size
        self.pool.incref(pages)
        return pages

    def insert(self, token_ids: list[int], pages: list[int], num_computed_tokens: int) -> None:
        """Cache the full pages of a request (`pages[i]` holds tokens `i*ps..`) whose KV is written.
        The request keeps its own references; pages already cached under another page id stay
        the request's alone and are freed when it lets go of them."""
        num_full = min(num_computed_tokens // self.page_size, len(pages), len(token_ids) // self.page_size)
        node, now = self.root, next(self._clock)
        for i, key in enumerate(self._keys(token_ids, num_full)):
            child = node.children.get(key)
            if child is None:
                child = _Node(key=key, page=pages[i], parent=node)
                node.children[key] = child
                self._leaves.discard(node)
                self._leaves.add(child)
                self.pool.incref([pages[i]])
                self._num_nodes += 1
            child.last_access = now
            node = child

    def _evictable(self, node: _Node) -> bool:
        return node is not self.root and not node.children and self.pool.ref_count(node.page) == 1

    def num_evictable_pages(self) -> int:
        """Pages only the tree holds (all of them can be evicted, leaves first)."""
        return sum(1 for n in self._iter_nodes() if self.pool.ref_count(n.page) == 1)

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` tree-only pages, least recently used leaves first."""
        heap = [(n.last_access, id(n), n) for n in self._leaves if self._evictable(n)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            _, _, node = heapq.heappop(heap)
            if not self._evictable(node):
                continue
            parent = node.parent
            del parent.children[node.key]
            self._leaves.discard(node)
            if parent is not self.root and not parent.children:
                self._leaves.add(parent)
            self._num_nodes -= 1
            freed += len(self.pool.decref([node.page]))
            if self._evictable(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def check_invariants(self) -> None:
        """The leaf set is exactly the childless nodes (used by tests)."""
        childless = {n for n in self._iter_nodes() if not n.children}
        assert self._leaves == childless, (len(self._leaves), len(childless))

    def clear(self) -> int:
        """Drop every tree-only page (e.g. on a weights update). Returns pages freed."""
        return self.evict(self._num_nodes)

    def _iter_nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())
