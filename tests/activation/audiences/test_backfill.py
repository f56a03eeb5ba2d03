"""Back-fills (:mod:`cdp_stream.activation.audiences.backfill`) on the real Postgres server:
the membership they give is the one real-time updates give; interrupted ones resume."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation.audiences import backfill
from cdp_stream.activation.audiences import repository as aud_repo
from tests.activation.audiences.conftest import Make, uid
from tests.activation.audiences.test_membership import (
    DAY,
    HOUR,
    PRICING,
    apply,
    changes,
    ev,
    members,
    order,
    owner,
    put,
    visit,
)


async def test_backfill_gives_the_membership_real_time_updates_give(
    engine: AsyncEngine, audience: Make
) -> None:
    now = datetime.now(UTC)
    anons = [uid("a-") for _ in range(14)]
    batches: list[dict[str, Any]] = []
    for n, anon in enumerate(anons):
        events = [visit(anon, now - (n % 4) * 3 * DAY - HOUR, "/pricing" if n % 3 else "/blog")]
        if n % 5 == 0:
            events.append(order(anon, now - 20 * DAY))
        if n % 7 == 1:
            events.append(ev("identify", now - DAY, anonymousId=anon, traits={"plan": "pro"}))
        batches.append(events)
    # two people become one: a merge, so the merged-away profile must not count
    email = f"{uid('e-')}@example.com"
    batches.append([ev("identify", now - DAY, anonymousId=anons[1], traits={"email": email})])
    batches.append([ev("identify", now - DAY, anonymousId=anons[2], traits={"email": email})])

    realtime = await audience(PRICING)
    for events in batches:
        await apply(engine, await put(engine, *events), datetime.now(UTC))
    pids = {await owner(engine, "anonymous_id", a) for a in anons}
    assert len(pids) == len(anons) - 1
    expected = await members(engine, realtime) & pids
    assert 0 < len(expected) < len(pids)

    later = await audience(PRICING)
    await backfill.backfill(engine, later, batch=7)
    assert await members(engine, later) & pids == expected
    async with engine.connect() as conn:
        info = await aud_repo.read_audience(conn, later)
    assert info is not None
    progress = info["backfill"]
    assert progress["status"] == "done"
    assert progress["processed"] == progress["total"] >= len(pids)
    assert info["size"] == len(await members(engine, later))
    enters = [c for p, c, _ in await changes(engine, later) if p in pids]
    assert enters == ["enter"] * len(expected)

    await backfill.backfill(engine, later, batch=50)  # again: nothing changes twice
    assert [c for p, c, _ in await changes(engine, later) if p in pids] == enters


async def test_backfill_of_a_missing_audience_does_nothing(engine: AsyncEngine) -> None:
    await backfill.backfill(engine, uuid.uuid4())


async def test_interrupted_backfills_resume(engine: AsyncEngine, audience: Make) -> None:
    aid = await audience({"trait": "plan", "eq": uid()})  # created pending, never started
    assert await backfill.resume_backfills(engine) >= 1
    await backfill.stop_backfills()  # cancelled part-way (or done already): either is fine
    assert await backfill.resume_backfills(engine) >= 0
    for _ in range(200):
        async with engine.connect() as conn:
            info = await aud_repo.read_audience(conn, aid)
        assert info is not None
        if info["backfill"]["status"] == "done":
            break
        await asyncio.sleep(0.05)
    assert info["backfill"]["status"] == "done"
    assert info["size"] == 0
