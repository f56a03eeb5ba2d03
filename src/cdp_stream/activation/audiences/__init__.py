"""Audiences: JSON rules over traits, computed traits and recent events (``rules.py``);
who matches (``matching.py``, pure); membership kept as profiles change and time passes
(``membership.py``), back-filled for a new audience (``backfill.py``), exported as CSV
(``export.py``); all SQL in ``repository.py``.

The names below are the package's face to the API and to the DMP feed (which counts
audiences' members), which import the package, never its modules.
"""

from cdp_stream.activation.audiences.backfill import start_backfill
from cdp_stream.activation.audiences.export import MEMBER_COLUMNS, members_csv
from cdp_stream.activation.audiences.repository import (
    audience_exists,
    audience_ids,
    audiences_of,
    create_audience,
    delete_audience,
    list_audiences,
    read_audience,
    read_members,
    size_history,
    update_audience,
)

__all__ = [
    "MEMBER_COLUMNS",
    "audience_exists",
    "audience_ids",
    "audiences_of",
    "create_audience",
    "delete_audience",
    "list_audiences",
    "members_csv",
    "read_audience",
    "read_members",
    "size_history",
    "start_backfill",
    "update_audience",
]
