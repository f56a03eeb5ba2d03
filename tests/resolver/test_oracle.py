"""The real resolver held to the oracle (``tests/resolver/oracle.py``): an independent,
sequential re-implementation of the identity and profile rules.

Why: unit tests check the rules one at a time; these check that whole realistic histories
(shuffled, duplicated, delayed, shared devices, junk ids) end in exactly the profiles the
specification implies, through ``apply_with_retry`` in random batches, and end to end
through Kafka with one or three ``cdp-stream resolver`` processes, one of them killed
mid-way.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream.bus.base import Record
from cdp_stream.bus.kafka import KafkaBus
from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.db import make_engine
from cdp_stream.profiles.migrate import upgrade_to_head
from cdp_stream.profiles.models import events as events_table
from cdp_stream.profiles.models import identities, identity_refusals, profiles
from cdp_stream.resolver import repository as resolver_repo
from cdp_stream.resolver.consumer import apply_with_retry
from cdp_stream.settings import Settings
from cdp_stream.topics import Topics
from tests.resolver.oracle import (
    ESP,
    WEB,
    Expected,
    Group,
    History,
    Key,
    Ref,
    computed_diff,
    describe,
    enrich,
    enriched_events,
    expected_state,
    generate,
    identifiers,
    without,
)

RULES = IdentityRules.from_settings(Settings())
CLI = Path(sys.executable).with_name("cdp-stream")

# -- the oracle itself (small, pure) ---------------------------------------------------


def _ev(mid: str, ts: str, source: str = WEB, **fields: Any) -> dict[str, Any]:
    """A minimal enriched event (the oracle reads nothing else)."""
    base = {"type": "track", "event": "E", "messageId": mid, "sourceId": source}
    return base | {"timestamp": ts, "channel": "other", "context": {}} | fields


T1, T2 = "2025-03-01T00:00:00.000000Z", "2025-03-02T00:00:00.000000Z"


def test_oracle_refuses_a_second_user_id_and_keeps_the_first_claim() -> None:
    state = expected_state(
        [
            _ev("1", T1, userId="u1", anonymousId="shared"),
            _ev("2", T1, userId="u2", anonymousId=" shared "),
            _ev("3", T1, anonymousId="null", context={"traits": {"email": " A@X.io "}}),
            _ev("4", T2, type="identify", userId="u2", traits={"email": "a@x.io"}),
        ]
    )
    assert state.groups == {
        frozenset({"user_id:u1", "anonymous_id:shared"}),
        frozenset({"user_id:u2", "email:a@x.io"}),
    }
    assert state.refused == [((WEB, "2"), "anonymous_id:shared")]
    assert state.event_group[(WEB, "2")] == frozenset({"user_id:u2", "email:a@x.io"})


def test_oracle_keeps_split_groups_apart_whatever_they_merge_with() -> None:
    events = [
        _ev("1", T1, anonymousId="a"),
        _ev("2", T1, userId="u"),
        _ev("3", T1, userId="u", anonymousId="a"),  # split before it: refused
        _ev("4", T1, userId="u", anonymousId="c"),  # c joins u's group
        _ev("5", T2, anonymousId="c", context={"device": {"id": "d"}}),
        _ev("6", T2, anonymousId="a", context={"device": {"id": "d"}}),  # refused: d is u's
    ]
    state = expected_state(events, {2: [("user_id:u", "anonymous_id:a")]})
    assert state.groups == {
        frozenset({"anonymous_id:a"}),
        frozenset({"user_id:u", "anonymous_id:c", "device_id:d"}),
    }
    assert state.refused == [((WEB, "3"), "anonymous_id:a"), ((WEB, "6"), "device_id:d")]
    assert state.event_group[(WEB, "3")] == frozenset(
        {"user_id:u", "anonymous_id:c", "device_id:d"}
    )
    assert len(expected_state(events).groups) == 1  # without the split: one person


def test_oracle_traits_and_computed_follow_the_spec() -> None:
    order = {"event": "Order Completed", "userId": "u"}
    state = expected_state(
        [
            _ev("1", T1, type="identify", userId="u", traits={"plan": "pro"}),
            _ev("2", T1, type="identify", userId="u", traits={"plan": "team"}),  # tie: larger
            _ev("2", T2, type="identify", userId="u", traits={"plan": "x"}),  # duplicate id
            _ev("3", T1, ESP, **order, properties={"revenue": 10.1, "currency": "eur"}),
            _ev("3", T1, **order, properties={"total": 5, "currency": "USD"}),  # other source
            _ev("4", T2, **order, properties={"revenue": 2.25}),
        ]
    )
    (group,) = state.groups
    assert state.traits[group] == {"plan": "team"}
    computed = state.computed[group]
    assert computed["orders"] == {
        "EUR": {"count": 1, "micros": 10_100_000},
        "USD": {"count": 2, "micros": 7_250_000},
    }
    assert (computed["currency"], computed["total_revenue"]) == ("USD", 7.25)
    assert (computed["event_count"], computed["average_order_value"]) == (5, 3.625)


def test_generated_histories_keep_to_their_promises() -> None:
    """Ground truth the comparisons rely on: the oracle never merges two people, shared
    devices travel only with a userId, no per-type limit but user_id's can be reached."""
    history = generate(3, "gen", people=40, events=1500, shuffle=False)
    events = enriched_events(history)
    assert len(events) == len(history.sent) > 1500  # duplicates, all accepted
    state = expected_state(events)
    person = {r: p.index for p in history.people for r in p.refs() if r not in history.shared}
    for group in state.groups:
        assert len({person[r] for r in without(group, history.shared)}) == 1
    for p in history.people:
        assert len(p.devices) + len(p.shared) <= 5 and len(p.emails) <= 5
    for e in events:
        if set(identifiers(e)) & history.shared.keys():
            assert e.get("userId")
    assert {r for _, r in state.refused} <= history.shared.keys()


# -- reading the resolver's result back --------------------------------------------------


@dataclass
class Actual:
    """The canonical profiles holding the identifiers asked for, and the events."""

    groups: dict[uuid.UUID, Group]
    traits: dict[uuid.UUID, dict[str, Any]]
    computed: dict[uuid.UUID, dict[str, Any]]
    event_profile: dict[Key, uuid.UUID]
    rows_per_event: Counter[Key]
    refused: set[tuple[Key, Ref]]
    problems: list[str] = field(default_factory=list)


async def read_actual(
    conn: AsyncConnection, refs: Collection[Ref] | None, keys: Collection[Key] | None
) -> Actual:
    """The state behind ``refs`` and ``keys``; None: the whole database (its own)."""
    ids_q = select(identities.c.type, identities.c.value, identities.c.profile_id)
    ev_q = select(events_table.c.source_id, events_table.c.message_id, events_table.c.profile_id)
    ref_q = select(
        identity_refusals.c.source_id,
        identity_refusals.c.message_id,
        identity_refusals.c.type,
        identity_refusals.c.value,
    )
    if refs is not None:
        pairs = [tuple(r.split(":", 1)) for r in refs]
        holders = select(identities.c.profile_id).where(
            tuple_(identities.c.type, identities.c.value).in_(pairs)
        )
        ids_q = ids_q.where(identities.c.profile_id.in_(holders))
    if keys is not None:
        ev_q = ev_q.where(tuple_(events_table.c.source_id, events_table.c.message_id).in_(keys))
        ref_q = ref_q.where(
            tuple_(identity_refusals.c.source_id, identity_refusals.c.message_id).in_(keys)
        )
    grouped: dict[uuid.UUID, set[Ref]] = {}
    for r in await conn.execute(ids_q):
        grouped.setdefault(r.profile_id, set()).add(f"{r.type}:{r.value}")
    rows = (await conn.execute(ev_q)).all()
    refusals = {
        ((r.source_id, r.message_id), f"{r.type}:{r.value}") for r in await conn.execute(ref_q)
    }
    wanted = set(grouped) | {r.profile_id for r in rows}
    prof_q = select(profiles.c.id, profiles.c.merged_into, profiles.c.traits, profiles.c.computed)
    if refs is None:  # every canonical profile too: one without identities is a leak
        prof_q = prof_q.where(profiles.c.id.in_(wanted) | profiles.c.merged_into.is_(None))
    else:
        prof_q = prof_q.where(profiles.c.id.in_(wanted))
    prof = {r.id: r for r in await conn.execute(prof_q)}
    actual = Actual(
        groups={pid: frozenset(g) for pid, g in grouped.items()},
        traits={pid: prof[pid].traits for pid in grouped if pid in prof},
        computed={pid: prof[pid].computed for pid in grouped if pid in prof},
        event_profile={(r.source_id, r.message_id): r.profile_id for r in rows},
        rows_per_event=Counter((r.source_id, r.message_id) for r in rows),
        refused=refusals,
    )
    for pid in wanted:
        if pid not in prof or prof[pid].merged_into is not None:
            actual.problems.append(f"identity or event points at non-canonical profile {pid}")
    for pid, row in prof.items():
        if row.merged_into is None and pid not in grouped:
            actual.problems.append(f"canonical profile {pid} has no identifier")
    return actual


def compare(expected: Expected, actual: Actual, history: History, strict: bool) -> list[str]:
    """Every difference between the oracle and the database, readable.

    Groups are compared without the shared devices (who claims one depends on arrival
    order); each shared device must sit with one of the people who used it. ``strict``
    (events applied in one known order) also compares those placements and the refusals.
    """
    shared = history.shared.keys()
    problems = list(actual.problems)
    exp_by = {without(g, shared): g for g in expected.groups}
    act_by: dict[Group, uuid.UUID] = {}
    for pid, g in actual.groups.items():
        if without(g, shared) in act_by:
            problems.append(f"two profiles hold {sorted(without(g, shared))}")
        act_by[without(g, shared)] = pid
    for g in exp_by.keys() - act_by.keys():
        near = [sorted(a) for a in act_by if a & g]
        problems.append(f"expected one profile with {sorted(g)}; profiles holding them: {near}")
    for g in act_by.keys() - exp_by.keys():
        problems.append(f"unexpected profile {act_by[g]} with {sorted(g)}")

    users = {p.index: f"user_id:{p.user_id}" for p in history.people}
    for ref, people in history.shared.items():
        holders = [pid for pid, g in actual.groups.items() if ref in g]
        owners = [users[i] for i in people]
        placed = [g for g in expected.groups if ref in g]
        if not placed and holders:
            problems.append(f"{ref} is on {len(holders)} profiles, but no stored event has it")
        elif placed and len(holders) != 1:
            problems.append(f"{ref} is held by {len(holders)} profiles")
        elif holders and not any(u in actual.groups[holders[0]] for u in owners):
            problems.append(f"{ref} (used by {owners}) sits on {sorted(actual.groups[holders[0]])}")
        elif strict and placed and placed[0] != actual.groups[holders[0]]:
            problems.append(
                f"{ref}: expected on {sorted(placed[0])}, is on {sorted(actual.groups[holders[0]])}"
            )

    for core, g in exp_by.items():
        found = act_by.get(core)
        if found is None:
            continue
        if actual.traits.get(found) != expected.traits[g]:
            problems.append(
                f"traits of {sorted(core)}: {actual.traits.get(found)} != {expected.traits[g]}"
            )
        diff = computed_diff(actual.computed.get(found, {}), expected.computed[g])
        if diff:
            problems.append(f"computed of {sorted(core)}, field: (actual, expected): {diff}")

    stored, want = set(actual.rows_per_event), set(expected.event_group)
    if stored != want:
        problems.append(
            f"events missing: {sorted(want - stored)[:10]}; extra: {sorted(stored - want)[:10]}"
        )
    doubled = [k for k, n in actual.rows_per_event.items() if n > 1]
    if doubled:
        problems.append(f"events stored more than once: {doubled[:10]}")
    pid_core = {pid: without(g, shared) for pid, g in actual.groups.items()}
    for key, g in expected.event_group.items():
        owner = actual.event_profile.get(key)
        want_core = without(g, shared)
        if owner is not None and pid_core.get(owner) != want_core:
            on = sorted(pid_core.get(owner, ()))
            problems.append(f"event {key} on {on}, expected {sorted(want_core)}")
    if strict and actual.refused != set(expected.refused):
        problems.append(
            f"refusals recorded {sorted(actual.refused)}, expected {sorted(expected.refused)}"
        )
    return problems


def report(problems: Sequence[str], limit: int = 25) -> str:
    more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n".join(problems[:limit]) + more


# -- a) small histories through apply_with_retry --------------------------------------------


def batches(
    events: list[dict[str, Any]], rng: random.Random, largest: int
) -> list[list[dict[str, Any]]]:
    """``events`` cut into consecutive batches of 1..``largest``, as a consumer polls them."""
    out, i = [], 0
    while i < len(events):
        n = rng.randint(1, largest)
        out.append(events[i : i + n])
        i += n
    return out


@pytest.mark.postgres
@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    people=st.integers(2, 4),
    n_events=st.integers(4, 36),
    shuffle=st.booleans(),
    largest=st.integers(1, 12),
    redeliver=st.booleans(),
)
async def test_small_histories_end_as_the_oracle_says(
    engine: AsyncEngine,
    seed: int,
    people: int,
    n_events: int,
    shuffle: bool,
    largest: int,
    redeliver: bool,
) -> None:
    history = generate(
        seed, f"o{uuid.uuid4().hex[:10]}", people=people, events=n_events, shuffle=shuffle
    )
    events = enriched_events(history)
    expected = expected_state(events)
    rng = random.Random(seed)
    chunks = batches(events, rng, largest)
    for chunk in chunks:
        await apply_with_retry(engine, chunk, RULES)
    if redeliver:  # Kafka redelivers a batch whose offsets were not committed
        await apply_with_retry(engine, rng.choice(chunks), RULES)

    refs = {r for e in events for r in identifiers(e)}
    keys = {(e["sourceId"], e["messageId"]) for e in events}
    async with engine.connect() as conn:
        actual = await read_actual(conn, refs, keys)
    problems = compare(expected, actual, history, strict=True)
    sizes = [len(c) for c in chunks]
    assert not problems, f"{report(problems)}\nbatches {sizes}\n{describe(events)}"


def split_pairs(history: History, state: Expected, rng: random.Random) -> list[tuple[Ref, Ref]]:
    """Up to two pairs of identifiers of one person that sit on different profiles in
    ``state`` (a person's devices before they sign in): what an operator might split."""
    shared = history.shared.keys()
    pairs = []
    for p in rng.sample(history.people, len(history.people)):
        mine = sorted(
            {min(g - shared) for g in state.groups if g - shared and (g - shared) <= p.refs()}
        )
        if len(mine) >= 2:
            pairs.append((mine[0], mine[-1]))
    return pairs[:2]


async def split_run(
    engine: AsyncEngine, history: History, at: int, pairs: list[tuple[Ref, Ref]], largest: int
) -> list[str]:
    """The events before ``at`` in random batches, then the profiles holding each pair
    split (``resolver_repo.record_split``, as an unmerge does), then the rest: the differences
    from the oracle's state with those splits, strictly."""
    events = enriched_events(history)
    rng = random.Random(at)
    for chunk in batches(events[:at], rng, largest):
        await apply_with_retry(engine, chunk, RULES)
    async with engine.begin() as conn:
        for a, b in pairs:
            found = [
                await repo.profile_for_identifier(conn, Identifier(*r.split(":", 1)))
                for r in (a, b)
            ]
            pa, pb = found
            assert pa is not None and pb is not None and pa != pb
            await resolver_repo.record_split(conn, pa, pb, None)
    for chunk in batches(events[at:], rng, largest):
        await apply_with_retry(engine, chunk, RULES)
    refs = {r for e in events for r in identifiers(e)}
    keys = {(e["sourceId"], e["messageId"]) for e in events}
    async with engine.connect() as conn:
        actual = await read_actual(conn, refs, keys)
    return compare(expected_state(events, {at: pairs}), actual, history, strict=True)


@pytest.mark.postgres
@settings(max_examples=20, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    people=st.integers(2, 6),
    n_events=st.integers(10, 60),
    largest=st.integers(1, 12),
)
async def test_split_profiles_stay_apart_as_the_oracle_says(
    engine: AsyncEngine, seed: int, people: int, n_events: int, largest: int
) -> None:
    """Part of a history, then splits between profiles of one person, then the rest:
    every link across a split refused, in random batches, exactly where the oracle
    refuses it."""
    history = generate(seed, f"s{uuid.uuid4().hex[:10]}", people=people, events=n_events)
    events = enriched_events(history)
    rng = random.Random(seed)
    at = rng.randint(1, len(events) - 1)
    pairs = split_pairs(history, expected_state(events[:at]), rng)
    problems = await split_run(engine, history, at, pairs, largest)
    assert not problems, f"{report(problems)}\nsplit at {at}: {pairs}\n{describe(events)}"


@pytest.mark.postgres
async def test_a_split_history_refuses_links_the_unsplit_one_makes(engine: AsyncEngine) -> None:
    """The same on a larger history, with splits that matter (checked: the oracle refuses
    links with them that it makes without)."""
    history = generate(11, f"S{uuid.uuid4().hex[:10]}", people=12, events=400)
    events = enriched_events(history)
    at = len(events) // 3
    pairs = split_pairs(history, expected_state(events[:at]), random.Random(11))
    with_splits = expected_state(events, {at: pairs})
    assert len(with_splits.refused) > len(expected_state(events).refused), pairs
    problems = await split_run(engine, history, at, pairs, 50)
    assert not problems, report(problems)


# -- b), c) end to end: Kafka and cdp-stream resolver processes ----------------------------


@dataclass
class Deployment:
    """A fresh migrated database and topic namespace, and the resolvers running on them."""

    url: str
    namespace: str
    bootstrap: str
    logs: Path
    engine: AsyncEngine
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    files: list[IO[bytes]] = field(default_factory=list)

    def start_resolver(self, **env: str) -> subprocess.Popen[bytes]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
        base |= {
            "CDP_KAFKA_BOOTSTRAP": self.bootstrap,
            "CDP_DATABASE_URL": self.url,
            "CDP_TOPIC_NAMESPACE": self.namespace,
            "CDP_RESOLVER_POLL_TIMEOUT_MS": "100",
            "CDP_SUPPRESSION_KEY": "oracle-suppression-key",
            **env,
        }
        log = open(self.logs / f"resolver-{len(self.procs)}.log", "wb")  # noqa: SIM115
        self.files.append(log)
        proc = subprocess.Popen(
            [str(CLI), "resolver"], env=base, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        return proc

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for path in sorted(self.logs.glob("resolver-*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(out)

    async def publish(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        bus = KafkaBus(self.bootstrap, publish_timeout_s=30)
        await bus.start()
        try:
            topic = Topics(self.namespace).events
            for i in range(0, len(records), 2000):
                await bus.publish_many([Record(topic, k, v) for k, v in records[i : i + 2000]])
        finally:
            await bus.stop()

    async def stored(self) -> int:
        async with self.engine.connect() as conn:
            return int(
                (await conn.execute(select(func.count()).select_from(events_table))).scalar_one()
            )

    async def wait_stored(self, total: int, within_s: float) -> int:
        """Until ``total`` events are stored; fails at once if a resolver died."""
        deadline = time.monotonic() + within_s
        while (n := await self.stored()) < total and time.monotonic() < deadline:
            dead = [p.returncode for p in self.procs if p.poll() is not None and p.returncode != -9]
            assert not dead, (
                f"a resolver exited ({dead}) with {n}/{total} stored\n{self.log_tail()}"
            )
            await asyncio.sleep(0.25)
        return n

    async def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        proc.send_signal(sig)
        try:
            return await asyncio.to_thread(proc.wait, 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


@asynccontextmanager
async def deployment(pg_url: str, bootstrap: str, logs: Path) -> AsyncIterator[Deployment]:
    admin = make_engine(pg_url, "oracle-admin")
    name = f"cdp_oracle_{uuid.uuid4().hex[:10]}"
    async with admin.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = pg_url.rsplit("/", 1)[0] + f"/{name}"
    engine = make_engine(url, "oracle")
    await upgrade_to_head(engine)
    namespace = f"oracle-{uuid.uuid4().hex[:10]}."
    await KafkaBus(bootstrap).ensure_topics(Topics(namespace).all(6))
    dep = Deployment(url, namespace, bootstrap, logs, engine)
    try:
        yield dep
    finally:
        for proc in dep.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for f in dep.files:
            f.close()
        await engine.dispose()
        async with admin.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()
        kafka_admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            await kafka_admin.start()
            await kafka_admin.delete_topics(list(Topics(namespace).all(1)))
        except Exception:  # best effort: a leftover namespace harms nobody
            pass
        finally:
            await kafka_admin.close()


async def check_against_oracle(
    dep: Deployment, history: History, events: list[dict[str, Any]]
) -> None:
    expected = expected_state(events)
    async with dep.engine.connect() as conn:
        actual = await read_actual(conn, None, None)
    problems = compare(expected, actual, history, strict=False)
    assert not problems, report(problems)
    by_count = {g: c["event_count"] for g, c in expected.computed.items()}
    assert sum(by_count.values()) == len(expected.event_group)


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.parametrize("resolvers", [1, 3])
async def test_twenty_thousand_events_through_kafka(
    kafka_bootstrap: str, pg_url: str, tmp_path: Path, resolvers: int
) -> None:
    history = generate(20_000 + resolvers, "big", people=500, events=20_000, shuffle=True)
    records = enrich(history.sent)
    events = [orjson.loads(v) for _, v in records]
    total = len({(e["sourceId"], e["messageId"]) for e in events})
    async with deployment(pg_url, kafka_bootstrap, tmp_path) as dep:
        await dep.publish(records)
        procs = [dep.start_resolver() for _ in range(resolvers)]
        stored = await dep.wait_stored(total, within_s=150)
        assert stored == total, f"{stored}/{total} stored\n{dep.log_tail()}"
        codes = [await dep.stop(p) for p in procs]
        assert codes == [0] * resolvers, dep.log_tail()
        await check_against_oracle(dep, history, events)


async def rewind_group(dep: Deployment, within_s: float = 90) -> None:
    """Commit offset 0 on every partition for the resolver group, as a consumer outside
    it. The broker accepts that only once the group is empty: after a SIGKILL, when the
    dead member's session (6 s here, CDP_KAFKA_SESSION_TIMEOUT_MS) has expired."""
    names = Topics(dep.namespace)
    parts = [TopicPartition(names.events, p) for p in range(6)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=dep.bootstrap, group_id=names.resolver_group, enable_auto_commit=False
    )
    consumer.assign(parts)
    await consumer.start()
    deadline = time.monotonic() + within_s
    try:
        while True:
            try:
                await consumer.commit({tp: 0 for tp in parts})
                return
            except KafkaError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)
    finally:
        await consumer.stop()


@pytest.mark.kafka
@pytest.mark.postgres
async def test_a_resolver_killed_mid_way_loses_and_doubles_nothing(
    kafka_bootstrap: str, pg_url: str, tmp_path: Path
) -> None:
    """SIGKILL mid-way (possibly mid-transaction), then the group's offsets are rewound to
    the start, as if the kill had come between the database commit and the offset commit
    of every batch: everything already stored arrives again and must change nothing."""
    history = generate(5_000, "kill", people=125, events=5_000, shuffle=True)
    records = enrich(history.sent)
    events = [orjson.loads(v) for _, v in records]
    total = len({(e["sourceId"], e["messageId"]) for e in events})
    async with deployment(pg_url, kafka_bootstrap, tmp_path) as dep:
        await dep.publish(records)
        first = dep.start_resolver(  # many small commits; a short session to wait out
            CDP_RESOLVER_BATCH_SIZE="20", CDP_KAFKA_SESSION_TIMEOUT_MS="6000"
        )
        await dep.wait_stored(total // 4, within_s=90)
        await dep.stop(first, signal.SIGKILL)
        at_kill = await dep.stored()
        assert 0 < at_kill < total, f"not killed mid-way: {at_kill}/{total}\n{dep.log_tail()}"
        await rewind_group(dep)
        second = dep.start_resolver()
        stored = await dep.wait_stored(total, within_s=120)
        assert stored == total, f"{stored}/{total} stored (killed at {at_kill})\n{dep.log_tail()}"
        assert await dep.stop(second) == 0, dep.log_tail()
        await check_against_oracle(dep, history, events)
