"""A thread-backed client for the collector's Segment HTTP Tracking API.

Each call (``identify``, ``track``, ...) builds its message (a fresh ``messageId`` from
uuid4, an ISO ``timestamp``), serializes it and puts it on a bounded in-memory queue, then
returns at once; it never raises. A daemon thread takes messages off the queue in batches
(at ``flush_at`` messages, at a byte budget under the collector's 500 KB request limit, or
``flush_interval`` seconds after the oldest waiting message) and POSTs them, gzip'd, to
``{host}/v1/batch`` with the write key as the HTTP Basic username.

Delivery: network errors, 5xx and 429 are retried with exponential backoff and full jitter
(a ``Retry-After`` from the collector is honoured); the batch keeps its messageIds across
retries, so a copy that did arrive before an error is deduplicated downstream. A 4xx other
than 429 is never retried: that batch is dropped and counted. So is a message that does not
fit the queue (``dropped_queue_full``) or is over the 32 KB event limit.
"""

from __future__ import annotations

import atexit
import email.utils
import gzip
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import httpx

log = logging.getLogger("cdp_stream_sdk")

LIBRARY = {"name": "cdp-stream-python", "version": "0.1.0"}

# The collector's limits (Settings.max_request_bytes / max_event_bytes / max_batch_events).
MAX_REQUEST_BYTES = 500 * 1024
MAX_EVENT_BYTES = 32 * 1024
MAX_BATCH_EVENTS = 2500
# Room left in a request for the envelope ({"batch":[...],"sentAt":"..."}) and slack.
DEFAULT_BATCH_BYTES = MAX_REQUEST_BYTES - 8 * 1024

Timestamp = datetime | date | str | None


@dataclass
class Stats:
    """Counters, in messages (not batches). ``dropped`` is every message lost, whatever
    the reason; the other ``dropped_*`` say why."""

    queued: int = 0
    sent: int = 0
    dropped: int = 0
    dropped_queue_full: int = 0
    dropped_invalid: int = 0
    dropped_rejected: int = 0  # the collector answered a non-retryable 4xx for the batch
    dropped_retries_exhausted: int = 0
    rejected_by_collector: int = 0  # accepted batch, but these events were refused one by one
    retries: int = 0
    batches_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


def _iso(value: Timestamp) -> str:
    if value is None:
        value = datetime.now(UTC)
    if isinstance(value, str):
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat(timespec="milliseconds")
    return value.isoformat()


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return _iso(value)
    if isinstance(value, uuid.UUID | bytes):
        return str(value) if isinstance(value, uuid.UUID) else value.decode("utf-8", "replace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


class InvalidMessage(ValueError):
    """A message the collector would refuse whatever happens (caught inside the SDK)."""


def build_message(
    type_: str,
    *,
    user_id: str | None = None,
    anonymous_id: str | None = None,
    context: Mapping[str, Any] | None = None,
    timestamp: Timestamp = None,
    message_id: str | None = None,
    integrations: Mapping[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """One Segment-spec message; raises :class:`InvalidMessage` when it cannot be valid."""
    if type_ == "alias":
        if not user_id or not fields.get("previousId"):
            raise InvalidMessage("alias needs both user_id and previous_id")
    elif not user_id and not anonymous_id:
        raise InvalidMessage(f"{type_} needs a user_id or an anonymous_id")
    if type_ == "track" and not fields.get("event"):
        raise InvalidMessage("track needs an event name")
    if type_ == "group" and not fields.get("groupId"):
        raise InvalidMessage("group needs a group_id")
    msg: dict[str, Any] = {
        "type": type_,
        "messageId": message_id or str(uuid.uuid4()),
        "timestamp": _iso(timestamp),
        "context": {**(context or {}), "library": LIBRARY},
    }
    if user_id is not None:
        msg["userId"] = str(user_id)
    if anonymous_id is not None:
        msg["anonymousId"] = str(anonymous_id)
    if integrations:
        msg["integrations"] = dict(integrations)
    # Segment names alias's old id ``previousId``; this collector reads ``previousUserId``.
    msg.update({k: v for k, v in fields.items() if v is not None})
    return msg


def encode_message(msg: Mapping[str, Any], max_bytes: int = MAX_EVENT_BYTES) -> bytes:
    """The message as compact UTF-8 JSON; :class:`InvalidMessage` if over ``max_bytes`` or
    not representable (NaN, circular...)."""
    try:
        data = json.dumps(
            msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_default
        ).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidMessage(f"cannot serialize the message: {exc}") from exc
    if len(data) > max_bytes:
        raise InvalidMessage(f"message is {len(data)} bytes, over the {max_bytes}-byte limit")
    return data


def encode_batch(items: list[bytes], *, compress: bool = True) -> bytes:
    """The ``/v1/batch`` body for pre-serialized messages, ``sentAt`` = now."""
    sent_at = _iso(datetime.now(UTC)).encode()
    body = b'{"batch":[' + b",".join(items) + b'],"sentAt":"' + sent_at + b'"}'
    return gzip.compress(body, compresslevel=6) if compress else body


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter for retry number ``attempt`` (0-based). The
    SDK's own, not the server's ``cdp_stream.retry``: the SDK depends on httpx only."""
    return random.uniform(0, min(cap, base * 2**attempt))  # jitter, not crypto


def is_retryable(status: int) -> bool:
    return status == 429 or status >= 500


class _Messages:
    """What :class:`Client` and the asyncio client share: their options, counters and
    message building. ``_build`` returns the message, or None (logged and counted) when
    it is invalid."""

    def _configure(
        self,
        write_key: str,
        host: str,
        *,
        flush_at: int,
        flush_interval: float,
        max_queue_size: int,
        max_batch_bytes: int,
        max_event_bytes: int,
        max_retries: int,
        backoff_base: float,
        backoff_max: float,
        timeout: float,
        compress: bool,
    ) -> dict[str, Any]:
        """Set the options (bounded by the collector's limits); returns the keyword
        arguments of the HTTP client the caller builds."""
        self.write_key = write_key
        self.host = host.rstrip("/")
        self.flush_at = max(1, min(flush_at, MAX_BATCH_EVENTS))
        self.flush_interval = flush_interval
        self.max_queue_size = max_queue_size
        self.max_batch_bytes = min(max_batch_bytes, DEFAULT_BATCH_BYTES)
        self.max_event_bytes = min(max_event_bytes, MAX_EVENT_BYTES, self.max_batch_bytes)
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.compress = compress
        self.stats = Stats()
        self._pending = 0  # queued or in flight, not yet sent or dropped
        return {
            "timeout": timeout,
            "auth": httpx.BasicAuth(write_key, ""),
            "headers": {"user-agent": f"{LIBRARY['name']}/{LIBRARY['version']}"},
        }

    @property
    def dropped(self) -> int:
        return self.stats.dropped

    @property
    def pending(self) -> int:
        """Messages queued or in flight."""
        return self._pending

    def _build(self, type_: str, **kwargs: Any) -> tuple[str, bytes] | None:
        try:
            msg = build_message(type_, **kwargs)
            return msg["messageId"], encode_message(msg, self.max_event_bytes)
        except InvalidMessage as exc:
            log.error("cdp-stream sdk: dropping %s message: %s", type_, exc)
        except Exception:  # never raise into the caller
            log.exception("cdp-stream sdk: dropping %s message", type_)
        self.stats.add(dropped=1, dropped_invalid=1)
        return None


class Client(_Messages):
    """Send Segment-spec events to a cdp-stream collector from any thread."""

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
        transport: httpx.BaseTransport | None = None,
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
        self._http = httpx.Client(transport=transport, **options)
        self._queue: deque[bytes] = deque()
        self._cond = threading.Condition()
        self._oldest_at = 0.0  # monotonic time the oldest queued message arrived
        self._flush_waiters = 0
        self._closing = False
        self._abort = threading.Event()  # stop retrying: shutdown ran out of time
        self._thread = threading.Thread(target=self._run, name="cdp-stream-sdk", daemon=True)
        self._thread.start()
        atexit.register(self.shutdown)

    # -- the public API ---------------------------------------------------------------

    def identify(
        self, user_id: str | None = None, traits: Mapping[str, Any] | None = None, **kw: Any
    ) -> str | None:
        return self._enqueue("identify", user_id=user_id, traits=dict(traits or {}), **kw)

    def track(
        self,
        user_id: str | None = None,
        event: str | None = None,
        properties: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> str | None:
        props = dict(properties or {})
        return self._enqueue("track", user_id=user_id, event=event, properties=props, **kw)

    def page(
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

    def screen(
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

    def group(
        self,
        user_id: str | None = None,
        group_id: str | None = None,
        traits: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> str | None:
        return self._enqueue(
            "group", user_id=user_id, groupId=group_id, traits=dict(traits or {}), **kw
        )

    def alias(
        self, previous_id: str | None = None, user_id: str | None = None, **kw: Any
    ) -> str | None:
        return self._enqueue(
            "alias", user_id=user_id, previousId=previous_id, previousUserId=previous_id, **kw
        )

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued now and wait until it is sent (or dropped); False if
        ``timeout`` seconds passed first."""
        with self._cond:
            self._flush_waiters += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._pending == 0, timeout)
            finally:
                self._flush_waiters -= 1

    def shutdown(self, timeout: float | None = 10.0) -> bool:
        """Flush (for at most ``timeout`` seconds), then stop the thread and close the
        connection pool. Idempotent; registered with :mod:`atexit`. Never raises."""
        try:
            atexit.unregister(self.shutdown)
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            done = self.flush(timeout)
            if not done:
                self._abort.set()
            self._thread.join(timeout if done else 1.0)
            if not self._thread.is_alive():
                self._http.close()
            if not done:
                log.error("cdp-stream sdk: shutdown left %d message(s) unsent", self._pending)
            return done
        except Exception:
            log.exception("cdp-stream sdk: shutdown failed")
            return False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- the caller's side ------------------------------------------------------------

    def _enqueue(self, type_: str, **kwargs: Any) -> str | None:
        built = self._build(type_, **kwargs)
        if built is None:
            return None
        message_id, data = built
        with self._cond:
            if self._closing:
                log.error("cdp-stream sdk: client shut down, dropping %s message", type_)
                self.stats.add(dropped=1, dropped_invalid=1)
                return None
            if len(self._queue) >= self.max_queue_size:
                self.stats.add(dropped=1, dropped_queue_full=1)
                log.warning("cdp-stream sdk: queue full, dropping %s message", type_)
                return None
            first = not self._queue
            if first:
                self._oldest_at = time.monotonic()
            self._queue.append(data)
            self._pending += 1
            self.stats.add(queued=1)
            if first or len(self._queue) >= self.flush_at:
                self._cond.notify_all()  # a batch window starts, or a batch is full
        return message_id

    # -- the background thread --------------------------------------------------------

    def _next_batch(self) -> list[bytes] | None:
        """Wait for a batch to be due and take it off the queue; None when closed and
        empty."""
        with self._cond:
            while True:
                if self._queue:
                    due = self._oldest_at + self.flush_interval
                    if (
                        len(self._queue) >= self.flush_at
                        or self._flush_waiters
                        or self._closing
                        or time.monotonic() >= due
                    ):
                        break
                    self._cond.wait(max(0.0, due - time.monotonic()))
                elif self._closing:
                    return None
                else:
                    self._cond.wait()
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

    def _run(self) -> None:
        while True:
            try:
                batch = self._next_batch()
                if batch is None:
                    return
            except Exception:  # pragma: no cover - defensive: keep the thread alive
                log.exception("cdp-stream sdk: batching failed")
                time.sleep(0.1)
                continue
            try:
                self._send(batch)
            except Exception:
                log.exception("cdp-stream sdk: dropping a batch of %d", len(batch))
                self.stats.add(dropped=len(batch), dropped_retries_exhausted=len(batch))
            finally:
                with self._cond:
                    self._pending -= len(batch)
                    self._cond.notify_all()

    def _send(self, batch: list[bytes]) -> None:
        n = len(batch)
        headers = {"content-type": "application/json"}
        if self.compress:
            headers["content-encoding"] = "gzip"
        attempt = 0
        while True:
            wait: float | None = None
            try:
                response = self._http.post(
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
            if self._abort.wait(delay):
                log.error("cdp-stream sdk: shutdown timed out, dropping a batch of %d", n)
                self.stats.add(dropped=n, dropped_retries_exhausted=n)
                return


def handle_response(
    response: httpx.Response, n: int, stats: Stats
) -> tuple[bool, str, float | None]:
    """Account for the collector's answer to a batch of ``n``: (finished with the batch,
    what went wrong, the Retry-After in seconds)."""
    status = response.status_code
    if 200 <= status < 300:
        rejected = _rejected(response)
        if rejected:
            log.warning(
                "cdp-stream sdk: the collector refused %d event(s): %s", len(rejected), rejected[:3]
            )
        stats.add(sent=n - len(rejected), rejected_by_collector=len(rejected), batches_sent=1)
        return True, "", None
    if not is_retryable(status):
        log.error(
            "cdp-stream sdk: dropping a batch of %d: HTTP %d %s", n, status, response.text[:300]
        )
        stats.add(dropped=n, dropped_rejected=n)
        return True, f"HTTP {status}", None
    return False, f"HTTP {status}", retry_after(response.headers)


def _rejected(response: httpx.Response) -> list[Any]:
    try:
        body = response.json()
    except ValueError:
        return []
    rejected = body.get("rejected") if isinstance(body, dict) else None
    return rejected if isinstance(rejected, list) else []
