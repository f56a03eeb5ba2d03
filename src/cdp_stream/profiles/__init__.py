"""Persistence: the Postgres schema (Alembic migrations), the engine, and the SQL.

SQL lives in small repository modules per domain: sources and tokens (``credentials``),
the API's reads (``reads``), erasure, the outbox, and what they share (``repository``);
the resolver's own is ``resolver.repository``. Callers own their transactions. Nothing
here knows about Kafka or HTTP.
"""
