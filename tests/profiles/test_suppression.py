"""The suppression list on the real server: sealed with the key, so the table alone does
not give away whom it holds; a deleted person stays deleted through a key rotation and
through the re-keying of rows from before keys existed."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.identity import EMAIL, Identifier, IdentityRules
from cdp_stream.profiles import erasure
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.models import suppressed_identifiers
from cdp_stream.profiles.suppression import (
    KEY_FILE,
    MissingSuppressionKey,
    rekey,
    with_suppression_key,
)
from cdp_stream.resolver.consumer import apply_with_retry
from cdp_stream.sealing import SuppressionKeys
from cdp_stream.settings import Settings
from tests.support import stored_event, uid

TS = "2026-01-01T00:00:00.000000Z"


def rules(key: str | None, *old: str) -> IdentityRules:
    return IdentityRules.from_settings(
        Settings(suppression_key=key, suppression_old_keys=list(old))
    )


def plain(email: str) -> str:
    """What the table held before: anyone can compute it from a list of emails."""
    return hashlib.sha256(f"{EMAIL}\x1f{email}".encode()).hexdigest()


async def delete_person(engine: AsyncEngine, email: str, with_rules: IdentityRules) -> None:
    person = stored_event("src_supp", "identify", TS, userId=uid("u"), traits={"email": email})
    await apply_with_retry(engine, [person], with_rules)
    async with engine.begin() as conn:
        pid = await repo.profile_for_identifier(conn, Identifier(EMAIL, email))
        assert pid is not None
        await erasure.delete_group(conn, pid, with_rules.suppression)


async def blocked(engine: AsyncEngine, email: str, with_rules: IdentityRules) -> bool:
    """Is a late event for ``email`` set aside rather than re-creating the person?"""
    late = stored_event("src_supp", "track", TS, anonymousId=uid("a"), event="E")
    late["context"] = {"traits": {"email": email}}
    result = await apply_with_retry(engine, [late], with_rules)
    return [e["messageId"] for e in result.suppressed] == [late["messageId"]]


async def rows_for(engine: AsyncEngine, digests: list[str]) -> list[tuple[str, str | None]]:
    table = suppressed_identifiers
    async with engine.connect() as conn:
        found = await conn.execute(
            select(table.c.digest, table.c.key_id).where(table.c.digest.in_(digests))
        )
        return [(r.digest, r.key_id) for r in found]


async def test_the_table_alone_does_not_tell_who_was_deleted(engine: AsyncEngine) -> None:
    email, keyed = f"{uid()}@example.com", rules("key-one")
    await delete_person(engine, email, keyed)
    assert await rows_for(engine, [plain(email)]) == []
    [(_, key_id)] = await rows_for(engine, keyed.suppression.candidates(EMAIL, email))
    assert key_id == keyed.suppression.key_id
    assert await blocked(engine, email, keyed)
    assert not await blocked(engine, email, rules("another-key"))  # the key is what matches


async def test_a_rotation_keeps_blocking_and_then_retires_the_old_key(
    engine: AsyncEngine,
) -> None:
    email = f"{uid()}@example.com"
    await delete_person(engine, email, rules("key-one"))

    rotating = rules("key-two", "key-one")  # step 1: new key, the old one still matched
    assert await blocked(engine, email, rotating)
    async with engine.begin() as conn:  # step 2: cdp-stream suppression-rekey
        assert await rekey(conn, rotating.suppression) >= 1
    after = rules("key-two")  # step 3: the old key removed
    assert await blocked(engine, email, after)
    [(_, key_id)] = await rows_for(engine, after.suppression.candidates(EMAIL, email))
    assert key_id == after.suppression.key_id
    assert not await blocked(engine, email, rules("key-one"))  # nothing sealed by it is left


async def test_rows_from_before_keys_are_sealed_and_keep_blocking(engine: AsyncEngine) -> None:
    email = f"{uid()}@example.com"
    await delete_person(engine, email, rules(None))  # unkeyed: plain SHA-256, as before
    assert await rows_for(engine, [plain(email)]) == [(plain(email), None)]
    keyed = rules("key-three")
    assert await blocked(engine, email, keyed)  # matched before the re-keying
    async with engine.begin() as conn:
        assert await rekey(conn, keyed.suppression) >= 1
    assert await rows_for(engine, [plain(email)]) == []
    assert await blocked(engine, email, keyed)


async def test_the_embedded_default_keeps_a_generated_key(tmp_path: Path) -> None:
    first = with_suppression_key(Settings(data_dir=tmp_path))
    again = with_suppression_key(Settings(data_dir=tmp_path))
    assert first.suppression_key is not None and again.suppression_key is not None
    assert first.suppression_key.get_secret_value() == again.suppression_key.get_secret_value()
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert SuppressionKeys.from_settings(first).current is not None


def test_a_server_deployment_without_a_key_is_refused() -> None:
    """A key each process made up would not match the others'; none leaves the table
    readable: the resolver and the API of a server deployment need the configured one."""
    with pytest.raises(MissingSuppressionKey, match="CDP_SUPPRESSION_KEY is unset"):
        with_suppression_key(Settings(database_url="postgresql+asyncpg://db/cdp"))
