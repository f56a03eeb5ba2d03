"""Collector throughput against the raw Kafka producer ceiling (printed figures, not a test).

Each figure is events acknowledged per second over ``--seconds`` windows after a
``--warmup``, measured ``--repeats`` times (median, min..max: the machine is noisy):

1. Raw producers, into a fresh 6-partition topic, with the very records the collector
   publishes (track events enriched by the collector's own ``intake``, ~500 bytes of JSON,
   keys ``user_id:u123``): a) aiokafka as the bus configures it (idempotent, linger 5 ms,
   256 KiB batches), ``send()`` 1000 records then gather their futures; b) confluent-kafka
   (idempotent, linger 5 ms), ``produce()`` + ``poll(0)``, counting delivery callbacks
   without error.
2. The real collector, once per Kafka producer library it can use (``CDP_KAFKA_PRODUCER``:
   aiokafka, confluent): ``cdp-stream collector`` as a subprocess, on a Postgres database
   created for this run, loaded over HTTP by another process with ``--concurrency``
   keep-alive connections, one request in flight on each (Basic auth, write key as the
   username): ``/v1/batch`` with 100 track events per request (unique messageIds, ~10k
   users), then single ``/v1/track`` calls. Only 200 answers without rejections count;
   anything else is reported. The load generator is a minimal HTTP/1.1 client on asyncio
   streams: httpx managed only ~180-530 requests/s with 32 in flight on this 2-core box
   (the collector answers ~2,400), so it would have measured itself.

The CPU of the producer or collector, the load generator, the broker and the whole machine
is sampled over the same windows (100% = one core): that says what bounds the figure.
Every load runs in its own process, counting into shared memory that the parent reads at
window edges. The collector runs in a topic namespace of its own (``CDP_TOPIC_NAMESPACE``),
so no resolver on the same broker ever sees its events; at exit the collector is stopped
and its topics, the raw producers' topic and the database are dropped.

    .venv/bin/python benchmarks/collect.py [--seconds 8] [--repeats 3] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import multiprocessing as mp
import os
import random
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
from typing import Any

import orjson
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
    from cdp_stream.resolver.identity import IdentityRules
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
        asyncio.run((aiokafka_loop if kind == "aiokafka" else http_loop)(*args, counters, stop))


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


async def http_loop(
    ports: list[int], endpoint: str, concurrency: int, key: str, counters: Counters, stop: Any
) -> None:
    per, auth = (100 if endpoint == "batch" else 1), base64.b64encode(f"{key}:".encode())
    prefix, rng = f"b{os.getpid()}-{uuid.uuid4().hex[:6]}", random.Random()

    async def connection(port: int, w: int) -> None:
        head = b"POST /v1/%s HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Basic %s\r\n"
        head = head % (endpoint.encode(), auth) + b"content-type: application/json\r\n"
        writer, n = None, 0
        while not stop.is_set():
            ts, n = now_iso(), n + per
            events = [track_event(rng, f"{prefix}-{w}-{n - j}", ts) for j in range(per)]
            body = orjson.dumps({"batch": events} if per > 1 else events[0])
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"%scontent-length: %d\r\n\r\n%s" % (head, len(body), body))
                lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
                fields = dict(line.lower().split(b":", 1) for line in lines[1:] if line)
                status = int(lines[0].split()[1])
                answer = await reader.readexactly(int(fields[b"content-length"]))
            except (OSError, ValueError, KeyError, asyncio.IncompleteReadError):
                counters[2] += 1
                writer = writer and writer.close()  # None: reconnect
                continue
            ok = status == 200 and b'"rejected"' not in answer
            if not ok and not counters[1]:
                print(f"first bad answer: {status} {answer[:300]!r}", file=sys.stderr)
            counters[0 if ok else 1] += per if ok else 1

    await asyncio.gather(*(connection(ports[w % len(ports)], w) for w in range(concurrency)))


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


def start_collector(
    opts: argparse.Namespace, db_url: str, log: Path, producer: str
) -> subprocess.Popen[bytes]:
    import httpx

    port, key = free_port(), opts.write_key
    env = os.environ | {"CDP_KAFKA_BOOTSTRAP": opts.bootstrap, "CDP_DATABASE_URL": db_url}
    env |= {"CDP_KAFKA_PRODUCER": producer, "CDP_TOPIC_NAMESPACE": opts.namespace}
    env |= {"CDP_BOOTSTRAP_WRITE_KEY": key, "CDP_BOOTSTRAP_API_TOKEN": "tok_" + key}
    command = [Path(sys.executable).with_name("cdp-stream"), "collector", "--port", str(port)]
    with log.open("ab") as out:  # its own session: Ctrl-C reaches us, we stop it in order
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc.port = port  # type: ignore[attr-defined]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    sys.exit(f"the collector did not become ready; its log ({log}):\n{log.read_text()[-3000:]}")


def stop_collectors(collectors: list[subprocess.Popen[bytes]]) -> None:
    """Stop them in order (SIGTERM: a graceful shutdown), and forget them."""
    for proc in collectors:
        proc.terminate()
    for proc in collectors:
        cleanup("stopping the collector", proc.wait, 20) if proc.poll() is None else None
        proc.kill()
    collectors.clear()


def cleanup(what: str, action: Any, *args: Any) -> None:
    try:
        action(*args)
    except Exception as exc:  # one failed step must not skip the others
        print(f"cleanup: {what} failed: {exc!r}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per run")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds before the first window")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight")
    ap.add_argument("--clients", type=int, default=1, help="load generator processes")
    ap.add_argument("--collectors", type=int, default=1, help="collector processes")
    ap.add_argument(
        "--producers",
        nargs="+",
        default=["aiokafka", "confluent"],
        choices=["aiokafka", "confluent"],
        help="the collector's Kafka producer library (CDP_KAFKA_PRODUCER), one run each",
    )
    ap.add_argument("--bootstrap", default=os.environ.get("CDP_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    pg = "postgresql+asyncpg://postgres@127.0.0.1:55432/cdp_test"
    ap.add_argument("--database-url", default=os.environ.get("CDP_TEST_DATABASE_URL", pg))
    opts = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks

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
    opts.watch = {"broker": broker_processes(opts.bootstrap)}
    collectors: list[subprocess.Popen[bytes]] = []
    results = []
    try:
        print(f"raw producers -> topic {topic} (6 partitions) on {opts.bootstrap}")
        for label in ("aiokafka", "confluent-kafka"):
            kind = label.split("-")[0]
            results.append(run_load(f"raw {label}", kind, (opts.bootstrap, topic), opts))
        log = Path(tempfile.gettempdir()) / f"cdp-bench-collector-{run_id}.log"
        db_url = opts.database_url.rsplit("/", 1)[0] + f"/{db}"
        broker = opts.watch
        for producer in opts.producers:
            for _ in range(opts.collectors):  # one after the other: the first one migrates
                collectors.append(start_collector(opts, db_url, log, producer))
            ports = [c.port for c in collectors]  # type: ignore[attr-defined]
            print(f"collector x{len(ports)} ({producer} producer) on ports {ports}, log {log}")
            opts.watch = {"collector": [psutil.Process(c.pid) for c in collectors], **broker}
            for endpoint in ("batch", "track"):
                label = f"collector[{producer}] /v1/{endpoint}"
                args = (ports, endpoint, opts.concurrency, opts.write_key)
                results.append(run_load(label, "http", args, opts, opts.clients))
            stop_collectors(collectors)
    finally:
        stop_collectors(collectors)
        cleanup("dropping the database", asyncio.run, database(opts.database_url, db, False))
        admin = AdminClient({"bootstrap.servers": opts.bootstrap})
        for name in (topic, *Topics(opts.namespace).all(1)):
            cleanup(f"deleting {name}", lambda n=name: admin.delete_topics([n])[n].result(30))

    report(opts, results)


def report(opts: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    median = [statistics.median(r["rates"]) for r in results]
    fastest = max(median[:2])
    print(
        f"\nsummary: median of {opts.repeats} x {opts.seconds:g} s (min..max); concurrency "
        f"{opts.concurrency}; {os.cpu_count()} cores; CPU 100% = one core"
    )
    for r, m in zip(results, median, strict=True):
        line = f"{r['label']:<25} {m:>8,.0f} ev/s ({min(r['rates']):,.0f}..{max(r['rates']):,.0f})"
        if r["label"].startswith("collector"):
            line += f"  = {m / fastest:.2f} of fastest raw ({m / median[0]:.2f} of aiokafka)"
        line += "  CPU " + " ".join(f"{n} {v:.0f}%" for n, v in r["cpu"].items())
        print(line + (f"  !! {r['bad']} failures" if r["bad"] else ""))
    ratio = max(m for r, m in zip(results, median, strict=True) if "/v1/batch" in r["label"])
    ratio /= fastest
    verdict = "PASS" if ratio >= 0.25 else "BELOW TARGET"
    print(
        f"target: collector /v1/batch >= 1/4 of the fastest raw producer: {verdict} ({ratio:.2f})"
    )


if __name__ == "__main__":
    main()
