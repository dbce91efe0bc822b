"""The scheduler's named operations on KV pages: allocate (evicting unreferenced prefix-cache
pages first), reuse a cached prefix, grow a request's page table with copy on write of pages
other choices still hold, and give pages back (into the prefix cache, or plainly freed).

It owns the block pool, the radix prefix cache and the copies of the step being scheduled. It
decides nothing about which request runs or is preempted (`scheduler.py` does) and never touches
KV memory: the copies it records are done on the device before the step's forward.
"""
from __future__ import annotations

from engine.block_pool import BlockPool, NoFreePages
from engine.radix_cache import RadixCache
from engine.request import Request


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_cache: bool):
        self.page_size = page_size
        self.block_pool = BlockPool(num_pages)
        self.radix = RadixCache(self.block_pool, page_size) if enable_prefix_cache else None
        self._copies: list[tuple[int, int]] = []  # copy-on-write pages of the step being scheduled

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int] | None:
        """`n` fresh pages, evicting from the prefix cache if short; None if they cannot be had."""
        if n <= 0:
            return []
        short = n - self.block_pool.num_free_pages
        if short > 0 and self.radix is not None:
            self.radix.evict(short)
        try:
            return self.block_pool.allocate(n)
        except NoFreePages:
            return None

    def match_prefix(self, req: Request) -> None:
        """Start `req` from its longest cached prefix, but always compute at least its last token
        (its logits)."""
        req.page_ids = self.radix.match(req.all_token_ids, max_tokens=req.num_tokens - 1)
        req.num_computed_tokens = len(req.page_ids) * self.page_size
        req.num_cached_tokens = req.num_computed_tokens

    def grow(self, req: Request, num_tokens: int) -> bool:
        """Make `req.page_ids` cover `num_tokens` tokens. A page it is about to write that another
        request still holds (a forked prompt's last, partly filled page) is replaced by a copy."""
        need = self.pages_for(num_tokens)
        pool = self.block_pool
        shared = [i for i in range(req.num_computed_tokens // self.page_size, min(need, len(req.page_ids)))
                  if pool.ref_count(req.page_ids[i]) > 1]
        pages = self.allocate(len(shared) + max(0, need - len(req.page_ids)))
        if pages is None:
            return False
        for i in shared:
            dst = pages.pop()
            self._copies.append((req.page_ids[i], dst))
            pool.decref([req.page_ids[i]])  # still held by the others
            req.page_ids[i] = dst
        req.page_ids.extend(pages)
        return True

    def take_copies(self) -> list[tuple[int, int]]:
        """The step's (src, dst) copies, once each; a dst reused within the step keeps its last copy."""
        copies = list({dst: (src, dst) for src, dst in self._copies}.values())
        self._copies = []
        return copies

    def cache(self, req: Request) -> None:
        """Share `req`'s computed full pages with the prefix cache (it keeps holding them)."""
        if self.radix is not None:
            self.radix.insert(req.all_token_ids, req.page_ids, req.num_computed_tokens)

    def release(self, req: Request) -> None:
        """Give back a request's pages; its computed full pages go to the prefix cache first."""
        if not req.page_ids:
            return
        self.cache(req)
        self.free(req)

    def free(self, req: Request) -> None:
        """Drop `req`'s hold on its pages without caching them (their KV may be incomplete)."""
        self.block_pool.decref(req.page_ids)
        req.page_ids = []
