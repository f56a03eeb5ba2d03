"""``heap.settle``: the collector's thresholds raised and what exists frozen out of its walks."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from cdp_stream import heap


@pytest.fixture
def restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored")
def test_settle_raises_the_thresholds_and_freezes_what_exists() -> None:
    gc.unfreeze()
    made_before = [[]]  # a container the collector tracks
    assert any(o is made_before for o in gc.get_objects())
    heap.settle()
    assert gc.get_threshold() == (20_000, 20, 20)
    assert gc.get_freeze_count() > 0
    assert not any(o is made_before for o in gc.get_objects())  # no collection walks it
