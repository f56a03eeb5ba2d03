"""``cdp-stream``'s process lifecycle: no stage ends on its own, and a stop signal stops
everything, embedded Postgres included."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from cdp_stream import cli
from cdp_stream.bus.base import Bus
from cdp_stream.settings import Settings
from tests.support import free_port, uid


def _settings(kafka_bootstrap: str, pg_url: str) -> Settings:
    return Settings(
        kafka_bootstrap=kafka_bootstrap,
        database_url=pg_url,
        bootstrap_write_key=uid("wk"),
        topic_namespace=f"test-{uid()}.",
        http_port=free_port(),
    )


async def _returns(bus: Bus, engine: object, settings: Settings, stop: asyncio.Event) -> None:
    """A consumer loop that ends without being asked to."""


async def _cancelled(bus: Bus, engine: object, settings: Settings, stop: asyncio.Event) -> None:
    """A CancelledError escaping a client library (aiokafka while rejoining did)."""
    raise asyncio.CancelledError


@pytest.mark.parametrize("loop", [_returns, _cancelled])
@pytest.mark.parametrize("parts", [(), ("collector",)])
async def test_a_stage_that_ends_on_its_own_exits_non_zero(
    kafka_bootstrap: str,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    loop: object,
    parts: tuple[str, ...],
) -> None:
    monkeypatch.setitem(cli._WORKERS, "resolver", loop)
    with pytest.raises(typer.Exit) as exit_:
        await cli._serve(_settings(kafka_bootstrap, pg_url), "resolver", parts, ("resolver",))
    assert exit_.value.exit_code == 1


def _postgres_of(data_dir: Path) -> int | None:
    """The pid of the embedded server in ``data_dir``, if one runs."""
    pidfile = data_dir / "pgdata" / "postmaster.pid"
    if not pidfile.exists():
        return None
    pid = int(pidfile.read_text().split()[0])
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
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("CDP_") or k.startswith("CDP_TEST")
    }
    env |= {"CDP_DATA_DIR": str(tmp_path), "CDP_HTTP_PORT": str(free_port())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdp_stream", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the first thing it says once every stage runs
            if "http: http://" in line:
                break
        else:
            pytest.fail(f"cdp-stream up ended before serving (status {proc.wait()})")
        postgres = _postgres_of(tmp_path)
        assert postgres is not None
        proc.send_signal(sig)
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status in (0, -signal.SIGINT, 130)  # SIGINT may end it as KeyboardInterrupt
    deadline = time.monotonic() + 10
    while _postgres_of(tmp_path) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _postgres_of(tmp_path)
    if left is not None:
        os.kill(left, signal.SIGTERM)  # not leave it behind for the next test run
    assert left is None, "embedded Postgres outlived cdp-stream up"
