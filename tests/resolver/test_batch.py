"""apply_batch on the real Postgres server: redelivery, ordering, concurrent batches, and
a batch that does not wait holding back what another transaction holds."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import asdict
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.profiles import reads
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.models import events as events_table
from cdp_stream.profiles.models import identities
from cdp_stream.resolver import repository as resolver_repo
from cdp_stream.resolver.batch import BatchResult, StaleRead, apply_batch, apply_prepared, prepare
from cdp_stream.resolver.consumer import apply_with_retry
from cdp_stream.settings import Settings

RULES = IdentityRules.from_settings(Settings())


def ev(msg: str, ts: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "identify",
        "messageId": msg,
        "sourceId": "src_test",
        "timestamp": ts,
        "receivedAt": ts,
        "channel": "other",
        **fields,
    }


async def _profile(engine: AsyncEngine, ident: Identifier) -> dict[str, Any]:
    async with engine.connect() as conn:
        pid = await repo.profile_for_identifier(conn, ident)
        assert pid is not None
        profile = await reads.read_profile(conn, pid)
        assert profile is not None
        return asdict(profile)


async def test_redelivered_batch_changes_nothing(engine: AsyncEngine) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    batch = [
        ev(f"{user}-1", "2024-01-01T00:00:00Z", userId=user, traits={"plan": "free"}),
        ev(f"{user}-2", "2024-01-02T00:00:00Z", userId=user, traits={"plan": "pro"}),
        ev(f"{user}-2", "2024-01-02T00:00:00Z", userId=user, traits={"plan": "pro"}),
    ]
    async with engine.begin() as conn:
        first = await apply_batch(conn, batch, RULES)
    async with engine.begin() as conn:
        second = await apply_batch(conn, batch, RULES)
    assert (first.stored, first.duplicates) == (2, 1)
    assert (second.stored, second.duplicates) == (0, 3)
    profile = await _profile(engine, Identifier("user_id", user))
    assert profile["traits"] == {"plan": "pro"}
    assert profile["computed"]["event_count"] == 2


async def test_late_event_does_not_overwrite_newer_trait(engine: AsyncEngine) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    async with engine.begin() as conn:
        await apply_batch(
            conn,
            [ev(f"{user}-new", "2024-03-01T00:00:00Z", userId=user, traits={"plan": "pro"})],
            RULES,
        )
    async with engine.begin() as conn:
        await apply_batch(
            conn,
            [
                ev(
                    f"{user}-old",
                    "2024-01-01T00:00:00Z",
                    userId=user,
                    traits={"plan": "free", "city": "Oslo"},
                )
            ],
            RULES,
        )
    profile = await _profile(engine, Identifier("user_id", user))
    assert profile["traits"] == {"plan": "pro", "city": "Oslo"}
    assert profile["computed"]["first_seen"] == "2024-01-01T00:00:00.000000Z"


async def test_concurrent_batches_on_the_same_people_never_split_an_identity(
    engine: AsyncEngine,
) -> None:
    people = [f"u-{uuid.uuid4().hex[:8]}" for _ in range(20)]

    def batch(tag: str, order: list[str]) -> list[dict[str, Any]]:
        return [
            ev(f"{p}-{tag}", "2024-01-01T00:00:00Z", userId=p, anonymousId=f"{p}-anon")
            for p in order
        ]

    batches = [batch(str(i), people if i % 2 else people[::-1]) for i in range(6)]
    await asyncio.gather(*(apply_with_retry(engine, b, RULES) for b in batches))
    async with engine.connect() as conn:
        owners = await conn.execute(
            select(identities.c.value, identities.c.profile_id).where(
                identities.c.value.in_(people + [f"{p}-anon" for p in people])
            )
        )
        by_value = dict(owners.all())
        stored = await conn.scalar(
            select(func.count())
            .select_from(events_table)
            .where(
                events_table.c.message_id.like("u-%")
                & events_table.c.message_id.in_([e["messageId"] for b in batches for e in b])
            )
        )
    assert len(by_value) == 40
    for p in people:
        assert by_value[p] == by_value[f"{p}-anon"]
    assert stored == 120


async def test_not_waiting_holds_back_only_the_people_another_transaction_holds(
    engine: AsyncEngine,
) -> None:
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    ts = "2024-01-01T00:00:00Z"
    async with engine.begin() as conn:  # a's profile: a user id and an email
        await apply_batch(conn, [ev(f"{a}-0", ts, userId=a, traits={"email": f"{a}@x.io"})], RULES)
    batch = prepare(
        [
            ev(f"{a}-2", ts, userId=a),  # an identifier the other transaction holds
            ev(f"{a}-3", ts, traits={"email": f"{a}@x.io"}),  # a free one, of its profile
            ev(f"{b}-1", ts, userId=b),  # someone else
        ],
        RULES,
    )
    async with engine.begin() as other:  # holds a's user id and a's profile row till the end
        await apply_batch(other, [ev(f"{a}-1", ts, userId=a)], RULES)
        async with engine.begin() as conn:  # waiting here would never end: `other` is open
            result = await asyncio.wait_for(apply_prepared(conn, batch, RULES, wait=False), 10)
    assert result.stored == 1
    assert sorted(p.key[1] for p in result.held) == [f"{a}-2", f"{a}-3"]
    async with engine.begin() as conn:  # the next batch, once `other` committed
        later = await apply_prepared(conn, result.held, RULES, wait=False)
    assert (later.stored, later.held) == (2, [])
    profile = await _profile(engine, Identifier("user_id", a))
    assert profile["computed"]["event_count"] == 4
    assert (await _profile(engine, Identifier("user_id", b)))["computed"]["event_count"] == 1


async def _merged_while_locking(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, wait: bool
) -> tuple[str, str, BatchResult]:
    """A batch with an event of anonymous id ``x`` and one of someone else, during which,
    after it read that ``x`` is profile P's and before it locks P, another transaction
    merges P into an older profile Q (``x`` moves to Q) and commits."""
    a, x, c = (f"{k}-{uuid.uuid4().hex[:8]}" for k in "axc")
    email, ts = f"{a}@x.io", "2024-01-01T00:00:00Z"
    async with engine.begin() as conn:
        await apply_batch(conn, [ev(f"{a}-q", ts, traits={"email": email})], RULES)  # Q
    async with engine.begin() as conn:
        await apply_batch(conn, [ev(f"{a}-p", ts, userId=a, anonymousId=x)], RULES)  # P
    lock_profiles = resolver_repo.lock_profiles

    async def merge_first(conn: AsyncConnection, *args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(resolver_repo, "lock_profiles", lock_profiles)
        async with engine.begin() as other:
            await apply_batch(other, [ev(f"{a}-m", ts, userId=a, traits={"email": email})], RULES)
        return await lock_profiles(conn, *args, **kwargs)

    monkeypatch.setattr(resolver_repo, "lock_profiles", merge_first)
    batch = prepare([ev(f"{x}-1", ts, anonymousId=x), ev(f"{c}-1", ts, userId=c)], RULES)
    async with engine.begin() as conn:
        result = await asyncio.wait_for(apply_prepared(conn, batch, RULES, wait=wait), 10)
    return x, c, result


async def test_not_waiting_holds_back_the_events_of_identifiers_merged_away_meanwhile(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, c, result = await _merged_while_locking(engine, monkeypatch, wait=False)
    assert result.stored == 1  # the other person's event: no retry of the whole batch
    assert [p.key[1] for p in result.held] == [f"{x}-1"]
    async with engine.begin() as conn:  # the next batch reads x's owner anew: Q
        later = await apply_prepared(conn, result.held, RULES, wait=False)
    assert (later.stored, later.held) == (1, [])
    merged = await _profile(engine, Identifier("anonymous_id", x))
    assert merged["computed"]["event_count"] == 4  # Q's, P's, the merge's and x's
    assert (await _profile(engine, Identifier("user_id", c)))["computed"]["event_count"] == 1


async def test_waiting_retries_a_batch_whose_identifiers_moved_meanwhile(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(StaleRead):
        await _merged_while_locking(engine, monkeypatch, wait=True)
