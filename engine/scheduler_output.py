"""What one scheduler step hands the model runner: the chunks to compute (or fork), the requests
it preempted and the pages to copy before the forward. Plain data; `scheduler.py` fills it."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import Request


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    start: int  # first position computed this step (== request.num_computed_tokens)
    num_new_tokens: int
    sample: bool  # the chunk reaches the request's last token: sample its next one
    output_index: int = -1  # where its sampled token goes in `request.output_token_ids` (set at launch)
    fork_of: Request | None = None  # a forked choice's first draw: nothing computed, `fork_of`'s logits row


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # query length 1 first
    preempted: list[Request] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) pages to copy before the forward

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)
