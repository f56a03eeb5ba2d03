"""Collector throughput against the raw Kafka producer ceiling (printed figures, not a test).

What is measured, each as events acknowledged per second over ``--seconds`` windows after a
``--warmup``, ``--repeats`` times (median, min..max; the machine is noisy):

1. The raw producer ceiling: the same enriched track events (~500 bytes JSON, made by the
   collector's own ``intake``, keys ``user_id:u123``) sent to a fresh 6-partition topic by
   a) aiokafka (idempotent, linger 5 ms, 256 KiB batches; ``send()`` 1000 then gather)
   b) confluent-kafka (idempotent, linger 5 ms; ``produce()`` + ``poll(0)``, delivery
      callbacks without error are counted).
2. The real collector (``cdp-stream collector`` as a subprocess, on a fresh Postgres
   database created for this run) over HTTP, loaded from a separate process by an httpx
   client with ``--concurrency`` requests in flight: ``/v1/batch`` with 100 track events
   per request, and single ``/v1/track`` calls. Only 200 answers count; any other answer
   or transport error is reported. The CPU of the collector, the load generator and the
   broker is sampled over the same windows (100% = one core), to show what is the bound.

Every producer and load generator runs in its own process and counts into shared
memory; the parent only reads the counters at window edges. At the end the benchmark
topic and database are dropped, and the idle resolver group is moved past the events the
collector published to ``cdp.events`` (so the next resolver, e.g. ``make test``, does
not replay them; ``--keep-resolver-offsets`` to leave it).

    .venv/bin/python benchmarks/collect.py [--seconds 8 --repeats 3 --concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psutil

EVENTS_TOPIC, RESOLVER_GROUP = "cdp.events", "cdp-resolver"
NAMES = ["Product Viewed", "Product Added", "Order Completed", "Email Opened", "Video Played"]
UA = "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 Version/17.4 Safari"
CHUNK = 1000
Counters = Any  # a shared mp.Array("q", 3): ok events, non-200 answers, errors


def track_event(rng: random.Random, message_id: str, ts: str) -> dict[str, Any]:
    """A client-side track event like analytics.js sends, from one of ~10k users."""
    sku = rng.randrange(100_000)
    return {
        "type": "track",
        "event": rng.choice(NAMES),
        "userId": f"u{rng.randrange(10_000)}",
        "messageId": message_id,
        "timestamp": ts,
        "properties": {
            "product_id": f"sku-{sku}",
            "price": round(rng.uniform(5, 500), 2),
            "currency": "EUR",
            "quantity": rng.randint(1, 3),
        },
        "context": {
            "library": {"name": "analytics.js", "version": "5.2.0"},
            "locale": "en-US",
            "userAgent": UA,
            "page": {"path": f"/p/sku-{sku}", "referrer": "https://www.google.com/"},
        },
    }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def enriched_records(count: int) -> list[tuple[bytes, bytes]]:
    """(key, value) exactly as the collector would publish them (its own intake)."""
    from cdp_stream.collector.intake import intake
    from cdp_stream.settings import Settings

    rng, settings, ts = random.Random(1), Settings(max_batch_events=count), now_iso()
    body = {"batch": [track_event(rng, f"raw-{i}", ts) for i in range(count)]}
    result = intake(
        body,
        "batch",
        settings=settings,
        source_id="src_bench",
        received_at=datetime.now(UTC),
        ip="127.0.0.1",
        user_agent="python-httpx",
    )
    return [(a.key, a.value) for a in result.accepted]


# -- load processes: each runs until ``stop`` is set, counting into its own counters -------


def worker(kind: str, args: tuple[Any, ...], counters: Counters, stop: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    if kind == "confluent":
        confluent_loop(*args, counters, stop)
    else:
        asyncio.run((aiokafka_loop if kind == "aiokafka" else http_loop)(*args, counters, stop))


async def aiokafka_loop(bootstrap: str, topic: str, counters: Counters, stop: Any) -> None:
    from aiokafka import AIOKafkaProducer

    records = enriched_records(10_000)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5, max_batch_size=256 * 1024
    )
    await producer.start()
    i = 0
    while not stop.is_set():
        futures = [await producer.send(topic, v, key=k) for k, v in records[i : i + CHUNK]]
        i = (i + CHUNK) % len(records)
        results = await asyncio.gather(*futures, return_exceptions=True)
        ok = sum(not isinstance(r, BaseException) for r in results)
        counters[0] += ok
        counters[2] += len(results) - ok
    await producer.stop()


def confluent_loop(bootstrap: str, topic: str, counters: Counters, stop: Any) -> None:
    from confluent_kafka import Producer

    records = enriched_records(10_000)
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )

    def delivered(err: Any, _msg: Any) -> None:
        counters[0 if err is None else 2] += 1

    while not stop.is_set():
        for key, value in records:
            while True:
                try:
                    producer.produce(topic, value, key, on_delivery=delivered)
                    break
                except BufferError:  # local queue full: serve callbacks, then retry
                    producer.poll(0.005)
            producer.poll(0)
    producer.flush(30)


async def http_loop(
    urls: list[str], endpoint: str, concurrency: int, key: str, counters: Counters, stop: Any
) -> None:
    import httpx

    per = 100 if endpoint == "batch" else 1
    auth = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    headers = {"authorization": auth, "content-type": "application/json"}
    prefix, rng = f"b{os.getpid()}-{uuid.uuid4().hex[:6]}", random.Random()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def loop(client: httpx.AsyncClient, url: str, w: int) -> None:
        n = 0
        while not stop.is_set():
            ts, n = now_iso(), n + per
            events = [track_event(rng, f"{prefix}-{w}-{n - j}", ts) for j in range(per)]
            body = orjson.dumps({"batch": events} if per > 1 else events[0])
            try:
                r = await client.post(url, content=body, headers=headers)
            except httpx.HTTPError:
                counters[2] += 1
                continue
            ok = r.status_code == 200 and b'"rejected"' not in r.content
            if not ok and not counters[1]:
                print(f"first bad answer: {r.status_code} {r.text[:300]}", file=sys.stderr)
            counters[0 if ok else 1] += per if ok else 1

    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        urls = [f"{u}/v1/{endpoint}" for u in urls]
        await asyncio.gather(*(loop(client, urls[w % len(urls)], w) for w in range(concurrency)))


# -- measuring -----------------------------------------------------------------------------


def cpu_s(proc: psutil.Process | None) -> float:
    try:
        t = proc.cpu_times() if proc else None
    except psutil.Error:
        return 0.0
    return t.user + t.system if t else 0.0


def measure(
    label: str,
    opts: argparse.Namespace,
    procs: list[mp.Process],
    counters: list[Any],
    watch: dict[str, psutil.Process | None],
) -> dict[str, Any]:
    """Rates (and CPU % of each watched process) over the repeated windows."""
    rates: list[float] = []
    cpus: dict[str, list[float]] = {name: [] for name in watch}
    time.sleep(opts.warmup)
    for run in range(opts.repeats):
        c0, t0, u0 = (
            [c[0] for c in counters],
            time.monotonic(),
            {n: cpu_s(p) for n, p in watch.items()},
        )
        time.sleep(opts.seconds)
        c1, t1, u1 = (
            [c[0] for c in counters],
            time.monotonic(),
            {n: cpu_s(p) for n, p in watch.items()},
        )
        if not all(p.is_alive() for p in procs):
            sys.exit(f"{label}: a load process died (see its output above)")
        rates.append((sum(c1) - sum(c0)) / (t1 - t0))
        for name in watch:
            cpus[name].append(100 * (u1[name] - u0[name]) / (t1 - t0))
        shown = "  ".join(f"{n} {v[-1]:.0f}%" for n, v in cpus.items() if watch[n])
        print(f"  {label:<28} run {run + 1}: {rates[-1]:>8,.0f} ev/s   CPU {shown}", flush=True)
    bad, errors = sum(c[1] for c in counters), sum(c[2] for c in counters)
    if bad or errors:
        print(f"  !! {label}: {bad} non-200 (or rejected) answers, {errors} errors/failed sends")
    cpu = {n: statistics.median(v) for n, v in cpus.items()}
    return {
        "label": label,
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "cpu": cpu,
        "bad": bad + errors,
    }


def run_load(
    label: str,
    kind: str,
    args: tuple[Any, ...],
    opts: argparse.Namespace,
    watch: dict[str, psutil.Process | None],
    nprocs: int = 1,
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    stop, counters = ctx.Event(), [ctx.Array("q", 3, lock=False) for _ in range(nprocs)]
    procs = [ctx.Process(target=worker, args=(kind, args, c, stop), daemon=True) for c in counters]
    for p in procs:
        p.start()
    try:
        time.sleep(1.0)  # spawn + imports + payloads before the warm-up starts to count
        watch = {**watch, "loadgen" if kind == "http" else "producer": psutil.Process(procs[0].pid)}
        return measure(label, opts, procs, counters, watch)
    finally:
        stop.set()
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.terminate()


# -- the services --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def broker_process(bootstrap: str) -> psutil.Process | None:
    port = int(bootstrap.split(",")[0].rpartition(":")[2])
    try:
        conns = psutil.net_connections("tcp")
        pid = next(c.pid for c in conns if c.status == "LISTEN" and c.laddr.port == port)
        return psutil.Process(pid) if pid else None
    except (psutil.Error, StopIteration):
        return None


async def database(admin_url: str, name: str, create: bool) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url.replace("+asyncpg", ""), timeout=5)
    try:
        sql = (
            f'CREATE DATABASE "{name}"'
            if create
            else f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
        )
        await conn.execute(sql)
    finally:
        await conn.close()


def start_collector(opts: argparse.Namespace, db_url: str, log: Path) -> tuple[Any, str]:
    import httpx

    port = free_port()
    env = {
        **os.environ,
        "CDP_KAFKA_BOOTSTRAP": opts.bootstrap,
        "CDP_DATABASE_URL": db_url,
        "CDP_BOOTSTRAP_WRITE_KEY": opts.write_key,
        "CDP_BOOTSTRAP_API_TOKEN": opts.write_key.replace("wk_", "tok_"),
    }
    exe = Path(sys.executable).with_name("cdp-stream")
    with log.open("ab") as out:  # start_new_session: our Ctrl-C must not reach it first
        proc = subprocess.Popen(
            [exe, "collector", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"the collector did not become ready; its log:\n{log.read_text()[-3000:]}")


def end_offsets(bootstrap: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "cdp-bench-probe"})
    try:
        topic = c.list_topics(EVENTS_TOPIC, timeout=10).topics.get(EVENTS_TOPIC)
        parts = topic.partitions if topic and not topic.error else {}
        return {p: c.get_watermark_offsets(TopicPartition(EVENTS_TOPIC, p), 10)[1] for p in parts}
    finally:
        c.close()


def skip_for_resolver(bootstrap: str, before: dict[int, int]) -> None:
    """Move the idle resolver group past what we published, where it had read all before."""
    from confluent_kafka import ConsumerGroupTopicPartitions as Group
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    after, admin = end_offsets(bootstrap), AdminClient({"bootstrap.servers": bootstrap})
    try:
        got = admin.list_consumer_group_offsets([Group(RESOLVER_GROUP)])[RESOLVER_GROUP].result()
        committed = {tp.partition: tp.offset for tp in got.topic_partitions}
        moves = [
            TopicPartition(EVENTS_TOPIC, p, end)
            for p, end in after.items()
            if max(committed.get(p, 0), 0) >= before.get(p, 0) and end > before.get(p, 0)
        ]
        if moves:
            admin.alter_consumer_group_offsets([Group(RESOLVER_GROUP, moves)])[
                RESOLVER_GROUP
            ].result()
        skipped = sum(tp.offset - max(committed.get(tp.partition, 0), 0) for tp in moves)
        print(f"resolver group {RESOLVER_GROUP}: moved past {skipped:,} benchmark events")
    except Exception as exc:  # an active group refuses; say so, do not fail the benchmark
        left = sum(after.values()) - sum(before.values())
        print(f"note: {RESOLVER_GROUP} not moved ({exc}); it will replay ~{left:,} events")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per run")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight")
    ap.add_argument("--clients", type=int, default=1, help="load generator processes")
    ap.add_argument("--collectors", type=int, default=1, help="collector processes")
    ap.add_argument("--bootstrap", default=os.environ.get("CDP_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    ap.add_argument(
        "--database-url",
        default=os.environ.get(
            "CDP_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:55432/cdp_test"
        ),
    )
    ap.add_argument("--keep-resolver-offsets", action="store_true")
    opts = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks

    host, _, port = opts.bootstrap.split(",")[0].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        sys.exit(f"Kafka is not reachable at {opts.bootstrap} ({exc}): run `make services`")
    run_id = uuid.uuid4().hex[:8]
    db_name, topic = f"cdp_bench_{run_id}", f"cdp-bench-{run_id}"
    opts.write_key = f"wk_bench_{run_id}"
    try:
        asyncio.run(database(opts.database_url, db_name, create=True))
    except Exception as exc:  # refused, unknown host, timeout, auth
        sys.exit(f"Postgres is not reachable at {opts.database_url} ({exc!r}): `make services`")
    from cdp_stream.bus import KafkaBus

    asyncio.run(KafkaBus(opts.bootstrap).ensure_topics({topic: 6}))
    broker = broker_process(opts.bootstrap)
    collectors: list[subprocess.Popen[bytes]] = []
    before: dict[int, int] | None = None
    results = []
    try:
        print(f"raw producers -> topic {topic} (6 partitions) on {opts.bootstrap}")
        for label, kind in (
            ("raw aiokafka producer", "aiokafka"),
            ("raw confluent-kafka", "confluent"),
        ):
            results.append(run_load(label, kind, (opts.bootstrap, topic), opts, {"broker": broker}))
        log = Path(tempfile.gettempdir()) / f"cdp-bench-collector-{run_id}.log"
        before = end_offsets(opts.bootstrap)
        urls = []
        for _ in range(opts.collectors):  # one at a time: the first one runs the migrations
            proc, url = start_collector(
                opts, opts.database_url.rsplit("/", 1)[0] + f"/{db_name}", log
            )
            collectors.append(proc)
            urls.append(url)
        print(f"collector x{opts.collectors} at {', '.join(urls)} (log {log})")
        watch = {"collector": psutil.Process(collectors[0].pid), "broker": broker}
        for label, endpoint in (
            ("collector /v1/batch x100", "batch"),
            ("collector /v1/track", "track"),
        ):
            args = (urls, endpoint, opts.concurrency, opts.write_key)
            results.append(run_load(label, "http", args, opts, watch, opts.clients))
    finally:
        for proc in collectors:
            proc.terminate()
        for proc in collectors:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        asyncio.run(database(opts.database_url, db_name, create=False))
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": opts.bootstrap})
        admin.delete_topics([topic])[topic].result(30)
        if before is not None and not opts.keep_resolver_offsets:
            skip_for_resolver(opts.bootstrap, before)

    fastest = max(r["median"] for r in results[:2])
    print(
        f"\nsummary ({opts.repeats} x {opts.seconds:g} s windows, concurrency {opts.concurrency}, "
        f"{os.cpu_count()} cores; CPU 100% = one core)"
    )
    for r in results:
        line = (
            f"{r['label']:<26} {r['median']:>8,.0f} ev/s (median; {r['min']:,.0f}..{r['max']:,.0f})"
        )
        if r["label"].startswith("collector"):
            line += f"  = {r['median'] / fastest:.2f} of fastest raw"
        line += "  CPU " + " ".join(f"{n} {v:.0f}%" for n, v in r["cpu"].items() if v)
        print(line + (f"  !! {r['bad']} failures" if r["bad"] else ""))
    batch = results[2]["median"]
    verdict = "PASS" if batch >= fastest / 4 else "BELOW TARGET"
    print(
        f"target: /v1/batch >= 1/4 of fastest raw ({fastest / 4:,.0f} ev/s): {verdict} "
        f"({batch / fastest:.2f})"
    )


if __name__ == "__main__":
    main()
