"""An audience's members as CSV (``GET /v1/audiences/{id}/members.csv``): a header, then
one chunk per :data:`EXPORT_CHUNK` members, so memory holds one chunk whatever the
audience's size."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation.audiences import repository as aud_repo
from cdp_stream.identity import BUILT_IN

# A member with its main identifiers: per built-in type the one linked most recently.
MEMBER_COLUMNS = ("profile_id", "entered_at", *BUILT_IN)
EXPORT_CHUNK = 1000  # members per CSV chunk (and per fetch from the cursor)


def csv_lines(rows: Iterable[Sequence[str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue().encode()


def csv_row(member: Any) -> list[str]:
    """One member (``profile_id``, ``entered_at``, ``identifiers``) as :data:`MEMBER_COLUMNS`
    (an identifier it lacks: empty)."""
    identifiers = member.identifiers or {}
    return [str(member.profile_id), member.entered_at.isoformat()] + [
        identifiers.get(t, "") for t in BUILT_IN
    ]


async def members_csv(engine: AsyncEngine, audience_id: uuid.UUID) -> AsyncIterator[bytes]:
    """Every member as CSV (:data:`MEMBER_COLUMNS`), a header then one chunk per
    :data:`EXPORT_CHUNK` members: a server-side cursor in one snapshot."""
    yield csv_lines([MEMBER_COLUMNS])
    async with engine.connect() as conn:
        async for rows in aud_repo.stream_members(conn, audience_id, EXPORT_CHUNK):
            yield csv_lines([csv_row(r) for r in rows])
