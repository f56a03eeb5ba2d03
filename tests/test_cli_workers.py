"""``cdp-stream collector`` with ``CDP_COLLECTOR_WORKERS``: several processes answer on one
port (real Kafka and Postgres), and they stop together."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from tests.support import free_port, uid


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@contextlib.asynccontextmanager
async def collector_with_two_workers(
    kafka_bootstrap: str, pg_url: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    """The command, once it answers: the process, its URL and its write key."""
    port, key = free_port(), uid("wk")
    env = {
        **os.environ,
        "CDP_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CDP_DATABASE_URL": pg_url,
        "CDP_TOPIC_NAMESPACE": uid("workers") + ".",
        "CDP_BOOTSTRAP_WRITE_KEY": key,
        "CDP_COLLECTOR_WORKERS": "2",
    }
    cli = Path(sys.executable).parent / "cdp-stream"
    command = [cli, "collector", "--port", str(port)]
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                assert proc.returncode is None, "the collector exited before it answered"
                await asyncio.sleep(0.2)
        yield proc, url, key
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()


async def test_two_workers_serve_one_port_and_stop_together(
    kafka_bootstrap: str, pg_url: str
) -> None:
    async with collector_with_two_workers(kafka_bootstrap, pg_url) as (proc, url, key):
        workers = children(proc.pid)
        assert len(workers) == 2
        for _ in range(10):  # new connections each time, whichever worker accepts
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                r = await client.post(
                    "/v1/track", json={"userId": "u", "event": "E"}, auth=(key, "")
                )
                assert r.status_code == 200 and r.json() == {"success": True}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert not any(alive(pid) for pid in workers)
        assert proc.stdout is not None
        output = (await proc.stdout.read()).decode()
    assert output.count("cdp-stream collector: collector") == 1  # described once
    assert "workers: 2 processes" in output


async def test_a_worker_that_dies_takes_the_others_down(kafka_bootstrap: str, pg_url: str) -> None:
    async with collector_with_two_workers(kafka_bootstrap, pg_url) as (proc, _, _):
        first, second = children(proc.pid)
        os.kill(first, signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 30) == 1  # a supervisor restarts the whole
        assert not alive(second)
