"""Helpers shared by tests (fixtures live in the conftest files)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


async def eventually(
    probe: Callable[[], Awaitable[Any]], within_s: float = 20.0, interval: float = 0.1
) -> Any:
    """Poll ``probe`` until it returns a truthy value (the pipeline is asynchronous); the
    last result (falsy) when ``within_s`` runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        result = await probe()
        if result or loop.time() > deadline:
            return result
        await asyncio.sleep(interval)
