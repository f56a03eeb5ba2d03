"""Audiences made for one test (the ``audience`` fixture) and its unique names."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation.audiences import repository as aud_repo
from cdp_stream.activation.audiences.rules import parse_rule

Make = Callable[[dict[str, Any]], Awaitable[uuid.UUID]]


def uid(prefix: str = "") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def audience(engine: AsyncEngine) -> AsyncIterator[Make]:
    """Create audiences for one test; deleted afterwards, so later tests' updates do not
    keep evaluating them."""
    made: list[uuid.UUID] = []

    async def make(rule: dict[str, Any]) -> uuid.UUID:
        async with engine.begin() as conn:
            audience_id = await aud_repo.create_audience(conn, uid("aud-"), parse_rule(rule))
        assert audience_id is not None
        made.append(audience_id)
        return audience_id

    yield make
    async with engine.begin() as conn:
        for audience_id in made:
            await aud_repo.delete_audience(conn, audience_id)
