"""The embedded default (``cdp-stream up``, no settings) next to the Kafka setup: intake,
end-to-end rate and memory (printed figures, not a test).

For each setup, ``cdp-stream up`` runs as a subprocess, as a user runs it:

* ``embedded``: no settings at all: the embedded Postgres wheel in a fresh data directory
  and the Postgres bus on it;
* ``kafka``: ``CDP_KAFKA_BOOTSTRAP`` and ``CDP_DATABASE_URL`` (a database of its own on the
  Postgres server, topics in a namespace of their own);
* ``collector`` (on request): ``cdp-stream collector`` on the embedded default, the intake
  without the resolver and activation that share ``up``'s process.

Figures, each the median of ``--repeats`` windows of ``--seconds`` (the machine is noisy),
but the end-to-end rate, over the whole backlog:

1. intake: events/s acknowledged by ``/v1/batch`` (100 events a request) and by single
   ``/v1/track`` calls, from wrk with ``--concurrency`` connections
   (``collect.py``'s load generator), while the resolver and activation in the same
   process work on what arrives;
2. end-to-end: events/s stored in ``events`` (the resolver's profiles) from the intake's
   end until the backlog it left is worked off;
3. raw ceilings in the same run: ``COPY`` of the very records into a table shaped as
   ``bus_records`` on the embedded server, and the raw aiokafka producer (``collect.py``);
   CPU (100% = one core) of ``cdp-stream up``, its Postgres (the embedded server, or this
   run's backends on the shared one), the broker and the machine says what bounds them;
4. memory (embedded only, a fresh data directory, ``CDP_BUS_RETENTION_S=0``): RSS of the
   ``cdp-stream up`` process after ``--rss-events`` / 10 and after ``--rss-events`` events
   acknowledged by ``/v1/batch``, and once the pipeline has stored them (or ``--drain-s``
   passed); the bus table's size beside it.

    .venv/bin/python benchmarks/embedded.py [--seconds 8] [--repeats 3]
        [--setups embedded kafka collector] [--rss-events 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from collect import (
    Server,
    broker_processes,
    cleanup,
    database,
    enriched_records,
    free_port,
    run_load,
    run_wrk,
    service_args,
    wrk,
)
from resolve import drop_namespace, listener
from sqlalchemy.engine import make_url

KEY = "wk_embedded_bench"


@dataclass
class Setup:
    """One ``cdp-stream up`` process and how to reach its database."""

    name: str
    env: dict[str, str]
    role: str = "up"  # or "collector": the intake alone, without the consumers beside it
    dsn: str = ""  # asyncpg DSN of its database, known once it runs
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    figures: dict[str, list[float]] = field(default_factory=dict)


def postmaster(pgdata: Path) -> tuple[int, str]:
    """The embedded server's pid and DSN, from its ``postmaster.pid``."""
    pid, _, _, port, socket_dir, *_ = (pgdata / "postmaster.pid").read_text().splitlines()
    return int(pid), f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"


def start_up(setup: Setup, log: Path) -> None:
    setup.port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")} | setup.env
    env |= {"CDP_BOOTSTRAP_WRITE_KEY": KEY, "CDP_HTTP_PORT": str(setup.port)}
    env |= {"CDP_RATE_LIMIT_PER_S": "0"}  # capacity is measured, not the per-source limit
    command = [Path(sys.executable).with_name("cdp-stream"), setup.role]
    with log.open("ab") as out:
        setup.proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and setup.proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{setup.port}/readyz", timeout=5).status_code == 200:
                if "CDP_DATA_DIR" in setup.env:
                    setup.dsn = postmaster(Path(setup.env["CDP_DATA_DIR"]) / "pgdata")[1]
                return
        time.sleep(0.3)
    setup.proc.kill()
    sys.exit(f"cdp-stream up ({setup.name}) did not become ready; log {log}")


def stop_up(setup: Setup) -> None:
    if setup.proc is not None and setup.proc.poll() is None:
        setup.proc.terminate()
        cleanup("stopping cdp-stream up", setup.proc.wait, 30)
        setup.proc.kill()
    setup.proc = None


def query(dsn: str, sql: str) -> Any:
    """One value from the database of ``dsn``."""

    async def run() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def stored(dsn: str) -> int:
    return int(query(dsn, "SELECT count(*) FROM events"))


def end_to_end(setup: Setup, opts: argparse.Namespace) -> list[float]:
    """Events/s stored by the resolver while it works off the backlog the intake left: from
    the intake's end to the last poll that found more stored, once 2 s went by without
    (fixed windows counted the time after the backlog ran out: a last one printed 0)."""
    c0 = last = stored(setup.dsn)
    t0 = grew = time.monotonic()
    while time.monotonic() - grew < 2.0 and time.monotonic() - t0 < opts.drain_s:
        time.sleep(0.5)
        if (n := stored(setup.dsn)) > last:
            last, grew = n, time.monotonic()
    rate = (last - c0) / max(grew - t0, 1e-9)
    print(
        f"  {setup.name:<9} end-to-end: {rate:>8,.0f} ev/s stored"
        f" ({last - c0:,} events of the backlog in {grew - t0:.1f} s)",
        flush=True,
    )
    return [rate]


def raw_copy(dsn: str, opts: argparse.Namespace) -> list[float]:
    """Rows/s of COPY of the collector's records into a table shaped as bus_records."""
    records = enriched_records()

    async def run() -> list[float]:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TEMP TABLE raw (LIKE bus_records INCLUDING ALL)")
            rates = []
            for _ in range(opts.repeats):
                n, t0 = 0, time.monotonic()
                while time.monotonic() - t0 < opts.seconds:
                    rows = [(1, i % 6, n + i, k, v) for i, (k, v) in enumerate(records)]
                    await conn.copy_records_to_table("raw", records=rows)
                    n += len(rows)
                rates.append(n / (time.monotonic() - t0))
                await conn.execute("TRUNCATE raw")
            return rates
        finally:
            await conn.close()

    rates = asyncio.run(run())
    print(f"  raw COPY into the embedded Postgres: {statistics.median(rates):,.0f} rows/s")
    return rates


class Backends:
    """The Postgres processes under ``root`` (only those of database ``db``, if given),
    listed anew at every CPU sample: pools open connections as the load grows."""

    def __init__(self, root: psutil.Process | None, db: str | None = None) -> None:
        self.root, self.db = root, db

    def __iter__(self) -> Iterator[psutil.Process]:
        try:
            children = self.root.children() if self.root else []
        except psutil.Error:
            children = []
        if self.db is None:
            return iter([self.root, *children] if self.root else [])
        return iter([p for p in children if self._serves_db(p)])

    def _serves_db(self, backend: psutil.Process) -> bool:
        try:  # a backend's title: "postgres: user database host(port) state"
            return f" {self.db} " in " ".join(backend.cmdline())
        except psutil.Error:
            return False


def services(setup: Setup, opts: argparse.Namespace) -> dict[str, Any]:
    """What else works for the setup, to sample its CPU: the embedded server, or the broker
    and this run's backends on the shared Postgres server."""
    if "CDP_DATA_DIR" in setup.env:
        root = psutil.Process(postmaster(Path(setup.env["CDP_DATA_DIR"]) / "pgdata")[0])
        return {"postgres": Backends(root)}
    server = listener(make_url(opts.database_url).port or 5432)
    db = make_url(setup.env["CDP_DATABASE_URL"]).database
    return {"broker": broker_processes(opts.bootstrap), "postgres": Backends(server, db)}


def intake_and_end_to_end(setup: Setup, opts: argparse.Namespace, log: Path) -> None:
    start_up(setup, log)
    assert setup.proc is not None
    print(f"{setup.name}: cdp-stream {setup.role} on port {setup.port}, log {log}", flush=True)
    if setup.name == "embedded":  # before the load: the pipeline is idle
        setup.figures["raw"] = raw_copy(setup.dsn, opts)
    opts.watch = {"up": [psutil.Process(setup.proc.pid)], **services(setup, opts)}
    server = Server(setup.proc, setup.port)
    for endpoint in ("batch", "track"):
        result = run_wrk(f"{setup.name} /v1/{endpoint}", server, endpoint, opts)
        setup.figures[f"/v1/{endpoint}"] = result["rates"]
    setup.figures["end-to-end"] = end_to_end(setup, opts) if setup.role == "up" else []
    stop_up(setup)


def memory(opts: argparse.Namespace, log: Path) -> dict[str, float]:
    """RSS of a fresh embedded ``cdp-stream up`` after a tenth of the events and after all."""
    data = Path(tempfile.mkdtemp(prefix="cdp-bench-rss-"))
    setup = Setup("memory", {"CDP_DATA_DIR": str(data), "CDP_BUS_RETENTION_S": "0"})
    out: dict[str, float] = {}
    try:
        start_up(setup, log)
        assert setup.proc is not None
        up = psutil.Process(setup.proc.pid)
        accepted = rejected = 0
        for label, events in (("tenth", opts.rss_events // 10), ("all", opts.rss_events)):
            while accepted < events:  # /v1/batch x 100 by wrk, in short runs
                run = wrk(setup.port, "batch", 2.0, opts)
                accepted += 100 * (run.requests - run.bad)
                rejected += 100 * run.bad
            out[f"events_{label}"] = accepted
            out[f"rss_{label}"] = up.memory_info().rss / 2**20
            out[f"table_{label}"] = bus_table_mb(setup.dsn)
            print(f"  after {accepted:,.0f} events: RSS {out[f'rss_{label}']:.0f} MB")
        t0 = time.monotonic()
        while (n := stored(setup.dsn)) < accepted and time.monotonic() - t0 < opts.drain_s:
            time.sleep(1)
        out["stored"] = n
        out["rss_drained"] = up.memory_info().rss / 2**20
        out["table_drained"] = bus_table_mb(setup.dsn)
        out["rejected"] = rejected
    finally:
        stop_up(setup)
        stop_embedded(data)
    return out


def bus_table_mb(dsn: str) -> float:
    return float(query(dsn, "SELECT pg_total_relation_size('bus_records')")) / 2**20


def stop_embedded(data: Path) -> None:
    """Stop the embedded server of ``data`` (a process that exits leaves it running when
    another one had been killed) and remove the directory."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        pid = postmaster(data / "pgdata")[0]
        os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(30)
    shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per run")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds before the first window")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight")
    ap.add_argument(
        "--setups",
        nargs="*",
        default=["embedded", "kafka"],
        help="and collector; none: memory only",
    )
    ap.add_argument("--rss-events", type=int, default=100_000, help="0: no memory figure")
    ap.add_argument("--drain-s", type=float, default=300, help="wait for the pipeline to store")
    service_args(ap)
    opts = ap.parse_args()
    opts.write_key, opts.wrk_threads = KEY, 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks

    run_id = uuid.uuid4().hex[:8]
    log = Path(tempfile.gettempdir()) / f"cdp-bench-embedded-{run_id}.log"
    data = Path(tempfile.mkdtemp(prefix="cdp-bench-embedded-"))
    db, namespace = f"cdp_bench_{run_id}", f"bench-{run_id}."
    kafka_url = opts.database_url.rsplit("/", 1)[0] + f"/{db}"
    setups = {
        "embedded": Setup("embedded", {"CDP_DATA_DIR": str(data)}),
        "collector": Setup("collector", {"CDP_DATA_DIR": str(data)}, role="collector"),
        "kafka": Setup(
            "kafka",
            {"CDP_KAFKA_BOOTSTRAP": opts.bootstrap, "CDP_DATABASE_URL": kafka_url}
            | {"CDP_TOPIC_NAMESPACE": namespace, "CDP_SUPPRESSION_KEY": f"bench-{run_id}"},
            dsn=kafka_url.replace("+asyncpg", ""),
        ),
    }
    chosen = [setups[name] for name in opts.setups]
    rss: dict[str, float] = {}
    raw_kafka: list[float] = []
    try:
        if "kafka" in opts.setups:
            asyncio.run(database(opts.database_url, db, create=True))
        for setup in chosen:
            intake_and_end_to_end(setup, opts, log)
        if "kafka" in opts.setups:
            raw_kafka = raw_aiokafka(opts, run_id)
        if opts.rss_events:
            rss = memory(opts, log)
    finally:
        for setup in chosen:
            stop_up(setup)
        stop_embedded(data)
        if "kafka" in opts.setups:
            cleanup("dropping the database", asyncio.run, database(opts.database_url, db, False))
            drop_namespace(opts.bootstrap, namespace)
    report(opts, chosen, raw_kafka, rss)


def raw_aiokafka(opts: argparse.Namespace, run_id: str) -> list[float]:
    from cdp_stream.bus import KafkaBus

    topic = f"cdp-bench-{run_id}"
    asyncio.run(KafkaBus(opts.bootstrap).ensure_topics({topic: 6}))
    opts.watch = {}
    try:
        return list(run_load("raw aiokafka", "aiokafka", (opts.bootstrap, topic), opts)["rates"])
    finally:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": opts.bootstrap})
        cleanup(f"deleting {topic}", lambda: admin.delete_topics([topic])[topic].result(30))


def report(
    opts: argparse.Namespace, setups: list[Setup], raw_kafka: list[float], rss: dict[str, float]
) -> None:
    def med(values: list[float]) -> str:
        return f"{statistics.median(values):>8,.0f}" if values else "       -"

    print(
        f"\nsummary: events/s, median of {opts.repeats} x {opts.seconds:g} s (end-to-end: over the"
        f" backlog the intake left); concurrency "
        f"{opts.concurrency}; {os.cpu_count()} cores (every process on the same box)"
    )
    print(f"{'setup':<10} {'/v1/batch':>9} {'/v1/track':>9} {'end-to-end':>10} {'raw':>9}")
    for s in setups:
        raw = s.figures.get("raw", raw_kafka if s.name == "kafka" else [])
        f = s.figures
        print(
            f"{s.name:<10} {med(f['/v1/batch'])} {med(f['/v1/track'])}  {med(f['end-to-end'])}"
            f"  {med(raw)}"
            + (
                f"  (batch = {statistics.median(f['/v1/batch']) / statistics.median(raw):.2f}"
                " of raw)"
                if raw
                else ""
            )
        )
    print("raw: COPY into the embedded Postgres (embedded), aiokafka producer (kafka)")
    if rss:
        grew = rss["rss_all"] - rss["rss_tenth"]
        per = grew * 2**20 / max(1.0, rss["events_all"] - rss["events_tenth"])
        print(
            f"memory (embedded, CDP_BUS_RETENTION_S=0): RSS {rss['rss_tenth']:.0f} MB after "
            f"{rss['events_tenth']:,.0f} events, {rss['rss_all']:.0f} MB after "
            f"{rss['events_all']:,.0f} ({grew:+.0f} MB, {per:.0f} bytes/event), "
            f"{rss['rss_drained']:.0f} MB once {rss['stored']:,.0f} were stored; bus_records "
            f"{rss['table_tenth']:.0f} / {rss['table_all']:.0f} / {rss['table_drained']:.0f} MB"
            f"; {rss['rejected']:,.0f} answers were 503 (backlog full) and retried"
        )


if __name__ == "__main__":
    main()
