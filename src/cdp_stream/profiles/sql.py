"""SQL shared by the repositories: membership tests and many-row inserts that keep one
statement text, and event names in the form every stage compares them in.

``column.in_(values)`` renders one bind parameter per value, so every batch size is a new
statement text: SQLAlchemy compiles it again and asyncpg prepares it again (a round trip
and a Postgres parse and plan) before running it. Activation's micro-batches come in every
size, so its statement cache missed nearly always (py-spy on the pipeline benchmark's
catch-up: ~16% of activation's busy time in preparing and expanding). ``= ANY(:array)``
binds one array: one text, prepared once per connection. Multi-row ``VALUES`` is the
same again (a new text for every row count), so many-row inserts that return rows or
resolve conflicts select from :func:`unnested` instead: py-spy and ``strace`` on the
pipeline benchmark at 1,000 events/s found activation preparing ~2.6 such inserts a batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Select, Table, any_, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.elements import ColumnElement

from cdp_stream.event_names import WHITESPACE


def among(column: ColumnElement[Any], values: Iterable[Any]) -> ColumnElement[bool]:
    """``column = ANY(:values)``: true for the rows whose ``column`` is one of ``values``
    (none when ``values`` is empty, as ``IN`` of nothing)."""
    return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))


def unnested(table: Table, names: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Select[Any]:
    """``SELECT * FROM unnest(:a, :b, ...)``: the ``names`` columns of ``rows``, one array
    parameter a column typed as ``table``'s, for ``insert(table).from_select(names, ...)``."""
    arrays = [
        bindparam(f"{name}_rows", [r[name] for r in rows], type_=ARRAY(table.c[name].type))
        for name in names
    ]
    unnest = func.unnest(*arrays).table_valued(*names).render_derived(name="r")
    return select(*(unnest.c[name] for name in names))


def name_key_of(column: ColumnElement[Any]) -> ColumnElement[str]:
    """``event_names.name_key`` in SQL: trimmed of what ``str.strip`` trims, lower-cased."""
    return func.lower(func.btrim(column, WHITESPACE))
