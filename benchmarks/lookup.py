"""Profile lookups alone: ``GET /v1/profiles/{ref}`` against the raw SQL floor (printed
figures, not a test: it never asserts).

A database of the run's own (migrated, dropped at the end) is seeded through the
resolver's own write path (``apply_with_retry``, batches of 500): ``--people`` people, each
with a user id ``u{k}``, an anonymous id ``a{k}``, an email ``u{k}@example.com``, a phone
and a few traits; every tenth also browsed first under a second anonymous id ``b{k}``, a
profile of its own that their sign-in merged into theirs (``merged_from`` is not empty).
Then one ``cdp-stream api`` process (Kafka at ``--bootstrap``, in a topic namespace of the
run's own, deleted at the end) with a ``profiles:read`` token.

Load: for each rate of ``--rates``, ``--seconds`` of lookups by ``user_id:``, ``email:``
and ``anonymous_id:`` in turn (random known people), open-loop (Poisson arrivals fixed in
advance, latency counted from the scheduled time: see ``benchmarks/loadgen.py``, whose
lean keep-alive client this uses, ``--connections`` connections). In the same run and at
the same rate, the floor: the same lookups as one raw SQL statement each (the identifier
to the profile row, its identities and its merged-away ids, as JSON), prepared, through
an asyncpg pool of ``--connections`` connections from this process.

Printed first, the API's CPU when idle (3 s before any load: part of every per-lookup
figure, more so at low rates). Then per rate: p50/p99 latency (ms), CPU per lookup (µs) of
the API process, of this run's Postgres backends (those alive at the end of the window: a
connection the pool closed meanwhile is not counted, so this errs low) and of this process
(``client``), the machine's CPU (% of one core: the box is shared, so whatever else runs
shows there), and API / floor for latency and Postgres CPU. The API's figures are the
median of ``--repeats`` runs. Last, as many ``GET /healthz`` at the same times: what the
API process spends on a request that reaches no database (uvicorn and FastAPI: the HTTP
part of a lookup). With ``--py-spy DIR``, the API's last run at each rate is profiled into
``DIR/api-<rate>.svg`` (``.venv/bin/pip install py-spy``; it costs the API some CPU).

    .venv/bin/python benchmarks/lookup.py [--people 20000] [--rates 100 500] [--seconds 10]
        [--py-spy DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import uvloop
from collect import (  # the siblings' helpers
    Server,
    cleanup,
    cpu_s,
    database,
    service_args,
    start_server,
)
from loadgen import Pool, Tally, get, open_loop, poisson
from resolve import backends_cpu_s, drop_namespace, listener, preflight
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "cdp_bench_lookup_" + uuid.uuid4().hex
SOURCE = "src_bench_lookup"
BATCH = 500

# The floor: what the API must find, as one statement (the index on identities' primary
# key, the profile by its key, its identities, its merged-away ids).
FLOOR = """
SELECT p.id, p.traits, p.computed, p.created_at, p.updated_at,
  (SELECT json_agg(json_build_object('type', i.type, 'value', i.value)
                   ORDER BY i.type, i.value)
     FROM identities i WHERE i.profile_id = p.id) AS identities,
  (SELECT json_agg(m.id ORDER BY m.id) FROM profiles m WHERE m.merged_into = p.id) AS merged
FROM identities x JOIN profiles p ON p.id = x.profile_id
WHERE x.type = $1 AND x.value = $2
"""


# -- the data ------------------------------------------------------------------------------


def people_events(people: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Two waves of events: first everyone's sign-in (and the second browser's page of
    every tenth person), then the sign-ins that merge those browsers in."""

    def event(type_: str, k: int, ts: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": type_,
            "messageId": f"m-{type_}-{k}-{uuid.uuid4().hex[:8]}",
            "sourceId": SOURCE,
            "timestamp": ts,
            "receivedAt": ts,
            "channel": "server",
            **fields,
        }

    first, second = [], []
    for k in range(people):
        traits = {
            "email": f"u{k}@example.com",
            "phone": f"+1415555{k % 10_000:04d}",
            "name": f"Person {k}",
            "plan": ("free", "pro", "team")[k % 3],
            "company": {"name": f"Company {k % 500}", "employees": k % 1000},
        }
        first.append(
            event(
                "identify",
                k,
                "2026-11-01T10:00:00.123Z",
                userId=f"u{k}",
                anonymousId=f"a{k}",
                traits=traits,
            )
        )
        if k % 10 == 0:
            page = {"path": "/pricing", "url": "https://example.com/pricing"}
            first.append(
                event("page", k, "2026-10-30T09:00:00Z", anonymousId=f"b{k}", properties=page)
            )
            second.append(
                event("identify", k, "2026-11-02T08:00:00Z", userId=f"u{k}", anonymousId=f"b{k}")
            )
    return first, second


async def seed(url: str, people: int) -> None:
    """Migrate, write the people through the resolver, create the read token."""
    from cdp_stream.identity import IdentityRules
    from cdp_stream.profiles.credentials import ensure_token
    from cdp_stream.profiles.db import make_engine
    from cdp_stream.profiles.migrate import upgrade_to_head
    from cdp_stream.resolver.consumer import apply_with_retry
    from cdp_stream.settings import Settings

    engine = make_engine(url, "bench-lookup-seed")
    rules = IdentityRules.from_settings(Settings())
    started = time.monotonic()
    try:
        await upgrade_to_head(engine)
        for wave in people_events(people):
            for at in range(0, len(wave), BATCH):
                await apply_with_retry(engine, wave[at : at + BATCH], rules)
        async with engine.begin() as conn:
            await ensure_token(conn, "tok_bench", "bench", TOKEN, ("profiles:read",))
            await conn.exec_driver_sql("ANALYZE")
    finally:
        await engine.dispose()
    print(f"  seeded {people:,} people in {time.monotonic() - started:.0f} s", flush=True)


def refs(rng: random.Random, people: int, count: int) -> list[tuple[str, str]]:
    """(type, value) of known people, the three kinds in turn."""
    out = []
    for i in range(count):
        k = rng.randrange(people)
        out.append(
            (("user_id", f"u{k}"), ("email", f"u{k}@example.com"), ("anonymous_id", f"a{k}"))[i % 3]
        )
    return out


# -- measuring -----------------------------------------------------------------------------

# CPU seconds so far of the processes watched, and of each backend of the run's database.
Sample = tuple[dict[str, float], dict[int, float]]


def used(before: Sample, after: Sample) -> dict[str, float]:
    """CPU seconds between two samples; ``postgres``: the backends alive at the second
    (a backend that exited meanwhile, an overflow connection closed, is not counted)."""
    (x, bx), (y, by) = before, after
    return {
        **{k: y[k] - x[k] for k in x},
        "postgres": sum(v - bx.get(pid, 0.0) for pid, v in by.items()),
    }


# -- one phase -----------------------------------------------------------------------------


async def phase(
    offsets: list[float],
    ask: Callable[[int], Awaitable[bool]],
    meter: Callable[[], Sample],
) -> dict[str, Any]:
    """``ask(i)`` at each offset, open-loop; latencies and the CPU used meanwhile."""
    loop, tally = asyncio.get_running_loop(), Tally()

    def send(i: int) -> Callable[[float], Awaitable[None]]:
        async def go(at: float) -> None:
            try:
                ok = await ask(i)
            except (OSError, ConnectionError):
                tally.errors += 1
                return
            tally.count(200 if ok else 500, b"", 0, 1000 * (loop.time() - at))

        return go

    before, t0 = meter(), time.monotonic()
    await open_loop([(t, send(i)) for i, t in enumerate(offsets)], tally, 10.0)
    after, elapsed = meter(), time.monotonic() - t0
    done = len(tally.latencies)
    lat = sorted(tally.latencies)
    bad = sum(n for s, n in tally.statuses.items() if s != 200) + tally.errors + tally.unanswered
    return {
        "p50": lat[len(lat) // 2] if lat else float("nan"),
        "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "cpu_us": {k: 1e6 * v / max(done, 1) for k, v in used(before, after).items()},
        "machine_pct": 100 * used(before, after)["machine"] / elapsed,
        "late_ms": statistics.median(tally.lateness) if tally.lateness else 0.0,
        "bad": bad,
        "first_bad": tally.first_bad,
    }


@dataclass
class Load:
    """One rate's lookups: (type, value) each, at their offsets, and how CPU is sampled."""

    lookups: list[tuple[str, str]]
    offsets: list[float]
    connections: int
    meter: Callable[[], Sample]

    async def run(self, ask: Callable[[int], Awaitable[bool]]) -> dict[str, Any]:
        """A warm-up (connections, prepared statements), then the measured phase."""
        await phase(self.offsets[:200], ask, self.meter)
        return await phase(self.offsets, ask, self.meter)


async def api_phase(port: int, load: Load, *, healthz: bool = False) -> dict[str, Any]:
    """The lookups through the API; ``healthz``: as many ``GET /healthz`` instead."""
    bearer = f"Bearer {TOKEN}".encode()
    requests = [
        get("/healthz" if healthz else f"/v1/profiles/{t}:{v}", bearer) for t, v in load.lookups
    ]
    pool = Pool(port, load.connections)
    await pool.open()
    first_bad: list[str] = []

    async def ask(i: int) -> bool:
        answer = await pool.request(requests[i])
        if answer.status != 200 and not first_bad:
            first_bad.append(f"{answer.status} {answer.body[:200]!r}")
        return answer.status == 200 and (healthz or answer.body.startswith(b'{"id":'))

    try:
        out = await load.run(ask)
    finally:
        pool.close()
    out["first_bad"] = first_bad[0] if first_bad else ""
    return out


async def floor_phase(url: str, load: Load) -> dict[str, Any]:
    import asyncpg

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    pool = await asyncpg.create_pool(dsn, min_size=load.connections, max_size=load.connections)

    async def ask(i: int) -> bool:
        async with pool.acquire() as conn:
            return await conn.fetchrow(FLOOR, *load.lookups[i]) is not None

    try:
        return await load.run(ask)
    finally:
        await pool.close()


# -- the run -------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--people", type=int, default=20_000)
    ap.add_argument("--rates", nargs="+", type=float, default=[100.0, 500.0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the API per rate")
    ap.add_argument("--connections", type=int, default=8, help="keep-alive connections")
    ap.add_argument("--py-spy", type=Path, help="profile the API's last run per rate into DIR")
    service_args(ap)
    opts = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    preflight(opts.bootstrap, opts.database_url)

    run_id = uuid.uuid4().hex[:8]
    name, namespace = f"cdp_bench_lookup_{run_id}", f"bench-lookup-{run_id}."
    url = make_url(opts.database_url).set(database=name).render_as_string(hide_password=False)
    postgres = listener(make_url(opts.database_url).port or 5432)
    log = Path(tempfile.gettempdir()) / f"cdp-bench-lookup-{run_id}.log"
    asyncio.run(database(opts.database_url, name, True))
    server = None
    try:
        print(f"lookup benchmark: {opts.people:,} people, database {name}", flush=True)
        asyncio.run(seed(url, opts.people))
        env = {
            **os.environ,
            "CDP_DATABASE_URL": url,
            "CDP_KAFKA_BOOTSTRAP": opts.bootstrap,
            "CDP_TOPIC_NAMESPACE": namespace,
            "CDP_SUPPRESSION_KEY": f"bench-{namespace}",
        }
        server = start_server([ROOT / ".venv/bin/cdp-stream", "api"], env, log)
        api = [psutil.Process(server.proc.pid)]
        me = [psutil.Process()]

        def meter() -> Sample:
            watched = {"api": cpu_s(api), "client": cpu_s(me), "machine": cpu_s(None)}
            return watched, backends_cpu_s(postgres, name)

        idle = meter()
        time.sleep(3)
        idle_pct = 100 * used(idle, meter())["api"] / 3
        print(f"  api pid {server.proc.pid}, port {server.port}; idle: {idle_pct:.1f}% of a core")
        results = []
        for rate in opts.rates:
            rng = random.Random(int(rate))
            offsets = poisson(rng, rate, opts.seconds)
            load = Load(refs(rng, opts.people, len(offsets)), offsets, opts.connections, meter)
            runs = []
            for n in range(opts.repeats):
                spy = opts.py_spy and n == opts.repeats - 1 and py_spy(opts, server, rate)
                runs.append(uvloop.run(api_phase(server.port, load)))
                show("api", rate, runs[-1])
                if spy:
                    cleanup("py-spy", spy.wait, 30)
            floor = uvloop.run(floor_phase(url, load))
            show("raw SQL", rate, floor)
            http = uvloop.run(api_phase(server.port, load, healthz=True))
            show("/healthz", rate, http)
            results.append((rate, runs, floor, http))
        summary(results)
    finally:
        if server is not None:
            server.stop()
        cleanup(
            "dropping the database", lambda: asyncio.run(database(opts.database_url, name, False))
        )
        drop_namespace(opts.bootstrap, namespace)


def py_spy(opts: argparse.Namespace, server: Server, rate: float) -> subprocess.Popen[bytes]:
    """py-spy recording the API for about the next run (warm-up included)."""
    opts.py_spy.mkdir(parents=True, exist_ok=True)
    out = opts.py_spy / f"api-{rate:.0f}.svg"
    seconds = int(opts.seconds + 2)
    command = [ROOT / ".venv/bin/py-spy", "record", "-o", out, "-d", seconds, "--nonblocking"]
    print(f"  profiling the API into {out}", flush=True)
    return subprocess.Popen([*map(str, command), "--pid", str(server.proc.pid)])


def show(label: str, rate: float, r: dict[str, Any]) -> None:
    cpu = r["cpu_us"]
    print(
        f"  {rate:>5.0f}/s {label:<8} p50 {r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms  "
        f"CPU/lookup: api {cpu['api']:5.0f} µs, postgres {cpu['postgres']:4.0f} µs, "
        f"client {cpu['client']:4.0f} µs; machine {r['machine_pct']:3.0f}%"
        + (f"  !! {r['bad']} failed: {r['first_bad']}" if r["bad"] else ""),
        flush=True,
    )


def median(runs: list[dict[str, Any]], key: str, sub: str | None = None) -> float:
    return statistics.median(r[key][sub] if sub else r[key] for r in runs)


Result = tuple[float, list[dict[str, Any]], dict[str, Any], dict[str, Any]]


def summary(results: list[Result]) -> None:
    print("\nsummary (API: median of the runs; floor: raw SQL through asyncpg, same lookups)")
    for rate, runs, floor, http in results:
        p50, p99 = median(runs, "p50"), median(runs, "p99")
        api_us, pg_us = median(runs, "cpu_us", "api"), median(runs, "cpu_us", "postgres")
        floor_pg = floor["cpu_us"]["postgres"]
        print(
            f"  {rate:>5.0f}/s  api p50 {p50:.2f} ms p99 {p99:.2f} ms "
            f"(floor {floor['p50']:.2f} / {floor['p99']:.2f} ms: x{p50 / floor['p50']:.1f} / "
            f"x{p99 / floor['p99']:.1f});  api CPU {api_us:.0f} µs/lookup "
            f"({api_us * rate / 1e4:.1f}% of a core);  postgres {pg_us:.0f} µs/lookup "
            f"(floor {floor_pg:.0f}: x{pg_us / max(floor_pg, 1):.1f});  "
            f"GET /healthz (no database) {http['cpu_us']['api']:.0f} µs of API CPU"
        )
    ok = all(median(runs, "p99") <= 10.0 for _, runs, _, _ in results)
    print(f"  target lookup p99 <= 10 ms (issue 10): {'PASS' if ok else 'MISS'}")


if __name__ == "__main__":
    main()
