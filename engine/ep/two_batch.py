"""Two-batch overlap across whole layers (SGLang's TBO, vLLM's DBO): an EP step split into two
micro-batches that run the whole model interleaved, so one micro-batch's dispatch/combine is in
flight while the other computes attention or experts.

How. Each micro-batch runs the ordinary model forward in its own host thread, but only one
thread runs at a time: a `Baton` passes control to the other thread right after each collective
is started (`run_pipelined`'s `after_start`). One MoE layer then issues, on every rank,

    A: attention, start dispatch(A) | B: attention, start dispatch(B) | A: experts, start combine(A)
    | B: experts, start combine(B) | A: finish combine(A), next attention ... | B: ...

so dispatch(A) overlaps B's attention, dispatch(B) and combine(A) overlap the expert GEMMs, and
combine(B) overlaps A's next attention (on CUDA the collectives run on NCCL's stream, the compute
on the step's stream; on gloo in its worker thread). The collective order (dA dB cA cB per layer)
is fixed by the baton, not by thread timing, and is the same on every rank because every rank
runs two micro-batches in every MoE layer of a two-batch step: an empty micro-batch (or an idle
rank) joins each layer's collectives with no tokens (`FusedMoE.idle_forward`).

Splitting. Chunks are split at half the step's tokens; a chunk straddling the middle becomes two
chunks of the same request (the first without sampling), exactly as two consecutive chunked
prefill steps: the second part's attention reads the first part's KV, which micro-batch A wrote
in the same layer before B's attention runs (same stream, program order). Sampled rows keep their
order (A's then B's).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import replace

import torch


def split_chunks(chunks: list) -> tuple[list, list]:
    """The step's chunks as two micro-batches of ceil(T/2) and floor(T/2) tokens, in order."""
    total = sum(c.num_new_tokens for c in chunks)
    half = total - total // 2
    first, second, seen = [], [], 0
    for c in chunks:
        n = c.num_new_tokens
        if seen >= half:
            second.append(c)
        elif seen + n <= half:
            first.append(c)
        else:
            head = half - seen
            first.append(replace(c, num_new_tokens=head, sample=False))
            second.append(replace(c, start=c.start + head, num_new_tokens=n - head))
        seen += n
    return first, second


class Baton:
    """Runs two callables in two threads, one at a time, handing over at `switch()`."""

    def __init__(self):
        self._cv = threading.Condition()
        self._turn = 0
        self._done = [False, False]
        self._me = threading.local()

    def switch(self) -> None:
        """From the running micro-batch: let the other one run until it switches back (no-op once
        the other has finished)."""
        me = self._me.index
        with self._cv:
            if self._done[1 - me]:
                return
            self._turn = 1 - me
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._turn == me)

    def run(self, first, second) -> tuple:
        results: list = [None, None]
        errors: list[BaseException] = []
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        stream = torch.cuda.current_stream() if device is not None else None
        inference = torch.is_inference_mode_enabled()

        def body(i: int, fn) -> None:
            self._me.index = i
            with self._cv:
                self._cv.wait_for(lambda: self._turn == i)
            try:
                if device is not None:  # the CUDA device and stream are per thread
                    torch.cuda.set_device(device)
                with torch.inference_mode(inference), (torch.cuda.stream(stream) if stream is not None
                                                       else contextlib.nullcontext()):
                    results[i] = fn()
            except BaseException as exc:  # re-raised by the caller
                errors.append(exc)
            finally:
                with self._cv:
                    self._done[i] = True
                    self._turn = 1 - i
                    self._cv.notify_all()

        helper = threading.Thread(target=body, args=(1, second), name="two-batch-B", daemon=True)
        helper.start()
        body(0, first)
        helper.join()
        if errors:
            raise errors[0]
        return results[0], results[1]

