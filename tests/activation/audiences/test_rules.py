"""The audience rule language: validation messages, each operator, windows, pure."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdp_stream.activation.audiences.rules import (
    EventView,
    Rule,
    RuleError,
    dump_rule,
    evaluate,
    event_specs,
    longest_window,
    matches,
    parse_rule,
    time_may_admit,
)

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
PRICING = {
    "and": [
        {
            "event": {
                "type": "page",
                "where": {"path": {"starts_with": "/pricing"}},
                "within": "7d",
            }
        },
        {"computed": "order_count", "eq": 0},
    ]
}


def problems(rule: Any) -> list[tuple[str, str]]:
    with pytest.raises(RuleError) as caught:
        parse_rule(rule)
    return [(p.path, p.message) for p in caught.value.problems]


def page(ago: timedelta, path: str = "/pricing", **fields: Any) -> EventView:
    payload = {"type": "page", "properties": {"path": path}, **fields}
    return EventView(type="page", event=fields.get("name"), timestamp=NOW - ago, payload=payload)


def track(name: str, ago: timedelta, **properties: Any) -> EventView:
    payload = {"type": "track", "event": name, "properties": properties}
    return EventView(type="track", event=name, timestamp=NOW - ago, payload=payload)


def holds(rule: dict[str, Any], profile: dict[str, Any] | None = None, *events: EventView) -> bool:
    return evaluate(parse_rule(rule), profile or {}, list(events), NOW)


def trait(value: Any, **ops: Any) -> bool:
    """Does a profile whose trait ``x`` is ``value`` (absent: MISSING) satisfy ``ops``?"""
    traits = {} if value is MISSING_ else {"x": value}
    return holds({"trait": "x", **ops}, {"traits": traits})


MISSING_ = object()
DAY, HOUR = timedelta(days=1), timedelta(hours=1)


# --- validation -------------------------------------------------------------------------


def test_unknown_operator_is_named_with_its_path() -> None:
    assert problems({"and": [{"trait": "plan", "eq": "pro"}, {"trait": "plan", "equals": 1}]}) == [
        (
            "$.and[1]",
            "unknown operator 'equals'; expected one of: eq, ne, gt, gte, lt, lte, exists, in, "
            "starts_with",
        )
    ]
    where = {"event": {"type": "page", "within": "1d", "where": {"path": {"startswith": "/"}}}}
    assert problems(where)[0][0] == "$.event.where.path"
    assert "unknown operator 'startswith'" in problems(where)[0][1]


@pytest.mark.parametrize("within", ["7 days", "7", "d", "-1d", "1.5h", "7D", 7, "0s", "4000d"])
def test_bad_duration(within: Any) -> None:
    [(path, message)] = problems({"event": {"type": "track", "within": within}})
    assert path == "$.event.within"
    assert "duration" in message or "longer than 0" in message


def test_bad_duration_message() -> None:
    assert problems({"event": {"type": "track", "within": "7 days"}}) == [
        (
            "$.event.within",
            "'7 days' is not a duration: use a whole number and s, m, h or d, like '7d'",
        )
    ]


def test_empty_and_or() -> None:
    assert problems({"and": []}) == [("$.and", "'and' needs at least one rule")]
    assert problems({"not": {"or": []}}) == [("$.not.or", "'or' needs at least one rule")]


def test_every_problem_is_listed_with_its_path() -> None:
    found = problems(
        {
            "or": [
                {"nope": 1},
                {"trait": "a", "computed": "order_count", "eq": 1},
                {"computed": "order_cnt", "eq": 0},
                {"not": {"and": [{"trait": "plan"}]}},
                {"event": {"type": "click", "within": "1d", "count": {}}},
                {"event": {"type": "page", "colour": "red", "within": "1d"}},
                {"event": {"type": "page"}},
                {"trait": "x", "eq": None},
                {"trait": "x", "gt": True, "exists": "yes", "in": []},
                {"event": {"type": "track", "within": "1d", "count": {"gte": -1}}},
            ]
        }
    )
    node = (
        "a rule is a JSON object with exactly one of the keys and, or, not, trait, computed, event"
    )
    unknown_computed, unknown_type, unknown_key = found[2][1], found[4][1], found[6][1]
    assert unknown_computed.startswith("unknown computed trait 'order_cnt'; known: event_count")
    assert unknown_type.startswith("unknown event type 'click'; expected one of: identify")
    assert unknown_key.startswith("unknown key in event 'colour'; expected one of: type, name")
    assert found == [
        ("$.or[0]", node),
        ("$.or[1]", node),
        ("$.or[2].computed", unknown_computed),
        (
            "$.or[3].not.and[0]",
            "a condition needs an operator: one of eq, ne, gt, gte, lt, lte, exists, in, "
            "starts_with",
        ),
        ("$.or[4].event.type", unknown_type),
        ("$.or[4].event.count", "count needs an operator: one of eq, ne, gt, gte, lt, lte"),
        ("$.or[5].event", unknown_key),
        ("$.or[6].event.within", "Field required"),
        (
            "$.or[7]",
            "operator 'eq' needs a value, not null (for a missing value: exists: false)",
        ),
        ("$.or[8].gt", "must be a number or a string"),
        ("$.or[8].exists", "Input should be a valid boolean"),
        ("$.or[8].in", "List should have at least 1 item after validation, not 0"),
        ("$.or[9].event.count.gte", "must be a whole number, 0 or more"),
    ]


@pytest.mark.parametrize("rule", [None, [], "plan", 1, {}])
def test_not_an_object(rule: Any) -> None:
    assert [path for path, _ in problems(rule)] == ["$"]


def test_rule_error_text_lists_everything() -> None:
    with pytest.raises(RuleError, match=r"\$\.and\[0\]: unknown operator .*; \$\.and\[1\]"):
        parse_rule({"and": [{"trait": "a", "is": 1}, {"trait": "b", "was": 2}]})


def test_dump_spells_out_defaults_and_parses_back() -> None:
    rule = parse_rule(PRICING)
    dumped = dump_rule(rule)
    assert dumped["and"][0]["event"] == {
        "type": "page",
        "where": {"path": {"starts_with": "/pricing"}},
        "within": "7d",
        "count": {"gte": 1},
    }
    assert dumped["and"][1] == {"computed": "order_count", "eq": 0}
    assert parse_rule(dumped) == rule


# --- operators --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ops", "expected"),
    [
        ("pro", {"eq": "pro"}, True),
        ("free", {"eq": "pro"}, False),
        (MISSING_, {"eq": "pro"}, False),
        (1, {"eq": 1.0}, True),
        (True, {"eq": 1}, False),  # booleans never equal numbers
        (1, {"eq": True}, False),
        (True, {"eq": True}, True),
        ("1", {"eq": 1}, False),
        ("free", {"ne": "pro"}, True),
        ("pro", {"ne": "pro"}, False),
        (MISSING_, {"ne": "pro"}, True),  # someone without a plan is not on pro
        (None, {"ne": "pro"}, True),
        (5, {"gt": 4}, True),
        (4, {"gt": 4}, False),
        (4, {"gte": 4}, True),
        (3.5, {"lt": 4}, True),
        (4, {"lt": 4}, False),
        (4, {"lte": 4}, True),
        ("b", {"gt": "a"}, True),
        ("2024-02-01T00:00:00.000000Z", {"gte": "2024-01-31T00:00:00.000000Z"}, True),
        ("5", {"gt": 4}, False),  # a string is never compared with a number
        (5, {"lt": "9"}, False),
        (True, {"gt": 0}, False),
        (MISSING_, {"lt": 10}, False),
        ([1], {"gt": 0}, False),
        ("x", {"exists": True}, True),
        (0, {"exists": True}, True),
        (False, {"exists": True}, True),
        (None, {"exists": True}, False),
        (MISSING_, {"exists": True}, False),
        (MISSING_, {"exists": False}, True),
        ("x", {"exists": False}, False),
        ("pro", {"in": ["free", "pro"]}, True),
        ("team", {"in": ["free", "pro"]}, False),
        (1, {"in": [True]}, False),
        (MISSING_, {"in": ["free"]}, False),
        ("/pricing/teams", {"starts_with": "/pricing"}, True),
        ("/blog/pricing", {"starts_with": "/pricing"}, False),
        (7, {"starts_with": "7"}, False),
        (MISSING_, {"starts_with": ""}, False),
        (5, {"gte": 1, "lt": 10}, True),  # several operators: all must hold
        (10, {"gte": 1, "lt": 10}, False),
    ],
)
def test_operator(value: Any, ops: dict[str, Any], expected: bool) -> None:
    assert trait(value, **ops) is expected


def test_dotted_names_walk_nested_objects_unless_a_key_has_that_name() -> None:
    profile = {"traits": {"address": {"city": "Oslo"}, "a.b": 1}}
    assert holds({"trait": "address.city", "eq": "Oslo"}, profile)
    assert holds({"trait": "a.b", "eq": 1}, profile)
    assert not holds({"trait": "address.zip", "exists": True}, profile)
    computed = {"computed": {"first_touch": {"source": "google"}, "orders": {"EUR": {"count": 2}}}}
    assert holds({"computed": "first_touch.source", "eq": "google"}, computed)
    assert holds({"computed": "orders.EUR.count", "gte": 2}, computed)


def test_computed_counters_read_as_zero_until_counted() -> None:
    assert holds({"computed": "order_count", "eq": 0}, {"computed": {}})
    assert holds({"computed": "page_views", "lt": 1}, {})
    assert not holds({"computed": "order_count", "eq": 0}, {"computed": {"order_count": 1}})
    assert not holds({"computed": "total_revenue", "exists": True}, {"computed": {}})


def test_and_or_not() -> None:
    yes, no = {"trait": "x", "exists": False}, {"trait": "x", "exists": True}
    assert holds({"and": [yes, yes]}) and not holds({"and": [yes, no]})
    assert holds({"or": [no, yes]}) and not holds({"or": [no, no]})
    assert holds({"not": no}) and not holds({"not": yes})


# --- events and windows ------------------------------------------------------------------


def test_pricing_visitors_who_never_ordered() -> None:
    visit = page(2 * DAY, "/pricing/teams")
    assert holds(PRICING, {"computed": {"page_views": 1}}, visit)
    assert not holds(PRICING, {"computed": {"order_count": 1}}, visit)
    assert not holds(PRICING, {}, page(8 * DAY))  # outside the window
    assert not holds(PRICING, {}, page(HOUR, "/blog"))
    assert not holds(PRICING, {}, track("Order Completed", HOUR, path="/pricing"))
    assert not holds(PRICING, {})


def test_where_looks_in_properties_then_context_page_and_follows_dotted_paths() -> None:
    rule = {"event": {"type": "page", "within": "1d", "where": {"path": {"eq": "/a"}}}}
    from_context = EventView(
        type="page",
        event=None,
        timestamp=NOW - HOUR,
        payload={"properties": {}, "context": {"page": {"path": "/a"}}},
    )
    assert holds(rule, {}, from_context)
    assert not holds(rule, {}, page(HOUR, "/b", context={"page": {"path": "/a"}}))
    dotted = {
        "event": {
            "type": "page",
            "within": "1d",
            "where": {"context.campaign.source": {"eq": "google"}},
        }
    }
    assert holds(dotted, {}, page(HOUR, context={"campaign": {"source": "google"}}))
    assert not holds(dotted, {}, page(HOUR))


def test_event_name_is_compared_trimmed_and_case_insensitively() -> None:
    rule = {"event": {"type": "track", "name": "Order Completed", "within": "30d"}}
    assert holds(rule, {}, track(" order completed ", DAY))
    assert not holds(rule, {}, track("Order Refunded", DAY))
    named_page = {"event": {"type": "page", "name": "Pricing", "within": "1h"}}
    assert holds(named_page, {}, page(timedelta(minutes=5), name="Pricing"))


def test_counts() -> None:
    def rule(**count: int) -> dict[str, Any]:
        return {"event": {"type": "track", "name": "Email Opened", "within": "7d", "count": count}}

    opens = [track("Email Opened", d * DAY) for d in (1, 2, 3)] + [track("Email Opened", 9 * DAY)]
    assert holds(rule(gte=3), {}, *opens)
    assert not holds(rule(gt=3), {}, *opens)
    assert holds(rule(eq=3), {}, *opens)
    assert holds(rule(ne=4), {}, *opens)
    assert holds(rule(lt=4), {}, *opens)
    assert not holds(rule(lte=2), {}, *opens)
    assert holds(rule(eq=0), {})  # "did not open an email in the last week"
    assert holds(rule(gte=1, lte=3), {}, *opens)


def test_window_is_open_at_its_start() -> None:
    rule = {"event": {"type": "page", "within": "1h"}}
    assert holds(rule, {}, page(HOUR - timedelta(microseconds=1)))
    assert not holds(rule, {}, page(HOUR))
    for unit, length in (("s", timedelta(seconds=1)), ("m", timedelta(minutes=1)), ("d", DAY)):
        assert longest_window(parse_rule({"event": {"type": "page", "within": f"3{unit}"}})) == (
            3 * length
        )


def test_longest_window() -> None:
    assert longest_window(parse_rule(PRICING)) == 7 * DAY
    assert longest_window(parse_rule({"trait": "x", "exists": True})) is None
    nested = {
        "or": [
            {"event": {"type": "page", "within": "2h"}},
            {"not": {"event": {"type": "track", "within": "3d"}}},
        ]
    }
    assert longest_window(parse_rule(nested)) == 3 * DAY


def test_next_expiry_is_when_the_newest_counted_event_leaves() -> None:
    rule = parse_rule(PRICING)
    events = [page(2 * DAY), page(5 * DAY), page(HOUR, "/blog"), page(9 * DAY)]
    assert next_expiry(rule, events, NOW) == NOW + 2 * DAY  # the 5-day-old one leaves first
    assert next_expiry(rule, events, NOW + 2 * DAY) == NOW + 5 * DAY
    assert next_expiry(rule, events, NOW + 5 * DAY) is None
    assert next_expiry(parse_rule({"trait": "x", "exists": True}), events, NOW) is None


def test_time_may_admit_only_rules_that_fewer_events_can_make_true() -> None:
    visited = {"event": {"type": "page", "within": "7d"}}
    assert not time_may_admit(parse_rule(PRICING))
    assert not time_may_admit(parse_rule({"trait": "x", "exists": True}))
    assert time_may_admit(parse_rule({"not": visited}))
    assert not time_may_admit(parse_rule({"not": {"not": visited}}))
    few = {"event": {"type": "page", "within": "7d", "count": {"lt": 3}}}
    assert time_may_admit(parse_rule({"and": [few, visited]}))


# --- properties -------------------------------------------------------------------------

scalars = st.one_of(
    st.text(max_size=5), st.integers(-5, 5), st.floats(allow_nan=False), st.booleans()
)


@given(scalars, scalars)
def test_eq_and_ne_are_complements(actual: Any, expected: Any) -> None:
    assert trait(actual, eq=expected) is not trait(actual, ne=expected)
    assert trait(actual, eq=expected) is trait(actual, **{"in": [expected]})


@given(scalars, scalars)
def test_not_inverts(actual: Any, expected: Any) -> None:
    profile = {"traits": {"x": actual}}
    for op in ("eq", "gt", "lte", "starts_with"):
        if op == "starts_with" and not isinstance(expected, str):
            continue
        if op in ("gt", "lte") and isinstance(expected, bool):
            continue
        condition = {"trait": "x", op: expected}
        assert holds({"not": condition}, profile) is not holds(condition, profile)


ages = st.lists(st.integers(0, 20 * 24), max_size=8).map(
    lambda hours: [page(h * HOUR, "/pricing" if h % 3 else "/blog") for h in hours]
)
count_ops = st.dictionaries(
    st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte"]), st.integers(0, 4), min_size=1
)


def next_expiry(rule: Rule, events: Sequence[EventView], now: datetime) -> datetime | None:
    """When time alone may next change the rule's answer: the first moment after ``now``
    an event it counts leaves its window (a member of an "in the last 7 days" audience
    drops out then unless another event keeps it in). None if no counted event will. The
    oracle of the expiry timer's shortcut: only events leaving a window change answers."""
    return min(
        (
            e["timestamp"] + spec.window
            for spec, _ in event_specs(rule)
            for e in events
            if e["timestamp"] + spec.window > now and matches(spec, e)
        ),
        default=None,
    )


@given(ages, count_ops, st.booleans(), st.integers(0, 30 * 24))
def test_answer_is_constant_until_next_expiry(
    events: list[EventView], count: dict[str, int], negate: bool, later_hours: int
) -> None:
    """Between ``now`` and ``next_expiry`` time alone changes nothing, so the expiry timer
    may sleep until then; and a rule time cannot admit never turns true by waiting."""
    spec = {
        "event": {
            "type": "page",
            "where": {"path": {"starts_with": "/pricing"}},
            "within": "7d",
            "count": count,
        }
    }
    rule = parse_rule({"not": spec} if negate else spec)
    later = NOW + later_hours * HOUR
    now_answer = evaluate(rule, {}, events, NOW)
    expiry = next_expiry(rule, events, NOW)
    if expiry is None or later < expiry:
        assert evaluate(rule, {}, events, later) is now_answer
    if not now_answer and not time_may_admit(rule):
        assert not evaluate(rule, {}, events, later)


@given(
    st.recursive(
        st.sampled_from(
            [
                {"trait": "plan", "in": ["pro", "team"]},
                {"computed": "order_count", "gte": 2},
                {"event": {"type": "track", "name": "Signed Up", "within": "90m"}},
            ]
        ),
        lambda children: st.one_of(
            st.lists(children, min_size=1, max_size=3).map(lambda rs: {"and": rs}),
            st.lists(children, min_size=1, max_size=3).map(lambda rs: {"or": rs}),
            children.map(lambda r: {"not": r}),
        ),
        max_leaves=8,
    )
)
def test_dump_round_trips(rule: dict[str, Any]) -> None:
    parsed = parse_rule(rule)
    assert parse_rule(dump_rule(parsed)) == parsed
