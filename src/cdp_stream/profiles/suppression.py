"""How the suppression list remembers a deleted person's identifiers without naming them.

Each identifier is stored as a *sealed digest*: its SHA-256 (of ``type``, a unit separator,
the value), encrypted with AES-SIV under ``CDP_SUPPRESSION_KEY``. AES-SIV is deterministic,
so the same identifier always seals to the same text and a lookup is an equality test on
the primary key, as it was; without the key the table is random bytes, so nobody holding
only the table (a dump, a backup, a replica) can test a list of emails or phone numbers
against it, which plain SHA-256 allowed. A keyed hash (HMAC) would hide them as well, but a
key could then never be retired; a seal can be opened with the old key and sealed again
with the new one, so a rotation finishes (``cdp-stream suppression-rekey``).

Each row carries the id of the key that sealed it (``key_id``; NULL for the plain SHA-256
rows written before keys existed, which keep blocking until re-keyed). Lookups try the
current key, every key in ``CDP_SUPPRESSION_OLD_KEYS`` (a rotation in progress) and the
plain digest.

Without a configured key: the embedded default generates one and keeps it in
``<data_dir>/suppression.key`` (see :func:`with_suppression_key`); on a server deployment
the stages that read or write the list (resolver, API) refuse to start, since a key made up
by each process would not match the others' and no key at all leaves the table readable.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from cdp_stream.profiles.models import suppressed_identifiers
from cdp_stream.sealing import SuppressionKeys
from cdp_stream.settings import Settings

log = logging.getLogger(__name__)

KEY_FILE = "suppression.key"


async def rekey(conn: AsyncConnection, keys: SuppressionKeys, batch: int = 1000) -> int:
    """Seal again with the current key every row sealed by an old key or by none (plain
    SHA-256); returns how many. Rows of a key that is not configured are left (and
    counted in the log): they keep their key until it is given as an old key."""
    if keys.current is None:
        return 0
    current, by_id = keys.current, {k.id: k for k in keys.old}
    table = suppressed_identifiers
    rows = await conn.execute(
        select(table.c.digest, table.c.key_id, table.c.created_at).where(
            table.c.key_id.is_distinct_from(current.id)
        )
    )
    moved, unknown = [], 0
    for row in rows:
        if row.key_id is None:
            inner: bytes | None = bytes.fromhex(row.digest)
        elif (old := by_id.get(row.key_id)) is not None:
            inner = old.open(row.digest)
        else:
            inner = None
        if inner is None:
            unknown += 1
            continue
        moved.append((row.digest, current.seal(inner), row.created_at))
    for start in range(0, len(moved), batch):
        chunk = moved[start : start + batch]
        await conn.execute(delete(table).where(table.c.digest.in_([old for old, _, _ in chunk])))
        await conn.execute(
            insert(table).on_conflict_do_nothing(),
            [{"digest": new, "key_id": current.id, "created_at": at} for _, new, at in chunk],
        )
    if unknown:
        log.warning("%d suppression rows are sealed by a key that is not configured", unknown)
    return len(moved)


class MissingSuppressionKey(Exception):
    """A server deployment's resolver or API started without ``CDP_SUPPRESSION_KEY``."""


def with_suppression_key(settings: Settings) -> Settings:
    """The settings with a suppression key: the configured one, or for the embedded default
    the one kept in ``<data_dir>/suppression.key`` (created on first use, mode 0600).
    A server deployment without one raises :class:`MissingSuppressionKey`."""
    if settings.suppression_key is not None:
        return settings
    if not settings.embedded_postgres:
        raise MissingSuppressionKey(
            "CDP_SUPPRESSION_KEY is unset: it seals deleted people's identifiers, so that "
            "the suppression table alone names nobody. Set it (e.g. `openssl rand -hex 32`), "
            "the same on every resolver and API process"
        )
    path = Path(settings.data_dir) / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return settings.model_copy(update={"suppression_key": SecretStr(path.read_text().strip())})


def sealed_rows(
    keys: SuppressionKeys, ids: Iterable[tuple[str, str]]
) -> list[dict[str, str | None]]:
    """The rows a deletion inserts for identifiers ``(type, value)``."""
    return [{"digest": keys.seal(t, v), "key_id": keys.key_id} for t, v in ids]
