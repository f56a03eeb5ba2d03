"""``cdp-stream``: one command per process role, plus ``up`` that runs them all in one.

up          collector + resolver + activation + API in one process (embedded default)
collector   the HTTP collector only (stateless; CDP_COLLECTOR_WORKERS processes on one port)
resolver    one resolver consumer (run up to the partition count of cdp.events)
activation  one activation consumer: CRM feed, audiences, DMP counts
api         the profile API only
migrate     bring the Postgres schema to the newest migration
crm-redrive send dead CRM webhook deliveries again
suppression-rekey  seal the suppression list with the current key (after a rotation)
schemas     write (or --check) the JSON Schemas in schemas/ from the event models
demo        send a seeded demo population through a running collector (see the console)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import httpx
import typer
import uvicorn
import uvloop
from sqlalchemy.engine import make_url

from cdp_stream import heap, logs, metrics
from cdp_stream.activation.consumer import run_activation
from cdp_stream.activation.crm import webhook
from cdp_stream.app import Runtime, StartupFailed, create_app
from cdp_stream.profiles.db import make_engine, resolve_database_url, retrying
from cdp_stream.profiles.migrate import upgrade_to_head
from cdp_stream.profiles.suppression import (
    MissingSuppressionKey,
    rekey,
    with_suppression_key,
)
from cdp_stream.resolver.consumer import run_resolver
from cdp_stream.retry import cancel_asked
from cdp_stream.sealing import SuppressionKeys
from cdp_stream.settings import Settings

Port = Annotated[int | None, typer.Option(help="HTTP port (default: CDP_HTTP_PORT)")]

log = logging.getLogger(__name__)
cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _settings(port: int | None = None) -> Settings:
    settings = Settings()
    logs.configure(settings.log_level, settings.log_format, _secrets(settings))
    return settings if port is None else settings.model_copy(update={"http_port": port})


def _secrets(settings: Settings) -> list[str]:
    """What the log formatter masks should a line ever quote it (``cdp_stream.logs``)."""
    keys = [settings.suppression_key, settings.dmp_noise_key, *settings.suppression_old_keys]
    password = make_url(settings.database_url).password if settings.database_url else None
    return [
        s
        for s in (
            settings.bootstrap_write_key,
            settings.bootstrap_api_token,
            settings.crm_webhook_secret,
            settings.mailgun_signing_key,
            password,
            *(k.get_secret_value() for k in keys if k is not None),
        )
        if s
    ]


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
    settings: Settings,
    role: str,
    parts: Collection[str],
    loops: Collection[str] = (),
    *,
    sock: socket.socket | None = None,
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
    logs.set_stage(role)  # the consumer loops set their own
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:  # from the start: a stop during start-up still stops cleanly
        loop.add_signal_handler(sig, stop.set)
    try:
        if "resolver" in loops or "api" in parts:  # the stages that read or write the list
            try:
                settings = with_suppression_key(settings)
            except MissingSuppressionKey as exc:
                typer.echo(f"cdp-stream {role}: cannot start: {exc}", err=True)
                raise typer.Exit(1) from None
        await _run_stages(settings, role, parts, loops, stop, sock)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _run_stages(
    settings: Settings,
    role: str,
    parts: Collection[str],
    loops: Collection[str],
    stop: asyncio.Event,
    sock: socket.socket | None,
) -> None:
    try:
        runtime = await Runtime.start(settings, role, migrate=sock is None)
    except StartupFailed as exc:
        typer.echo(f"cdp-stream {role}: cannot start: {exc}", err=True)
        raise typer.Exit(1) from None
    if sock is None:
        _describe(runtime, parts, loops)
    stages = {
        asyncio.create_task(
            _where_cancelled(_WORKERS[name](runtime.bus, runtime.engine, settings, stop))
        ): name
        for name in loops
    }
    stop_metrics = None
    if loops and settings.metrics_port is not None:
        stop_metrics = metrics.serve(settings.http_host, settings.metrics_port)
    server = None
    if parts:
        config = uvicorn.Config(
            create_app(runtime, parts),
            host=settings.http_host,
            port=settings.http_port,
            lifespan="off",
            log_config=None,  # its lines go through cdp_stream.logs like every other
            access_log=False,
        )
        server = _Server(config)
        heap.settle()
        stages[asyncio.create_task(server.serve(None if sock is None else [sock]))] = "http"
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
        if stop_metrics is not None:
            stop_metrics()
        await runtime.stop()
    failed = [t for t in stages if t in ended or t.cancelled() or t.exception() is not None]
    for task in failed:
        how = "was cancelled" if task.cancelled() else "failed" if task.exception() else "returned"
        error = None if task.cancelled() else task.exception()
        log.error("cdp-stream %s: %s %s on its own", role, stages[task], how, exc_info=error)
    if failed:
        raise typer.Exit(1)


async def _where_cancelled(stage: Awaitable[None]) -> None:
    """Run a consumer loop; if a CancelledError nobody asked for ends it (one escaping a
    client library), log where it came from: a cancelled task keeps no traceback."""
    try:
        await stage
    except asyncio.CancelledError:
        if not cancel_asked():
            log.exception("a consumer loop was cancelled from inside; where")
        raise


@cli.command()
def up(port: Port = None) -> None:
    """Run collector, resolver, activation and API in one process."""
    settings = _settings(port).in_one_process()
    uvloop.run(_serve(settings, "up", ("collector", "api"), ("resolver", "activation")))


@cli.command()
def collector(port: Port = None) -> None:
    """Run the HTTP collector (CDP_COLLECTOR_WORKERS processes)."""
    settings = _settings(port)
    if settings.collector_workers == 1:
        uvloop.run(_serve(settings, "collector", ("collector",)))
    elif not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # The workers must count in shared files, and prometheus_client picks that mode
        # when it is imported: start again, at once, with a directory of this run's own.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=_METRICS_DIR_PREFIX)
        os.execv(sys.executable, [sys.executable, "-m", "cdp_stream", *sys.argv[1:]])
    else:
        _serve_workers(settings)


_METRICS_DIR_PREFIX = "cdp-stream-metrics-"


def _clear_metrics_dir() -> None:
    """Remove the workers' metric files (prometheus_client wants them wiped between
    runs), and the directory too when this command made it."""
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    for stale in directory.glob("*.db"):
        stale.unlink()
    if directory.name.startswith(_METRICS_DIR_PREFIX):
        shutil.rmtree(directory, ignore_errors=True)


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
    for stale in Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"):
        stale.unlink()  # a previous run's counts
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
    stopped = (0, -signal.SIGTERM, -signal.SIGINT)  # stopped by a signal, as asked
    failed = False
    for _ in workers:
        _, status = os.wait()
        failed |= os.waitstatus_to_exitcode(status) not in stopped
        stop()
    _clear_metrics_dir()
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


@cli.command("suppression-rekey")
def suppression_rekey() -> None:
    """Seal the suppression list again with CDP_SUPPRESSION_KEY: rows of the keys in
    CDP_SUPPRESSION_OLD_KEYS, and plain SHA-256 rows from before keys existed."""

    async def run() -> int:
        try:
            settings = with_suppression_key(_settings())
        except MissingSuppressionKey as exc:
            typer.echo(f"cdp-stream suppression-rekey: {exc}", err=True)
            raise typer.Exit(1) from None
        keys = SuppressionKeys.from_settings(settings)
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
def demo(
    people: Annotated[int, typer.Option(help="how many people")] = 3000,
    seed: Annotated[int, typer.Option(help="the same seed gives the same people")] = 7,
    url: Annotated[
        str | None, typer.Option(help="the collector and API (default: CDP_HTTP_HOST:PORT)")
    ] = None,
    write_key: Annotated[
        str | None, typer.Option(help="a source's write key (default: CDP_BOOTSTRAP_WRITE_KEY)")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(help="an API token, to define demo audiences (CDP_BOOTSTRAP_API_TOKEN)"),
    ] = None,
) -> None:
    """Fill a running cdp-stream with a realistic, seeded population, through its collector."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cdp_stream import demo as demo_data

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    settings = _settings()
    base = url or f"http://{settings.http_host}:{settings.http_port}"
    key = write_key or settings.bootstrap_write_key
    api_token = token or settings.bootstrap_api_token
    if not key:
        typer.echo(
            "cdp-stream demo: a write key is needed: --write-key, or CDP_BOOTSTRAP_WRITE_KEY "
            "(`cdp-stream up` printed the one it created at its first start)",
            err=True,
        )
        raise typer.Exit(1)
    population = list(demo_data.population(people, seed, datetime.now(UTC)))
    events = sum(len(p.events) for p in population)

    async def run() -> str | None:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns) as progress:
            bar = progress.add_task(f"sending {events:,} events", total=people)
            await demo_data.send(base, key, population, lambda n: progress.advance(bar, n))
        if not api_token:
            return None
        await demo_data.define_audiences(base, api_token)
        last = next((p.email for p in reversed(population) if p.email), None)
        if last is not None and not await demo_data.resolved(base, api_token, last, 120):
            typer.echo("  (the resolver is still catching up: profiles keep appearing)")
        return last

    try:
        example = asyncio.run(run())
    except (demo_data.DemoFailed, httpx.HTTPError) as exc:
        typer.echo(f"cdp-stream demo: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{people:,} people, {events:,} events sent to {base}.")
    if example is None:
        typer.echo(f"Open {base}/ and sign in with an API token (set --token to add audiences).")
    else:
        typer.echo(
            f"Open {base}/ , sign in with your API token and look up {example}; "
            f"audiences: {', '.join(demo_data.AUDIENCES)}."
        )


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
    logs.configure("info", "auto")  # until a command reads its settings
    # Every line names its stage: the command's until a stage starts (``_serve``).
    logs.set_stage(next((a for a in sys.argv[1:] if not a.startswith("-")), "cli"))
    cli(prog_name="cdp-stream")


if __name__ == "__main__":
    main()
