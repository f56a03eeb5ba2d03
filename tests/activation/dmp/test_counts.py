"""DMP count runs (:mod:`cdp_stream.activation.dmp.counts`) on the real Postgres server
(memory bus; once the real Kafka); the pure steps have their own tests beside this one.

The privacy test builds a data set through the resolver (identities, traits, events with
context), scans every message and row the feed produces for every identifier and trait
value of it, and runs the complementary-disclosure attack against the published counts.
The database is shared by the session and ``count_once`` counts every audience in it, so
each test reads only its own audience's rows and messages.
"""

from __future__ import annotations

import asyncio
import statistics
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from sqlalchemy import delete, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation.dmp import counts as dmp
from cdp_stream.activation.dmp.dimensions import DIMENSIONS, window_start
from cdp_stream.activation.dmp.dimensions import WINDOWS as DMP_WINDOWS
from cdp_stream.bus.base import Bus, BusUnavailable, Message, Record
from cdp_stream.bus.kafka import KafkaBus
from cdp_stream.bus.memory import MemoryBus
from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.models import (
    audience_members,
    audiences,
    dmp_audience_counts,
    events,
    identities,
    profiles,
)
from cdp_stream.resolver.consumer import apply_with_retry
from cdp_stream.settings import Settings
from tests.activation.dmp.test_devices import IPAD, IPHONE, WINDOWS
from tests.support import eventually, stored_event, uid

RULES = IdentityRules.from_settings(Settings())
SOURCE = "src_dmp_test"
K = 5
NOW = datetime(2024, 6, 1, 12, 34, 56, tzinfo=UTC)
FIELDS = {"audience_id", "window", "window_start", "dimension", "bucket", "count", "epsilon"}


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"dmp_k": K, "topic_namespace": f"{uid('dmp')}."}
    return Settings(**(values | overrides))


# --- the data set -----------------------------------------------------------------------

COUNTRY = ["DE"] * 12 + ["FR"] * 7 + ["IT"] * 3  # IT: the one small bucket
DEVICE = ["mobile"] * 10 + ["desktop"] * 9 + ["tablet"] * 2 + ["unknown"]
CHANNEL = ["paid"] * 8 + ["organic"] * 6 + ["direct"] * 8
CONSENTING = len(COUNTRY)
# How the opted-out members say so: (consent trait, [context.consent, oldest first]).
OPT_OUTS: list[tuple[Any, list[Any]]] = [
    ({"marketing": False}, []),
    (None, [{"categoryPreferences": {"Advertising": False, "Analytics": True}}]),
    (["necessary", "analytics", "marketing"], []),
    (None, [{"ad_storage": "denied", "analytics_storage": "granted"}]),
    (False, []),
    (None, [{"marketing": True, "advertising": True}, {"marketing": "denied"}]),
]


@dataclass
class DataSet:
    audience_id: uuid.UUID
    audience_name: str
    run: str
    members: list[uuid.UUID]  # as inserted into audience_members (one merged-away)
    truth: dict[str, Counter[str]]  # exact consenting counts per dimension
    by_person: list[dict[str, str]]  # person i (consenting) -> dimension -> bucket
    canonical: list[uuid.UUID]  # person i -> canonical profile id
    secrets: set[str] = field(default_factory=set)


def ev(type_: str, ts: str, **fields: Any) -> dict[str, Any]:
    return stored_event(SOURCE, type_, ts, channel="web" if type_ == "page" else "server", **fields)


def person(
    run: str,
    i: int,
    country: str,
    device: str,
    channel: str,
    consent_trait: Any = None,
    consent_contexts: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """The events of one person; every identifier and trait value carries ``run``."""
    user, anon = f"u-{run}-{i}", f"a-{run}-{i}"
    traits: dict[str, Any] = {
        "email": f"person{i}-{run}@example.com",
        "name": f"Person {i} {run}",
        "plan": f"plan-{run}-{i % 3}",
        "ltv": 1000 + i + 0.25,
        "phone": f"+1415555{1000 + i}",
    }
    context: dict[str, Any] = {"ip": f"203.0.113.{i}", "locale": f"xx-{run}"}
    if i % 3 == 0:
        traits["country"] = f" {country.lower()} "
    elif i % 3 == 1:
        traits["address"] = {"country": country, "city": f"Springfield-{run}-{i}"}
    else:  # an invalid trait falls through to the event's location
        traits["country"] = f"Neverland-{run}"
        context["location"] = {"country": country, "city": f"Shelbyville-{run}-{i}"}
    if consent_trait is not None:
        traits["consent"] = consent_trait
    if device == "mobile" and i % 2:
        context["device"] = {"type": "ios", "id": f"dev-{run}-{i}", "model": "iPhone15,2"}
    elif device != "unknown":
        agent = {"mobile": IPHONE, "desktop": WINDOWS, "tablet": IPAD}[device]
        context["userAgent"] = f"{agent} run/{run}-{i}"
    if channel == "paid":
        context["campaign"] = {"source": f"google-{run}", "medium": "cpc", "name": f"c-{run}-{i}"}
    elif channel == "organic":
        context["page"] = {"referrer": f"https://www.google.com/search?q=q-{run}-{i}"}
    out = [
        ev("identify", "2024-03-01T10:00:00Z", userId=user, traits=traits),
        ev("page", "2024-03-01T10:05:00Z", userId=user, anonymousId=anon, context=context),
    ]
    for n, consent in enumerate(consent_contexts):
        out.append(
            ev(
                "track",
                f"2024-03-0{2 + n}T10:00:00Z",
                event="Consent Updated",
                userId=user,
                context={"consent": consent},
            )
        )
    return out


def leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for v in value.values():
            yield from leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from leaves(v)
    elif value is not None:
        yield value


async def owner(engine: AsyncEngine, type_: str, value: str) -> uuid.UUID:
    async with engine.connect() as conn:
        pid = await repo.profile_for_identifier(conn, Identifier(type_, value))
    assert pid is not None
    return pid


async def new_audience(engine: AsyncEngine, members: Sequence[uuid.UUID]) -> uuid.UUID:
    audience_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            insert(audiences).values(id=audience_id, name=uid("dmp audience"), rule={})
        )
        await conn.execute(
            insert(audience_members),
            [{"audience_id": audience_id, "profile_id": m} for m in members],
        )
    return audience_id


@pytest.fixture(scope="module")
async def data(engine: AsyncEngine) -> DataSet:
    """22 consenting members (DE 12 / FR 7 / IT 3; mobile 10 / desktop 9 / tablet 2 /
    unknown 1; paid 8 / organic 6 / direct 8), one of them made of two merged profiles
    listed twice, 6 opted-out members, and one profile that is not a member."""
    run = uuid.uuid4().hex[:10]
    batch: list[dict[str, Any]] = []
    by_person = []
    for i in range(CONSENTING):
        buckets = {
            "country": COUNTRY[i],
            "device_type": DEVICE[(i * 5) % CONSENTING],
            "first_touch_channel": CHANNEL[(i * 3) % CONSENTING],
        }
        by_person.append(buckets)
        consent_trait: Any = None
        contexts: list[Any] = []
        if i == 0:
            consent_trait = {"marketing": True, "advertising": "granted"}
        elif i == 1:
            contexts = [{"categoryPreferences": {"Advertising": True, "Marketing": True}}]
        elif i == 2:
            consent_trait = ["necessary", "marketing", "advertising"]
        elif i == 3:  # refused once, then granted: the latest statement counts
            contexts = [{"marketing": "denied"}, {"marketing": "granted", "advertising": True}]
        batch += person(
            run,
            i,
            buckets["country"],
            buckets["device_type"],
            buckets["first_touch_channel"],
            consent_trait,
            contexts,
        )
    opted = [CONSENTING + j for j in range(len(OPT_OUTS))]
    for i, (trait, contexts) in zip(opted, OPT_OUTS, strict=True):
        batch += person(run, i, "DE", "mobile", "paid", trait, contexts)
    outsider = CONSENTING + len(OPT_OUTS)
    batch += person(run, outsider, "IT", "tablet", "email")
    # Person 4 starts as two profiles (its page view knows only the anonymous id).
    split = [e for e in batch if e.get("userId") == f"u-{run}-4" and e["type"] == "page"]
    del split[0]["userId"]
    await apply_with_retry(engine, batch, RULES)
    first = await owner(engine, "anonymous_id", f"a-{run}-4")
    second = await owner(engine, "user_id", f"u-{run}-4")
    assert first != second
    link = ev("track", "2024-03-05T00:00:00Z", event="Signed In", userId=f"u-{run}-4")
    link["anonymousId"] = f"a-{run}-4"
    await apply_with_retry(engine, [link], RULES)
    canonical = [await owner(engine, "user_id", f"u-{run}-{i}") for i in range(outsider + 1)]
    assert canonical[4] in (first, second)
    members = [*canonical[:outsider], first if canonical[4] == second else second]
    audience_id = await new_audience(engine, members)
    async with engine.connect() as conn:
        name = (
            await conn.execute(select(audiences.c.name).where(audiences.c.id == audience_id))
        ).scalar_one()
    truth = {
        name_: Counter(p[name_] for p in by_person)
        for name_ in ("country", "device_type", "first_touch_channel")
    }
    data = DataSet(audience_id, name, run, members, truth, by_person, canonical)
    data.secrets = await secrets_of(engine, [*canonical, first, second], run)
    return data


async def secrets_of(engine: AsyncEngine, ids: Sequence[uuid.UUID], run: str) -> set[str]:
    """Every identifier and trait value of the data set (and every value of its events),
    as text; plus the profile ids, message ids and the run tag itself."""
    async with engine.connect() as conn:
        idents = await conn.execute(select(identities).where(identities.c.profile_id.in_(ids)))
        traits = await conn.execute(select(profiles.c.traits).where(profiles.c.id.in_(ids)))
        payloads = await conn.execute(select(events.c.payload).where(events.c.profile_id.in_(ids)))
        found = {r.value for r in idents}
        values = [*leaves([r.traits for r in traits]), *leaves([r.payload for r in payloads])]
    assert len(found) >= 4 * CONSENTING  # user id, anonymous id, email, phone, ...
    strings = {v if isinstance(v, str) else orjson.dumps(v).decode() for v in values}
    assert any(run in s for s in strings)
    return found | strings | {str(i) for i in ids} | {run}


# --- reading what was produced ---------------------------------------------------------


async def drain_raw(bus: Bus, topic: str, expect: int | None = None) -> list[Message]:
    """Every record on the topic (a fresh group reads from the start)."""
    consumer = bus.consumer(uid("dmp-reader"), [topic])
    await consumer.start()
    got: list[Message] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (60 if expect else 0.5)
    try:
        while loop.time() < deadline and (expect is None or len(got) < expect):
            got += await consumer.getmany(10_000, 200)
    finally:
        await consumer.stop()
    return got


async def drain(bus: Bus, topic: str, expect: int | None = None) -> list[dict[str, Any]]:
    """Every message on the topic, decoded; each keyed by its audience id."""
    out = []
    for m in await drain_raw(bus, topic, expect):
        value = orjson.loads(m.value)
        assert m.key == value["audience_id"].encode()
        out.append(value)
    return out


async def ours(bus: Bus, topic: str, audience_id: uuid.UUID) -> list[dict[str, Any]]:
    return [m for m in await drain(bus, topic) if m["audience_id"] == str(audience_id)]


async def rows_of(engine: AsyncEngine, audience_id: uuid.UUID) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(dmp_audience_counts).where(dmp_audience_counts.c.audience_id == audience_id)
        )
        return [dict(r._mapping) for r in rows]


def current(rows: Sequence[dict[str, Any]], window: str) -> dict[tuple[str, str], int]:
    start = window_start(NOW, window)
    return {
        (r["dimension"], r["bucket"]): r["count"]
        for r in rows
        if r["window"] == window and r["window_start"] == start
    }


def latest(
    messages: Sequence[dict[str, Any]], audience_id: uuid.UUID, window: str
) -> dict[tuple[str, str], int]:
    """What a consumer holds after the messages: the latest per key, withdrawals removed."""
    state: dict[tuple[str, str], int | None] = {}
    start = window_start(NOW, window).strftime("%Y-%m-%dT%H:%M:%SZ")
    for m in messages:
        if m["audience_id"] == str(audience_id) and (m["window"], m["window_start"]) == (
            window,
            start,
        ):
            state[(m["dimension"], m["bucket"])] = m["count"]
    return {cell: n for cell, n in state.items() if n is not None}


def assert_nothing_personal(
    items: Sequence[dict[str, Any]], secrets: set[str], raw: Sequence[str] = ()
) -> None:
    """The shape is the published one, every label is from a fixed vocabulary, and no
    identifier or trait value of the data set appears: neither as a value nor inside the
    text (values of 6+ characters: shorter ones, like a country code, would match
    anywhere in a UUID and are covered by the value check)."""
    vocabularies = {name: vocab for name, (_, vocab) in DIMENSIONS.items()}
    vocabularies["overall"] = frozenset({"all"})
    long = [s for s in secrets if len(s) >= 6]
    assert long
    for item in items:
        assert set(item) == FIELDS
        assert item["window"] in DMP_WINDOWS
        assert item["bucket"] in vocabularies[item["dimension"]]
        assert item["count"] is None or (isinstance(item["count"], int) and item["count"] >= 0)
        assert item["epsilon"] is None or isinstance(item["epsilon"], float)
        uuid.UUID(str(item["audience_id"]))
        for name, value in item.items():
            if name != "bucket":  # a vocabulary label; checked above
                as_text = value if isinstance(value, str) else orjson.dumps(value).decode()
                assert as_text not in secrets, (name, value)
    for dumped in [*raw, *(orjson.dumps(i, default=str).decode() for i in items)]:
        for secret in long:
            assert secret not in dumped


# --- count runs on Postgres -------------------------------------------------------------


async def test_privacy_of_every_message_and_row(engine: AsyncEngine, data: DataSet) -> None:
    """The privacy test: nothing personal in any message or row, no bucket under k, the
    complement attack fails, opted-out members are not counted, merged ones count once."""
    s = settings()
    bus = MemoryBus()
    published = await dmp.count_once(engine, bus, s, NOW)
    raw = [m.value.decode() for m in await drain_raw(bus, s.topics.dmp_audience_counts)]
    messages = await drain(bus, s.topics.dmp_audience_counts)
    assert len(messages) == len(raw) == published
    mine = [m for m in messages if m["audience_id"] == str(data.audience_id)]
    rows = await rows_of(engine, data.audience_id)
    assert_nothing_personal(messages, data.secrets, raw)
    assert_nothing_personal(
        [orjson.loads(orjson.dumps({k: r[k] for k in FIELDS}, default=str)) for r in rows],
        data.secrets,
    )
    assert all(data.run not in r for r in raw)
    assert all(data.audience_name not in r for r in raw)  # the name stays in (see dmp/counts.py)

    published_views = [
        view
        for window in ("hour", "day")
        for view in (current(rows, window), latest(messages, data.audience_id, window))
    ]
    for shown in published_views:
        # No bucket under k, in any dimension: every published count is a true size >= k.
        assert shown[("overall", "all")] == CONSENTING  # 28 members: 6 opted out, 1 twice
        for (dimension, bucket), n in shown.items():
            if dimension != "overall":
                assert n == data.truth[dimension][bucket] >= K, (dimension, bucket)
        # The complement attack: overall minus a dimension's published buckets must not
        # be the size of a suppressed small bucket, nor any group of 1..k-1 people.
        for dimension, truth in data.truth.items():
            small = [n for n in truth.values() if 0 < n < K]
            residual = shown[("overall", "all")] - sum(
                n for (d, _), n in shown.items() if d == dimension
            )
            assert residual not in small, (dimension, residual, small)
            assert residual == 0 or residual >= K, (dimension, residual)
    # The data set makes the attack real: against k-suppression alone, overall minus the
    # published countries is exactly the 3 people in IT.
    naive = CONSENTING - sum(n for n in data.truth["country"].values() if n >= K)
    assert naive == data.truth["country"]["IT"] == 3

    expected = {
        ("overall", "all"): CONSENTING,
        ("country", "DE"): 12,
        ("device_type", "mobile"): 10,
        ("first_touch_channel", "paid"): 8,
        ("first_touch_channel", "organic"): 6,
        ("first_touch_channel", "direct"): 8,
    }
    assert published_views == [expected] * 4
    assert len(mine) == 2 * len(expected)  # hour and day, each cell once
    assert {r["epsilon"] for r in rows} == {None}

    # A second run changes nothing and so publishes nothing.
    bus = MemoryBus()
    await dmp.count_once(engine, bus, s, NOW)
    assert await ours(bus, s.topics.dmp_audience_counts, data.audience_id) == []


async def test_noise_is_reported_unbiased_and_not_renewed_for_unchanged_counts(
    engine: AsyncEngine, data: DataSet
) -> None:
    audience_id = await new_audience(engine, data.members)
    s = settings(dmp_epsilon=1.0)
    exact = {
        ("overall", "all"): CONSENTING,
        ("country", "DE"): 12,
        ("device_type", "mobile"): 10,
        ("first_touch_channel", "paid"): 8,
        ("first_touch_channel", "organic"): 6,
        ("first_touch_channel", "direct"): 8,
    }
    errors: list[int] = []
    bus = MemoryBus()
    for _ in range(40):  # fresh noise each run (no key given)
        await dmp.count_once(engine, bus, s, NOW)
        rows = await rows_of(engine, audience_id)
        assert {r["epsilon"] for r in rows} == {1.0}
        hour = current(rows, "hour")
        assert hour.keys() == exact.keys()  # suppression is decided on exact counts
        assert hour == current(rows, "day")  # one noise per count, whatever the window
        errors += [hour[cell] - n for cell, n in exact.items()]
    assert any(errors)
    assert abs(statistics.fmean(errors)) < 0.6  # sd of the mean ~0.13 at scale 1
    messages = await drain(bus, s.topics.dmp_audience_counts)
    assert_nothing_personal(messages, data.secrets)
    assert {m["epsilon"] for m in messages if m["audience_id"] == str(audience_id)} == {1.0}

    # A process keeps its key: an unchanged audience is not re-sampled, so not re-sent.
    key = b"\x01" * 32
    await dmp.count_once(engine, bus, s, NOW, noise_key=key)
    before = current(await rows_of(engine, audience_id), "hour")
    bus = MemoryBus()
    await dmp.count_once(engine, bus, s, NOW, noise_key=key)
    assert await ours(bus, s.topics.dmp_audience_counts, audience_id) == []
    assert current(await rows_of(engine, audience_id), "hour") == before


async def test_a_bucket_that_falls_under_k_is_withdrawn(engine: AsyncEngine, data: DataSet) -> None:
    audience_id = await new_audience(engine, data.canonical[:CONSENTING])
    s = settings(dmp_windows=["hour"], dmp_dimensions=["device_type", "first_touch_channel"])
    bus = MemoryBus()
    await dmp.count_once(engine, bus, s, NOW)
    assert (
        current(await rows_of(engine, audience_id), "hour")[("first_touch_channel", "organic")] == 6
    )
    # Two organic members leave: organic (4) goes, and direct with it (4 alone would be
    # overall minus paid minus direct).
    leaving = [
        data.canonical[i]
        for i, p in enumerate(data.by_person)
        if p["first_touch_channel"] == "organic"
    ][:2]
    async with engine.begin() as conn:
        await conn.execute(
            delete(audience_members).where(
                audience_members.c.audience_id == audience_id,
                audience_members.c.profile_id.in_(leaving),
            )
        )
    bus = MemoryBus()
    await dmp.count_once(engine, bus, s, NOW)
    changed = {
        (m["dimension"], m["bucket"]): m["count"]
        for m in await ours(bus, s.topics.dmp_audience_counts, audience_id)
    }
    assert changed[("overall", "all")] == CONSENTING - 2
    assert changed[("first_touch_channel", "organic")] is None
    assert changed[("first_touch_channel", "direct")] is None
    assert ("first_touch_channel", "paid") not in changed  # unchanged: not re-sent
    hour = current(await rows_of(engine, audience_id), "hour")
    assert ("first_touch_channel", "organic") not in hour
    assert ("first_touch_channel", "direct") not in hour
    assert hour[("first_touch_channel", "paid")] == 8


async def test_opt_outs_leave_the_counts_at_the_next_run(engine: AsyncEngine) -> None:
    """Six fresh consenting people; as they refuse, the counts drop, and once the
    audience is under k everything published for the window is withdrawn."""
    run = uuid.uuid4().hex[:10]
    await apply_with_retry(
        engine, [e for i in range(6) for e in person(run, i, "DE", "desktop", "direct")], RULES
    )
    users = [f"u-{run}-{i}" for i in range(6)]
    audience_id = await new_audience(engine, [await owner(engine, "user_id", u) for u in users])
    s, bus = settings(dmp_windows=["day"], dmp_dimensions=["country"]), MemoryBus()
    later = datetime(2024, 6, 1, 23, 59, tzinfo=UTC)  # the same day window as NOW

    async def refuse(user: str, consent: Any) -> None:
        refusal = ev("track", "2024-05-01T00:00:00Z", event="Consent Updated", userId=user)
        refusal["context"] = {"consent": consent}
        await apply_with_retry(engine, [refusal], RULES)

    await dmp.count_once(engine, bus, s, NOW)
    day = {("overall", "all"): 6, ("country", "DE"): 6}
    assert current(await rows_of(engine, audience_id), "day") == day
    await refuse(users[0], {"categoryPreferences": {"Advertising": False}})
    await dmp.count_once(engine, bus, s, later)
    day = {("overall", "all"): 5, ("country", "DE"): 5}
    assert current(await rows_of(engine, audience_id), "day") == day
    await refuse(users[1], "denied")
    await dmp.count_once(engine, bus, s, later)
    assert current(await rows_of(engine, audience_id), "day") == {}
    assert latest(await drain(bus, s.topics.dmp_audience_counts), audience_id, "day") == {}


class FailingBus(MemoryBus):
    def __init__(self, error: Exception | None = None) -> None:
        super().__init__()
        self.error = error or BusUnavailable("broker down")

    async def publish_many(self, records: Sequence[Record]) -> None:
        raise self.error


async def test_an_audience_another_process_is_counting_is_skipped(
    engine: AsyncEngine, data: DataSet
) -> None:
    """Two activation processes count at once: each audience is counted by one of them
    (an advisory lock per audience), never both; the other's next run finds it done."""
    audience_id = await new_audience(engine, data.members)
    s, later = settings(), datetime(2024, 6, 4, 9, tzinfo=UTC)
    async with engine.connect() as holder:
        await holder.execute(
            text("SELECT pg_advisory_xact_lock(:key)"),
            {"key": repo.lock_key("dmp", str(audience_id))},
        )
        bus = MemoryBus()
        await dmp.count_once(engine, bus, s, later)
        assert await ours(bus, s.topics.dmp_audience_counts, audience_id) == []
        await holder.rollback()
    bus = MemoryBus()
    await dmp.count_once(engine, bus, s, later)
    assert len(await ours(bus, s.topics.dmp_audience_counts, audience_id)) == 12
    # Concurrent runs: every cell published exactly once between them.
    again = datetime(2024, 6, 5, 9, tzinfo=UTC)
    bus = MemoryBus()
    await asyncio.gather(*(dmp.count_once(engine, bus, s, again) for _ in range(3)))
    published = await ours(bus, s.topics.dmp_audience_counts, audience_id)
    assert len(published) == 12
    assert len({(m["window"], m["dimension"], m["bucket"]) for m in published}) == 12


async def test_a_failed_publish_stores_nothing_and_the_next_run_publishes_it(
    engine: AsyncEngine, data: DataSet
) -> None:
    audience_id = await new_audience(engine, data.members)
    s = settings()
    later = datetime(2024, 6, 2, 8, tzinfo=UTC)
    with pytest.raises(BusUnavailable):
        await dmp.count_once(engine, FailingBus(), s, later)
    assert await rows_of(engine, audience_id) == []
    bus = MemoryBus()
    await dmp.count_once(engine, bus, s, later)
    published = await ours(bus, s.topics.dmp_audience_counts, audience_id)
    assert len(published) == len(await rows_of(engine, audience_id)) == 12


async def test_run_counts_runs_until_stopped(engine: AsyncEngine, data: DataSet) -> None:
    audience_id = await new_audience(engine, data.members)
    s, bus, stop = settings(dmp_interval_s=0.05), MemoryBus(), asyncio.Event()
    task = asyncio.create_task(dmp.run_counts(engine, bus, s, stop))
    assert await eventually(lambda: rows_of(engine, audience_id))
    stop.set()
    await asyncio.wait_for(task, 10)
    rows = await rows_of(engine, audience_id)
    assert {(r["dimension"], r["bucket"]) for r in rows} >= {("overall", "all")}
    with pytest.raises(ValueError):
        await dmp.run_counts(engine, bus, settings(dmp_windows=["week"]), stop)


async def test_a_configured_noise_key_is_kept_across_restarts(
    engine: AsyncEngine, data: DataSet
) -> None:
    audience_id = await new_audience(engine, data.members)
    s = settings(dmp_interval_s=0.05, dmp_epsilon=1.0, dmp_noise_key="n" * 32)
    sent = []
    for _ in range(2):  # a process, then its restart
        bus, stop = MemoryBus(), asyncio.Event()
        task = asyncio.create_task(dmp.run_counts(engine, bus, s, stop))
        assert await eventually(lambda: rows_of(engine, audience_id))
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(task, 10)
        sent.append(await ours(bus, s.topics.dmp_audience_counts, audience_id))
    assert sent[0] and sent[1] == []  # the same noise again: nothing changed, nothing re-sent


@pytest.mark.parametrize(
    ("error", "logged"),
    [(BusUnavailable("down"), "bus unavailable"), (RuntimeError("bug"), "run failed")],
)
async def test_run_counts_survives_a_failed_run(
    engine: AsyncEngine,
    data: DataSet,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    logged: str,
) -> None:
    audience_id = await new_audience(engine, data.members)  # something new to publish
    s, stop = settings(dmp_interval_s=0.05), asyncio.Event()
    task = asyncio.create_task(dmp.run_counts(engine, FailingBus(error), s, stop))
    await asyncio.sleep(0.5)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 10)
    assert caplog.text.count(logged) >= 2  # every run tries again
    assert await rows_of(engine, audience_id) == []


@pytest.mark.kafka
async def test_counts_through_kafka(
    engine: AsyncEngine, data: DataSet, kafka_bootstrap: str
) -> None:
    audience_id = await new_audience(engine, data.members)
    s = settings(kafka_bootstrap=kafka_bootstrap)
    bus = KafkaBus(kafka_bootstrap, client_id=uid("dmp-test"))
    await bus.start()
    try:
        await bus.ensure_topics({s.topics.dmp_audience_counts: 3})
        later = datetime(2024, 6, 3, 9, tzinfo=UTC)
        published = await dmp.count_once(engine, bus, s, later)
        messages = await drain(bus, s.topics.dmp_audience_counts, expect=published)
    finally:
        await bus.stop()
    assert len(messages) == published
    assert_nothing_personal(messages, data.secrets)
    ours = {
        (m["window"], m["dimension"], m["bucket"]): m["count"]
        for m in messages
        if m["audience_id"] == str(audience_id)
    }
    stored = {
        (r["window"], r["dimension"], r["bucket"]): r["count"]
        for r in await rows_of(engine, audience_id)
    }
    assert ours == stored
    assert {m["window_start"] for m in messages if m["audience_id"] == str(audience_id)} == {
        "2024-06-03T09:00:00Z",
        "2024-06-03T00:00:00Z",
    }
    assert ours[("day", "overall", "all")] == CONSENTING
    assert ours[("hour", "country", "DE")] == 12
    assert ("hour", "country", "IT") not in ours
