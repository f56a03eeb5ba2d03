"""Who should be in which audience (:mod:`cdp_stream.activation.audiences.matching`):
pure, no database."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from cdp_stream.activation.audiences.matching import (
    Audience,
    audiences_of_rows,
    diff,
    wanted,
)
from cdp_stream.activation.audiences.rules import EventView, parse_rule

NOW = datetime(2024, 6, 1, 12, tzinfo=UTC)


def test_wanted_pairs_each_canonical_profile_with_the_rules_it_meets() -> None:
    pro = Audience(uuid.uuid4(), parse_rule({"trait": "plan", "eq": "pro"}))
    visitors = Audience(uuid.uuid4(), parse_rule({"event": {"type": "page", "within": "1d"}}))
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    profiles = {
        a: {"traits": {"plan": "pro"}, "computed": {}},
        b: {"traits": {"plan": "free"}, "computed": {}},
        c: {"traits": {}, "computed": {}},
    }
    recent = EventView(type="page", event=None, timestamp=NOW - timedelta(hours=1), payload={})
    old = EventView(type="page", event=None, timestamp=NOW - timedelta(days=2), payload={})
    timeline = {b: [recent], c: [old]}
    assert wanted([pro, visitors], profiles, timeline, NOW) == {(pro.id, a), (visitors.id, b)}
    assert wanted([], profiles, timeline, NOW) == set()


def test_diff_says_who_enters_and_who_exits_in_order() -> None:
    aid = uuid.uuid4()
    p1, p2, p3 = sorted(uuid.uuid4() for _ in range(3))
    entering, leaving = diff({(aid, p3), (aid, p1), (aid, p2)}, {(aid, p2), (aid, p1)} | set())
    assert (entering, leaving) == ([(aid, p3)], [])
    entering, leaving = diff({(aid, p2)}, {(aid, p3), (aid, p1), (aid, p2)})
    assert (entering, leaving) == ([], [(aid, p1), (aid, p3)])


def test_a_stored_rule_that_no_longer_parses_is_skipped_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good, bad = uuid.uuid4(), uuid.uuid4()
    with caplog.at_level(logging.ERROR):
        found = audiences_of_rows([(good, {"trait": "plan", "eq": "pro"}), (bad, {"nope": 1})])
    assert [a.id for a in found] == [good]
    assert str(bad) in caplog.text
