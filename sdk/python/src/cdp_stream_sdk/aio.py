"""The asyncio variant of :class:`cdp_stream_sdk.Client`: same batching, limits, retries
and counters, on a task of the running loop instead of a thread.

``await client.track(...)`` only queues (it never waits for the network and never raises);
``await client.flush()`` waits until everything queued is sent or dropped;
``await client.aclose()`` flushes and stops. The task starts with the first call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import httpx

from cdp_stream_sdk.client import (
    DEFAULT_BATCH_BYTES,
    MAX_EVENT_BYTES,
    _Messages,
    backoff,
    encode_batch,
    handle_response,
)

log = logging.getLogger("cdp_stream_sdk")


class AsyncClient(_Messages):
    """Send Segment-spec events to a cdp-stream collector from asyncio code."""

    def __init__(
        self,
        write_key: str,
        host: str = "http://127.0.0.1:8080",
        *,
        flush_at: int = 100,
        flush_interval: float = 0.5,
        max_queue_size: int = 10_000,
        max_batch_bytes: int = DEFAULT_BATCH_BYTES,
        max_event_bytes: int = MAX_EVENT_BYTES,
        max_retries: int = 10,
        backoff_base: float = 0.25,
        backoff_max: float = 30.0,
        timeout: float = 15.0,
        compress: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        options = self._configure(
            write_key,
            host,
            flush_at=flush_at,
            flush_interval=flush_interval,
            max_queue_size=max_queue_size,
            max_batch_bytes=max_batch_bytes,
            max_event_bytes=max_event_bytes,
            max_retries=max_retries,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            timeout=timeout,
            compress=compress,
        )
        self._http = httpx.AsyncClient(transport=transport, **options)
        self._queue: deque[bytes] = deque()
        self._oldest_at = 0.0
        self._flush_waiters = 0
        self._closing = False
        self._wake = asyncio.Event()
        self._abort = asyncio.Event()
        self._idle = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def identify(
        self, user_id: str | None = None, traits: Mapping[str, Any] | None = None, **kw: Any
    ) -> str | None:
        return self._enqueue("identify", user_id=user_id, traits=dict(traits or {}), **kw)

    async def track(
        self,
        user_id: str | None = None,
        event: str | None = None,
        properties: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> str | None:
        props = dict(properties or {})
        return self._enqueue("track", user_id=user_id, event=event, properties=props, **kw)

    async def page(
        self,
        user_id: str | None = None,
        category: str | None = None,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> str | None:
        props = dict(properties or {})
        return self._enqueue(
            "page", user_id=user_id, category=category, name=name, properties=props, **kw
        )

    async def screen(
        self,
        user_id: str | None = None,
        category: str | None = None,
        name: str | None = None,
        properties: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> str | None:
        props = dict(properties or {})
        return self._enqueue(
            "screen", user_id=user_id, category=category, name=name, properties=props, **kw
        )

    async def group(
        self,
        user_id: str | None = None,
        group_id: str | None = None,
        traits: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> str | None:
        return self._enqueue(
            "group", user_id=user_id, groupId=group_id, traits=dict(traits or {}), **kw
        )

    async def alias(
        self, previous_id: str | None = None, user_id: str | None = None, **kw: Any
    ) -> str | None:
        return self._enqueue(
            "alias", user_id=user_id, previousId=previous_id, previousUserId=previous_id, **kw
        )

    async def flush(self, max_wait: float | None = None) -> bool:
        """Send everything queued now; True once it is all sent or dropped, False if
        ``max_wait`` seconds passed first."""
        self._flush_waiters += 1
        self._wake.set()
        try:
            async with asyncio.timeout(max_wait), self._idle:
                await self._idle.wait_for(lambda: self._pending == 0)
            return True
        except TimeoutError:
            return False
        finally:
            self._flush_waiters -= 1

    async def aclose(self, max_wait: float | None = 10.0) -> bool:
        """Flush (for at most ``max_wait`` seconds), stop the task, close the connection
        pool. Never raises."""
        try:
            self._closing = True
            self._wake.set()
            done = await self.flush(max_wait)
            if not done:
                self._abort.set()
                log.error("cdp-stream sdk: aclose left %d message(s) unsent", self._pending)
            if self._task is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._task), 1.0)
                if not self._task.done():
                    self._task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._task
            await self._http.aclose()
            return done
        except Exception:
            log.exception("cdp-stream sdk: aclose failed")
            return False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _enqueue(self, type_: str, **kwargs: Any) -> str | None:
        built = self._build(type_, **kwargs)
        if built is None:
            return None
        message_id, data = built
        if self._closing:
            log.error("cdp-stream sdk: client closed, dropping %s message", type_)
            self.stats.add(dropped=1, dropped_invalid=1)
            return None
        if len(self._queue) >= self.max_queue_size:
            self.stats.add(dropped=1, dropped_queue_full=1)
            log.warning("cdp-stream sdk: queue full, dropping %s message", type_)
            return None
        if not self._queue:
            self._oldest_at = time.monotonic()
        self._queue.append(data)
        self._pending += 1
        self.stats.add(queued=1)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return message_id

    async def _next_batch(self) -> list[bytes] | None:
        while True:
            timeout: float | None = None
            if self._queue:
                due = self._oldest_at + self.flush_interval
                if (
                    len(self._queue) >= self.flush_at
                    or self._flush_waiters
                    or self._closing
                    or time.monotonic() >= due
                ):
                    break
                timeout = max(0.0, due - time.monotonic())
            elif self._closing:
                return None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        batch: list[bytes] = []
        size = 0
        while self._queue and len(batch) < self.flush_at:
            item = self._queue[0]
            if batch and size + len(item) + 1 > self.max_batch_bytes:
                break
            batch.append(self._queue.popleft())
            size += len(item) + 1
        if self._queue:
            self._oldest_at = time.monotonic()
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            try:
                await self._send(batch)
            except Exception:
                log.exception("cdp-stream sdk: dropping a batch of %d", len(batch))
                self.stats.add(dropped=len(batch), dropped_retries_exhausted=len(batch))
            finally:
                async with self._idle:
                    self._pending -= len(batch)
                    self._idle.notify_all()

    async def _send(self, batch: list[bytes]) -> None:
        n = len(batch)
        headers = {"content-type": "application/json"}
        if self.compress:
            headers["content-encoding"] = "gzip"
        attempt = 0
        while True:
            wait: float | None = None
            try:
                response = await self._http.post(
                    f"{self.host}/v1/batch",
                    content=encode_batch(batch, compress=self.compress),
                    headers=headers,
                )
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                done, problem, wait = handle_response(response, n, self.stats)
                if done:
                    return
            if attempt >= self.max_retries or self._abort.is_set():
                log.error(
                    "cdp-stream sdk: dropping a batch of %d after %d attempt(s): %s",
                    n,
                    attempt + 1,
                    problem,
                )
                self.stats.add(dropped=n, dropped_retries_exhausted=n)
                return
            delay = backoff(attempt, self.backoff_base, self.backoff_max)
            if wait is not None:
                delay = max(delay, min(wait, self.backoff_max))
            log.warning(
                "cdp-stream sdk: batch of %d failed (%s), retry %d in %.2fs",
                n,
                problem,
                attempt + 1,
                delay,
            )
            self.stats.add(retries=1)
            attempt += 1
            try:
                await asyncio.wait_for(self._abort.wait(), delay)
            except TimeoutError:
                continue
            log.error("cdp-stream sdk: aclose timed out, dropping a batch of %d", n)
            self.stats.add(dropped=n, dropped_retries_exhausted=n)
            return
