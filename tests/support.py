"""Helpers shared by tests (fixtures live in the conftest files)."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import APIRouter, FastAPI
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation.crm.feed import Incoming
from cdp_stream.activation.crm.feed import incoming as feed_incoming
from cdp_stream.api.deps import Tokens
from cdp_stream.app import Runtime, create_app
from cdp_stream.collector.routes import TRACKING_PATHS
from cdp_stream.identity import IdentityRules
from cdp_stream.profiles.credentials import ensure_token
from cdp_stream.profiles.models import events, profile_update_outbox
from cdp_stream.settings import Settings
from cdp_stream.updates import ProfileUpdate


async def eventually(
    probe: Callable[[], Awaitable[Any]], within_s: float = 20.0, interval: float = 0.1
) -> Any:
    """Poll ``probe`` until it returns a truthy value (the pipeline is asynchronous); the
    last result (falsy) when ``within_s`` runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        result = await probe()
        if result or loop.time() > deadline:
            return result
        await asyncio.sleep(interval)


def uid(prefix: str = "") -> str:
    """A unique id: tests share one database and one broker."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}" if prefix else uuid.uuid4().hex[:10]


def stored_event(
    source: str, type_: str, ts: str, *, channel: str = "server", **fields: Any
) -> dict[str, Any]:
    """An event as the resolver reads it from cdp.events (what the collector enriched)."""
    return {
        "type": type_,
        "messageId": uid("m"),
        "sourceId": source,
        "timestamp": ts,
        "receivedAt": ts,
        "channel": channel,
        **fields,
    }


async def outbox_updates(
    engine: AsyncEngine, message_ids: Sequence[str], *, take: bool = False
) -> list[dict[str, Any]]:
    """The profile updates in the outbox that carry one of ``message_ids``, oldest first,
    with their events as the relay adds them; ``take`` deletes them (other tests' stay)."""
    box = profile_update_outbox
    async with engine.begin() as conn:
        rows = (
            await conn.execute(
                select(box.c.id, box.c.payload, box.c.event_sources, box.c.event_messages)
                .where(box.c.event_messages.overlap(list(message_ids)))
                .order_by(box.c.id)
            )
        ).all()
        named = [m for r in rows for m in r.event_messages]
        stored = await conn.execute(
            select(events.c.source_id, events.c.message_id, events.c.payload).where(
                events.c.message_id.in_(named)
            )
        )
        payloads = {(e.source_id, e.message_id): e.payload for e in stored}
        if take:
            await conn.execute(delete(box).where(box.c.id.in_([r.id for r in rows])))
    updates = []
    for r in rows:
        update = orjson.loads(r.payload)
        update["events"] = [
            payloads[k] for k in zip(r.event_sources, r.event_messages, strict=True)
        ]
        updates.append(update)
    return updates


def typed(updates: Sequence[dict[str, Any]]) -> list[ProfileUpdate]:
    """Updates as the activation consumer decodes them off ``cdp.profile-updates``."""
    return [ProfileUpdate.model_validate(u) for u in updates]


def incoming(updates: Sequence[dict[str, Any]], settings: Settings) -> list[Incoming]:
    """The same, with what the CRM feed makes of each alone (as the consumer decodes)."""
    return [feed_incoming(u, settings) for u in typed(updates)]


async def api_app(
    engine: AsyncEngine, router: APIRouter, tokens: Mapping[str, tuple[str, ...]]
) -> FastAPI:
    """One router on its own app, with API tokens (secret -> scopes) created."""
    async with engine.begin() as conn:
        for secret, scopes in tokens.items():
            await ensure_token(conn, uid("tok"), "test", secret, scopes)
    app = FastAPI()
    app.state.settings = Settings()
    app.state.engine = engine
    app.state.tokens = Tokens(engine)
    app.state.lookups = engine
    app.state.rules = IdentityRules.from_settings(Settings())
    app.include_router(router)
    return app


@asynccontextmanager
async def api_client(
    engine: AsyncEngine, router: APIRouter, tokens: Mapping[str, tuple[str, ...]]
) -> AsyncIterator[httpx.AsyncClient]:
    """One router on its own app over httpx, with API tokens (secret -> scopes) created."""
    transport = httpx.ASGITransport(app=await api_app(engine, router, tokens))
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
        yield client


@asynccontextmanager
async def running_pipeline(
    kafka_bootstrap: str,
    pg_url: str,
    *,
    write_key: str,
    api_token: str,
    loops: Sequence[Callable[..., Awaitable[None]]],
    **overrides: Any,
) -> AsyncIterator[Runtime]:
    """A Runtime on the real broker and server, in topics of its own (nothing a shared
    broker holds from earlier runs is replayed), with consumer ``loops`` running and
    ``overrides`` of the settings."""
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        database_url=pg_url,
        bootstrap_write_key=write_key,
        bootstrap_api_token=api_token,
        resolver_poll_timeout_ms=50,
        topic_namespace=f"test-{uid()}.",
        **overrides,
    )
    runtime = await Runtime.start(settings, "test")
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(run(runtime.bus, runtime.engine, settings, stop)) for run in loops
    ]
    try:
        yield runtime
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await runtime.stop()


ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class Gate:
    """In front of a collector app: records each POST to a tracking path (the answer's
    status and the messageIds in the body: a batch's or the one event's) and counts the
    other methods there (CORS preflights); answers the statuses in ``answers`` itself, with
    Retry-After: 1 (and, to a page, the CORS headers the collector would give)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.requests: list[tuple[int, list[str]]] = []
        self.answers: list[int] = []
        self.other_methods: list[str] = []

    def reset(self) -> Gate:
        """Forget what was recorded and queued (a test's fresh start)."""
        self.requests.clear()
        self.answers.clear()
        self.other_methods.clear()
        return self

    def delivered(self) -> Counter[str]:
        """How many times each messageId reached the collector in a request it took."""
        return Counter(m for status, ids in self.requests if status == 200 for m in ids)

    def sizes(self) -> list[int]:
        return [len(ids) for status, ids in self.requests if status == 200]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in TRACKING_PATHS:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            self.other_methods.append(scope["method"])
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        headers = dict(scope["headers"])
        raw = gzip.decompress(body) if headers.get(b"content-encoding") == b"gzip" else body
        sent = json.loads(raw)
        ids = [e["messageId"] for e in sent.get("batch", [sent])]
        if self.answers:
            status = self.answers.pop(0)
            self.requests.append((status, ids))
            answer = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
            if b"origin" in headers:  # readable by the page, as the collector's own 503 is
                answer += [
                    (b"access-control-allow-origin", headers[b"origin"]),
                    (b"access-control-expose-headers", b"Retry-After"),
                ]
            await send({"type": "http.response.start", "status": status, "headers": answer})
            await send({"type": "http.response.body", "body": b'{"success":false}'})
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        status_seen: list[int] = []

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
            await send(message)

        await self.app(scope, replay, capture)
        self.requests.append((status_seen[0] if status_seen else 0, ids))


async def profile_events(
    api: str, token: str, ref: str, count: int, within_s: float = 20
) -> list[dict[str, Any]]:
    """The payloads of the profile's stored events (the API at ``api``), oldest first, once
    there are ``count``; fails if there are more or fewer."""
    async with httpx.AsyncClient(base_url=api) as http:

        async def probe() -> list[dict[str, Any]]:
            r = await http.get(
                f"/v1/profiles/{ref}/events",
                params={"limit": 100},
                headers={"authorization": f"Bearer {token}"},
            )
            items: list[dict[str, Any]] = r.json()["items"] if r.status_code == 200 else []
            return items if len(items) >= count else []

        items = await eventually(probe, within_s)
    assert len(items) == count, f"expected {count} events for {ref}, got {len(items)}"
    return [item["payload"] for item in reversed(items)]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """name + labels -> value of every sample of a Prometheus text exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` whose labels include ``labels`` (0: none)."""
    want = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and want <= got)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """uvicorn serving ``app`` on a fixed port on this loop; stop and start again."""

    def __init__(self, app: ASGIApp, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            ws="none",
            http="h11",
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None


@asynccontextmanager
async def gated_collector(runtime: Runtime, port: int | None = None) -> AsyncIterator[Server]:
    """The collector and API of ``runtime`` on a real socket, behind a :class:`Gate`."""
    server = Server(Gate(create_app(runtime, ["collector", "api"])), port)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def gate_of(server: Server) -> Gate:
    """The server's Gate, reset for the next test."""
    assert isinstance(server.app, Gate)
    return server.app.reset()


# A broker and a server of a test's own (deploy/'s scripts on other ports), for the tests
# that stop, kill or restart them without disturbing the shared ones.
REPO = Path(__file__).resolve().parents[1]


async def kafka_sh(command: str, port: int) -> None:
    """``deploy/kafka/kafka.sh start|stop`` for the broker on ``port`` (controller: +1)."""
    env = {**os.environ, "CDP_KAFKA_PORT": str(port), "CDP_KAFKA_CONTROLLER_PORT": str(port + 1)}
    script = REPO / "deploy" / "kafka" / "kafka.sh"
    proc = await asyncio.create_subprocess_exec("bash", str(script), command, env=env)
    assert await proc.wait() == 0, f"kafka.sh {command} failed on port {port}"


def kafka_pid(port: int) -> int:
    """The pid of the broker ``kafka.sh`` started on ``port``."""
    cache = Path(os.environ.get("CDP_CACHE_DIR", REPO / ".cache"))
    [pidfile] = cache.glob(f"kafka-*/broker-{port}/kafka.pid")
    return int(pidfile.read_text().split()[0])


async def postgres_sh(command: str, port: int) -> None:
    """``deploy/postgres/postgres.sh start|stop`` for the server on ``port``."""
    env = {**os.environ, "CDP_PG_PORT": str(port)}
    script = REPO / "deploy" / "postgres" / "postgres.sh"
    proc = await asyncio.create_subprocess_exec("bash", str(script), command, env=env)
    assert await proc.wait() == 0, f"postgres.sh {command} failed on port {port}"


@contextmanager
def serving_up(data_dir: Path, **env: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``cdp-stream up`` on the embedded default in ``data_dir``, on a free port, with no
    CDP_ setting of this environment but ``env``: (the process, its port) once it serves.
    Stopped with SIGTERM on the way out if it still runs (it stops its Postgres then)."""
    port = free_port()
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("CDP_") or k.startswith("CDP_TEST")
    }
    clean |= env | {"CDP_DATA_DIR": str(data_dir), "CDP_HTTP_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdp_stream", "up"],
        env=clean,
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
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
