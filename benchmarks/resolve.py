"""Resolver throughput into Postgres against the raw COPY ceiling (printed figures, not a test).

The seeded large case of ``tests/resolver/oracle.py`` (``generate``: people browsing
anonymously, signing in, opening emails, buying, sharing devices; shuffled, ~5% delivered
twice; ``--events`` distinct calls, 100,000 by default, by one person for every 40 of them
unless ``--people``, enriched by the collector's own ``intake``) goes
through ``cdp-stream resolver`` processes, 1 and then 3 of them, ``--repeats`` times
(median, min..max: the machine is noisy). Every run has a Postgres database (migrated)
and a topic namespace of its own (``CDP_TOPIC_NAMESPACE``, 6 partitions), so nothing is
deduped away and no other resolver sees the events. All records are published, and
acknowledged, before the resolvers start: only the resolvers are timed, from their start
until ``events`` holds one row per distinct (sourceId, messageId) (polled every 0.2 s;
``count(*)`` once the span of the ids reaches it, see :data:`ID_SPAN`). A hundred
thousand events, not the oracle test's 20,000: those make three of a
resolver's 8,000-event batches, and the rate after the first (two batches, the second
decoded while the first was applied, so partly before the window) is no measure. Figures:
events/s over the whole time, the time to the first stored row
(start-up: imports, connections, joining the group) and the rate after it. On ``make
bench``'s broker (Kafka's default ``group.initial.rebalance.delay.ms``, 3 s) resolvers
started together join the group before its first assignment, so three begin as a group
of three; on one with no delay (the test broker) the first took every partition, the
others joined a second later and the rebalances, and the batches whose commits they
refused, were most of the three's short run.

The ceiling, in the same run and database once the resolvers are stopped: the same rows
(one profile per identity group the oracle expects) written by one asyncpg
``copy_records_to_table`` into a table shaped as ``events`` with its indexes
(``LIKE events INCLUDING ALL``), and into a bare one (``INCLUDING DEFAULTS``).

CPU, sampled after start-up (100% = one core), says what bounds the figure:
``resolvers``; ``db``, the Postgres backends connected to this run's database; ``postgres``,
the whole server (postmaster and every backend, those that exited included: the server is
shared with whatever else runs on the box); ``broker``; ``bench``, this process;
``others``, the machine less all of these; ``machine``. After start-up it is also given per
stored event (ms), which the noise of other processes does not inflate as it does rates.
Lock waits: the mean number of resolver backends waiting on a lock (``wait_event_type``
``Lock``: advisory locks on identifiers, profile rows) over the polls after start-up; and,
from each resolver's ``/metrics`` once every event is stored, how often events were held
back (their people locked by another resolver's batch; one held back twice counts twice)
and the seconds all batches spent taking their locks: with several resolvers on this
case's few people nearly every batch shares someone with the others', and an event held
back :data:`cdp_stream.consuming.HOLD_ROUNDS` times, or once the backlog is worked off,
is applied waiting for them (the waits). The size of
``profile_update_outbox`` (heap, TOAST, indexes): the largest at a poll, and once the
resolvers have stopped, with its live and dead rows: what the insert-then-delete churn
of the updates left. The summary ends with
the targets of issue 10, met or not. At exit the resolvers are stopped (SIGTERM) and every
database, topic and consumer group this run made is dropped.

    .venv/bin/python benchmarks/resolve.py [--events 100000] [--people N] [--repeats 3]
        [--resolvers 1 3] [--batch-size N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
from collect import cleanup, cpu_s, database, free_port, service_args  # the sibling's helpers
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from cdp_stream.resolver.repository import EVENT_COLUMNS

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """The published records, the rows they must end as, and how many."""

    records: list[tuple[bytes, bytes]]
    rows: list[tuple[Any, ...]]  # for COPY, in EVENT_COLUMNS order, one per stored event
    people: int
    groups: int


@dataclass(frozen=True)
class Outbox:
    """``profile_update_outbox`` after a run: what its insert-then-delete churn left."""

    bytes: int  # pg_total_relation_size: heap, TOAST and indexes
    live: int
    dead: int  # pg_stat_user_tables.n_dead_tup (the statistics lag by up to a second)

    def __str__(self) -> str:
        return f"{self.bytes / 1024:,.0f} KiB, {self.live} live rows, {self.dead:,} dead"


@dataclass
class Run:
    resolvers: int
    stored: int = 0
    seconds: float = 0.0
    first_s: float | None = None  # time to the first stored row
    first_n: int = 0  # rows stored at that moment
    cpu: dict[str, float] = field(default_factory=dict)  # % of a core after start-up
    per_resolver: list[float] = field(default_factory=list)  # % of a core after start-up
    per_event: dict[str, float] = field(default_factory=dict)  # CPU ms/event after start-up
    waits: dict[str, float] = field(default_factory=dict)  # mean resolver backends per state
    copy_indexed: float = 0.0  # rows/s
    copy_bare: float = 0.0
    outbox: Outbox | None = None  # profile_update_outbox once the resolvers stopped
    outbox_peak: int = 0  # its largest size (bytes) at a poll during the run
    retries: int = 0  # batch retries in the resolver logs (conflicts, races)
    batches: int = 0  # transactions that stored events
    held_back: float = 0.0  # events held back (each time), from the resolvers' metrics
    lock_wait_s: dict[str, float] = field(default_factory=dict)  # all resolvers', by lock
    codes: list[int | None] = field(default_factory=list)
    failure: str | None = None

    @property
    def lock_waits(self) -> float:
        """Mean number of resolver backends waiting on a lock (advisory or row) at a poll."""
        return sum(v for k, v in self.waits.items() if k.startswith("Lock:"))

    @property
    def rate(self) -> float:
        return self.stored / self.seconds

    @property
    def steady(self) -> float:
        """The rate once the first row is stored (start-up excluded)."""
        assert self.first_s is not None
        return (self.stored - self.first_n) / max(self.seconds - self.first_s, 1e-9)


# -- the case ------------------------------------------------------------------------------


def make_case(events: int, people: int | None, seed: int) -> Case:
    """The seeded large case of the oracle tests, as records and as the rows they become."""
    sys.path.insert(0, str(ROOT))
    from tests.resolver.oracle import enrich, expected_state, generate

    people = people or max(2, events // 40)  # as the oracle test's 500 people, 20,000 events
    history = generate(seed, "big", people=people, events=events, shuffle=True)
    records = enrich(history.sent)
    decoded = [orjson.loads(value) for _, value in records]
    expected = expected_state(decoded)
    profile = {group: uuid.uuid4() for group in expected.groups}
    rows, seen = [], set()
    for (_, value), e in zip(records, decoded, strict=True):
        key = (e["sourceId"], e["messageId"])
        if key in seen or key not in expected.event_group:  # a duplicate, or parked
            continue
        seen.add(key)
        pid = profile[expected.event_group[key]]
        rows.append(
            (
                *key,
                pid,
                e["type"],
                e.get("event") or e.get("name"),
                e.get("channel", "other"),
                datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")),
                datetime.fromisoformat(e["receivedAt"].replace("Z", "+00:00")),
                value.decode(),
                pid,
            )
        )
    return Case(records, rows, people, len(expected.groups))


# -- measuring -----------------------------------------------------------------------------


def server_cpu_s(root: psutil.Process | None) -> float:
    """CPU seconds of a server and all its children, those it has reaped included (the
    backends of every connection, come and gone: Postgres forks one per connection)."""
    if root is None:
        return 0.0
    try:
        children = root.children(recursive=True)
    except psutil.Error:
        return 0.0
    total = cpu_s(children)
    try:
        t = root.cpu_times()
        return total + t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
        return total


def backends_cpu_s(root: psutil.Process | None, db: str) -> dict[int, float]:
    """pid -> CPU seconds of the live Postgres backends connected to ``db`` (their process
    title names it): the server is shared with whatever else runs on the box."""
    out: dict[int, float] = {}
    with contextlib.suppress(psutil.Error):
        for p in root.children() if root else []:
            with contextlib.suppress(psutil.Error):
                if f" {db} " in " ".join(p.cmdline()):
                    out[p.pid] = sum(p.cpu_times()[:2])
    return out


def listener(port: int) -> psutil.Process | None:
    """The process listening on ``port`` on this machine (the broker, the postmaster)."""
    try:
        conns = psutil.net_connections("tcp")
        pids = {c.pid for c in conns if c.status == "LISTEN" and c.laddr.port == port and c.pid}
        return psutil.Process(min(pids)) if pids else None
    except psutil.Error:
        return None


@dataclass
class Meter:
    """CPU seconds, sampled at moments, of: the resolvers, this database's backends, the
    whole Postgres server, the broker, this benchmark, the machine."""

    resolvers: list[psutil.Process]
    postgres: psutil.Process | None
    broker: psutil.Process | None
    db: str
    samples: list[tuple[float, dict[str, float], dict[int, float]]] = field(default_factory=list)

    def sample(self) -> None:
        cpu = {
            "resolvers": cpu_s(self.resolvers),
            "postgres": server_cpu_s(self.postgres),
            "broker": server_cpu_s(self.broker),
            "bench": cpu_s([psutil.Process()]),
            "machine": cpu_s(None),
        }
        self.samples.append((time.monotonic(), cpu, backends_cpu_s(self.postgres, self.db)))

    def used(self, a: int, b: int) -> dict[str, float]:
        """CPU seconds between samples ``a`` and ``b``, with ``db`` (this database's
        backends) and ``others`` (the machine less everything watched)."""
        (_, x, bx), (_, y, by) = self.samples[a], self.samples[b]
        d = {k: y[k] - x[k] for k in x}
        d["db"] = sum(v - bx.get(pid, 0.0) for pid, v in by.items())
        watched = ("resolvers", "postgres", "broker", "bench")
        d["others"] = max(0.0, d["machine"] - sum(d[k] for k in watched))
        order = ("resolvers", "db", "postgres", "broker", "bench", "others", "machine")
        return {k: d[k] for k in order}


# -- the services --------------------------------------------------------------------------


async def probe(admin_url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url.replace("+asyncpg", ""), timeout=5)
    await conn.close()


def preflight(bootstrap: str, database_url: str) -> None:
    """Exit with what to do when Kafka or Postgres does not answer."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        sys.exit(f"Kafka is not reachable at {bootstrap} ({exc}); start it: make services")
    try:
        asyncio.run(probe(database_url))
    except Exception as exc:  # refused, timeout, auth, unknown database
        sys.exit(f"Postgres is not usable at {database_url} ({exc!r}); make services")


async def prepare(db_url: str, bootstrap: str, namespace: str, case: Case) -> None:
    """Migrate the database, create the topics, publish every record (acknowledged)."""
    from cdp_stream.bus import KafkaBus
    from cdp_stream.bus.base import Record
    from cdp_stream.profiles.db import make_engine
    from cdp_stream.profiles.migrate import upgrade_to_head
    from cdp_stream.topics import Topics

    engine = make_engine(db_url, "bench")
    try:
        await upgrade_to_head(engine)
    finally:
        await engine.dispose()
    topics = Topics(namespace)
    bus = KafkaBus(bootstrap, publish_timeout_s=30)
    await bus.ensure_topics(topics.all(6))
    await bus.start()
    try:
        records = case.records
        for i in range(0, len(records), 2000):
            chunk = records[i : i + 2000]
            await bus.publish_many([Record(topics.events, k, v) for k, v in chunk])
    finally:
        await bus.stop()


def start_resolvers(
    opts: argparse.Namespace, db_url: str, namespace: str, log: Path, ports: list[int]
) -> list[subprocess.Popen[bytes]]:
    """One resolver per metrics port, each in a session of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env |= {"CDP_KAFKA_BOOTSTRAP": opts.bootstrap, "CDP_DATABASE_URL": db_url}
    env |= {"CDP_TOPIC_NAMESPACE": namespace, "CDP_SUPPRESSION_KEY": f"bench-{namespace}"}
    if opts.batch_size is not None:
        env["CDP_RESOLVER_BATCH_SIZE"] = str(opts.batch_size)
    command = [Path(sys.executable).with_name("cdp-stream"), "resolver"]
    procs = []
    with log.open("ab") as out:  # own sessions: Ctrl-C reaches us, we stop them in order
        for port in ports:
            procs.append(
                subprocess.Popen(
                    command,
                    env=env | {"CDP_METRICS_PORT": str(port)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return procs


async def contention(ports: list[int], run: Run) -> None:
    """From the resolvers' own metrics: the events they held back (each time: one held
    back twice counts twice) and the seconds their batches spent taking locks (waiting,
    or trying without waiting), summed over the resolvers."""
    async with httpx.AsyncClient(timeout=5) as client:
        for port in ports:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "cdp_resolver_events_total":
                        if sample.labels.get("outcome") == "held_back":
                            run.held_back += sample.value
                    elif sample.name == "cdp_lock_wait_seconds_sum":
                        lock = sample.labels["lock"]
                        run.lock_wait_s[lock] = run.lock_wait_s.get(lock, 0.0) + sample.value


def stop_resolvers(procs: list[subprocess.Popen[bytes]]) -> list[int | None]:
    """SIGTERM (a graceful shutdown), wait, kill what is left; their exit codes."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        cleanup("stopping a resolver", proc.wait, 30) if proc.poll() is None else None
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return [proc.returncode for proc in procs]


# What the resolvers' backends are doing, at each poll.
ACTIVITY = """SELECT state, wait_event_type, wait_event FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'cdp-stream-resolver'"""


def state_of(state: str | None, wait_type: str | None, wait: str | None) -> str:
    """``idle`` (between transactions), ``in tx`` (idle in transaction: waiting for the
    resolver), ``CPU`` (active, no wait event) or the wait event (``Lock:advisory``...)."""
    if state == "idle in transaction":
        return "in tx"
    if state != "active":
        return "idle"
    return f"{wait_type}:{wait}" if wait_type else "CPU"


# An upper bound of ``count(*)`` of events read from the primary key alone: ids come from a
# sequence (a rolled-back batch leaves a gap, never a repeat). ``count(*)`` scans the
# table, 10 ms at 100,000 rows: polled every 0.2 s it was ~5% of a core of Postgres,
# counted as the resolvers' (``db``) and taken from them.
ID_SPAN = "SELECT coalesce(max(id) - min(id) + 1, 0) FROM events"


async def timed(
    opts: argparse.Namespace, case: Case, db: str, namespace: str, log: Path, run: Run
) -> list[subprocess.Popen[bytes]]:
    """Start the resolvers and poll the events stored every 0.2 s until they are every
    event (or a resolver exits, or ``--timeout``); fills ``run``; returns the resolvers
    (still running: the caller stops them, also on error)."""
    import asyncpg

    db_url = opts.database_url.rsplit("/", 1)[0] + f"/{db}"
    total, procs = len(case.rows), []
    conn = await asyncpg.connect(db_url.replace("+asyncpg", ""), timeout=5)
    try:
        t0 = time.monotonic()
        ports = [free_port() for _ in range(run.resolvers)]
        procs = start_resolvers(opts, db_url, namespace, log, ports)
        opts.procs.extend(procs)  # for the cleanup, whatever happens here
        mine = [psutil.Process(p.pid) for p in procs]
        meter = Meter(mine, opts.postgres, opts.broker, db)
        meter.sample()
        waits: Counter[str] = Counter()
        polls = peak = n = 0
        at_first: list[float] = []  # each resolver's CPU seconds at the first stored row

        async def stored() -> int:
            return int(await conn.fetchval("SELECT count(*) FROM events"))

        while True:
            # ``count(*)`` only when the ids' span says it may have changed what is
            # checked: at the first row, and once every event may be in.
            span = int(await conn.fetchval(ID_SPAN))
            if (span and run.first_s is None) or span >= total:
                n = await stored()
            peak = max(peak, await conn.fetchval(OUTBOX_BYTES))
            elapsed = time.monotonic() - t0
            if n and run.first_s is None:
                run.first_s, run.first_n = elapsed, n
                meter.sample()
                at_first = [cpu_s([p]) for p in mine]
            if run.first_s is not None:  # after start-up: the resolvers are all at work
                polls += 1
                waits.update(state_of(*row) for row in await conn.fetch(ACTIVITY))
            if n >= total:
                break
            if dead := [p.returncode for p in procs if p.poll() is not None]:
                n = await stored()
                run.failure = f"a resolver exited ({dead}) with {n:,}/{total:,} stored"
                break
            if elapsed > opts.timeout:
                n = await stored()
                run.failure = f"only {n:,}/{total:,} stored after {opts.timeout:g} s"
                break
            await asyncio.sleep(0.2)
        meter.sample()
        if run.failure is None:
            await contention(ports, run)
    finally:
        await conn.close()
    run.stored, run.seconds, run.outbox_peak = n, elapsed, peak
    waits.pop("idle", None)
    run.waits = {k: v / max(polls, 1) for k, v in waits.most_common()}
    if run.first_s is not None and n > run.first_n:  # after start-up
        steady, span = meter.used(1, -1), elapsed - run.first_s
        now = [cpu_s([p]) for p in mine]
        run.per_resolver = [100 * (b - a) / span for a, b in zip(at_first, now, strict=True)]
        run.cpu = {k: 100 * v / span for k, v in steady.items()}
        run.per_event = {k: 1000 * steady[k] / (n - run.first_n) for k in ("resolvers", "db")}
    else:  # nothing after start-up to measure: the whole run
        run.per_resolver = [100 * cpu_s([p]) / elapsed for p in mine]
        run.cpu = {k: 100 * v / elapsed for k, v in meter.used(0, -1).items()}
    return procs


OUTBOX_BYTES = "SELECT pg_total_relation_size('profile_update_outbox')"
OUTBOX = """SELECT pg_total_relation_size('profile_update_outbox'),
(SELECT count(*) FROM profile_update_outbox),
(SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'profile_update_outbox')"""


async def copy_ceiling(
    db_url: str, rows: list[tuple[Any, ...]]
) -> tuple[int, Outbox, float, float]:
    """The transactions that stored the events (the resolvers' batches) and what the
    outbox holds, then rows/s of one COPY of ``rows`` into a table like events with its
    indexes, and into a bare one."""
    import asyncpg

    conn = await asyncpg.connect(db_url.replace("+asyncpg", ""), timeout=5)
    rates = []
    try:
        batches = int(await conn.fetchval("SELECT count(DISTINCT xmin::text) FROM events"))
        await asyncio.sleep(1.0)  # the backends' statistics reach pg_stat within a second
        outbox = Outbox(*await conn.fetchrow(OUTBOX))
        for table, like in (("copy_indexed", "INCLUDING ALL"), ("copy_bare", "INCLUDING DEFAULTS")):
            await conn.execute(f"CREATE TABLE {table} (LIKE events {like})")
            t0 = time.perf_counter()
            await conn.copy_records_to_table(table, records=rows, columns=EVENT_COLUMNS)
            rates.append(len(rows) / (time.perf_counter() - t0))
            count = await conn.fetchval(f"SELECT count(*) FROM {table}")
            assert count == len(rows), f"COPY stored {count} of {len(rows)} rows"
    finally:
        await conn.close()
    return batches, outbox, rates[0], rates[1]


def drop_namespace(bootstrap: str, namespace: str) -> None:
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    from cdp_stream.topics import Topics

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    names = Topics(namespace)
    for topic in names.all(1):
        cleanup(f"deleting {topic}", lambda t=topic: admin.delete_topics([t])[t].result(30))

    def delete_group(group: str) -> None:
        try:
            admin.delete_consumer_groups([group])[group].result(30)
        except KafkaException as exc:  # no consumer ever joined it: nothing to delete
            if exc.args[0].code() != KafkaError.GROUP_ID_NOT_FOUND:
                raise

    for group in (names.resolver_group, names.activation_group):
        cleanup(f"deleting group {group}", delete_group, group)


# -- one run -------------------------------------------------------------------------------


def one_run(opts: argparse.Namespace, case: Case, n: int, index: int) -> Run:
    run_id = f"{opts.run_id}_{index}"
    db, namespace = f"cdp_bench_resolve_{run_id}", f"bench-resolve-{run_id}."
    db_url = opts.database_url.rsplit("/", 1)[0] + f"/{db}"
    log = Path(tempfile.gettempdir()) / f"cdp-bench-resolver-{run_id}.log"
    run = Run(n)
    opts.procs = []
    asyncio.run(database(opts.database_url, db, create=True))
    try:
        asyncio.run(prepare(db_url, opts.bootstrap, namespace, case))
        procs = asyncio.run(timed(opts, case, db, namespace, log, run))
        run.codes = stop_resolvers(procs)
        if run.failure is None and run.codes != [0] * n:
            run.failure = f"resolver exit codes {run.codes} (0 expected after SIGTERM)"
        text = log.read_text(errors="replace")
        run.retries = text.count("retrying")
        if run.failure:
            tail = "\n    ".join(line[:300] for line in text.splitlines()[-25:])
            print(f"  !! resolver x{n}: {run.failure}; its log ({log}), last lines:\n    {tail}")
        copied = asyncio.run(copy_ceiling(db_url, case.rows))
        run.batches, run.outbox, run.copy_indexed, run.copy_bare = copied
    finally:
        cleanup("stopping the resolvers", stop_resolvers, opts.procs)
        cleanup("dropping the database", asyncio.run, database(opts.database_url, db, False))
        cleanup("dropping the namespace", drop_namespace, opts.bootstrap, namespace)
    return run


def describe_waits(waits: dict[str, float]) -> str:
    shown = " ".join(f"{k} {v:.2f}" for k, v in list(waits.items())[:6] if v >= 0.005)
    return shown or "none busy"


def contended(run: Run) -> str:
    taking = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(run.lock_wait_s.items()))
    return (
        f"held back {run.held_back / max(run.stored, 1):.2f} times per stored event;"
        f" taking locks (all resolvers' batches): {taking or 'not measured'}"
    )


def show(run: Run, repeat: int) -> None:
    label = f"resolver x{run.resolvers} run {repeat}:"
    if run.first_s is None:
        print(f"  {label:<20} nothing stored in {run.seconds:.1f} s", flush=True)
        return
    shown = " ".join(f"{k} {v:.0f}%" for k, v in run.cpu.items())
    each = "/".join(f"{v:.0f}" for v in run.per_resolver)
    ms = " ".join(f"{k} {v:.3f}" for k, v in run.per_event.items())
    print(
        f"  {label:<20} {run.stored:,} events in {run.seconds:5.1f} s = {run.rate:6,.0f} ev/s;"
        f" first row at {run.first_s:.1f} s, then {run.steady:6,.0f} ev/s;"
        f" {run.batches} batches ({run.stored / max(run.batches, 1):.0f} events each),"
        f" {run.retries} retried\n"
        f"  {'':<20} CPU {shown} (each resolver {each}%);"
        f" after start-up, CPU ms/event: {ms}\n"
        f"  {'':<20} resolvers' backends (mean number): {describe_waits(run.waits)};"
        f" waiting on locks {run.lock_waits:.2f}\n"
        f"  {'':<20} {contended(run)}\n"
        f"  {'':<20} outbox after the run: {run.outbox};"
        f" at most {run.outbox_peak / 1024:,.0f} KiB during it\n"
        f"  {'':<20} COPY of the same rows: {run.copy_indexed:,.0f} rows/s with the indexes"
        f" of events, {run.copy_bare:,.0f} bare",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000, help="distinct calls generated")
    ap.add_argument("--people", type=int, help="people in the history (default: events/40)")
    ap.add_argument("--seed", type=int, default=20_001)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resolvers", type=int, nargs="+", default=[1, 3], help="processes")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to store them all")
    ap.add_argument(
        "--batch-size",
        type=int,
        help="events per resolver transaction (default: the setting's); a steady rate's "
        "batch size (~30 at 1,000 events/s) shows what each batch costs beside its events",
    )
    service_args(ap)
    opts = ap.parse_args()
    # A topic just created may have no leader yet: aiokafka retries, and says so on stderr.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks

    preflight(opts.bootstrap, opts.database_url)
    port = opts.bootstrap.split(",")[0].rpartition(":")[2]
    opts.run_id = uuid.uuid4().hex[:8]
    opts.broker = listener(int(port))
    opts.postgres = listener(make_url(opts.database_url).port or 5432)

    t0 = time.monotonic()
    case = make_case(opts.events, opts.people, opts.seed)
    print(
        f"case: seed {opts.seed}, {case.people} people, {len(case.records):,} records "
        f"({len(case.records) - len(case.rows):,} repeats) -> {len(case.rows):,} events, "
        f"{case.groups:,} profiles expected (made in {time.monotonic() - t0:.1f} s)"
    )
    if opts.postgres is None or opts.broker is None:
        print("  (the Postgres server or broker process is not visible here: its CPU reads 0)")
    runs: list[Run] = []
    for repeat in range(1, opts.repeats + 1):
        for n in opts.resolvers:  # alternating, so drift on the box hits both alike
            runs.append(one_run(opts, case, n, len(runs)))
            show(runs[-1], repeat)
    report(opts, case, runs)


def spread(values: list[float], fmt: str = ",.0f") -> str:
    return f"{statistics.median(values):>7{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


def report(opts: argparse.Namespace, case: Case, runs: list[Run]) -> None:
    print(
        f"\nsummary: median of {opts.repeats} (min..max); {len(case.rows):,} events, "
        f"6 partitions; {os.cpu_count()} cores; CPU 100% = one core, after start-up"
    )
    ok = [r for r in runs if r.failure is None]
    for bad in (r for r in runs if r.failure):
        print(f"  !! resolver x{bad.resolvers}: {bad.failure}")
    medians: dict[int, tuple[float, float]] = {}
    for n in opts.resolvers:
        mine = [r for r in ok if r.resolvers == n]
        if not mine:
            print(f"resolver x{n}: no complete run")
            continue
        medians[n] = (
            statistics.median(r.rate for r in mine),
            statistics.median(r.steady for r in mine),
        )
        cpu = {k: statistics.median(r.cpu[k] for r in mine) for k in mine[0].cpu}
        ms = {
            k: statistics.median(r.per_event.get(k, 0.0) for r in mine) for k in ("resolvers", "db")
        }
        busiest = statistics.median(max(r.per_resolver) for r in mine)
        states = {k for r in mine for k in r.waits}
        waits = {k: statistics.median(r.waits.get(k, 0.0) for r in mine) for k in states}
        waits = dict(sorted(waits.items(), key=lambda kv: -kv[1]))
        print(
            f"resolver x{n:<4} {spread([r.rate for r in mine])} ev/s;"
            f" start-up {spread([r.first_s or 0.0 for r in mine], '.1f')} s,"
            f" after it {spread([r.steady for r in mine])} ev/s;"
            f" batches {spread([float(r.batches) for r in mine], '.0f')},"
            f" retried {spread([float(r.retries) for r in mine], '.0f')}\n"
            f"{'':<14}CPU "
            + " ".join(f"{k} {v:.0f}%" for k, v in cpu.items())
            + f" (busiest resolver {busiest:.0f}%)\n"
            f"{'':<14}CPU ms/event after start-up: "
            + " ".join(f"{k} {v:.3f}" for k, v in ms.items())
            + f"\n{'':<14}resolvers' backends (mean number): {describe_waits(waits)}"
            + f"\n{'':<14}waiting on locks (mean backends, polled from pg_stat_activity"
            f" every 0.2 s): {spread([r.lock_waits for r in mine], '.2f')}"
            + f"\n{'':<14}held back, times per stored event:"
            f" {spread([r.held_back / max(r.stored, 1) for r in mine], '.2f')}"
            + f"\n{'':<14}outbox at most {spread([r.outbox_peak / 1024 for r in mine])} KiB"
            " during a run; after it: "
            + "; ".join(str(r.outbox) for r in mine if r.outbox)
            + f"\n{'':<14}-> {bound(cpu, busiest, ms, waits, medians[n][1], n)}"
        )
    copy = statistics.median(r.copy_indexed for r in runs if r.copy_indexed)
    bare = statistics.median(r.copy_bare for r in runs if r.copy_bare)
    print(
        f"COPY, events' indexes {spread([r.copy_indexed for r in runs if r.copy_indexed])} rows/s"
    )
    print(f"COPY, bare table      {spread([r.copy_bare for r in runs if r.copy_bare])} rows/s")
    for n, (m, steady) in medians.items():
        print(
            f"ratio resolver x{n} / COPY: {m / copy:.3f} (after start-up {steady / copy:.3f};"
            f" / bare COPY {m / bare:.3f})"
        )
    if 1 in medians:
        for n, (m, steady) in medians.items():
            if n != 1:
                print(
                    f"ratio resolver x{n} / x1: {m / medians[1][0]:.2f}"
                    f" (after start-up {steady / medians[1][1]:.2f})"
                )
    targets(medians, copy, ok)


def targets(medians: dict[int, tuple[float, float]], copy: float, ok: list[Run]) -> None:
    """Issue 10's resolver targets, each met or not, on the medians (after start-up)."""
    checks = []
    if 1 in medians:
        one = medians[1][1]
        checks += [
            (f"x1 >= 10,000 events/s ({one:,.0f})", one >= 10_000),
            (f"x1 >= 0.2 of COPY ({one / copy:.3f})", one >= 0.2 * copy),
        ]
        for n, (_, steady) in medians.items():
            if n != 1:
                checks.append((f"x{n} >= 1.5 x1 ({steady / one:.2f})", steady >= 1.5 * one))
    for n in medians:
        waits = statistics.median(r.lock_waits for r in ok if r.resolvers == n)
        checks.append((f"x{n} lock waits near zero, < 0.05 ({waits:.2f})", waits < 0.05))
    print("targets: " + "; ".join(f"{what} {'met' if met else 'NOT met'}" for what, met in checks))


def bound(
    cpu: dict[str, float],
    busiest: float,
    ms: dict[str, float],
    waits: dict[str, float],
    rate: float,
    n: int,
) -> str:
    """What the figures say bounds the rate (``rate``: after start-up)."""
    cores = os.cpu_count() or 1
    says = []
    if cpu["machine"] >= 85 * cores:
        says.append(f"the {cores} cores are saturated (others took {cpu['others']:.0f}%)")
    if busiest >= 85:
        says.append("a resolver process is CPU-bound")
    if r := ms.get("resolvers"):
        d = ms.get("db", 0.0)
        loop = (r + d) * rate / 1000 / n
        says.append(
            f"each resolver's loop is computing {loop:.0%} of the time, in turn in the resolver"
            f" ({r:.3f} ms/event) and in Postgres ({d:.3f})"
        )
    locks = sum(v for k, v in waits.items() if k.startswith("Lock:"))
    if locks >= 0.05:
        says.append(f"{locks:.2f} backends wait on locks on average (batches queue)")
    return "; ".join(says) or "nothing measured"


if __name__ == "__main__":
    main()
