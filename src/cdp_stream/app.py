"""Wiring: start the shared resources a process needs and build its HTTP app.

``Runtime`` owns the engine and the bus for one process (migrations and bootstrap
credentials run once at its start); ``create_app`` mounts the collector and/or the API
(with the console at ``/``) on it with ``/healthz`` and ``/readyz``. The stages themselves
know nothing of this module.

The tracking endpoints (the hot path) are plain ASGI apps the :class:`App` serves before
FastAPI's routing; every other route is FastAPI's. A database that is down or whose pool
timed out is answered 503 + Retry-After on every route, never 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cdp_stream import metrics
from cdp_stream.api.audiences import router as audiences_router
from cdp_stream.api.crm import router as crm_router
from cdp_stream.api.deps import Tokens, database_error
from cdp_stream.api.dmp import router as dmp_router
from cdp_stream.api.profiles import LOOKUP_PATHS
from cdp_stream.api.profiles import router as profiles_router
from cdp_stream.api.sources import router as sources_router
from cdp_stream.api.status import router as status_router
from cdp_stream.bus import make_bus
from cdp_stream.bus.base import Bus, BusUnavailable
from cdp_stream.collector.auth import Sources
from cdp_stream.collector.dropin import router as dropin_router
from cdp_stream.collector.library import router as library_router
from cdp_stream.collector.ratelimit import RateLimits
from cdp_stream.collector.routes import TRACKING_PATHS, openapi_paths
from cdp_stream.collector.webhooks import router as webhooks_router
from cdp_stream.console import router as console_router
from cdp_stream.identity import IdentityRules
from cdp_stream.openapi import secure
from cdp_stream.profiles.credentials import NewCredentials, bootstrap_credentials
from cdp_stream.profiles.db import (
    DATABASE_UNAVAILABLE,
    make_engine,
    resolve_database_url,
)
from cdp_stream.profiles.migrate import upgrade_to_head
from cdp_stream.retry import backoff, retry, within
from cdp_stream.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Runtime:
    settings: Settings
    role: str
    engine: AsyncEngine
    bus: Bus
    credentials: NewCredentials = field(default_factory=NewCredentials)
    # The API's profile lookups: a pool of their own, so that other work never holds up a
    # lookup's connection (see ``read_only``); None: they share ``engine``.
    lookups: AsyncEngine | None = None

    @classmethod
    async def start(cls, settings: Settings, role: str, *, migrate: bool = True) -> Runtime:
        """Connect, waiting up to ``startup_timeout_s`` for Postgres and Kafka to answer
        (services often start together); :class:`StartupFailed` says which did not."""
        deadline = asyncio.get_running_loop().time() + settings.startup_timeout_s
        database_url = await resolve_database_url(settings)
        engine = make_engine(database_url, role)

        async def prepare_database() -> NewCredentials:
            if migrate:
                await upgrade_to_head(engine)
            async with engine.begin() as conn:
                return await bootstrap_credentials(
                    conn,
                    settings.bootstrap_write_key,
                    settings.bootstrap_api_token,
                    settings.bootstrap_allowed_origins,
                )

        bus = make_bus(settings, f"cdp-stream-{role}", database_url)
        try:
            where = engine.url.render_as_string(hide_password=True)
            creds = await _when_reachable(f"Postgres at {where}", deadline, prepare_database)
            # Kafka's errors name its address; the Postgres bus is on the database above.
            what = "Kafka" if settings.kafka_bootstrap else "the Postgres bus"
            await _when_reachable(what, deadline, bus.start)
            await bus.ensure_topics(settings.topics.all(settings.topic_partitions))
        except BaseException:
            await bus.stop()
            await engine.dispose()
            raise
        # Connects lazily. Ten kept: a burst of lookups that finds every pooled connection
        # busy opens more, and each one over pool_size is closed again after its lookup.
        lookups = make_engine(database_url, f"{role}-lookups", pool_size=10)
        return cls(settings, role, engine, bus, creds, lookups)

    async def stop(self) -> None:
        await self.bus.stop()
        await self.engine.dispose()
        if self.lookups is not None:
            await self.lookups.dispose()


class StartupFailed(Exception):
    """A service the process needs did not answer within ``startup_timeout_s``."""


async def _when_reachable(what: str, deadline: float, attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()``, retried with backoff while ``what`` is unreachable, until ``deadline``."""

    def waiting(exc: Exception, delay: float) -> None:
        log.warning("waiting for %s (retrying in %.1fs): %s", what, delay, exc)

    try:
        return await retry(
            attempt,
            retry_if=lambda exc: isinstance(exc, _UNREACHABLE),
            delays=within(backoff(0.5, 5.0), deadline, asyncio.get_running_loop().time),
            on_retry=waiting,
        )
    except _UNREACHABLE as exc:
        raise StartupFailed(f"{what} did not answer in time ({exc})") from exc


_UNREACHABLE = (OSError, TimeoutError, OperationalError, InterfaceError, BusUnavailable)


class App(FastAPI):
    """FastAPI, with some paths served by plain ASGI apps before its middleware and
    routing: the collector's tracking endpoints (``plain``, by path: see
    ``cdp_stream.collector.routes``) and the API's profile lookup (``plain_get``: a GET of
    ``prefix/{one segment}``, by prefix, with its route template: see
    ``cdp_stream.api.profiles``).
    Every HTTP request is counted and timed here (``cdp_http_*``), by its route template:
    for a plain endpoint its path without the trailing slash, for a FastAPI route its
    path as declared (``/v1/profiles/{ref}``), ``unmatched`` for any other path."""

    def __init__(
        self,
        plain: dict[str, ASGIApp],
        plain_get: dict[str, tuple[str, ASGIApp]],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.plain = plain
        self.plain_get = plain_get
        self._counted = _Counted()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before answering

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        route, endpoint = path.rstrip("/"), self.plain.get(path)
        if endpoint is None and scope["method"] == "GET":
            prefix, _, last = path.rpartition("/")
            if last and (found := self.plain_get.get(prefix)) is not None:
                route, endpoint = found
        try:
            if endpoint is not None:
                scope["app"] = self
                await endpoint(scope, receive, answer)
            else:
                await super().__call__(scope, receive, answer)
        finally:
            if endpoint is None:
                route = getattr(scope.get("route"), "path", "unmatched")
            self._counted(route, scope["method"], status, time.perf_counter() - started)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, plus the plain endpoints when they are served, and the
        security schemes (see ``cdp_stream.openapi``)."""
        if self.openapi_schema is None:
            schema = secure(super().openapi())
            if self.plain:
                paths, components = openapi_paths()
                schema["paths"] = {**paths, **schema.get("paths", {})}
                schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
        return super().openapi()


class _Counted:
    """``cdp_http_*`` for one answered request; the label children are looked up once
    per (route, method, status), not per request (the collector's hot path)."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[str, Any] = {}

    def __call__(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        if (requests := self._requests.get(key)) is None:
            requests = self._requests[key] = metrics.http_requests.labels(route, method, status)
        if (duration := self._durations.get(route)) is None:
            duration = self._durations[route] = metrics.http_request_duration.labels(route)
        requests.inc()
        duration.observe(seconds)


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    bus: str = Field(description='"ok" or why not')
    database: str = Field(description='"ok" or why not')


_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": Readiness, "description": "the bus or the database does not answer"}
}


def create_app(runtime: Runtime, parts: Collection[str] = ("collector", "api")) -> App:
    app = App(
        TRACKING_PATHS if "collector" in parts else {},
        LOOKUP_PATHS if "api" in parts else {},
        title="cdp-stream",
    )
    app.state.settings = runtime.settings
    app.state.engine = runtime.engine
    app.state.bus = runtime.bus
    app.state.sources = Sources(runtime.engine)
    app.state.rate_limits = RateLimits.from_settings(runtime.settings)
    app.state.tokens = Tokens(runtime.engine)
    app.state.lookups = runtime.lookups or runtime.engine
    app.state.rules = IdentityRules.from_settings(runtime.settings)

    async def database_down(request: Request, exc: Exception) -> JSONResponse:
        """See ``database_error``."""
        route = getattr(request.scope.get("route"), "path", "")
        return database_error(exc, runtime.settings, f"{request.method} {route}")

    for unavailable in DATABASE_UNAVAILABLE:
        app.add_exception_handler(unavailable, database_down)

    if "collector" in parts:
        app.include_router(webhooks_router)
        app.include_router(library_router)
        app.include_router(dropin_router)
    if "api" in parts:
        app.include_router(profiles_router)
        app.include_router(crm_router)
        app.include_router(audiences_router)
        app.include_router(dmp_router)
        app.include_router(sources_router)
        app.include_router(status_router)
        app.include_router(console_router)

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        """This process's Prometheus metrics (every collector worker's, when several
        share the port): see ``cdp_stream.metrics``."""
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE_LATEST)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=Readiness, responses=_NOT_READY)
    async def readyz() -> JSONResponse:
        """The bus and the database answer (readiness)."""
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(runtime.bus.ping(), 5)
            checks["bus"] = "ok"
        except (BusUnavailable, TimeoutError) as exc:
            checks["bus"] = f"unavailable: {exc}"
        try:
            async with runtime.engine.connect() as conn:
                await asyncio.wait_for(conn.execute(text("SELECT 1")), 5)
            checks["database"] = "ok"
        except Exception as exc:  # any failure means not ready; say which
            checks["database"] = f"unavailable: {exc}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503
        )

    return app
