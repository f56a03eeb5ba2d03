"""Stage 2: ``cdp.events`` -> identities, profiles and events in Postgres.

``identity`` and ``traits`` are pure rules (no I/O); ``batch`` applies one micro-batch in
one transaction; ``consumer`` is the loop: poll -> transaction -> commit offsets.
"""
