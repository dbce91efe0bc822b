"""Incremental detokenization with stop strings, for streaming.

Byte-level BPE splits one character over several tokens, so text is released only when the
decode of the unreleased window no longer ends in an incomplete character (U+FFFD). Each step
decodes a bounded window (a few tokens of context before the unreleased ones), not the whole
sequence. Text that could still turn into a stop string is held back until decided.
"""
from __future__ import annotations

_CONTEXT_TOKENS = 5  # tokens decoded before the unreleased ones, so merges at the edge decode right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False):
        self.tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.include_stop = include_stop_str_in_output
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # window start (context)
        self.read_offset = len(self.ids)  # first token whose text is not yet released
        self.text = ""  # generated text decided so far (released + held)
        self.released = 0  # chars of `text` already returned
        self.stopped = False
        self.stop_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, new_ids: list[int]) -> str:
        """Add generated ids; returns the text that became final with them."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset: self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return self._release(final=False)  # an incomplete character: wait for more tokens
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.prefix_offset > 0:  # keep the window bounded
            drop = self.prefix_offset
            self.ids = self.ids[drop:]
            self.prefix_offset, self.read_offset = 0, self.read_offset - drop
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            hit = self._find_stop()
            if hit is not None:
                pos, s = hit
                self.stopped, self.stop_reason = True, s
                self.text = self.text[: pos + len(s)] if self.include_stop else self.text[:pos]
                final = True
        limit = len(self.text)
        if not final and self.stop:
            limit = max(self.released, len(self.text) - self._held_back())
        out = self.text[self.released: limit]
        self.released = limit
        return out

    def _find_stop(self) -> tuple[int, str] | None:
        start = max(0, self.released - max(len(s) for s in self.stop))
        best = None
        for s in self.stop:
            pos = self.text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        return best

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    longest = max(longest, n)
                    break
        return longest

    def flush(self) -> str:
        """At the end of the request: release everything held back."""
        if self.stopped:
            return ""
        tail = self._decode(self.ids[self.read_offset:]) if self.read_offset < len(self.ids) else ""
        if tail and not tail.endswith("\ufffd"):
            self.text += tail
            self.read_offset = len(self.ids)
        return self._release(final=True)
