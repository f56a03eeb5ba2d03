"""The garbage collector of a long-running stage process, set once it has started.

Fewer, cheaper collections. A resolver batch decodes into hundreds of thousands of
containers, and with CPython's default thresholds a full collection ran every few hundred
records, walking every object the process holds (a fifth of the resolver's time under
py-spy). Measured with ``gc.callbacks``: activation catching up spent 12% of its CPU in
collections, 7% with these settings; the collector at 3,000 events/s 2.7%, 0.5%. Full
collections still run, so memory stays flat.

And none during a batch: its hundreds of thousands of containers live until it is done
and then go at once, by reference counting; a collection in between walks them all and
frees nothing (10 of a resolver's ~120 us of CPU an event, measured with
``gc.callbacks``). So a stage's batch is applied with collections paused
(:func:`paused`), and the first allocation after it collects what the batch left.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def settle() -> None:
    """Collect the youngest generation every 20,000 allocations instead of 700, and move
    what exists now (modules, the app or the stage, clients, SQLAlchemy's caches) out of
    every later walk: it lives as long as the process. Process-wide: in ``cdp-stream up``
    every stage shares it."""
    gc.set_threshold(20_000, 20, 20)
    gc.freeze()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection while a stage applies its batch. In a process of several
    stages (``cdp-stream up``) the first to finish its batch resumes them, whatever the
    others are doing: with batches of two stages overlapping back to back, a count of
    the batches in hand might never reach zero, and cyclic garbage would never be
    collected. So collections never wait longer than one batch."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
