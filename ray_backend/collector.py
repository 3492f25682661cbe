"""Startup imports without the cyclic garbage collector, and frozen after (a pool worker, and the benches' ranks that
stand in for one)."""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused(then_freeze: bool = False) -> Iterator[None]:
    """Run a worker's startup imports without the cyclic garbage collector (and with `then_freeze`, freeze what they
    left). Importing torch and ComfyUI creates ~475k tracked objects that live as long as the process; the collector
    traversed them again and again (7 full passes: torch's import 2.05 -> 1.58 CPU-s without it, ComfyUI's 3.9 ->
    3.1), paid by every worker at once on a cold start, and would again in every later full collection (0.12-0.35 s
    each, inside some sampling step, where every other rank waits for it at the next collective). Frozen, no
    collection looks at them. The ~12k objects the imports left unreachable are frozen too: a one-time leak of a few
    MB, cheaper than the full collection that would find them."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if then_freeze:
            gc.freeze()
        if was_enabled:
            gc.enable()
