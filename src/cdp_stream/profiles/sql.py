"""SQL shared by the repositories: membership tests that keep one statement text, and
event names in the form every stage compares them in.

``column.in_(values)`` renders one bind parameter per value, so every batch size is a new
statement text: SQLAlchemy compiles it again and asyncpg prepares it again (a round trip
and a Postgres parse and plan) before running it. Activation's micro-batches come in every
size, so its statement cache missed nearly always (py-spy on the pipeline benchmark's
catch-up: ~16% of activation's busy time in preparing and expanding). ``= ANY(:array)``
binds one array: one text, prepared once per connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import any_, bindparam, func
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import ColumnElement

from cdp_stream.event_names import WHITESPACE


def among(column: ColumnElement[Any], values: Iterable[Any]) -> ColumnElement[bool]:
    """``column = ANY(:values)``: true for the rows whose ``column`` is one of ``values``
    (none when ``values`` is empty, as ``IN`` of nothing)."""
    return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))


def name_key_of(column: ColumnElement[Any]) -> ColumnElement[str]:
    """``event_names.name_key`` in SQL: trimmed of what ``str.strip`` trims, lower-cased."""
    return func.lower(func.btrim(column, WHITESPACE))
