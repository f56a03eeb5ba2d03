"""The whole pipeline under site-shaped traffic, every stage its own process (printed
figures against the targets of issue 10, not a test: it never asserts).

The production shape on one box, as README "Running the stages apart" starts it: real
Kafka (``--bootstrap``) and real Postgres (a database created for the run, dropped at the
end), ``cdp-stream migrate``, then ``cdp-stream collector``, ``api``, two ``resolver``
processes and one ``activation``, all in a topic namespace of the run's own
(``CDP_TOPIC_NAMESPACE``: fresh topics and consumer groups, deleted at the end).

Load (``benchmarks/loadgen.py``, in ``--generators`` processes of their own): open-loop
(Poisson arrivals on a schedule fixed in advance; latency counted from the scheduled
time, so a stalling server cannot hide its latency by slowing the sender), raw HTTP/1.1
on keep-alive connections, requests pre-built. 70% of the events as single ``/v1/page``,
``/v1/track``, ``/v1/identify`` calls over ``--connections`` connections, 30% in
``/v1/batch`` calls of 10-50 events; ~780 bytes per event (measured and printed);
``--people`` known people, seeded through the collector before the clock starts, plus 20%
of events from new visitors (new anonymous ids, who later identify). Three audiences are
created first (customers, a trait, "added to cart twice in 7 days, never ordered"), so that
activation does what it does on a real site. Beside the load, from this process:
``--lookups``/s profile lookups (``GET /v1/profiles/{ref}`` by ``user_id:``, ``email:``
and ``anonymous_id:`` of known people, open-loop too).

Event -> profile visible: ``--probes``/s identify calls for dedicated people
(``probe-N``), each carrying a unique trait value. From the collector's 2xx, the profile
is read through the API (``GET /v1/profiles/user_id:probe-N``) until the value shows,
polling every max(20 ms, 10% of the time waited so far); the figure is the arrival of the
first answer showing it, so it errs high, by at most one poll interval and one lookup.
This is what a marketer (or a downstream system) sees, API included; a probe still
invisible when the phase's grace time ends counts as infinitely late.

Printed, for the main phase (``--rate`` events/s offered for ``--seconds``): the accepted
rate vs offered, non-2xx answers (5xx apart), collector latency p50/p99, event -> profile
p50/p99, lookup p50/p99, the resolvers' and activation's processed rates and consumer lag,
CPU per process (% of one core: collector, api, each resolver, activation, the broker, this
run's Postgres backends and the whole server, the load generators, this process, and
"others": the rest of the machine, i.e. noise from whatever else runs on it), and where
Postgres's time went, by statement (pg_stat_statements, which
``deploy/postgres/postgres.sh`` loads: the longest statements' share, calls/s, ms and rows
a call).

Then a step test: each rate of ``--steps`` for ``--step-seconds``, after the lag of the
previous step has drained. Consumer-group lag (end offsets minus committed offsets, read
every second with aiokafka's admin client) of the resolvers on ``cdp.events`` and of
activation on ``cdp.profile-updates``. A step holds when the collector answered 2xx for
>= 95% of the offered events by 2 s after the step (requests queued longer are its own
lag) and, for both groups, the lag grows by under 5% of the rate per second (the slope of
a least-squares line through the samples after the first 3 s) and ends under 2 s of
traffic. Capacity is the highest rate of the steps that held before the first that did
not (the test stops there).

Then the catch-up (item 4 of the issue: does activation keep up with the resolvers?),
which the step test cannot answer once the collector is what saturates: with the
resolvers and activation stopped, the collector takes ``--rate`` events/s for
``--catchup-seconds``; the two resolvers are started and work off that backlog alone, then
activation works off the profile updates they made. Each one's rate (from its first
commit to its last, start-up left out) and CPU per record, and activation / resolvers:
the time the resolvers took to make the updates over the time activation took to work
them off (>= 1: it keeps up), and updates/s over events/s. Last, the targets with PASS/MISS.

    .venv/bin/python benchmarks/pipeline.py [--rate 1000] [--seconds 30]
        [--steps 500 1000 2000 3000 4000] [--step-seconds 15] [--catchup-seconds 45]

About 4 minutes by default; every process it starts is stopped at exit (Ctrl-C too), and
the database, topics and consumer groups it made are dropped. Traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import uvloop
from collect import (  # the sibling benchmarks' helpers
    cleanup,
    cpu_s,
    database,
    free_port,
    service_args,
)
from loadgen import Pool, Tally, basic, generator, get, iso, open_loop, poisson, post
from resolve import backends_cpu_s, drop_namespace, listener, preflight, server_cpu_s
from sqlalchemy.engine import make_url

TARGET_VISIBLE_MS, TARGET_LOOKUP_MS, TARGET_CAPACITY = 250.0, 10.0, 3000.0
PROBE_PEOPLE = 300


# -- the stages ----------------------------------------------------------------------------


@dataclass
class Stages:
    """The ``cdp-stream`` processes of the run, by name, each in its own session (Ctrl-C
    reaches this process only, which stops them in order) and with its own log."""

    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> Path:
        return self.logs.with_name(f"{self.logs.name}-{name.replace(' ', '')}.log")

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        command = [str(Path(sys.executable).with_name("cdp-stream")), *args]
        with self.log(name).open("ab") as out:
            proc = subprocess.Popen(
                command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[name] = proc
        return proc

    def tail(self, name: str, lines: int = 20) -> str:
        text = self.log(name).read_text(errors="replace").splitlines()[-lines:]
        return "\n    ".join(line[:300] for line in text)

    def dead(self) -> list[str]:
        return [name for name, p in self.procs.items() if p.poll() is not None]

    def stop(self, *names: str) -> None:
        """SIGTERM (a graceful shutdown), wait, kill what is left; ``names`` (default all)."""
        procs = {n: p for n, p in self.procs.items() if n in names or not names}
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for name, proc in procs.items():
            if proc.poll() is None:
                cleanup(f"stopping {name}", proc.wait, 20)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def ready(port: int, proc: subprocess.Popen[bytes], seconds: float = 90) -> bool:
    """``/readyz`` answers 200 within ``seconds`` (False: it did not, or the process died)."""
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.3)
    return False


# -- measuring -----------------------------------------------------------------------------


class Lag:
    """End offsets vs committed offsets of the resolvers' group on cdp.events and of
    activation's group on cdp.profile-updates, read with aiokafka."""

    def __init__(self, bootstrap: str, namespace: str, partitions: int) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        from cdp_stream.topics import Topics

        names = Topics(namespace)
        self.groups = {
            "resolver": (names.resolver_group, names.events),
            "activation": (names.activation_group, names.profile_updates),
        }
        self.parts = {
            topic: [TopicPartition(topic, p) for p in range(partitions)]
            for _, topic in self.groups.values()
        }
        self.admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self.consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)

    async def start(self) -> None:
        await self.admin.start()
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.admin.close()

    async def sample(self) -> dict[str, tuple[int, int]]:
        """group name -> (records produced, records committed), over its partitions (the
        commits read first: end offsets only grow, so the lag is never negative)."""
        committed = {}
        for name, (group, topic) in self.groups.items():
            done = await self.admin.list_consumer_group_offsets(group, partitions=self.parts[topic])
            committed[name] = sum(max(0, m.offset) for m in done.values() if m is not None)
        ends = await self.consumer.end_offsets([tp for ps in self.parts.values() for tp in ps])
        return {
            name: (sum(ends[tp] for tp in self.parts[topic]), committed[name])
            for name, (_, topic) in self.groups.items()
        }

    async def drained(self, seconds: float) -> dict[str, tuple[int, int]]:
        """Wait until both groups have committed everything twice in a row (or ``seconds``)."""
        deadline, calm = time.monotonic() + seconds, 0
        while True:
            now = await self.sample()
            calm = calm + 1 if all(e == c for e, c in now.values()) else 0
            if calm >= 2 or time.monotonic() > deadline:
                return now
            await asyncio.sleep(0.5)


Sample = tuple[dict[str, float], dict[int, float], dict[str, float]]


def runnable_s(proc: psutil.Process) -> float:
    """Seconds the threads of ``proc`` spent runnable but not running (waiting for a CPU:
    the second field of Linux's ``/proc/PID/task/TID/schedstat``); 0 where unknown."""
    total = 0
    for stat in Path(f"/proc/{proc.pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


@dataclass
class Meter:
    """CPU seconds of every process of the run, and of the machine."""

    procs: dict[str, list[psutil.Process]]
    broker: psutil.Process | None
    postgres: psutil.Process | None
    db: str

    def sample(self) -> Sample:
        cpu = {name: cpu_s(ps) for name, ps in self.procs.items()}
        cpu |= {"broker": server_cpu_s(self.broker), "postgres": server_cpu_s(self.postgres)}
        cpu["machine"] = cpu_s(None)
        waits = {name: sum(map(runnable_s, ps)) for name, ps in self.procs.items()}
        return cpu, backends_cpu_s(self.postgres, self.db), waits

    @staticmethod
    def waiting(a: Sample, b: Sample, seconds: float) -> dict[str, float]:
        """% of the time each process's threads (summed) were ready to run but waited for
        a CPU, between samples ``a`` and ``b``: how much the box's other load held it back."""
        return {k: 100 * (b[2][k] - a[2][k]) / seconds for k in a[2]}

    @staticmethod
    def percent(a: Sample, b: Sample, seconds: float) -> dict[str, float]:
        """% of one core between samples ``a`` and ``b``; ``pg db``: this database's
        backends; ``others``: the machine less every process watched."""
        d = {k: b[0][k] - a[0][k] for k in a[0]}
        d["pg db"] = sum(v - a[1].get(pid, 0.0) for pid, v in b[1].items())
        inside = ("machine", "pg db")  # the machine holds everything; postgres, its backends
        d["others"] = max(0.0, d["machine"] - sum(v for k, v in d.items() if k not in inside))
        order = [k for k in d if k not in ("postgres", "pg db", "others", "machine")]
        order += ["pg db", "postgres", "others", "machine"]
        return {k: 100 * d[k] / seconds for k in order}


def pct(values: list[float], q: float, censored: int = 0) -> float:
    """The ``q`` quantile of ``values`` plus ``censored`` values of +infinity."""
    ranked = sorted(values) + [float("inf")] * censored
    return ranked[min(len(ranked) - 1, int(q * len(ranked)))] if ranked else float("nan")


def ms(value: float) -> str:
    if value == float("inf"):
        return "never"
    return f"{value:,.0f} ms" if value >= 100 else f"{value:.1f} ms"


# -- one phase -----------------------------------------------------------------------------


@dataclass
class Phase:
    rate: float
    seconds: float
    offered: int = 0
    body_bytes: int = 0
    http: Tally = field(default_factory=Tally)  # the generators' requests
    schedule: Tally = field(default_factory=Tally)  # their lateness, what was unanswered
    lookups: Tally = field(default_factory=Tally)
    visible: list[float] = field(default_factory=list)  # ms, event -> profile
    invisible: int = 0  # probes not visible when the grace time ran out
    probe_failed: int = 0  # probes the collector did not accept
    polls: int = 0
    lag: list[tuple[float, dict[str, tuple[int, int]]]] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    waiting: dict[str, float] = field(default_factory=dict)  # % of time waiting for a CPU

    @property
    def accepted(self) -> float:
        return self.http.events / self.seconds

    def count(self, low: int, high: int, tally: Tally | None = None) -> int:
        t = tally or self.http
        return sum(n for s, n in t.statuses.items() if low <= s < high)

    def processed(self, group: str) -> float:
        """Records/s the group committed over the phase."""
        (t0, a), (t1, b) = self.lag[0], self.lag[-1]
        return (b[group][1] - a[group][1]) / max(t1 - t0, 1e-9)

    def held(self, group: str) -> tuple[bool, int, float]:
        """(lag bounded, lag at the end, lag growth per second). The growth is the slope
        of a least-squares line through the lag samples after the first 3 s (the
        pipeline filling up), which one batch committed early or late barely moves."""
        points = [(t, s[group][0] - s[group][1]) for t, s in self.lag if t >= 3.0]
        end = self.lag[-1][1][group][0] - self.lag[-1][1][group][1]
        if len(points) < 3:
            return end <= 2 * self.rate, end, 0.0
        mt = statistics.fmean(t for t, _ in points)
        ml = statistics.fmean(v for _, v in points)
        slope = sum((t - mt) * (v - ml) for t, v in points) / sum((t - mt) ** 2 for t, _ in points)
        return slope <= 0.05 * self.rate and end <= 2 * self.rate, end, slope

    @property
    def share(self) -> float:
        """The part of the offered events accepted."""
        return self.http.events / max(self.offered, 1)

    @property
    def holds(self) -> bool:
        return self.share >= 0.95 and self.held("resolver")[0] and self.held("activation")[0]


@dataclass
class Run:
    opts: argparse.Namespace
    collector: int  # ports
    api: int
    lag: Lag
    meter: Meter
    generators: list[tuple[Any, Any]]  # (process, pipe)


async def probes(run: Run, phase: Phase, grace: float) -> None:
    """Identify calls carrying a unique trait, each read back through the API until it
    shows: ``phase.visible`` (ms from the collector's 2xx)."""
    opts, loop = run.opts, asyncio.get_running_loop()
    auth, bearer = basic(opts.write_key), f"Bearer {opts.api_token}".encode()
    collector, api = Pool(run.collector, 8), Pool(run.api, 16)
    rng = random.Random()

    def probe_send(j: int) -> Any:
        async def send(_at: float) -> None:
            token = uuid.uuid4().hex
            event = {"userId": f"probe-{j}", "messageId": token, "timestamp": iso(time.time())}
            body = orjson.dumps(event | {"traits": {"probe": token}})
            try:
                answer = await collector.request(post("/v1/identify", auth, body))
            except (OSError, ConnectionError):
                answer = None
            if answer is None or not 200 <= answer.status < 300:
                phase.probe_failed += 1
                return
            accepted, read = loop.time(), get(f"/v1/profiles/user_id:probe-{j}", bearer)
            while True:
                try:
                    answer = await api.request(read)
                except (OSError, ConnectionError):
                    continue  # a new connection: the probe's clock runs on
                phase.polls += 1
                waited = loop.time() - accepted
                if token.encode() in answer.body:
                    phase.visible.append(1000 * waited)
                    return
                await asyncio.sleep(max(0.02, 0.1 * waited))

        return send

    start = rng.randrange(PROBE_PEOPLE)
    at = poisson(rng, opts.probes, phase.seconds)
    schedule = [(t, probe_send((start + i) % PROBE_PEOPLE)) for i, t in enumerate(at)]
    unseen = Tally()
    try:
        await open_loop(schedule, unseen, grace)
    finally:
        collector.close()
        api.close()
    phase.invisible = unseen.unanswered


async def lookups(run: Run, phase: Phase) -> None:
    """Profile lookups of known people by each kind of ref, open-loop."""
    opts, loop, rng = run.opts, asyncio.get_running_loop(), random.Random()
    bearer, pool = f"Bearer {opts.api_token}".encode(), Pool(run.api, 16)

    def lookup(k: int, kind: int) -> Any:
        ref = (f"user_id:u{k}", f"email:u{k}@example.com", f"anonymous_id:a{k}")[kind]
        data = get(f"/v1/profiles/{ref}", bearer)

        async def send(at: float) -> None:
            try:
                answer = await pool.request(data)
            except (OSError, ConnectionError):
                phase.lookups.errors += 1
                return
            phase.lookups.count(answer.status, answer.body, 0, 1000 * (loop.time() - at))

        return send

    at = poisson(rng, opts.lookups, phase.seconds)
    schedule = [(t, lookup(rng.randrange(opts.people), i % 3)) for i, t in enumerate(at)]
    try:
        await open_loop(schedule, Tally(), 10.0)
    finally:
        pool.close()


async def phase_run(run: Run, rate: float, seconds: float, grace: float, wait: float) -> Phase:
    """``rate`` events/s for ``seconds`` with the lookups and probes beside them; probes
    get ``grace`` seconds after it to show, requests ``wait`` seconds to be answered."""
    phase, loop = Phase(rate, seconds), asyncio.get_running_loop()
    share = rate / len(run.generators)
    for i, (_, pipe) in enumerate(run.generators):
        pipe.send((share, seconds, random.randrange(1 << 30) + i, wait))
    for _, pipe in run.generators:
        answer = await loop.run_in_executor(None, pipe.recv)
        phase.offered, phase.body_bytes = phase.offered + answer[1], phase.body_bytes + answer[2]
    cpu0 = run.meter.sample()
    t0 = loop.time()
    for _, pipe in run.generators:
        pipe.send("go")
    phase.lag.append((0.0, await run.lag.sample()))
    side = [
        asyncio.create_task(probes(run, phase, grace)),
        asyncio.create_task(lookups(run, phase)),
    ]
    while (now := loop.time() - t0) < seconds:
        await asyncio.sleep(min(1.0, seconds - now))
        phase.lag.append((loop.time() - t0, await run.lag.sample()))
    cpu1 = run.meter.sample()
    phase.cpu = Meter.percent(cpu0, cpu1, loop.time() - t0)
    phase.waiting = Meter.waiting(cpu0, cpu1, loop.time() - t0)
    for _, pipe in run.generators:
        tallies = await loop.run_in_executor(None, pipe.recv)
        phase.http.merge(tallies["single"])
        phase.http.merge(tallies["batch"])
        phase.schedule.merge(tallies["schedule"])
    await asyncio.gather(*side)
    return phase


# -- the run -------------------------------------------------------------------------------


AUDIENCES = {  # what a marketer sets up first: activation re-evaluates them per update
    "customers": {"computed": "order_count", "gte": 1},
    "pro plan": {"trait": "plan", "eq": "pro"},
    "added to cart twice this week, never ordered": {
        "and": [
            {"computed": "order_count", "eq": 0},
            {
                "event": {
                    "type": "track",
                    "name": "Product Added",
                    "within": "7d",
                    "count": {"gte": 2},
                }
            },
        ]
    },
}


async def seed(opts: argparse.Namespace, collector: int, api: int) -> None:
    """The audiences (through the API), then the known people (and the probe people)
    identified through the collector."""
    bearer = {"authorization": f"Bearer {opts.api_token}"}
    async with httpx.AsyncClient(timeout=60, headers=bearer) as client:
        for name, rule in AUDIENCES.items():
            answer = await client.post(
                f"http://127.0.0.1:{api}/v1/audiences", json={"name": name, "rule": rule}
            )
            if answer.status_code != 201:
                sys.exit(f"creating audience {name!r}: {answer.status_code} {answer.text[:300]}")
    people = [
        {"userId": f"u{k}", "anonymousId": f"a{k}", "traits": {"email": f"u{k}@example.com"}}
        for k in range(opts.people)
    ] + [{"userId": f"probe-{j}", "traits": {"probe": ""}} for j in range(PROBE_PEOPLE)]
    auth = (opts.write_key, "")
    async with httpx.AsyncClient(timeout=60, auth=auth) as client:
        for i in range(0, len(people), 500):
            batch = [p | {"type": "identify"} for p in people[i : i + 500]]
            url = f"http://127.0.0.1:{collector}/v1/batch"
            answer = await client.post(url, json={"batch": batch})
            if answer.status_code != 200 or answer.json().get("rejected"):
                sys.exit(f"seeding failed: {answer.status_code} {answer.text[:300]}")


async def bench(opts: argparse.Namespace, stages: Stages, db: str) -> None:
    env = stages.env
    print(f"stages: logs {stages.logs}-*.log")
    migrate = stages.start("migrate", "migrate")
    if await asyncio.get_running_loop().run_in_executor(None, migrate.wait) != 0:
        sys.exit(f"cdp-stream migrate failed:\n    {stages.tail('migrate')}")
    del stages.procs["migrate"]
    collector, api = free_port(), free_port()
    while api == collector:  # the kernel may hand the same free port out twice
        api = free_port()
    stages.start("collector", "collector", "--port", str(collector))
    if not await ready(collector, stages.procs["collector"]):  # it makes the credentials
        sys.exit(f"the collector did not become ready:\n    {stages.tail('collector')}")
    stages.start("api", "api", "--port", str(api))
    for i in (1, 2):
        stages.start(f"resolver {i}", "resolver")
    stages.start("activation", "activation")
    if not await ready(api, stages.procs["api"]):
        sys.exit(f"the api did not become ready:\n    {stages.tail('api')}")
    print(f"collector on 127.0.0.1:{collector}, api on 127.0.0.1:{api}", flush=True)

    ctx = mp.get_context("spawn")
    generators = []
    for _ in range(opts.generators):
        mine, theirs = ctx.Pipe()
        args = (theirs, collector, opts.write_key, opts.people, opts.connections)
        proc = ctx.Process(target=generator, args=args, daemon=True)
        proc.start()
        generators.append((proc, mine))
    opts.loads = generators

    watched = {n: [psutil.Process(p.pid)] for n, p in stages.procs.items()}
    watched["loadgen"] = [psutil.Process(p.pid) for p, _ in generators]
    watched["bench"] = [psutil.Process()]
    bport = int(opts.bootstrap.split(",")[0].rpartition(":")[2])
    pg = listener(make_url(opts.database_url).port or 5432)
    meter = Meter(watched, listener(bport), pg, db)
    lag = Lag(opts.bootstrap, env["CDP_TOPIC_NAMESPACE"], opts.partitions)
    await lag.start()
    try:
        run = Run(opts, collector, api, lag, meter, generators)
        t0 = time.monotonic()
        await seed(opts, collector, api)
        left = await lag.drained(opts.seed_timeout)
        print(
            f"{len(AUDIENCES)} audiences; seeded {opts.people:,} known people"
            f" (+{PROBE_PEOPLE} probe people) in "
            f"{time.monotonic() - t0:.1f} s; lag after: "
            + ", ".join(f"{g} {e - c:,}" for g, (e, c) in left.items()),
            flush=True,
        )
        dsn = env["CDP_DATABASE_URL"].replace("+asyncpg", "")
        await statements(dsn, reset=True)
        counted = time.monotonic()
        main = await phase_run(run, opts.rate, opts.seconds, opts.visible_timeout, 15.0)
        show_main(opts, main)
        by_statement = await statements(dsn, reset=False)
        show_statements(by_statement, time.monotonic() - counted, main.http.events)
        check(stages)
        steps: list[Phase] = []
        for rate in opts.steps:
            await lag.drained(opts.drain)
            steps.append(await phase_run(run, rate, opts.step_seconds, 3.0, 2.0))
            show_step(steps[-1], first=len(steps) == 1)
            check(stages)
            if not steps[-1].holds:
                break
        await lag.drained(opts.drain)
        alone = await catch_up(run, stages) if opts.catchup_seconds > 0 else None
        report(opts, main, steps, alone)
    finally:
        await lag.stop()


@dataclass
class Drain:
    """How fast one group worked off a backlog, once it had started."""

    backlog: int
    rate: float  # records/s from its first commit to the last
    cpu_ms: float  # CPU of its processes per record, over the same time
    pg_ms: float  # CPU of this run's Postgres backends per record, the same
    done: bool

    @property
    def seconds(self) -> float:
        return self.backlog / max(self.rate, 1e-9)


async def drain(run: Run, group: str, procs: list[psutil.Process], seconds: float) -> Drain:
    """Poll ``group``'s offsets until it has committed everything (or ``seconds``); the
    start-up of its processes (imports, joining the group) is left out."""
    loop = asyncio.get_running_loop()
    end, base = (await run.lag.sample())[group]
    deadline, first = loop.time() + seconds, None
    while loop.time() < deadline:
        await asyncio.sleep(0.2)
        end, done = (await run.lag.sample())[group]
        if first is None and done > base:
            first = (loop.time(), done, cpu_s(procs), run.meter.sample()[1])
        if first and done >= end:
            break
    if first is None:
        return Drain(end - base, 0.0, 0.0, 0.0, False)
    took, records = loop.time() - first[0], max(done - first[1], 1)
    cpu = 1000 * (cpu_s(procs) - first[2]) / records
    pg = sum(v - first[3].get(pid, 0.0) for pid, v in run.meter.sample()[1].items())
    return Drain(end - base, records / max(took, 1e-9), cpu, 1000 * pg / records, done >= end)


async def catch_up(run: Run, stages: Stages) -> tuple[Drain, Drain]:
    """Resolver and activation throughput, each on its own: with both stopped, the
    collector takes ``--rate`` events/s for ``--catchup-seconds``; then the resolvers are
    started and work off the backlog alone, then activation works off the profile
    updates they made (the rates a step test cannot show when the collector saturates)."""
    opts, consumers = run.opts, ("resolver 1", "resolver 2", "activation")
    stages.stop(*consumers)
    await phase_run(run, opts.rate, opts.catchup_seconds, 0.5, 15.0)
    resolvers = [stages.start(name, "resolver") for name in consumers[:2]]
    mine = [psutil.Process(p.pid) for p in resolvers]
    resolved = await drain(run, "resolver", mine, opts.seed_timeout)
    activation = psutil.Process(stages.start("activation", "activation").pid)
    activated = await drain(run, "activation", [activation], opts.seed_timeout)
    check(stages)
    show_catch_up(resolved, activated)
    return resolved, activated


def check(stages: Stages) -> None:
    for name in stages.dead():
        print(f"  !! {name} exited ({stages.procs[name].returncode}); its log:")
        print(f"    {stages.tail(name)}")
    if stages.dead():
        sys.exit("a stage died: the figures would mean nothing")


# -- Postgres by statement -----------------------------------------------------------------

# This run's database's statements, most execution time first (pg_stat_statements: what
# ``deploy/postgres/postgres.sh`` loads), normalized (``$1`` for every constant).
_STATEMENTS = """
SELECT calls, total_exec_time, rows, regexp_replace(query, '\\s+', ' ', 'g') AS query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY total_exec_time DESC
"""


async def statements(dsn: str, reset: bool) -> list[Any] | str:
    """The run's statements so far (with ``reset``: none, counting starts now), or why
    there are none: pg_stat_statements not loaded (a server not started by
    ``deploy/postgres/postgres.sh``)."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        if reset:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.execute(
                "SELECT pg_stat_statements_reset(0, oid, 0) FROM pg_database"
                " WHERE datname = current_database()"
            )
            return []
        return list(await conn.fetch(_STATEMENTS))
    except asyncpg.PostgresError as exc:
        return f"no figures by statement: {exc}"
    finally:
        await conn.close()


def show_statements(rows: list[Any] | str, seconds: float, events: int, top: int = 8) -> None:
    """Where Postgres's time went over ``seconds`` (the main phase and the wait for its
    last probes) in which ``events`` were accepted: each statement's share of the
    execution time (wall time in the server: waiting for a CPU, a lock or the disk
    included), its calls a second, time and rows a call."""
    if isinstance(rows, str):
        print(f"  Postgres by statement: {rows}")
        return
    total = sum(r["total_exec_time"] for r in rows)
    print(
        f"  Postgres by statement (pg_stat_statements, {seconds:.0f} s):"
        f" {total / 1000 / seconds:.2f} s of execution a second,"
        f" {total / max(events, 1):.3f} ms per event; the longest:"
    )
    print("     share   calls/s   ms/call  rows/call  statement")
    for r in rows[:top]:
        calls = max(r["calls"], 1)
        print(
            f"    {r['total_exec_time'] / max(total, 1e-9):6.1%} {calls / seconds:9.1f}"
            f" {r['total_exec_time'] / calls:9.2f} {r['rows'] / calls:10.1f}  {r['query'][:90]}"
        )


# -- printing ------------------------------------------------------------------------------


def show_main(opts: argparse.Namespace, p: Phase) -> None:
    http, look = p.http, p.lookups
    bad, five = p.count(300, 1000), p.count(500, 600)
    print(
        f"\nat {p.rate:,.0f} events/s offered for {p.seconds:g} s "
        f"({p.offered:,} events, {p.body_bytes / max(p.offered, 1):.0f} bytes/event of JSON):\n"
        f"  accepted        {p.accepted:8,.0f} ev/s = {http.events / max(p.offered, 1):.1%} of"
        f" offered; non-2xx {bad} (5xx {five}), connection errors {http.errors},"
        f" unanswered {p.schedule.unanswered}\n"
        f"  collector       p50 {ms(pct(http.latencies, 0.5))}  p99 {ms(pct(http.latencies, 0.99))}"
        f"  ({len(http.latencies):,} requests; generator late p99"
        f" {ms(pct(p.schedule.lateness, 0.99))})\n"
        f"  event->profile  p50 {ms(pct(p.visible, 0.5, p.invisible))}"
        f"  p99 {ms(pct(p.visible, 0.99, p.invisible))}  ({len(p.visible)} probes visible,"
        f" {p.invisible} not within {opts.visible_timeout:g} s, {p.probe_failed} refused;"
        f" {p.polls / p.seconds:.0f} polls/s)\n"
        f"  lookups         p50 {ms(pct(look.latencies, 0.5))}  p99 {ms(pct(look.latencies, 0.99))}"
        f"  ({len(look.latencies):,}; 404 {look.statuses.get(404, 0)},"
        f" 5xx {p.count(500, 600, look)}, errors {look.errors})"
    )
    for group in ("resolver", "activation"):
        held, end, slope = p.held(group)
        print(
            f"  {group:<15} {p.processed(group):8,.0f} records/s; lag at end {end:,},"
            f" growing {slope:,.0f}/s ({'bounded' if held else 'NOT bounded'})"
        )
    print(
        f"  activation/resolver {p.processed('activation') / max(p.processed('resolver'), 1):.2f}"
        " (profile updates per event processed)"
    )
    print("  CPU, % of a core: " + "  ".join(f"{k} {v:.0f}" for k, v in p.cpu.items()))
    mine = [k for k in p.cpu if k not in ("bench", "loadgen", "postgres", "others", "machine")]
    per = {k: p.cpu[k] * 10 / max(p.processed("resolver"), 1) for k in mine}
    print(  # what each part costs, which the others' noise inflates less than rates
        "  CPU ms per event processed: "
        + "  ".join(f"{k} {v:.2f}" for k, v in per.items())
        + f"  (all of these {sum(per.values()):.2f})"
    )
    print(
        "  waiting for a CPU (ready to run, not running), % of the time: "
        + "  ".join(f"{k} {v:.0f}" for k, v in p.waiting.items())
    )
    if pct(p.schedule.lateness, 0.99) > 50:
        print(
            "  !! the load generator fell behind its own schedule (p99 over 50 ms): it did not"
            " get the CPU it needed, so the load came in bursts; latencies still count from"
            " the schedule"
        )
    if http.first_bad:
        print(f"  first bad answer: {http.first_bad}")


def show_step(p: Phase, first: bool) -> None:
    if first:
        print(
            "\nstep test (holds: >= 95% accepted, and for both groups the lag grows by"
            " under 5% of the rate per second and ends under 2 s of traffic)\n"
            f"  {'offered':>8} {'accepted':>9} {'5xx':>5} {'coll p99':>9} {'e2e p99':>9}"
            f" {'look p99':>9} {'resolver/s':>10} {'lag':>7} {'activ/s':>8} {'lag':>7}"
            "  CPU coll/api/res/act/broker/pg/others  holds"
        )
    r, a = p.held("resolver"), p.held("activation")
    c = p.cpu
    res = c.get("resolver 1", 0) + c.get("resolver 2", 0)
    cpu = "/".join(
        f"{v:.0f}"
        for v in (c["collector"], c["api"], res, c["activation"], c["broker"], c["pg db"])
    )
    print(
        f"  {p.rate:>8,.0f} {p.share:>9.1%} {p.count(500, 600):>5}"
        f" {ms(pct(p.http.latencies, 0.99)):>9} {ms(pct(p.visible, 0.99, p.invisible)):>9}"
        f" {ms(pct(p.lookups.latencies, 0.99)):>9} {p.processed('resolver'):>10,.0f}"
        f" {r[1]:>7,} {p.processed('activation'):>8,.0f} {a[1]:>7,}"
        f"  {cpu}/{c['others']:.0f}  {'yes' if p.holds else 'NO'}",
        flush=True,
    )


def show_catch_up(resolved: Drain, activated: Drain) -> None:
    print(
        "\neach consumer alone on a backlog (start-up left out):\n"
        f"  resolver x2  {resolved.rate:8,.0f} events/s on {resolved.backlog:,} events"
        f" (CPU per event: resolvers {resolved.cpu_ms:.2f} ms, Postgres {resolved.pg_ms:.2f})"
        + ("" if resolved.done else "  !! not finished")
        + f"\n  activation   {activated.rate:8,.0f} updates/s on {activated.backlog:,} updates"
        f" (CPU per update: activation {activated.cpu_ms:.2f} ms, Postgres {activated.pg_ms:.2f})"
        + ("" if activated.done else "  !! not finished")
        + f"\n  activation / resolvers: {keeps_up(resolved, activated):.2f} by time (the"
        f" resolvers made these {activated.backlog:,} updates in {resolved.seconds:.1f} s,"
        f" activation worked them off in {activated.seconds:.1f} s);"
        f" {activated.rate / max(resolved.rate, 1e-9):.2f} per record (updates/s over events/s)",
        flush=True,
    )


def keeps_up(resolved: Drain, activated: Drain) -> float:
    """Activation keeps up when it works off the updates the resolvers made in no more
    time than they took to make them (a resolver batch makes one update per profile, so
    fewer updates than events: comparing updates/s with events/s would ask more)."""
    return resolved.seconds / max(activated.seconds, 1e-9)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(
    opts: argparse.Namespace, main: Phase, steps: list[Phase], alone: tuple[Drain, Drain] | None
) -> None:
    held = [s.rate for s in steps if s.holds]
    capacity = max(held) if held else 0.0
    stopped = next((s.rate for s in steps if not s.holds), None)
    visible99 = pct(main.visible, 0.99, main.invisible)
    look99 = pct(main.lookups.latencies, 0.99)
    fives = main.count(500, 600) + main.count(500, 600, main.lookups)
    keeps = [p for p in [main, *steps] if p.held("resolver")[0]]
    act_ok = all(p.held("activation")[0] for p in keeps)
    act_figure = "lag bounded wherever the resolvers' is"
    if alone:
        act_ok = act_ok and alone[1].done and keeps_up(*alone) >= 1
        act_figure += (
            f"; alone {alone[1].seconds:.1f} s for what the resolvers made in"
            f" {alone[0].seconds:.1f} s ({alone[1].rate:,.0f} updates/s,"
            f" {alone[0].rate:,.0f} events/s)"
        )
    if steps:
        print(
            f"\ncapacity: {capacity:,.0f} events/s (the highest step that held"
            + (f"; {stopped:,.0f} did not)" if stopped else "; every step held)")
        )
    others = statistics.median(p.cpu["others"] for p in [main, *steps])
    print(
        f"\n{os.cpu_count()} cores; other processes on the box took {others:.0f}% of a core"
        " (median over the phases)"
        + (": these figures are not this pipeline's alone" if others >= 20 else "")
    )
    rate = f"{opts.rate:,.0f} ev/s"
    print("targets:")
    lines = [
        (
            f"every event accepted at {rate}",
            main.http.events == main.offered,
            f"{main.http.events:,}/{main.offered:,}",
        ),
        (f"no 5xx at {rate} (collector, API)", fives == 0, f"{fives}"),
        (
            f"event->profile p99 <= {TARGET_VISIBLE_MS:g} ms",
            visible99 <= TARGET_VISIBLE_MS,
            ms(visible99),
        ),
        (f"lookup p99 <= {TARGET_LOOKUP_MS:g} ms", look99 <= TARGET_LOOKUP_MS, ms(look99)),
        (
            f"capacity >= {TARGET_CAPACITY:,.0f} ev/s",
            capacity >= TARGET_CAPACITY,
            f"{capacity:,.0f}" if steps else "no step test",
        ),
        ("activation keeps up with the resolvers", act_ok, act_figure),
    ]
    for what, ok, figure in lines:
        print(f"  {what:<42} {verdict(ok)}  ({figure})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s of the main phase")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the main phase")
    ap.add_argument("--steps", type=float, nargs="*", default=[500, 1000, 2000, 3000, 4000])
    ap.add_argument("--step-seconds", type=float, default=15.0)
    ap.add_argument("--people", type=int, default=20_000, help="known people, seeded")
    ap.add_argument("--lookups", type=float, default=100.0, help="profile lookups/s")
    ap.add_argument("--probes", type=float, default=10.0, help="event->profile probes/s")
    ap.add_argument("--connections", type=int, default=256, help="per generator (singles)")
    ap.add_argument("--generators", type=int, default=1, help="load generator processes")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--visible-timeout", type=float, default=20.0, help="main phase's probes")
    ap.add_argument("--seed-timeout", type=float, default=120.0)
    ap.add_argument("--drain", type=float, default=20.0, help="max seconds between steps")
    ap.add_argument(
        "--catchup-seconds",
        type=float,
        default=45.0,
        help="backlog taken for the catch-up (10 s of it drained in ~2 s, which the first"
        " batch and the 0.2 s sampling distorted)",
    )
    service_args(ap)
    opts = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks

    preflight(opts.bootstrap, opts.database_url)
    run_id = uuid.uuid4().hex[:8]
    db, namespace = f"cdp_bench_pipeline_{run_id}", f"bench-pipeline-{run_id}."
    opts.write_key, opts.api_token = f"wk_p_{run_id}", f"tok_p_{run_id}"
    opts.loads = []
    env = os.environ | {
        "CDP_KAFKA_BOOTSTRAP": opts.bootstrap,
        "CDP_DATABASE_URL": opts.database_url.rsplit("/", 1)[0] + f"/{db}",
        "CDP_TOPIC_NAMESPACE": namespace,
        "CDP_TOPIC_PARTITIONS": str(opts.partitions),
        "CDP_BOOTSTRAP_WRITE_KEY": opts.write_key,
        "CDP_BOOTSTRAP_API_TOKEN": opts.api_token,
        "CDP_RATE_LIMIT_PER_S": "0",  # capacity is measured, not the per-source limit
        "CDP_SUPPRESSION_KEY": f"bench-{run_id}",
    }
    stages = Stages(env, Path(tempfile.gettempdir()) / f"cdp-bench-pipeline-{run_id}")
    print(
        f"pipeline run {run_id}: Kafka {opts.bootstrap} ({opts.partitions} partitions, topics"
        f" {namespace}*), Postgres database {db}; collector, api, resolver x2, activation"
    )
    asyncio.run(database(opts.database_url, db, create=True))
    interrupted = False
    try:
        uvloop.run(bench(opts, stages, db))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for proc, pipe in opts.loads:  # ask them to end; then make them
            cleanup("stopping a load generator", pipe.send, None)
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        cleanup("stopping the stages", stages.stop)
        cleanup("dropping the database", asyncio.run, database(opts.database_url, db, False))
        cleanup("dropping the topics and groups", drop_namespace, opts.bootstrap, namespace)
    if interrupted:
        sys.exit("interrupted: every process stopped; the database, topics and groups dropped")


if __name__ == "__main__":
    main()
