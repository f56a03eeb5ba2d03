"""Real headless Chromium for the website library's tests: Debian's ``chromium`` driven by
``playwright-core`` from npm (``browser/driver.mjs``, one JSON command per line).

``make test`` installs both (``make browser``). Missing, they fail the test under CI=true
and skip it elsewhere, like Kafka and Postgres.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tests.conftest import unavailable
from tests.support import eventually

DRIVER = Path(__file__).parent / "browser" / "driver.mjs"
EXECUTABLE = os.environ.get("CDP_CHROMIUM", "/usr/bin/chromium")


def _missing() -> list[str]:
    """What the browser tests need and this machine lacks."""
    needs = {
        f"Chromium at {EXECUTABLE}": Path(EXECUTABLE).exists(),
        "node": shutil.which("node") is not None,
        "playwright-core": (DRIVER.parent / "node_modules" / "playwright-core").exists(),
    }
    return [what for what, there in needs.items() if not there]


class Chromium:
    """One browser; ``await call(op, **args)`` runs an op of driver.mjs and returns its value."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._next = 0

    @classmethod
    async def launch(cls) -> Chromium:
        missing = _missing()
        if missing:
            unavailable(", ".join(missing) + " (`make browser` installs them)")
        process = await asyncio.create_subprocess_exec(
            "node",
            str(DRIVER),
            cwd=DRIVER.parent,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "CDP_CHROMIUM": EXECUTABLE},
            limit=16 * 1024 * 1024,
        )
        browser = cls(process)
        await browser._answer(0, within_s=60)
        return browser

    async def call(self, op: str, within_s: float = 30, **args: Any) -> Any:
        self._next += 1
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps({"id": self._next, "op": op, **args}).encode() + b"\n")
        await self._process.stdin.drain()
        return await self._answer(self._next, within_s)

    async def until(self, page: str, expression: str, within_s: float = 20) -> None:
        """Wait until ``expression`` is truthy in ``page`` (fails with the console log)."""

        async def probe() -> bool:
            return bool(await self.call("eval", page=page, expression=expression))

        assert await eventually(probe, within_s), (expression, await self.call("log"))

    async def _answer(self, wanted: int, within_s: float) -> Any:
        assert self._process.stdout is not None
        while True:
            line = await asyncio.wait_for(self._process.stdout.readline(), within_s)
            if not line:
                raise RuntimeError(f"the browser driver exited ({await self._process.wait()})")
            answer = json.loads(line)
            if answer["id"] == wanted:
                if "error" in answer:
                    raise RuntimeError(answer["error"])
                return answer["value"]

    async def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            await asyncio.wait_for(self._process.wait(), 20)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
