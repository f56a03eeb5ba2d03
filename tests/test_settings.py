"""``Settings``: what differs when every stage runs in one process."""

from __future__ import annotations

import pytest

from cdp_stream.settings import ONE_PROCESS_RESOLVER_BATCH, Settings


def test_up_takes_smaller_resolver_batches_unless_they_are_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resolver process of its own takes batches of 8,000 events; ``cdp-stream up``
    (every stage, and two batches decoded, in one process) 2,000, unless
    ``CDP_RESOLVER_BATCH_SIZE`` says otherwise, which both then take."""
    monkeypatch.delenv("CDP_RESOLVER_BATCH_SIZE", raising=False)
    assert Settings().resolver_batch_size == 8000
    assert Settings().in_one_process().resolver_batch_size == ONE_PROCESS_RESOLVER_BATCH == 2000
    monkeypatch.setenv("CDP_RESOLVER_BATCH_SIZE", "500")
    assert Settings().resolver_batch_size == 500
    assert Settings().in_one_process().resolver_batch_size == 500
