"""Which KV pages are free and who holds the others: a free list plus a reference count per page.

A page is held by every running request whose page table contains it and by the radix prefix
cache when cached there. It returns to the free list exactly when its count drops to zero, so a
page shared through the prefix cache is never handed out twice. The tensors themselves live in
`kv_cache.KVPool`; this module never touches memory.
"""
from __future__ import annotations

from collections import deque


class NoFreePages(RuntimeError):
    """An allocation asked for more pages than are free (the caller evicts or preempts)."""


class BlockPool:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"a block pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, n: int) -> list[int]:
        """`n` fresh pages, each with reference count 1."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise NoFreePages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def incref(self, pages: list[int]) -> None:
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"incref of free page {p}")
            self._refs[p] += 1

    def decref(self, pages: list[int]) -> list[int]:
        """Drop one reference of each page; returns the pages that became free."""
        freed = []
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"decref of free page {p} (double free)")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
                freed.append(p)
        return freed

    def check_invariants(self) -> None:
        """Every page is either free with count 0 or held with count > 0 (used by tests)."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a page is on the free list twice")
        for p, r in enumerate(self._refs):
            if (p in free) != (r == 0):
                raise AssertionError(f"page {p}: ref count {r} but {'free' if p in free else 'not free'}")
