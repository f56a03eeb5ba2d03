"""Persistence: the Postgres schema (Alembic migrations), the engine, and the SQL.

SQL lives in small repository modules per domain (``credentials``, ``repository``);
stages call those and own their transactions. Nothing here knows about Kafka or HTTP.
"""
