"""Collector throughput against the raw Kafka producers and the HTTP stack's own ceiling
(printed figures, not a test).

Each figure is measured ``--repeats`` times over ``--seconds`` windows after a ``--warmup``
(median, min..max: the machine is noisy), with the CPU of each process in the same windows
(100% = one core), so it says what bounds it:

1. Raw producers, into a fresh 6-partition topic, with the very records the collector
   publishes (track events enriched by the collector's own ``intake``, ~500 bytes of JSON,
   keys ``user_id:u123``): a) aiokafka as the bus configures it (idempotent, linger 5 ms,
   256 KiB batches), ``send()`` 1000 records then gather their futures; b) confluent-kafka
   (idempotent, linger 5 ms), ``produce()`` + ``poll(0)``, counting delivery callbacks
   without error.
2. The load generator's ceiling: ``wrk`` (C, keep-alive, requests built up front by
   ``collect.lua``) against the least an ASGI app can do (read the body, answer
   ``{"success":true}``) under uvicorn with httptools and uvloop, as the collector is served:
   the most requests/s this box gives any Python endpoint with this load generator.
3. The real collector, once per Kafka producer library (``CDP_KAFKA_PRODUCER``) and number
   of worker processes (``CDP_COLLECTOR_WORKERS``): ``cdp-stream collector`` as a
   subprocess on a Postgres database created for this run, loaded by ``wrk`` with
   ``--concurrency`` connections, Basic auth: ``/v1/batch`` with 100 track events per
   request, then single ``/v1/track`` calls. Only 200 answers without rejections count;
   anything else is reported. Per figure: the ratio to the fastest raw producer, to the
   ceiling of 2., and the collector's CPU per request and per event.

Why wrk: a Python load generator measures itself (httpx managed a few hundred requests/s,
a minimal asyncio client ~5,000 while using a core). The targets (issue 10) are printed
with PASS or BELOW: single ``/v1/track`` >= 8,000 requests/s on one process, ``/v1/batch``
>= 40,000 events/s. The collector runs in a topic namespace of its own
(``CDP_TOPIC_NAMESPACE``), so no resolver on the same broker sees its events; at exit the
servers are stopped and the topics and the database dropped.

    .venv/bin/python benchmarks/collect.py [--seconds 8] [--repeats 3] [--concurrency 32]
        [--workers 1 2] [--producers aiokafka confluent]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import psutil

NAMES = ["Product Viewed", "Product Added", "Order Completed", "Email Opened", "Video Played"]
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 Version/17.4 Safari"
Counters = Any  # a shared mp.Array("q", 3): events acknowledged, bad answers, errors


def track_event(rng: random.Random, message_id: str, ts: str) -> dict[str, Any]:
    """A track call as analytics.js sends it, from one of ~10k users."""
    sku = rng.randrange(100_000)
    return {
        "type": "track",
        "event": rng.choice(NAMES),
        "userId": f"u{rng.randrange(10_000)}",
        "messageId": message_id,
        "timestamp": ts,
        "properties": {"product_id": f"sku-{sku}", "price": round(rng.uniform(5, 500), 2)}
        | {"currency": "EUR", "quantity": rng.randint(1, 3)},
        "context": {
            "library": {"name": "analytics.js", "version": "5.2.0"},
            "locale": "en-US",
            "userAgent": UA,
            "page": {"path": f"/p/sku-{sku}", "referrer": "https://www.google.com/"},
        },
    }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def enriched_records(count: int = 10_000) -> list[tuple[bytes, bytes]]:
    """(key, value) as the collector publishes them, made by its own intake."""
    from cdp_stream.collector.intake import intake
    from cdp_stream.identity import IdentityRules
    from cdp_stream.settings import Settings

    rng, ts, now = random.Random(1), now_iso(), datetime.now(UTC)
    body = {"batch": [track_event(rng, f"raw-{i}", ts) for i in range(count)]}
    settings = Settings(max_batch_events=count)
    result = intake(
        body,
        "batch",
        settings=settings,
        rules=IdentityRules.from_settings(settings),
        source_id="src_bench",
        received_at=now,
        ip="127.0.0.1",
        user_agent=None,
    )
    return [(a.key, a.value) for a in result.accepted]


# -- the load processes: each runs until ``stop`` is set, counting into its counters ----


def worker(kind: str, args: tuple[Any, ...], counters: Counters, stop: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    if kind == "confluent":
        confluent_loop(*args, counters, stop)
    else:
        asyncio.run(aiokafka_loop(*args, counters, stop))


async def aiokafka_loop(bootstrap: str, topic: str, counters: Counters, stop: Any) -> None:
    from aiokafka import AIOKafkaProducer

    records = enriched_records()
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5, max_batch_size=262144
    )
    await producer.start()
    for i in range(sys.maxsize):
        if stop.is_set():
            break
        chunk = records[i * 1000 % len(records) :][:1000]
        futures = [await producer.send(topic, value, key=key) for key, value in chunk]
        results = await asyncio.gather(*futures, return_exceptions=True)
        ok = sum(not isinstance(r, BaseException) for r in results)
        counters[0], counters[2] = counters[0] + ok, counters[2] + len(results) - ok
    await producer.stop()


def confluent_loop(bootstrap: str, topic: str, counters: Counters, stop: Any) -> None:
    from confluent_kafka import Producer

    records = enriched_records()
    config = {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    producer = Producer(config)

    def delivered(err: Any, _msg: Any) -> None:
        counters[0 if err is None else 2] += 1

    while not stop.is_set():
        for key, value in records:
            while True:
                try:
                    producer.produce(topic, value, key, on_delivery=delivered)
                    break
                except BufferError:  # the local queue is full: serve callbacks first
                    producer.poll(0.005)
            producer.poll(0)
    producer.flush(30)


# -- measuring -----------------------------------------------------------------------------


def cpu_s(procs: Sequence[psutil.Process] | None) -> float:
    """CPU seconds used so far by ``procs`` (None: the whole machine, busy time); a
    process that is gone counts what it had."""
    if procs is None:
        t = psutil.cpu_times()
        return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += sum(p.cpu_times()[:2])
    return total


def run_load(
    label: str, kind: str, args: tuple[Any, ...], opts: argparse.Namespace, nprocs: int = 1
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    stop, counters = ctx.Event(), [ctx.Array("q", 3, lock=False) for _ in range(nprocs)]
    procs = [ctx.Process(target=worker, args=(kind, args, c, stop), daemon=True) for c in counters]
    for p in procs:
        p.start()
    try:
        time.sleep(1.0 + opts.warmup)  # spawn, imports and payloads, then the warm-up
        mine = [psutil.Process(p.pid) for p in procs]
        watch = {"load": mine, **opts.watch, "machine": None}
        rates: list[float] = []
        cpus: dict[str, list[float]] = {n: [] for n in watch}

        def sample() -> tuple[int, float, list[float]]:
            return sum(c[0] for c in counters), time.monotonic(), [*map(cpu_s, watch.values())]

        for run in range(opts.repeats):
            c0, t0, u0 = sample()
            time.sleep(opts.seconds)
            c1, t1, u1 = sample()
            if not all(p.is_alive() for p in procs):
                sys.exit(f"{label}: a load process died (its error is above)")
            rates.append((c1 - c0) / (t1 - t0))
            for name, a, b in zip(watch, u0, u1, strict=True):
                cpus[name].append(100 * (b - a) / (t1 - t0))
            shown = " ".join(f"{n} {v[-1]:.0f}%" for n, v in cpus.items())
            print(f"  {label:<26} run {run + 1}: {rates[-1]:>8,.0f} ev/s  CPU {shown}", flush=True)
    finally:
        stop.set()
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.terminate()
    bad, errors = sum(c[1] for c in counters), sum(c[2] for c in counters)
    if bad or errors:
        print(f"  !! {label}: {bad} bad answers (non-200 or rejected), {errors} errors")
    cpu = {n: statistics.median(v) for n, v in cpus.items()}
    return {"label": label, "rates": rates, "bad": bad + errors, "cpu": cpu}


# -- the services --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_processes(bootstrap: str) -> list[psutil.Process]:
    port = int(bootstrap.split(",")[0].rpartition(":")[2])
    try:
        conns = psutil.net_connections("tcp")
        pids = {c.pid for c in conns if c.status == "LISTEN" and c.laddr.port == port and c.pid}
        return [psutil.Process(pid) for pid in pids]
    except psutil.Error:
        return []


async def database(admin_url: str, name: str, create: bool) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url.replace("+asyncpg", ""), timeout=5)
    try:
        drop = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        await conn.execute(f'CREATE DATABASE "{name}"' if create else drop)
    finally:
        await conn.close()


async def trivial_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The least an ASGI endpoint does for a POST: read the body, answer a constant."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/json"), (b"content-length", b"16")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"success":true}'})


def serve_trivial(port: int) -> None:
    """``trivial_app`` served as ``cdp-stream`` serves the collector."""
    import uvicorn

    uvicorn.run(
        trivial_app,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


def start_server(command: Sequence[Any], env: dict[str, str], log: Path) -> Server:
    """``command`` serving HTTP on a free port (passed as ``--port``), once it answers."""
    import httpx

    port = free_port()
    with log.open("ab") as out:  # its own session: Ctrl-C reaches us, we stop it in order
        proc = subprocess.Popen(
            [*map(str, command), "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return Server(proc, port)
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    sys.exit(f"{command[0]} did not become ready; its log ({log}):\n{log.read_text()[-3000:]}")


class Server:
    """A started HTTP server process (and the workers it forked)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc, self.port = proc, port
        time.sleep(0.5)  # let forked workers show up
        main = psutil.Process(proc.pid)
        self.processes = [main, *main.children(recursive=True)]

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL if it takes over 20 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            cleanup("stopping a server", self.proc.wait, 20)
        self.proc.kill()


class WrkResult(NamedTuple):
    rate: float  # requests/s
    requests: int
    bad: int  # non-200 or rejected
    errors: int  # socket errors
    p99_ms: float


def wrk(port: int, endpoint: str, seconds: float, opts: argparse.Namespace) -> WrkResult:
    """One wrk run at ``/v1/{endpoint}`` on 127.0.0.1:``port`` (a batch is 100 events)."""
    per = 100 if endpoint == "batch" else 1
    credentials = base64.b64encode(f"{opts.write_key}:".encode()).decode()
    script = Path(__file__).with_name("collect.lua")
    command = ["wrk", f"-t{opts.wrk_threads}", f"-c{opts.concurrency}", f"-d{seconds:g}s"]
    command += ["--timeout", "30s"]  # a slow answer is measured, not counted as an error
    command += ["--latency", "-s", script, f"http://127.0.0.1:{port}", "--"]
    command += [f"/v1/{endpoint}", credentials, str(per)]
    out = subprocess.run(list(map(str, command)), capture_output=True, text=True, check=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"wrk printed no RESULT:\n{out.stdout}\n{out.stderr}")
    requests, duration_us, bad, errors, _p50, p99 = map(int, line.split()[1:])
    return WrkResult(requests / (duration_us / 1e6), requests, bad, errors, p99 / 1000)


def run_wrk(label: str, server: Server, endpoint: str, opts: argparse.Namespace) -> dict[str, Any]:
    """wrk against ``server``: requests/s and events/s, with CPU per process."""
    per = 100 if endpoint == "batch" else 1
    wrk(server.port, endpoint, opts.warmup, opts)
    watch = {"server": server.processes, **opts.watch, "machine": None}
    rates: list[float] = []
    cpus: dict[str, list[float]] = {n: [] for n in ("wrk", *watch)}
    cpu_per_request: list[float] = []
    p99s: list[float] = []
    failures = 0
    for run in range(opts.repeats):
        u0, t0 = [*map(cpu_s, watch.values())], time.monotonic()
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        rate, requests, bad, errors, p99 = wrk(server.port, endpoint, opts.seconds, opts)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        u1, t1 = [*map(cpu_s, watch.values())], time.monotonic()
        wrk_cpu = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
        cpus["wrk"].append(100 * wrk_cpu / (t1 - t0))
        for name, a, b in zip(watch, u0, u1, strict=True):
            cpus[name].append(100 * (b - a) / (t1 - t0))
        rates.append(rate)
        p99s.append(p99)
        failures += bad + errors
        cpu_per_request.append(1e6 * (u1[0] - u0[0]) / max(requests, 1))
        shown = " ".join(f"{n} {v[-1]:.0f}%" for n, v in cpus.items())
        print(
            f"  {label:<32} run {run + 1}: {rate:>7,.0f} req/s {rate * per:>8,.0f} ev/s  "
            f"p99 {p99:.0f} ms  {cpu_per_request[-1]:.0f} us CPU/request  CPU {shown}",
            flush=True,
        )
    if failures:
        print(f"  !! {label}: {failures} bad answers (non-200 or rejected) or socket errors")
    return {
        "label": label,
        "endpoint": endpoint,
        "per": per,
        "rates": [r * per for r in rates],
        "bad": failures,
        "cpu": {n: statistics.median(v) for n, v in cpus.items()},
        "cpu_us": statistics.median(cpu_per_request),
        "p99": statistics.median(p99s),
    }


def cleanup(what: str, action: Any, *args: Any) -> None:
    try:
        action(*args)
    except Exception as exc:  # one failed step must not skip the others
        print(f"cleanup: {what} failed: {exc!r}", file=sys.stderr)


def service_args(ap: argparse.ArgumentParser) -> None:
    """The broker and server every benchmark runs against (``make bench`` sets both)."""
    ap.add_argument("--bootstrap", default=os.environ.get("CDP_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    pg = "postgresql+asyncpg://postgres@127.0.0.1:55432/cdp_test"
    ap.add_argument("--database-url", default=os.environ.get("CDP_TEST_DATABASE_URL", pg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per run")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds before the first window")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32, help="HTTP connections (wrk -c)")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk -t")
    ap.add_argument(
        "--workers",
        nargs="+",
        type=int,
        default=[1, 2],
        help="collector worker processes (CDP_COLLECTOR_WORKERS), one run each",
    )
    ap.add_argument(
        "--producers",
        nargs="+",
        default=["aiokafka", "confluent"],
        choices=["aiokafka", "confluent"],
        help="the collector's Kafka producer library (CDP_KAFKA_PRODUCER), one run each",
    )
    service_args(ap)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)  # with --serve-trivial
    ap.add_argument("--serve-trivial", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.serve_trivial:
        return serve_trivial(opts.port)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (the load generator): apt-get install wrk")

    host, _, port = opts.bootstrap.split(",")[0].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        sys.exit(f"Kafka is not reachable at {opts.bootstrap} ({exc}); start it: make services")
    run_id = uuid.uuid4().hex[:8]
    db, topic, opts.write_key = f"cdp_bench_{run_id}", f"cdp-bench-{run_id}", f"wk_b_{run_id}"
    opts.namespace = f"bench-{run_id}."
    try:
        asyncio.run(database(opts.database_url, db, create=True))
    except Exception as exc:  # refused, timeout, auth, unknown database
        sys.exit(f"Postgres is not usable at {opts.database_url} ({exc!r}); make services")
    from confluent_kafka.admin import AdminClient

    from cdp_stream.bus import KafkaBus
    from cdp_stream.topics import Topics

    asyncio.run(KafkaBus(opts.bootstrap).ensure_topics({topic: 6}))
    broker = {"broker": broker_processes(opts.bootstrap)}
    log = Path(tempfile.gettempdir()) / f"cdp-bench-collector-{run_id}.log"
    db_url = opts.database_url.rsplit("/", 1)[0] + f"/{db}"
    servers: list[Server] = []
    results = []
    try:
        print(f"raw producers -> topic {topic} (6 partitions) on {opts.bootstrap}")
        opts.watch = broker
        for label in ("aiokafka", "confluent-kafka"):
            kind = label.split("-")[0]
            results.append(run_load(f"raw {label}", kind, (opts.bootstrap, topic), opts))
        opts.watch = {}
        servers.append(start_server([sys.executable, __file__, "--serve-trivial"], {}, log))
        print(f"trivial ASGI endpoint (uvicorn, httptools, uvloop) on port {servers[0].port}")
        for endpoint in ("batch", "track"):
            results.append(run_wrk(f"trivial endpoint /v1/{endpoint}", servers[0], endpoint, opts))
        servers.pop().stop()
        opts.watch = broker
        env = os.environ | {"CDP_KAFKA_BOOTSTRAP": opts.bootstrap, "CDP_DATABASE_URL": db_url}
        env |= {"CDP_TOPIC_NAMESPACE": opts.namespace, "CDP_BOOTSTRAP_WRITE_KEY": opts.write_key}
        env |= {"CDP_RATE_LIMIT_PER_S": "0"}  # capacity is measured, not the per-source limit
        collector = [Path(sys.executable).with_name("cdp-stream"), "collector"]
        for producer, workers in itertools.product(opts.producers, opts.workers):
            env |= {"CDP_KAFKA_PRODUCER": producer, "CDP_COLLECTOR_WORKERS": str(workers)}
            servers.append(start_server(collector, env, log))
            print(f"collector x{workers} ({producer}) on port {servers[0].port}, log {log}")
            for endpoint in ("batch", "track"):
                label = f"collector[{producer} x{workers}] /v1/{endpoint}"
                results.append(run_wrk(label, servers[0], endpoint, opts))
            servers.pop().stop()
    finally:
        for server in servers:
            server.stop()
        cleanup("dropping the database", asyncio.run, database(opts.database_url, db, False))
        admin = AdminClient({"bootstrap.servers": opts.bootstrap})
        for name in (topic, *Topics(opts.namespace).all(1)):
            cleanup(f"deleting {name}", lambda n=name: admin.delete_topics([n])[n].result(30))

    report(opts, results)


def report(opts: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    median = {r["label"]: statistics.median(r["rates"]) for r in results}
    fastest = max(median["raw aiokafka"], median["raw confluent-kafka"])
    ceiling = {e: median[f"trivial endpoint /v1/{e}"] for e in ("batch", "track")}
    print(
        f"\nsummary: median of {opts.repeats} x {opts.seconds:g} s (min..max); wrk "
        f"-t{opts.wrk_threads} -c{opts.concurrency}; {os.cpu_count()} cores; CPU 100% = one core"
    )
    for r in results:
        m, lo, hi = median[r["label"]], min(r["rates"]), max(r["rates"])
        line = f"{r['label']:<34} {m:>8,.0f} ev/s ({lo:,.0f}..{hi:,.0f})"
        if "endpoint" in r:
            line += f" = {m / r['per']:,.0f} req/s, p99 {r['p99']:.0f} ms"
        if r["label"].startswith("collector"):
            line += (
                f"  = {m / fastest:.2f} of fastest raw, {m / ceiling[r['endpoint']]:.2f} of the "
                f"trivial endpoint; {r['cpu_us']:.0f} us CPU/request, "
                f"{r['cpu_us'] / r['per']:.1f} us/event"
            )
        line += "  CPU " + " ".join(f"{n} {v:.0f}%" for n, v in r["cpu"].items())
        print(line + (f"  !! {r['bad']} failures" if r["bad"] else ""))
    collectors = [r for r in results if r["label"].startswith("collector")]
    single = [
        median[r["label"]] for r in collectors if r["endpoint"] == "track" and " x1]" in r["label"]
    ]
    batch = [median[r["label"]] for r in collectors if r["endpoint"] == "batch"]
    for what, best, target in (
        ("single /v1/track on one process, requests/s", max(single, default=0.0), 8_000),
        ("/v1/batch, events/s", max(batch, default=0.0), 40_000),
    ):
        verdict = "PASS" if best >= target else "BELOW TARGET"
        print(f"target: {what} >= {target:,}: {verdict} ({best:,.0f})")


if __name__ == "__main__":
    main()
