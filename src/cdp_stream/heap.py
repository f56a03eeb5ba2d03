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


_pausing = 0  # batches in hand, of every stage in the process


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection until every stage of the process is done with its batch."""
    global _pausing
    _pausing += 1
    gc.disable()
    try:
        yield
    finally:
        _pausing -= 1
        if not _pausing:
            gc.enable()
