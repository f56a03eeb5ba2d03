"""Back-fills: a new (or re-ruled) audience evaluated over every canonical profile, in
batches, each its own transaction, in the background of the API process; resumed after a
restart (they are idempotent). Progress is kept in ``audiences.backfill``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream.activation.audiences import repository as aud_repo
from cdp_stream.activation.audiences.membership import reconcile
from cdp_stream.profiles.db import retrying

log = logging.getLogger(__name__)


async def backfill(engine: AsyncEngine, audience_id: uuid.UUID, batch: int = 500) -> None:
    """Evaluate every canonical profile for a new audience, ``batch`` at a time, each batch
    its own transaction (so the consumer is never held up for long), recording
    ``{"status", "processed", "total"}`` in ``audiences.backfill``. Profiles changing
    meanwhile are safe: the consumer evaluates them too, against the same state. Stops
    quietly if the audience is deleted; rerunning it is harmless (it records only real
    changes)."""

    async def start(conn: AsyncConnection) -> int | None:
        if not await aud_repo.load_audiences(conn, [audience_id]):
            return None
        total = await aud_repo.count_canonical(conn)
        await aud_repo.set_progress(conn, audience_id, status="running", processed=0, total=total)
        return total

    total = await retrying(engine, start)
    if total is None:
        return
    processed, after = 0, None

    async def step(conn: AsyncConnection) -> list[uuid.UUID] | None:
        chosen = await aud_repo.load_audiences(conn, [audience_id])
        if not chosen:
            return None
        ids = await aud_repo.canonical_page(conn, after, batch)
        await aud_repo.lock_profiles(conn, ids)
        await reconcile(conn, chosen, ids, datetime.now(UTC))
        done = len(ids) < batch
        count = processed + len(ids)
        await aud_repo.set_progress(
            conn,
            audience_id,
            status="done" if done else "running",
            processed=count,
            total=count if done else max(total, count),
        )
        return ids

    try:
        while True:
            ids = await retrying(engine, step)
            if ids is None:
                return
            processed += len(ids)
            if len(ids) < batch:
                return
            after = ids[-1]
    except Exception as exc:
        with contextlib.suppress(Exception):
            async with engine.begin() as conn:
                await aud_repo.set_progress(
                    conn,
                    audience_id,
                    status="failed",
                    processed=processed,
                    total=total,
                    error=str(exc),
                )
        raise


_BACKFILLS: set[asyncio.Task[None]] = set()


def start_backfill(engine: AsyncEngine, audience_id: uuid.UUID) -> asyncio.Task[None]:
    """Run ``backfill`` in the background, keeping a reference to the task (the event
    loop holds only weak ones) and logging its failure."""
    task = asyncio.create_task(backfill(engine, audience_id), name=f"backfill-{audience_id}")
    _BACKFILLS.add(task)

    def done(t: asyncio.Task[None]) -> None:
        _BACKFILLS.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("back-fill of audience %s failed", audience_id, exc_info=t.exception())

    task.add_done_callback(done)
    return task


async def stop_backfills() -> None:
    """Cancel running back-fills (at shutdown); ``resume_backfills`` restarts them."""
    tasks = list(_BACKFILLS)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def resume_backfills(engine: AsyncEngine, stop: asyncio.Event | None = None) -> int:
    """Start again the back-fills a stop interrupted (status pending / running): they are
    idempotent, so starting over is safe. Returns how many were started."""

    ids = await retrying(engine, aud_repo.interrupted_backfills, stop)
    for audience_id in ids:
        start_backfill(engine, audience_id)
    return len(ids)
