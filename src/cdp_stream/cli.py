"""``cdp-stream``: one command per process role, plus ``up`` that runs them all in one.

up          collector + resolver + activation + API in one process (embedded default)
collector   the HTTP collector only (stateless; CDP_COLLECTOR_WORKERS processes on one port)
resolver    one resolver consumer (run up to the partition count of cdp.events)
activation  one activation consumer: CRM feed, audiences, DMP counts
api         the profile API only
migrate     bring the Postgres schema to the newest migration
crm-redrive send dead CRM webhook deliveries again
schemas     write (or --check) the JSON Schemas in schemas/ from the event models
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
import uvloop

from cdp_stream.activation import webhook
from cdp_stream.activation.consumer import run_activation
from cdp_stream.app import Runtime, StartupFailed, create_app
from cdp_stream.profiles.db import make_engine, resolve_database_url
from cdp_stream.profiles.migrate import upgrade_to_head
from cdp_stream.resolver.consumer import run_resolver
from cdp_stream.settings import Settings

Port = Annotated[int | None, typer.Option(help="HTTP port (default: CDP_HTTP_PORT)")]

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
    if s.memory_bus:
        say(
            "  bus: in-process memory bus (embedded default). Events are acknowledged once "
            "they are in this process's memory: a crash loses events not yet stored in "
            "Postgres. Set CDP_KAFKA_BOOTSTRAP for a durable, scaled-out bus."
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


async def _serve(
    settings: Settings,
    role: str,
    parts: Collection[str],
    loops: Collection[str] = (),
    *,
    sock: socket.socket | None = None,
) -> None:
    """Run ``parts`` (HTTP) and ``loops`` (consumers) until SIGINT/SIGTERM. With ``sock`` this
    is one of several worker processes on a shared socket (see :func:`_serve_workers`): the
    database was prepared and the process described before the workers were forked."""
    try:
        runtime = await Runtime.start(settings, role, migrate=sock is None)
    except StartupFailed as exc:
        typer.echo(f"cdp-stream {role}: cannot start: {exc}", err=True)
        raise typer.Exit(1) from None
    if sock is None:
        _describe(runtime, parts, loops)
    stop = asyncio.Event()
    workers = [
        asyncio.create_task(_WORKERS[name](runtime.bus, runtime.engine, settings, stop))
        for name in loops
    ]
    try:
        if parts:
            config = uvicorn.Config(
                create_app(runtime, parts),
                host=settings.http_host,
                port=settings.http_port,
                lifespan="off",
                log_level="info",
                access_log=False,
            )
            server = uvicorn.Server(config)
            # What startup made (modules, the app, its models) lives as long as the process:
            # out of the collector's way, so a garbage collection walks only the requests'.
            gc.freeze()
            for w in workers:  # a consumer that dies takes the process down, never silently
                w.add_done_callback(lambda _: setattr(server, "should_exit", True))
            await server.serve(None if sock is None else [sock])  # returns on SIGINT/SIGTERM
        else:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await asyncio.wait(
                [asyncio.create_task(stop.wait()), *workers], return_when=asyncio.FIRST_COMPLETED
            )
    finally:
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
        for w in workers:
            if w.done() and not w.cancelled() and w.exception():
                raise w.exception()  # type: ignore[misc]
        await runtime.stop()


@cli.command()
def up(port: Port = None) -> None:
    """Run collector, resolver, activation and API in one process."""
    uvloop.run(_serve(_settings(port), "up", ("collector", "api"), ("resolver", "activation")))


@cli.command()
def collector(port: Port = None) -> None:
    """Run the HTTP collector (CDP_COLLECTOR_WORKERS processes)."""
    settings = _settings(port)
    if settings.collector_workers == 1:
        uvloop.run(_serve(settings, "collector", ("collector",)))
    else:
        _serve_workers(settings)


def _serve_workers(settings: Settings) -> None:
    """``collector_workers`` collector processes accepting on one listening socket.

    Why: one process is one Python event loop, so one core; the collector is stateless, so
    more processes on the same port scale it with the cores. The database is migrated and
    the process described once, in a short-lived child; then the socket is bound and the
    workers forked, each with its own engine and bus, in a process group of their own so
    that a terminal's Ctrl-C reaches only this parent, which stops them all with SIGTERM.
    When one worker ends, the others are stopped too (a supervisor restarts the whole).
    This parent never starts a thread or an event loop, so forking it is safe.
    """
    role, parts = "collector", ("collector",)

    async def prepare() -> None:
        try:
            runtime = await Runtime.start(settings, role)
        except StartupFailed as exc:
            typer.echo(f"cdp-stream {role}: cannot start: {exc}", err=True)
            raise typer.Exit(1) from None
        _describe(runtime, parts, ())
        typer.echo(f"  workers: {settings.collector_workers} processes")
        await runtime.stop()

    if _forked(lambda: uvloop.run(prepare()), own_group=False) != 0:
        raise typer.Exit(1)
    sock = socket.socket(socket.AF_INET6 if ":" in settings.http_host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.http_host, settings.http_port))
    sock.listen(2048)
    sock.set_inheritable(True)
    workers = [
        _forked(lambda: uvloop.run(_serve(settings, role, parts, sock=sock)), wait=False)
        for _ in range(settings.collector_workers)
    ]

    def stop(*_: object) -> None:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    stopped = (0, -signal.SIGTERM, -signal.SIGINT)  # uvicorn re-raises the signal it got
    failed = False
    for _ in workers:
        _, status = os.wait()
        failed |= os.waitstatus_to_exitcode(status) not in stopped
        stop()
    raise typer.Exit(1 if failed else 0)


def _forked(work: Callable[[], None], *, wait: bool = True, own_group: bool = True) -> int:
    """Run ``work`` in a forked child: its exit code (``wait``) or its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if own_group:
                os.setpgid(0, 0)
            work()
            code = 0
        except typer.Exit as exc:
            code = exc.exit_code
        except BaseException:
            logging.getLogger(__name__).exception("a collector process failed")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if not wait:
        return pid
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


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
