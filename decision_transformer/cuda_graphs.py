"""What the two CUDA-graph paths share (``evaluation.GraphedActions``, ``training.trainer.StepGraph``): a guard that
refuses host synchronisation during a warm-up, and a capture that raises the first error of a failed one."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def no_host_sync():
    """Code in this block that waits for the GPU (``.item()``, ``.cpu()``, ``nonzero``, boolean masks ...) raises.
    Such code cannot be captured, and a capture that fails on it can leave torch's CUDA generator marked as capturing
    (torch before 2.13), after which dropout outside any graph fails: running the captured code once under this guard
    first turns it into a plain error, before any capture begins."""
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def capture(graph, fn, **capture_kw):
    """``fn()`` captured into ``graph`` (on the current stream, which must be a side stream); returns its result.
    Where the capture fails, the error raised is ``fn``'s own, not the one ``capture_end`` raises after it."""
    graph.capture_begin(**capture_kw)
    try:
        out = fn()
    except BaseException:
        with contextlib.suppress(Exception):
            graph.capture_end()
        raise
    graph.capture_end()
    return out
