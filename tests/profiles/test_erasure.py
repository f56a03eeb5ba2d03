"""Erasure on the real server: every profile of the person gone, and one tombstone in
the outbox naming the profiles merged into the erased one (typed ``Erased``)."""

from __future__ import annotations

import orjson
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.profiles import outbox, repository
from cdp_stream.profiles.erasure import erase
from cdp_stream.profiles.models import profiles
from cdp_stream.resolver.consumer import apply_with_retry
from cdp_stream.settings import Settings
from tests.support import stored_event, uid

RULES = IdentityRules.from_settings(Settings())
TS = "2026-01-01T00:00:00.000000Z"


async def test_erase_removes_the_group_and_queues_its_tombstone(engine: AsyncEngine) -> None:
    user, anon = uid("u"), uid("a")
    first = stored_event("src_erase", "page", TS, anonymousId=anon)
    second = stored_event("src_erase", "identify", TS, userId=user)
    await apply_with_retry(engine, [first], RULES)
    await apply_with_retry(engine, [second], RULES)
    async with engine.connect() as conn:
        before = {
            await repository.profile_for_identifier(conn, Identifier("anonymous_id", anon)),
            await repository.profile_for_identifier(conn, Identifier("user_id", user)),
        }
    linking = stored_event("src_erase", "identify", TS, userId=user, anonymousId=anon)
    await apply_with_retry(engine, [linking], RULES)
    async with engine.connect() as conn:
        pid = await repository.profile_for_identifier(conn, Identifier("user_id", user))
    assert pid is not None and len(before) == 2 and pid in before  # two profiles merged
    [merged] = before - {pid}
    assert merged is not None

    async with engine.begin() as conn:
        erased = await erase(conn, pid, RULES.suppression)
    assert erased.profile_id == pid and erased.merged_ids == [merged]
    async with engine.connect() as conn:
        left = await conn.scalar(select(func.count()).where(profiles.c.id.in_([pid, merged])))
    assert left == 0
    async with engine.begin() as conn:
        [(key, payload)] = await outbox.take_outbox(conn, 10, erased.outbox_ids)
    assert key == str(pid)
    tombstone = orjson.loads(payload)
    assert (tombstone["type"], tombstone["profile_id"]) == ("deleted", str(pid))
    assert tombstone["merged_ids"] == [str(merged)]
