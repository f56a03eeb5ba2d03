"""``cdp-stream up`` as a user runs it: no settings, the embedded Postgres wheel, the bus on
it. Killed with SIGKILL at random moments under load, it loses no event it acknowledged
and stores none twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx

from tests.support import free_port

KEY = "wk_kill"
CLI = Path(sys.executable).parent / "cdp-stream"


def postmaster(pgdata: Path) -> tuple[int, str]:
    """The embedded server's pid and asyncpg DSN, from its ``postmaster.pid``."""
    pid, _, _, port, socket_dir, *_ = (pgdata / "postmaster.pid").read_text().splitlines()
    return int(pid), f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"


@contextlib.asynccontextmanager
async def embedded_server(data_dir: Path) -> AsyncIterator[Path]:
    """The data directory of the runs inside; at the end, the embedded server that the
    first run started (and that a SIGKILLed process leaves running) is stopped."""
    try:
        yield data_dir
    finally:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            os.kill(postmaster(data_dir / "pgdata")[0], signal.SIGTERM)


async def start_up(data_dir: Path, port: int) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env |= {"CDP_DATA_DIR": str(data_dir), "CDP_BOOTSTRAP_WRITE_KEY": KEY}
    env |= {"CDP_HTTP_PORT": str(port), "CDP_BOOTSTRAP_API_TOKEN": "tok_kill"}
    proc = await asyncio.create_subprocess_exec(
        CLI, "up", env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(600):
            assert proc.returncode is None, "cdp-stream up exited"
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/readyz")).status_code == 200:
                    return proc
            await asyncio.sleep(0.1)
    proc.kill()
    raise AssertionError("cdp-stream up did not become ready within 60 s")


async def load(port: int, acknowledged: set[str], sender: int) -> None:
    """Send batches (and single tracks) until cancelled; note the messageIds of each 200."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", auth=(KEY, ""), timeout=30
    ) as client:
        for n in range(sys.maxsize):
            ids = [f"s{sender}-{uuid.uuid4().hex}" for _ in range(1 if n % 5 == 0 else 20)]
            events = [
                {"type": "track", "event": "E", "userId": f"u{hash(i) % 50}", "messageId": i}
                for i in ids
            ]
            try:
                if len(events) == 1:
                    r = await client.post("/v1/track", json=events[0])
                else:
                    r = await client.post("/v1/batch", json={"batch": events})
            except httpx.HTTPError:
                await asyncio.sleep(0.05)
                continue
            if r.status_code == 200:
                acknowledged.update(ids)


async def test_kill_9_of_up_under_load_loses_no_acknowledged_event_and_stores_none_twice(
    tmp_path: Path,
) -> None:
    acknowledged: set[str] = set()
    port = free_port()
    async with embedded_server(tmp_path / "data") as data_dir:
        for _ in range(4):
            proc = await start_up(data_dir, port)
            senders = [asyncio.create_task(load(port, acknowledged, s)) for s in range(8)]
            await asyncio.sleep(random.uniform(1.0, 3.0))
            proc.kill()  # SIGKILL, in the middle of requests, publishes and batches
            await proc.wait()
            for s in senders:
                s.cancel()
            await asyncio.gather(*senders, return_exceptions=True)

        proc = await start_up(data_dir, port)  # the pipeline catches up from the log
        conn = await asyncpg.connect(postmaster(data_dir / "pgdata")[1])
        try:
            for _ in range(600):
                async with conn.transaction(isolation="repeatable_read"):  # one snapshot
                    stored = [r[0] for r in await conn.fetch("SELECT message_id FROM events")]
                    counted = await conn.fetchval(
                        "SELECT sum((computed->>'event_count')::int) FROM profiles "
                        "WHERE merged_into IS NULL"
                    )
                if acknowledged <= set(stored):
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
            proc.terminate()
            await proc.wait()

    assert len(acknowledged) > 1000, "the load must have been acknowledged in earnest"
    assert acknowledged - set(stored) == set(), "acknowledged events were lost"
    assert len(stored) == len(set(stored)), "an event was stored twice"
    assert counted == len(stored), "a profile counted an event twice (or missed one)"
