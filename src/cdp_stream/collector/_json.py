"""Strict JSON for request bodies: what the stdlib and orjson let through, refused here.

``loads_strict`` turns a body into Python objects or raises :class:`BadRequest` (400) for
the whole request on: bytes that are not UTF-8, malformed JSON, ``NaN``/``Infinity`` (and
numbers like ``1e999`` that only parse to infinity), duplicate keys in an object (both
parsers silently keep the last one: which did the client mean?), and nesting deeper than
``max_depth``.

Valid JSON that cannot be *stored* is not refused here but per event by the intake, so the
other events of a batch still go through: ``\\u0000`` (Postgres ``jsonb`` cannot hold it),
integers outside JavaScript's safe range and lone surrogates.

Two parsers, one result. The stdlib parser is the reference: it keeps big integers exact
and reports duplicate keys (a Python hook per object, which made it the collector's most
expensive step per event). orjson parses ~7x faster and is used when its result is
provably the same (:func:`_fast`); anything else, including every body refused, goes
through the stdlib, so the answers and their messages do not depend on the path taken.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson


class BadRequest(Exception):
    """Refuse the whole request with ``status`` and a message the client can act on."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r} in an object")
            seen.add(key)
    return obj


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


_CONTAINERS = (dict, list)


def _too_deep(value: Any, max_depth: int) -> bool:
    """Is any container nested deeper than ``max_depth`` (the top level being 1)?
    Level by level, so the cost is one visit per container (this runs on every request)."""
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(max_depth):
        below = []
        for node in level:
            children = node.values() if type(node) is dict else node
            below += [c for c in children if type(c) in _CONTAINERS]
        if not below:
            return False
        level = below
    return True


# 19 digits in a row may be an integer beyond 64 bits, which orjson turns into a float.
_DIGITS = bytes.maketrans(b"0123456789", b"0000000000")
_LONG_NUMBER = b"0" * 19


def _fast(body: bytes) -> Any:
    """orjson's parse of ``body`` when it is the stdlib's (see the module docstring), else
    ``_SLOW``. Why the checks suffice:

    - orjson refuses what the stdlib would refuse (bad UTF-8, NaN, infinity) or keep
      (lone surrogates): those go the stdlib's way;
    - integers beyond 64 bits need 19 digits or more in a row: such bodies go too;
    - a duplicate key: orjson keeps one member of the two, so its re-serialization has
      fewer ``:`` than the body (one per member, plus those inside strings, which orjson
      writes raw). Equal counts mean no member was dropped, provided no ``:`` hides in a
      ``\\u003a`` escape (such bodies go the stdlib's way too).
    """
    if b"\\u003" in body or _LONG_NUMBER in body.translate(_DIGITS):
        return _SLOW
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _SLOW
    if orjson.dumps(value).count(b":") != body.count(b":"):
        return _SLOW
    return value


_SLOW = object()


def loads_strict(body: bytes, max_depth: int) -> Any:
    """The parsed body, or :class:`BadRequest` saying what is wrong with it."""
    value = _fast(body)
    if value is _SLOW:
        value = _loads_stdlib(body, max_depth)
    # Each level of nesting opens with a bracket of its own, so a body with fewer brackets
    # than the limit is within it (brackets in strings only add to the count): a single
    # event's few skip the walk.
    if body.count(b"{") + body.count(b"[") > max_depth and _too_deep(value, max_depth):
        raise BadRequest(400, f"JSON nested deeper than {max_depth} levels")
    return value


def _loads_stdlib(body: bytes, max_depth: int) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(400, f"the body is not valid UTF-8 (at byte {exc.start})") from exc
    try:
        value = json.loads(
            text, object_pairs_hook=_object, parse_constant=_constant, parse_float=_finite
        )
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise BadRequest(400, f"malformed JSON: {exc.msg} at {where}") from exc
    except ValueError as exc:
        raise BadRequest(400, f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadRequest(400, f"JSON nested deeper than {max_depth} levels") from exc
    return value
