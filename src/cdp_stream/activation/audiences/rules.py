"""Audience rules: a small JSON language, parsed into pydantic models, evaluated purely.

The language (and / or / not; trait, computed and event conditions; operators; how
missing values compare) is specified in docs/audience-rules.md. Invalid rules raise
:class:`RuleError`, listing each problem with its JSON path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, TypedDict

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cdp_stream import computed_traits
from cdp_stream.event_names import name_key
from cdp_stream.events import EVENT_TYPES, EventType

OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "exists", "in", "starts_with")
COUNT_OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte")
NODE_KEYS = ("and", "or", "not", "trait", "computed", "event")
EVENT_KEYS = ("type", "name", "where", "within", "count")

# What the resolver writes (the shared list); the counters read as 0 until the first event
# that counts.
COMPUTED_TRAITS = computed_traits.NAMES
COMPUTED_COUNTERS = computed_traits.COUNTERS

_DURATION = re.compile(r"^([0-9]{1,9})([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW = timedelta(days=3650)  # beyond it ``now - within`` leaves datetime's range soon


class _Missing:
    """A value the profile or event does not have (distinct from JSON null)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def _err(error_type: str, template: str, **context: Any) -> PydanticCustomError:
    return PydanticCustomError(error_type, template, context)


def _check_keys(data: Any, allowed: Sequence[str], what: str, subject: str = "") -> None:
    """Name the unexpected key and what would be accepted (pydantic's "Extra inputs are
    not permitted" says neither); refuse null operands, which would silently match."""
    if not isinstance(data, dict):
        raise _err("rule_type", "{what} must be a JSON object", what=what)
    unknown = [k for k in data if k not in allowed and k != subject]
    if unknown:
        raise _err(
            "unknown_key",
            "unknown {kind} {key}; expected one of: {allowed}",
            kind="operator" if what in ("a condition", "count") else f"key in {what}",
            key=repr(unknown[0]),
            allowed=", ".join(allowed),
        )
    if what in ("a condition", "count"):
        nulls = [k for k in data if k != subject and data[k] is None]
        if nulls:
            raise _err(
                "null_operand",
                "operator {op} needs a value, not null (for a missing value: exists: false)",
                op=repr(nulls[0]),
            )


def _scalar(value: Any) -> str | int | float | bool:
    if isinstance(value, str | int | float):  # bool is an int
        return value
    raise _err("scalar", "must be a string, a number or a boolean")


def _ordered(value: Any) -> str | int | float:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return value
    raise _err("ordered", "must be a number or a string")


def _count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _err("count", "must be a whole number, 0 or more")


def _duration(value: Any) -> str:
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise _err(
            "duration",
            "{value} is not a duration: use a whole number and s, m, h or d, like '7d'",
            value=repr(value),
        )
    window = timedelta(seconds=int(match[1]) * _UNIT[match[2]])
    if not timedelta(0) < window <= MAX_WINDOW:
        raise _err("duration", "must be longer than 0 and at most {max} days", max=MAX_WINDOW.days)
    return str(value)


Scalar = Annotated[str | int | float | bool, PlainValidator(_scalar)]
Ordered = Annotated[str | int | float, PlainValidator(_ordered)]
Count = Annotated[int, PlainValidator(_count)]
Duration = Annotated[str, PlainValidator(_duration)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Ops(_Model):
    """The operators, shared by trait, computed and ``where`` conditions."""

    eq: Scalar | None = None
    ne: Scalar | None = None
    gt: Ordered | None = None
    gte: Ordered | None = None
    lt: Ordered | None = None
    lte: Ordered | None = None
    exists: bool | None = Field(default=None, strict=True)
    in_: Annotated[list[Scalar], Field(min_length=1)] | None = Field(default=None, alias="in")
    starts_with: str | None = Field(default=None, strict=True)

    @classmethod
    def _keys(cls, data: Any, subject: str | None) -> Any:
        _check_keys(data, OPERATORS, "a condition", subject or "")
        if not any(op in data for op in OPERATORS):
            raise _err(
                "no_operator",
                "a condition needs an operator: one of {ops}",
                ops=", ".join(OPERATORS),
            )
        return data


class Comparison(_Ops):
    """``{"starts_with": "/pricing"}``: a ``where`` value."""

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        return cls._keys(data, None)


class TraitCondition(_Ops):
    trait: str = Field(min_length=1, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        return cls._keys(data, "trait")


class ComputedCondition(_Ops):
    computed: str = Field(min_length=1, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        return cls._keys(data, "computed")

    @field_validator("computed")
    @classmethod
    def _exists(cls, name: str) -> str:
        if name.split(".", 1)[0] not in COMPUTED_TRAITS:
            raise _err(
                "unknown_computed",
                "unknown computed trait {name}; known: {known}",
                name=repr(name),
                known=", ".join(COMPUTED_TRAITS),
            )
        return name


class CountSpec(_Model):
    eq: Count | None = None
    ne: Count | None = None
    gt: Count | None = None
    gte: Count | None = None
    lt: Count | None = None
    lte: Count | None = None

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        _check_keys(data, COUNT_OPERATORS, "count")
        if not data:
            raise _err(
                "no_operator",
                "count needs an operator: one of {ops}",
                ops=", ".join(COUNT_OPERATORS),
            )
        return data

    def upward(self) -> bool:
        """Only lower bounds: fewer events can only make it false."""
        return self.eq is None and self.ne is None and self.lt is None and self.lte is None


class EventSpec(_Model):
    type: EventType
    name: str | None = Field(default=None, min_length=1, strict=True)
    where: dict[str, Comparison] | None = None
    within: Duration
    count: CountSpec = Field(default_factory=lambda: CountSpec(gte=1))

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        _check_keys(data, EVENT_KEYS, "event")
        return data

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, value: Any) -> Any:
        if value not in EVENT_TYPES:
            raise _err(
                "event_type",
                "unknown event type {value}; expected one of: {types}",
                value=repr(value),
                types=", ".join(EVENT_TYPES),
            )
        return value

    @property
    def normal_name(self) -> str | None:
        """The event name as events are compared with it (see ``matches``)."""
        return _normal_name(self.name)

    @property
    def window(self) -> timedelta:
        match = _DURATION.match(self.within)
        assert match is not None  # validated
        return timedelta(seconds=int(match[1]) * _UNIT[match[2]])


class EventCondition(_Model):
    event: EventSpec


def _non_empty(value: Any, key: str) -> Any:
    if isinstance(value, list) and not value:
        raise _err("empty", "{key} needs at least one rule", key=repr(key))
    return value


class And(_Model):
    all_: list[Rule] = Field(alias="and")

    @field_validator("all_", mode="before")
    @classmethod
    def _some(cls, value: Any) -> Any:
        return _non_empty(value, "and")


class Or(_Model):
    any_: list[Rule] = Field(alias="or")

    @field_validator("any_", mode="before")
    @classmethod
    def _some(cls, value: Any) -> Any:
        return _non_empty(value, "or")


class Not(_Model):
    rule: Rule = Field(alias="not")


_TAGS: dict[type[BaseModel], str] = {
    And: "and",
    Or: "or",
    Not: "not",
    TraitCondition: "trait",
    ComputedCondition: "computed",
    EventCondition: "event",
}


def _node_tag(value: Any) -> str | None:
    """Which node a JSON object is: the one node key it has (None: zero or several)."""
    if isinstance(value, dict):
        found = [k for k in NODE_KEYS if k in value]
        return found[0] if len(found) == 1 else None
    return _TAGS.get(type(value))


Rule = Annotated[
    Annotated[And, Tag("and")]
    | Annotated[Or, Tag("or")]
    | Annotated[Not, Tag("not")]
    | Annotated[TraitCondition, Tag("trait")]
    | Annotated[ComputedCondition, Tag("computed")]
    | Annotated[EventCondition, Tag("event")],
    Discriminator(
        _node_tag,
        custom_error_type="rule_node",
        custom_error_message=(
            "a rule is a JSON object with exactly one of the keys and, or, not, trait, "
            "computed, event"
        ),
    ),
]

for _model in (And, Or, Not):
    _model.model_rebuild()
_ADAPTER: TypeAdapter[Rule] = TypeAdapter(Rule)


# --- parsing, with errors a person can act on ------------------------------------------


@dataclass(frozen=True)
class RuleProblem:
    loc: tuple[str | int, ...]  # JSON path as keys and indexes
    path: str  # the same, as text: ``$.and[0].event.within``
    message: str
    type: str


class RuleError(ValueError):
    """An invalid rule: every problem found, each with where it is and what is wrong."""

    def __init__(self, problems: list[RuleProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))


def _clean_loc(loc: Sequence[str | int]) -> tuple[str | int, ...]:
    """Pydantic's location without the union tags it inserts where a rule is expected
    (the root, each ``and`` / ``or`` item, and ``not``'s operand)."""
    out: list[str | int] = []
    expect_tag = True
    for item in loc:
        if expect_tag and item in NODE_KEYS:
            expect_tag = False
            continue
        expect_tag = (isinstance(item, int) and out[-1:] in (["and"], ["or"])) or item == "not"
        out.append(item)
    return tuple(out)


def _render(loc: Sequence[str | int]) -> str:
    text = "$"
    for item in loc:
        if isinstance(item, int):
            text += f"[{item}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item):
            text += f".{item}"
        else:
            text += f"[{item!r}]"
    return text


def parse_rule(data: Any) -> Rule:
    """A rule from its JSON form; :class:`RuleError` lists what is wrong and where."""
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            loc = _clean_loc(error["loc"])
            problems.append(RuleProblem(loc, _render(loc), error["msg"], error["type"]))
        raise RuleError(problems) from None


def dump_rule(rule: Rule) -> dict[str, Any]:
    """The rule's JSON form, defaults spelled out: what is stored and shown."""
    dumped: dict[str, Any] = _ADAPTER.dump_python(rule, by_alias=True, exclude_none=True)
    ordered: dict[str, Any] = _subject_first(dumped)
    return ordered


def _subject_first(node: Any) -> Any:
    """``{"trait": "plan", "eq": "pro"}`` rather than ``{"eq": "pro", "trait": "plan"}``."""
    if isinstance(node, list):
        return [_subject_first(n) for n in node]
    if not isinstance(node, dict):
        return node
    first = [k for k in (*NODE_KEYS, *EVENT_KEYS) if k in node]
    return {k: _subject_first(node[k]) for k in (*first, *(k for k in node if k not in first))}


# --- evaluation: pure ---------------------------------------------------------------------


class EventView(TypedDict):
    """One stored event as rules see it (the ``events`` table's columns)."""

    type: str
    event: str | None  # track event name, page / screen name
    timestamp: datetime  # timezone-aware
    payload: Mapping[str, Any]


def lookup(obj: Any, name: str) -> Any:
    """``obj[name]``, else the dotted path walked through nested objects; MISSING if absent."""
    if not isinstance(obj, Mapping):
        return MISSING
    if name in obj:
        return obj[name]
    current: Any = obj
    for part in name.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return MISSING
        current = current[part]
    return current


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float | str) and isinstance(b, int | float | str):
        return bool(a == b)
    return False


def _order(a: Any, b: Any) -> int | None:
    """-1, 0, 1 comparing ``a`` with ``b``; None when they are not both numbers or both
    strings (a string is never greater than a number, nor less)."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
    if not numbers and not (isinstance(a, str) and isinstance(b, str)):
        return None
    return int(a > b) - int(a < b)


_CHECKS: dict[str, Callable[[int], bool]] = {
    "gt": lambda c: c > 0,
    "gte": lambda c: c >= 0,
    "lt": lambda c: c < 0,
    "lte": lambda c: c <= 0,
}


def holds(ops: _Ops, actual: Any) -> bool:
    """Every operator in ``ops`` holds for ``actual`` (MISSING or None: not there)."""
    present = actual is not MISSING and actual is not None
    if ops.exists is not None and present != ops.exists:
        return False
    if ops.eq is not None and not (present and _same(actual, ops.eq)):
        return False
    if ops.ne is not None and present and _same(actual, ops.ne):
        return False
    if ops.in_ is not None and not (present and any(_same(actual, v) for v in ops.in_)):
        return False
    for name, check in _CHECKS.items():
        bound = getattr(ops, name)
        if bound is not None:
            order = _order(actual, bound) if present else None
            if order is None or not check(order):
                return False
    return ops.starts_with is None or (
        isinstance(actual, str) and actual.startswith(ops.starts_with)
    )


def _count_holds(spec: CountSpec, n: int) -> bool:
    if spec.eq is not None and n != spec.eq:
        return False
    if spec.ne is not None and n == spec.ne:
        return False
    return all(
        getattr(spec, name) is None or check(n - getattr(spec, name))
        for name, check in _CHECKS.items()
    )


def _normal_name(name: Any) -> str | None:
    return name_key(name) if isinstance(name, str) else None


def _where_value(payload: Mapping[str, Any], key: str) -> Any:
    if "." in key:
        return lookup(payload, key)
    found = lookup(payload.get("properties"), key)
    if found is MISSING:
        context = payload.get("context")
        found = lookup(context.get("page") if isinstance(context, Mapping) else None, key)
    return found


def matches(spec: EventSpec, event: EventView) -> bool:
    """The event is of the kind ``spec`` counts (type, name, where), at any time."""
    if event["type"] != spec.type:
        return False
    if spec.name is not None and _normal_name(event["event"]) != spec.normal_name:
        return False
    return all(holds(c, _where_value(event["payload"], k)) for k, c in (spec.where or {}).items())


def count_events(spec: EventSpec, events: Sequence[EventView], now: datetime) -> int:
    since = now - spec.window
    return sum(1 for e in events if e["timestamp"] > since and matches(spec, e))


def _computed_value(computed: Any, name: str) -> Any:
    value = lookup(computed, name)
    if (value is MISSING or value is None) and name in COMPUTED_COUNTERS:
        return 0
    return value


def evaluate(
    rule: Rule, profile: Mapping[str, Any], events: Sequence[EventView], now: datetime
) -> bool:
    """Does the profile (``{"traits", "computed"}``) with these events satisfy the rule at
    ``now``? Pure; ``events`` need only cover :func:`longest_window` before ``now``."""
    if isinstance(rule, And):
        return all(evaluate(r, profile, events, now) for r in rule.all_)
    if isinstance(rule, Or):
        return any(evaluate(r, profile, events, now) for r in rule.any_)
    if isinstance(rule, Not):
        return not evaluate(rule.rule, profile, events, now)
    if isinstance(rule, TraitCondition):
        return holds(rule, lookup(profile.get("traits"), rule.trait))
    if isinstance(rule, ComputedCondition):
        return holds(rule, _computed_value(profile.get("computed"), rule.computed))
    return _count_holds(rule.event.count, count_events(rule.event, events, now))


def event_specs(rule: Rule) -> Iterator[tuple[EventSpec, bool]]:
    """Every event condition with its polarity (False: under an odd number of ``not``)."""

    def walk(node: Rule, positive: bool) -> Iterator[tuple[EventSpec, bool]]:
        if isinstance(node, And):
            for r in node.all_:
                yield from walk(r, positive)
        elif isinstance(node, Or):
            for r in node.any_:
                yield from walk(r, positive)
        elif isinstance(node, Not):
            yield from walk(node.rule, not positive)
        elif isinstance(node, EventCondition):
            yield node.event, positive

    return walk(rule, True)


def longest_window(rule: Rule) -> timedelta | None:
    """How far back the rule looks at events; None if it looks at none."""
    return max((spec.window for spec, _ in event_specs(rule)), default=None)


def time_may_admit(rule: Rule) -> bool:
    """Can time passing (events leaving windows) turn the rule from false to true? Only
    through an event condition that fewer events can make true: under a ``not``, or with
    a count bounded above (``lt``, ``eq``...). "Did not visit in 7 days" can; "visited in
    the last 7 days" cannot."""
    return any(not positive or not spec.count.upward() for spec, positive in event_specs(rule))
