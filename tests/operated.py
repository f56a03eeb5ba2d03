"""Every stage as its own ``cdp-stream`` process on the real broker and server, with real
traffic through them, as an operator runs it: what ``tests/test_metrics.py`` scrapes and
``tests/test_logs.py`` reads the logs of.

The collector runs two workers on one port (``CDP_COLLECTOR_WORKERS``), the consumers
serve their metrics on ``CDP_METRICS_PORT``; their stdout and stderr go to files. The
traffic: an audience, a batch of page views carrying e-mail addresses and phone numbers
(one event invalid), two anonymous visitors who sign in as the same user (a merge), an
unmerge through the API, a record on ``cdp.events`` that is not an event, and a CRM
webhook URL that refuses every delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from cdp_stream.bus.kafka import KafkaBus
from cdp_stream.topics import Topics
from tests.support import Samples, eventually, free_port, parse, uid

CLI = Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "cdp-stream"


@dataclass
class Stages:
    """The processes, where they answer, and what the traffic was."""

    logs: Path
    collector: str
    api: str
    metrics: dict[str, str]  # stage -> its /metrics URL
    write_key: str
    api_token: str
    webhook_secret: str
    suppression_key: str
    personal: list[str] = field(default_factory=list)  # every e-mail and phone sent
    accepted: int = 0
    batches: int = 0
    merged_profile: str = ""

    async def scrape(self, stage: str) -> Samples:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(self.metrics[stage])
        response.raise_for_status()
        return parse(response.text)

    def log_lines(self, role: str) -> list[str]:
        """What the process wrote to stderr: its logs."""
        return (self.logs / f"{role}.log").read_text(errors="replace").splitlines()

    def output(self) -> str:
        """Everything every process wrote, stdout and stderr."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.iterdir()))


@contextlib.asynccontextmanager
async def operated(kafka_bootstrap: str, pg_url: str, logs: Path) -> AsyncIterator[Stages]:
    run = uid()
    namespace = f"test-ops-{run}."
    ports = {name: free_port() for name in ("collector", "api", "resolver", "activation")}
    stages = Stages(
        logs=logs,
        collector=f"http://127.0.0.1:{ports['collector']}",
        api=f"http://127.0.0.1:{ports['api']}",
        metrics={
            "collector": f"http://127.0.0.1:{ports['collector']}/metrics",
            "api": f"http://127.0.0.1:{ports['api']}/metrics",
            "resolver": f"http://127.0.0.1:{ports['resolver']}/metrics",
            "activation": f"http://127.0.0.1:{ports['activation']}/metrics",
        },
        write_key=uid("wk_ops"),
        api_token=uid("tok_ops"),
        webhook_secret=uid("whsec"),
        suppression_key=uid("suppression-key"),
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "PROMETHEUS_"))}
    base |= {
        "CDP_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CDP_DATABASE_URL": pg_url,
        "CDP_TOPIC_NAMESPACE": namespace,
        "CDP_BOOTSTRAP_WRITE_KEY": stages.write_key,
        "CDP_BOOTSTRAP_API_TOKEN": stages.api_token,
        "CDP_SUPPRESSION_KEY": stages.suppression_key,
        "CDP_RESOLVER_POLL_TIMEOUT_MS": "100",
        "CDP_ACTIVATION_POLL_TIMEOUT_MS": "100",
        "CDP_DMP_INTERVAL_S": "1",
        "CDP_CRM_WEBHOOK_URL": f"http://127.0.0.1:{free_port()}/refused",  # nothing listens
        "CDP_CRM_WEBHOOK_SECRET": stages.webhook_secret,
        "CDP_LOG_LEVEL": "info",
    }
    roles: dict[str, dict[str, str]] = {
        "collector": {"CDP_HTTP_PORT": str(ports["collector"]), "CDP_COLLECTOR_WORKERS": "2"},
        "api": {"CDP_HTTP_PORT": str(ports["api"])},
        "resolver": {"CDP_METRICS_PORT": str(ports["resolver"])},
        "activation": {"CDP_METRICS_PORT": str(ports["activation"])},
    }
    procs = _Processes(logs)
    try:
        for role, env in roles.items():
            proc = procs.start(role, base | env)
            if role == "collector":  # the first to start migrates and creates the keys
                await _answering(f"{stages.collector}/readyz", proc, stages)
        for url in stages.metrics.values():
            await _answering(url, None, stages)
        await _traffic(stages, Topics(namespace), kafka_bootstrap, run)
        yield stages
    finally:
        procs.stop()


class _Processes:
    """``cdp-stream`` processes, each writing its stdout to ``<role>.out`` and its stderr
    (the logs) to ``<role>.log``; stopped with SIGTERM as a supervisor stops them."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self._procs: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []

    def start(self, role: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = open(self._logs / f"{role}.out", "wb")  # noqa: SIM115
        err = open(self._logs / f"{role}.log", "wb")  # noqa: SIM115
        self._files += [out, err]
        self._procs.append(subprocess.Popen([str(CLI), role], env=env, stdout=out, stderr=err))
        return self._procs[-1]

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for f in self._files:
            f.close()


async def _answering(url: str, proc: subprocess.Popen[bytes] | None, stages: Stages) -> None:
    async def probe() -> bool:
        assert proc is None or proc.poll() is None, stages.output()[-3000:]
        with contextlib.suppress(httpx.TransportError):
            async with httpx.AsyncClient(timeout=5) as client:
                return (await client.get(url)).status_code == 200
        return False

    await eventually(probe, within_s=90, interval=0.2)


async def _traffic(stages: Stages, topics: Topics, kafka_bootstrap: str, run: str) -> None:
    bearer = {"authorization": f"Bearer {stages.api_token}"}
    async with (
        httpx.AsyncClient(base_url=stages.collector, auth=(stages.write_key, "")) as collector,
        httpx.AsyncClient(base_url=stages.api, headers=bearer, timeout=10) as api,
    ):
        path = f"/ops-{run}"
        rule = {"event": {"type": "page", "where": {"path": {"eq": path}}, "within": "7d"}}
        created = await api.post("/v1/audiences", json={"name": f"ops {run}", "rule": rule})
        assert created.status_code == 201, created.text
        audience = created.json()["id"]

        async def backfilled() -> bool:
            """Its back-fill (in the API process) over the profiles already stored is done:
            from here on, only activation moves members (and counts them)."""
            got = (await api.get(f"/v1/audiences/{audience}")).json()
            return bool(got["backfill"]["status"] == "done")

        await eventually(backfilled, within_s=90, interval=0.2)

        async def send(events: list[dict[str, Any]]) -> dict[str, Any]:
            response = await collector.post("/v1/batch", json={"batch": events})
            assert response.status_code == 200, response.text
            stages.batches += 1
            answer: dict[str, Any] = response.json()
            stages.accepted += len(events) - len(answer.get("rejected", []))
            return answer

        def page(anon: str, **fields: Any) -> dict[str, Any]:
            return {"type": "page", "anonymousId": anon, "properties": {"path": path}, **fields}

        visitors = [f"anon-{run}-{i}" for i in range(8)]
        people = []
        for i, anon in enumerate(visitors):
            email, phone = f"ops.{run}.{i}@example.com", f"+4915{i}{abs(hash(run)) % 10**7:07d}"
            stages.personal += [email, phone]
            people.append(page(anon, context={"traits": {"email": email, "phone": phone}}))
        answer = await send([*people, {"type": "track", "anonymousId": visitors[0]}])
        assert [r["index"] for r in answer["rejected"]] == [len(people)]  # no event name

        # Two visitors, each a profile of their own, then signed in as one user: a merge.
        twins = [f"twin-{run}-{i}" for i in range(2)]
        await send([page(t) for t in twins])
        for t in twins:
            await eventually(
                lambda t=t: _found(api, f"anonymous_id:{t}"), within_s=60, interval=0.2
            )
        user = f"user-{run}"
        for t in twins:
            await send([{"type": "identify", "anonymousId": t, "userId": user}])
            await eventually(
                lambda t=t: _found(api, f"user_id:{user}", f"anonymous_id:{t}"), within_s=60
            )
        profile = (await api.get(f"/v1/profiles/user_id:{user}")).json()
        stages.merged_profile = profile["id"]
        undone = await api.post(f"/v1/profiles/{profile['id']}/unmerge")
        assert undone.status_code == 200, undone.text

    # A record on cdp.events that is not an event (what no collector writes).
    bus = KafkaBus(kafka_bootstrap, client_id=f"test-ops-{run}")
    await bus.start()
    try:
        await bus.publish(topics.events, b"junk", b"not json at all")
    finally:
        await bus.stop()
    await asyncio.sleep(0)


async def _found(api: httpx.AsyncClient, ref: str, same_as: str | None = None) -> bool:
    """Whether ``ref`` has a profile (the same one as ``same_as``'s, if given)."""
    got = await api.get(f"/v1/profiles/{ref}")
    if got.status_code != 200:
        return False
    if same_as is None:
        return True
    other = await api.get(f"/v1/profiles/{same_as}")
    return bool(other.status_code == 200 and other.json()["id"] == got.json()["id"])
