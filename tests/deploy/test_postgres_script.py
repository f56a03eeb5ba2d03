"""``deploy/postgres/postgres.sh`` with a real server: what ``make test`` starts, it stops.

A fresh clone made in a directory of ``mktemp -d`` (mode 0700) puts the server's files
under /tmp, where the ``postgres`` user can reach them; if that directory is opened up
while the server runs, the stop must still find it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support import REPO, free_port

SCRIPT = REPO / "deploy" / "postgres" / "postgres.sh"


def postgres_sh(command: str, cache: Path, port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CDP_CACHE_DIR": str(cache), "CDP_PG_PORT": str(port)}
    return subprocess.run(
        ["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=120
    )


def test_a_server_started_under_tmp_is_stopped_once_the_cache_opens_up() -> None:
    closed = Path(tempfile.mkdtemp(prefix="cdp-clone-", dir="/tmp"))  # as mktemp -d: 0700
    cache, port = closed / ".cache", free_port()
    started = postgres_sh("start", cache, port)
    assert started.returncode == 0, started.stderr
    try:
        assert f"/tmp/cdp-postgres-{port}/" in started.stderr  # postgres cannot reach cache
        closed.chmod(0o755)  # now postgres could reach <cache>: no server there
        assert "running: pid" in postgres_sh("status", cache, port).stdout
        stopped = postgres_sh("stop", cache, port)
        assert stopped.returncode == 0 and "stopped" in stopped.stderr, stopped.stderr
        assert postgres_sh("status", cache, port).returncode == 3  # nothing answers
    finally:
        postgres_sh("stop", cache, port)
        shutil.rmtree(f"/tmp/cdp-postgres-{port}", ignore_errors=True)
        shutil.rmtree(closed, ignore_errors=True)


def test_the_server_records_each_statements_time_when_postgres_ships_the_module() -> None:
    """``benchmarks/pipeline.py`` prints where Postgres's time went, by statement."""
    cache, port = Path(tempfile.mkdtemp(prefix="cdp-cache-", dir="/tmp")), free_port()
    shipped = Path("/usr/lib/postgresql/15/lib/pg_stat_statements.so").exists()
    started = postgres_sh("start", cache, port)
    assert started.returncode == 0, started.stderr
    try:
        psql = ["/usr/lib/postgresql/15/bin/psql", "-X", "-h", "127.0.0.1", "-p", str(port)]
        shown = subprocess.run(
            [*psql, "-U", "postgres", "-d", "cdp_test", "-tAc", "SHOW shared_preload_libraries"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert shown.returncode == 0, shown.stderr
        assert ("pg_stat_statements" in shown.stdout) == shipped
    finally:
        postgres_sh("stop", cache, port)
        shutil.rmtree(f"/tmp/cdp-postgres-{port}", ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
