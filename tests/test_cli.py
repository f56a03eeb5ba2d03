"""``cdp-stream``'s process lifecycle as a user meets it.

``cdp-stream up`` with no settings (the embedded Postgres wheel, the bus on it), killed with
SIGKILL at random moments under load, loses no event it acknowledged and stores none twice;
no stage ends on its own; a stop signal stops everything, embedded Postgres included."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import typer

from cdp_stream import cli
from cdp_stream.bus.base import Bus
from cdp_stream.settings import Settings
from tests.support import free_port, serving_up, uid

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


def _settings(kafka_bootstrap: str, pg_url: str) -> Settings:
    return Settings(
        kafka_bootstrap=kafka_bootstrap,
        database_url=pg_url,
        bootstrap_write_key=uid("wk"),
        topic_namespace=f"test-{uid()}.",
        http_port=free_port(),
        suppression_key="test-suppression-key",
    )


async def _returns(bus: Bus, engine: object, settings: Settings, stop: asyncio.Event) -> None:
    """A consumer loop that ends without being asked to."""


async def _cancelled(bus: Bus, engine: object, settings: Settings, stop: asyncio.Event) -> None:
    """A CancelledError escaping a client library (aiokafka while rejoining did)."""
    raise asyncio.CancelledError


@pytest.mark.parametrize(
    ("role", "parts", "loops"), [("resolver", (), ("resolver",)), ("api", ("api",), ())]
)
async def test_a_server_resolver_or_api_without_a_suppression_key_does_not_start(
    kafka_bootstrap: str,
    pg_url: str,
    capsys: pytest.CaptureFixture[str],
    role: str,
    parts: tuple[str, ...],
    loops: tuple[str, ...],
) -> None:
    settings = _settings(kafka_bootstrap, pg_url).model_copy(update={"suppression_key": None})
    with pytest.raises(typer.Exit) as exit_:
        await cli._serve(settings, role, parts, loops)
    assert exit_.value.exit_code == 1
    err = capsys.readouterr().err
    assert f"cdp-stream {role}: cannot start: CDP_SUPPRESSION_KEY is unset" in err


@pytest.mark.parametrize("loop", [_returns, _cancelled])
@pytest.mark.parametrize("parts", [(), ("collector",)])
async def test_a_stage_that_ends_on_its_own_exits_non_zero(
    kafka_bootstrap: str,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    loop: object,
    parts: tuple[str, ...],
) -> None:
    monkeypatch.setitem(cli._WORKERS, "resolver", loop)
    with pytest.raises(typer.Exit) as exit_:
        await cli._serve(_settings(kafka_bootstrap, pg_url), "resolver", parts, ("resolver",))
    assert exit_.value.exit_code == 1
    if loop is _cancelled:  # where the CancelledError came from is logged
        [where] = [r for r in caplog.records if "cancelled from inside" in r.getMessage()]
        assert where.exc_info is not None
        assert "in _cancelled" in "".join(traceback.format_exception(*where.exc_info))


def _postgres_of(data_dir: Path) -> int | None:
    """The pid of the embedded server in ``data_dir``, if one runs."""
    try:
        pid = postmaster(data_dir / "pgdata")[0]
    except FileNotFoundError:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_stopped_by_a_signal_stops_embedded_postgres(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """How Docker, systemd and Kubernetes stop a process: SIGTERM."""
    with serving_up(tmp_path) as (proc, _):
        postgres = _postgres_of(tmp_path)
        assert postgres is not None
        proc.send_signal(sig)
        status = proc.wait(timeout=60)
    assert status in (0, -signal.SIGINT, 130)  # SIGINT may end it as KeyboardInterrupt
    deadline = time.monotonic() + 10
    while _postgres_of(tmp_path) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _postgres_of(tmp_path)
    if left is not None:
        os.kill(left, signal.SIGTERM)  # not leave it behind for the next test run
    assert left is None, "embedded Postgres outlived cdp-stream up"
