"""``cdp-stream``: one command per process role, plus ``up`` that runs them all in one.

up          collector + resolver + activation + API in one process (embedded default)
collector   the HTTP collector only (stateless; run many behind a load balancer)
resolver    one resolver consumer (run up to the partition count of cdp.events)
activation  one activation consumer: CRM feed, audiences, DMP counts
api         the profile API only
migrate     bring the Postgres schema to the newest migration
crm-redrive send dead CRM webhook deliveries again
suppression-rekey  seal the suppression list with the current key (after a rotation)
schemas     write (or --check) the JSON Schemas in schemas/ from the event models
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
import uvloop

from cdp_stream.activation import webhook
from cdp_stream.activation.consumer import run_activation
from cdp_stream.app import Runtime, StartupFailed, create_app
from cdp_stream.profiles.db import make_engine, resolve_database_url, retrying
from cdp_stream.profiles.migrate import upgrade_to_head
from cdp_stream.profiles.suppression import SuppressionKeys, rekey, with_suppression_key
from cdp_stream.resolver.consumer import run_resolver
from cdp_stream.settings import Settings

Port = Annotated[int | None, typer.Option(help="HTTP port (default: CDP_HTTP_PORT)")]

log = logging.getLogger(__name__)
cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _settings(port: int | None = None) -> Settings:
    settings = Settings()
    return settings if port is None else settings.model_copy(update={"http_port": port})


# The consumer loops a process can run beside (or instead of) its HTTP parts.
_WORKERS = {"resolver": run_resolver, "activation": run_activation}


def _describe(runtime: Runtime, parts: Collection[str], workers: Collection[str]) -> None:
    s = runtime.settings
    say = typer.echo
    stages = [*parts, *workers]
    say(f"cdp-stream {runtime.role}: {', '.join(stages)}")
    if s.postgres_bus:
        say(
            "  bus: a log on the Postgres database below (the default without Kafka). An "
            "event is acknowledged once it is committed to disk: a crash, even kill -9, "
            "loses none that was acknowledged, and a redelivered one is stored once. "
            f"Records are kept {s.bus_retention_s:g} s after every consumer has them; past "
            f"{s.bus_max_backlog:,} records waiting for a consumer the collector answers "
            "503 with Retry-After (clients retry). For more events/s than one box and "
            "Postgres take, set CDP_KAFKA_BOOTSTRAP (README: when to move to Kafka)."
        )
    else:
        say(f"  bus: Kafka at {s.kafka_bootstrap}")
    where = (
        "embedded Postgres in " + str(s.data_dir / "pgdata") if s.embedded_postgres else "postgres"
    )
    say(f"  database: {where} ({runtime.engine.url.render_as_string(hide_password=True)})")
    if "collector" in parts or "api" in parts:
        say(f"  http: http://{s.http_host}:{s.http_port}")
    if runtime.credentials.write_key:
        say(f"  created source write key: {runtime.credentials.write_key}")
    if runtime.credentials.api_token:
        say(f"  created API token (all scopes, shown once): {runtime.credentials.api_token}")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: ``_serve`` owns SIGINT/SIGTERM for every
    part of the process. (uvicorn's re-raises a captured SIGTERM after shutting down, and
    the default SIGTERM action kills the process before ``atexit`` stops embedded Postgres.)"""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(
    settings: Settings, role: str, parts: Collection[str], loops: Collection[str] = ()
) -> None:
    """Run the parts and consumer loops until SIGINT/SIGTERM, then stop them all.

    No stage may end on its own: a consumer loop or the HTTP server that ends before the
    stop signal (an exception, a ``CancelledError`` escaping a client library, or a plain
    return) is logged and the process exits 1, so its supervisor (systemd, Kubernetes,
    Docker's restart policy) starts a fresh one. A fresh process is chosen over restarting
    the task in place because the failure may have left shared state (the producer, the
    pool, a half-left consumer group) in an unknown shape; a new process rebuilds all of
    it, and the work is at-least-once and idempotent, so nothing is lost or doubled.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:  # from the start: a stop during start-up still stops cleanly
        loop.add_signal_handler(sig, stop.set)
    try:
        await _run_stages(with_suppression_key(settings), role, parts, loops, stop)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _run_stages(
    settings: Settings,
    role: str,
    parts: Collection[str],
    loops: Collection[str],
    stop: asyncio.Event,
) -> None:
    try:
        runtime = await Runtime.start(settings, role)
    except StartupFailed as exc:
        typer.echo(f"cdp-stream {role}: cannot start: {exc}", err=True)
        raise typer.Exit(1) from None
    _describe(runtime, parts, loops)
    stages = {
        asyncio.create_task(_WORKERS[name](runtime.bus, runtime.engine, settings, stop)): name
        for name in loops
    }
    server = None
    if parts:
        config = uvicorn.Config(
            create_app(runtime, parts),
            host=settings.http_host,
            port=settings.http_port,
            lifespan="off",
            log_level="info",
            access_log=False,
        )
        server = _Server(config)
        stages[asyncio.create_task(server.serve())] = "http"
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([stopping, *stages], return_when=asyncio.FIRST_COMPLETED)
        ended = {t for t in stages if t.done()}  # before any stop signal: on their own
    finally:
        stop.set()
        if server is not None:
            server.should_exit = True
        await asyncio.gather(*stages, return_exceptions=True)
        stopping.cancel()
        await runtime.stop()
    failed = [t for t in stages if t in ended or t.cancelled() or t.exception() is not None]
    for task in failed:
        how = "was cancelled" if task.cancelled() else "failed" if task.exception() else "returned"
        error = None if task.cancelled() else task.exception()
        log.error("cdp-stream %s: %s %s on its own", role, stages[task], how, exc_info=error)
    if failed:
        raise typer.Exit(1)


@cli.command()
def up(port: Port = None) -> None:
    """Run collector, resolver, activation and API in one process."""
    uvloop.run(_serve(_settings(port), "up", ("collector", "api"), ("resolver", "activation")))


@cli.command()
def collector(port: Port = None) -> None:
    """Run the HTTP collector."""
    uvloop.run(_serve(_settings(port), "collector", ("collector",)))


@cli.command()
def resolver() -> None:
    """Run one resolver consumer in the group."""
    uvloop.run(_serve(_settings(), "resolver", (), ("resolver",)))


@cli.command()
def activation() -> None:
    """Run one activation consumer (CRM feed, audiences, DMP counts) in its group."""
    uvloop.run(_serve(_settings(), "activation", (), ("activation",)))


@cli.command()
def api(port: Port = None) -> None:
    """Run the profile API."""
    uvloop.run(_serve(_settings(port), "api", ("api",)))


@cli.command("crm-redrive")
def crm_redrive() -> None:
    """Send the CRM webhook deliveries that went dead again (after the receiver is fixed)."""

    async def run() -> int:
        engine = make_engine(await resolve_database_url(_settings()), "crm-redrive")
        try:
            return await webhook.redrive(engine)
        finally:
            await engine.dispose()

    typer.echo(f"{asyncio.run(run())} dead deliveries are pending again")


@cli.command("suppression-rekey")
def suppression_rekey() -> None:
    """Seal the suppression list again with CDP_SUPPRESSION_KEY: rows of the keys in
    CDP_SUPPRESSION_OLD_KEYS, and plain SHA-256 rows from before keys existed."""

    async def run() -> int:
        settings = with_suppression_key(_settings())
        keys = SuppressionKeys.from_settings(settings)
        if keys.current is None:
            typer.echo("CDP_SUPPRESSION_KEY is unset: nothing to seal with", err=True)
            raise typer.Exit(1)
        engine = make_engine(await resolve_database_url(settings), "suppression-rekey")
        try:
            return await retrying(engine, lambda conn: rekey(conn, keys))
        finally:
            await engine.dispose()

    n = asyncio.run(run())
    typer.echo(f"{n} suppression rows sealed with the current key")


@cli.command()
def migrate() -> None:
    """Bring the database schema to the newest migration."""

    async def run() -> None:
        engine = make_engine(await resolve_database_url(_settings()), "migrate")
        try:
            await upgrade_to_head(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
    typer.echo("schema is at the newest migration")


@cli.command()
def schemas(
    out: Annotated[Path, typer.Option(help="directory for the JSON Schemas")] = Path("schemas"),
    check: Annotated[bool, typer.Option(help="exit 1 if the files differ from the models")] = False,
) -> None:
    """Write the JSON Schemas generated from the event models."""
    from cdp_stream.schemas_io import check_schemas, write_schemas

    if check:
        drift = check_schemas(out)
        for line in drift:
            typer.echo(line, err=True)
        raise typer.Exit(1 if drift else 0)
    for path in write_schemas(out):
        typer.echo(f"wrote {path}")


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # embedded_postgres logs every initdb/pg_ctl command line with its output at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    cli(prog_name="cdp-stream")


if __name__ == "__main__":
    main()
