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


def test_no_collection_runs_while_a_stage_applies_its_batch() -> None:
    assert gc.isenabled()
    with heap.paused():  # the resolver's batch
        assert not gc.isenabled()
    assert gc.isenabled()


def test_the_first_stage_done_with_its_batch_resumes_collections() -> None:
    with heap.paused():  # the resolver's batch
        with heap.paused():  # activation's, in the same process (``cdp-stream up``)
            assert not gc.isenabled()
        # activation is done: whatever the resolver does, collections wait no longer
        assert gc.isenabled()
    assert gc.isenabled()


def test_collections_resume_when_a_batch_fails() -> None:
    with pytest.raises(RuntimeError), heap.paused():
        raise RuntimeError("the batch's transaction failed")
    assert gc.isenabled()


def test_cycles_made_during_a_batch_are_collected_by_the_first_allocation_after_it() -> None:
    class Node:
        other: object = None

    with heap.paused():
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: reference counting alone never frees it
        del a, b
        assert any(isinstance(o, Node) for o in gc.get_objects())
        made = [[] for _ in range(5 * gc.get_threshold()[0])]  # no collection: paused
        assert any(isinstance(o, Node) for o in gc.get_objects())
    made += [[]]  # the first allocation after the batch collects
    assert not any(isinstance(o, Node) for o in gc.get_objects())
