"""The fault test: every stage its own process (``cdp-stream collector|resolver|
activation``) on a broker and a server of the test's own, under a steady load of HTTP
clients that retry until answered 200 (as the SDKs do). Meanwhile each stage is killed
with SIGKILL and started again, Kafka is stopped and started, Postgres is restarted.
Afterwards: 0 accepted events lost, 0 stored twice, each person's profile exact (one
profile, every accepted event counted once, a CRM contact), and no stage process exited
on its own — only the killed ones are gone, and every process still running stops
cleanly (status 0) on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Text, any_, bindparam, func, select, text
from sqlalchemy.dialects.postgresql import ARRAY

from cdp_stream.identity import Identifier
from cdp_stream.profiles import reads
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.db import make_engine
from cdp_stream.profiles.models import crm_contacts
from cdp_stream.profiles.models import events as events_table
from tests.support import eventually, free_port, kafka_pid, kafka_sh, postgres_sh, uid

KAFKA_PORT = int(os.environ.get("CDP_TEST_FAULT_KAFKA_PORT", "19392"))
PG_PORT = int(os.environ.get("CDP_TEST_FAULT_PG_PORT", "15532"))
PG_URL = f"postgresql+asyncpg://postgres@127.0.0.1:{PG_PORT}/cdp_test"
USERS = 12
pytestmark = pytest.mark.faults


class Stage:
    """One ``cdp-stream <role>`` process; its output goes to a file for the post-mortem."""

    def __init__(self, role: str, env: dict[str, str], logs: Path) -> None:
        self.role, self.env, self.logs = role, env, logs
        self.runs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        log = (self.logs / f"{self.role}-{len(self.runs)}.log").open("wb")
        command = [sys.executable, "-m", "cdp_stream", self.role]
        self.runs.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=log))

    def kill(self) -> None:
        self.runs[-1].send_signal(signal.SIGKILL)
        self.runs[-1].wait()

    @property
    def current(self) -> subprocess.Popen[bytes]:
        return self.runs[-1]

    def output(self) -> str:
        return "".join(p.read_text() for p in sorted(self.logs.glob(f"{self.role}-*.log")))


@pytest.fixture
async def services(kafka_bootstrap: str) -> AsyncIterator[None]:
    await kafka_sh("start", KAFKA_PORT)
    await postgres_sh("start", PG_PORT)
    try:
        yield
    finally:
        await kafka_sh("stop", KAFKA_PORT)
        await postgres_sh("stop", PG_PORT)


@pytest.fixture
def stages(services: None, tmp_path: Path) -> Iterator[dict[str, Stage]]:
    port, namespace = free_port(), f"fault-{uid()}."
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env |= {
        "CDP_KAFKA_BOOTSTRAP": f"127.0.0.1:{KAFKA_PORT}",
        "CDP_DATABASE_URL": PG_URL,
        "CDP_TOPIC_NAMESPACE": namespace,
        "CDP_TOPIC_PARTITIONS": "3",
        "CDP_BOOTSTRAP_WRITE_KEY": "wk_faults",
        "CDP_SUPPRESSION_KEY": "faults-suppression-key",
        "CDP_HTTP_PORT": str(port),
        "CDP_PUBLISH_TIMEOUT_S": "3",
        "CDP_RETRY_AFTER_S": "1",
        "CDP_KAFKA_SESSION_TIMEOUT_MS": "6000",  # a killed member's partitions move on soon
        "CDP_RESOLVER_POLL_TIMEOUT_MS": "100",
    }
    stages = {role: Stage(role, env, tmp_path) for role in ("resolver", "activation")}
    for stage in stages.values():  # the consumers first: they create the topics
        stage.start()
    stages["collector"] = Stage("collector", env, tmp_path)
    stages["collector"].start()
    try:
        yield stages
    finally:
        for stage in stages.values():
            if stage.current.poll() is None:
                stage.current.kill()
                stage.current.wait()


class Load:
    """Clients sending small batches without pause, each batch retried until it is answered
    200 (a client's retries keep its messageIds); ``accepted`` is what was answered 200."""

    def __init__(self, url: str, run: str) -> None:
        self.url, self.run = url, run
        self.accepted: Counter[str] = Counter()  # messageId -> user
        self.users: dict[str, str] = {}
        self.refused = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, clients: int = 4) -> None:
        self._tasks = [asyncio.create_task(self._client(c)) for c in range(clients)]

    async def stop(self) -> None:
        """Stop sending; each client first gets its last batch accepted."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(self, c: int) -> None:
        auth = httpx.BasicAuth("wk_faults", "")
        async with httpx.AsyncClient(base_url=self.url, auth=auth, timeout=10) as http:
            n = 0
            while not self._stop.is_set():
                batch = []
                for _ in range(5):
                    n += 1
                    user = f"u-{self.run}-{n % USERS}"
                    mid = f"{self.run}-{c}-{n}"
                    self.users[mid] = user
                    traits = {"email": f"{user}@example.com"}
                    batch.append(
                        {"type": "identify", "userId": user, "messageId": mid, "traits": traits}
                    )
                while True:  # until this batch is accepted, whatever happens to the stages
                    try:
                        r = await http.post("/v1/batch", json={"batch": batch})
                        if r.status_code == 200:
                            assert not r.json().get("rejected")
                            self.accepted.update(e["messageId"] for e in batch)
                            break
                    except httpx.TransportError:
                        pass
                    self.refused += 1
                    await asyncio.sleep(0.2)


async def test_kill_9_each_stage_and_restart_kafka_and_postgres_under_load(
    stages: dict[str, Stage],
) -> None:
    url = f"http://127.0.0.1:{stages['collector'].env['CDP_HTTP_PORT']}"
    async with httpx.AsyncClient() as probe:

        async def serving() -> bool:
            try:
                return (await probe.get(f"{url}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        assert await eventually(serving, within_s=60), stages["collector"].output()

    load = Load(url, uid())
    load.start()
    await asyncio.sleep(3)
    for role in ("collector", "resolver", "activation"):
        stages[role].kill()
        await asyncio.sleep(1)
        stages[role].start()
        await asyncio.sleep(3)
    os.kill(kafka_pid(KAFKA_PORT), signal.SIGKILL)  # the broker dies
    await asyncio.sleep(3)
    await kafka_sh("start", KAFKA_PORT)
    await asyncio.sleep(3)
    await postgres_sh("stop", PG_PORT)  # pg_ctl stop -m fast: every connection ended
    await asyncio.sleep(2)
    await postgres_sh("start", PG_PORT)
    await asyncio.sleep(3)
    await load.stop()

    # No stage process exited on its own: each one still runs, killed ones excepted.
    for stage in stages.values():
        assert stage.current.poll() is None, f"{stage.role} exited:\n{stage.output()[-3000:]}"
        assert all(p.returncode == -signal.SIGKILL for p in stage.runs[:-1])
    assert load.refused > 0  # the faults were felt by the clients
    assert len(load.accepted) > 100

    engine = make_engine(PG_URL, "fault-test-check")
    try:
        ids = list(load.accepted)

        async def all_stored() -> bool:
            # One array parameter: an IN list of over 32,767 ids is more than a statement takes.
            query = select(func.count()).where(
                events_table.c.message_id == any_(bindparam("ids", ids, type_=ARRAY(Text)))
            )
            async with engine.connect() as conn:
                return (await conn.execute(query)).scalar_one() >= len(ids)

        assert await eventually(all_stored, within_s=90), stages["resolver"].output()[-3000:]
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT message_id, count(*) FROM events WHERE message_id LIKE :run"
                    " GROUP BY message_id"
                ),
                {"run": f"{load.run}-%"},
            )
            stored = {r[0]: r[1] for r in rows}
        assert set(stored) == set(ids)  # 0 lost, nothing that was not accepted
        assert set(stored.values()) == {1}  # 0 stored twice

        per_user = Counter(load.users[m] for m in ids)

        async def profiles() -> dict[str, reads.ProfileRow | None]:
            async with engine.connect() as conn:
                out = {}
                for user in per_user:
                    pid = await repo.profile_for_identifier(conn, Identifier("user_id", user))
                    out[user] = None if pid is None else await reads.read_profile(conn, pid)
                return out

        async def exact() -> bool:
            found = await profiles()
            return all(
                p is not None and p.computed["event_count"] == per_user[u] for u, p in found.items()
            )

        assert await eventually(exact, within_s=60), await profiles()
        emails = [f"{u}@example.com" for u in per_user]

        async def contacts() -> bool:
            query = select(func.count()).where(crm_contacts.c.email.in_(emails))
            async with engine.connect() as conn:
                return (await conn.execute(query)).scalar_one() == len(emails)

        assert await eventually(contacts, within_s=60), stages["activation"].output()[-3000:]
    finally:
        await engine.dispose()

    for stage in stages.values():  # a stop signal stops every stage cleanly
        stage.current.send_signal(signal.SIGTERM)
    for stage in stages.values():
        assert stage.current.wait(timeout=60) == 0, stage.output()[-3000:]
    print(
        f"faults: {len(ids)} events accepted from {USERS} people, "
        f"{load.refused} requests retried by the clients, 0 lost, 0 stored twice"
    )
