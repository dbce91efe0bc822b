"""Which KV pages are free and who holds the others: a free map plus a reference count per page.

A page is held by every running request whose page table contains it and by the radix prefix
cache when cached there. It becomes free exactly when its count drops to zero, so a page shared
through the prefix cache is never handed out twice. The tensors themselves live in
`kv_cache.KVPool`; this module never touches memory.

Allocation keeps a request's pages consecutive where it can: several pages at once take the first
run of free pages long enough for all of them, and otherwise (and for single pages, as decode
steps ask) the lowest free pages, run by run. The disaggregated KV push posts one NIXL descriptor per
run of pages consecutive on both nodes (kvtransfer/agent.py `page_runs`). A FIFO free list had
scattered a prompt's pages once decode steps had interleaved sequences' pages, so a 2,048-token
DeepSeek-V2-Lite push became 3,100-3,500 descriptors a WRITE, 40-65 ms of the sender's CPU, and posts
that blocked in NIXL for up to a second (bench/results/2026-12-07n_h100_validation.md).
"""
from __future__ import annotations

FREE, USED = 1, 0


class NoFreePages(RuntimeError):
    """An allocation asked for more pages than are free (the caller evicts or preempts)."""


class BlockPool:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"a block pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._map = bytearray([FREE]) * num_pages  # one byte per page: bytes.find locates runs in C
        self._num_free = num_pages
        self._refs = [0] * num_pages

    @property
    def num_free_pages(self) -> int:
        return self._num_free

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self._num_free

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def allocate(self, n: int) -> list[int]:
        """`n` fresh pages, each with reference count 1: one run of consecutive pages where a free
        run that long exists, else the lowest free pages."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self._num_free:
            raise NoFreePages(f"asked for {n} pages, {self._num_free} free")
        start = self._map.find(bytes([FREE]) * n) if n > 1 else -1
        if start >= 0:
            runs = [(start, n)]
        else:
            runs, at, left = [], 0, n
            while left:
                at = self._map.find(FREE, at)
                end = self._map.find(USED, at)
                take = min(left, (self.num_pages if end < 0 else end) - at)
                runs.append((at, take))
                at, left = at + take, left - take
        pages = []
        for first, length in runs:
            self._map[first:first + length] = bytes(length)  # USED
            pages.extend(range(first, first + length))
        for p in pages:
            self._refs[p] = 1
        self._num_free -= n
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
                self._map[p] = FREE
                freed.append(p)
        self._num_free += len(freed)
        return freed

    def check_invariants(self) -> None:
        """Every page is either free with count 0 or held with count > 0 (used by tests)."""
        if self._map.count(FREE) != self._num_free:
            raise AssertionError(f"{self._map.count(FREE)} pages marked free, {self._num_free} counted")
        for p, r in enumerate(self._refs):
            if (self._map[p] == FREE) != (r == 0):
                raise AssertionError(f"page {p}: ref count {r} but {'free' if self._map[p] == FREE else 'not free'}")
