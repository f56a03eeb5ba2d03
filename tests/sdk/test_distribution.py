"""The SDK is its own distribution: installed from ``sdk/python`` into a fresh virtual
environment, without the server, it imports, requires httpx and nothing else, and sends
an event to the real collector (the fixtures of conftest.py)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import venv
from collections import Counter
from pathlib import Path

import pytest

from tests.sdk.conftest import WRITE_KEY
from tests.support import REPO, Gate, Server, uid

SDK = REPO / "sdk" / "python"

SEND = """
import sys
from cdp_stream_sdk import Client
client = Client(sys.argv[1], sys.argv[2], flush_interval=0.1)
message_id = client.track(sys.argv[3], "Installed Alone", {"from": "a fresh venv"})
assert client.shutdown(20.0), "not delivered"
assert client.stats.sent == 1, client.stats
print(message_id)
"""


async def run(*args: str | Path) -> str:
    """``args`` in a subprocess, off this loop (the collector serves on it): stdout."""
    done = await asyncio.to_thread(
        subprocess.run, [str(a) for a in args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with only the SDK and what it requires (pip fetches httpx
    from the index or its cache; the server package is never offered to it)."""
    env = tmp_path_factory.mktemp("sdk-venv")
    venv.EnvBuilder(with_pip=True).create(env)
    python = env / "bin" / "python"
    source = env / "sdk"  # a copy: pip builds in the tree it is given
    shutil.copytree(SDK, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        check=True,
        timeout=300,
    )
    return python


async def test_it_installs_alone_and_requires_only_httpx(fresh_python: Path) -> None:
    shown = await run(fresh_python, "-m", "pip", "show", "cdp-stream-sdk")
    assert "Requires: httpx\n" in shown
    requires = "import importlib.metadata as m; print(*m.requires('cdp-stream-sdk'), sep='\\n')"
    assert (await run(fresh_python, "-c", requires)).split() == ["httpx>=0.27"]
    # The server is not there, and the SDK does not need it.
    probe = "import importlib.util as u; print(u.find_spec('cdp_stream'))"
    assert (await run(fresh_python, "-c", probe)).strip() == "None"
    assert sys.prefix not in await run(fresh_python, "-c", "import sys; print(sys.path)")


async def test_the_installed_sdk_sends_to_a_real_collector(
    fresh_python: Path, server: Server, gate: Gate
) -> None:
    message_id = (await run(fresh_python, "-c", SEND, WRITE_KEY, server.url, uid("u"))).strip()
    assert message_id
    assert gate.delivered() == Counter([message_id])
