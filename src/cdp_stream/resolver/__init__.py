"""The resolver: events from ``cdp.events`` become unified profiles in Postgres.

``consumer.py`` polls and commits, ``batch.py`` applies a micro-batch in one transaction,
``traits.py``, ``computed.py`` and ``orders.py`` fold profile state whatever the order of
events, ``unmerge.py`` undoes a merge; identifiers come from ``cdp_stream.identity``. The
rules (identifier priority, limits, merges, trait precedence), which
``tests/resolver/oracle.py`` re-implements and holds the resolver to, are specified in
docs/identity-resolution.md.
"""
