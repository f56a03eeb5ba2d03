"""Members as CSV (:mod:`cdp_stream.activation.audiences.export`): the rows' shape, pure
(the whole export through the API: tests/api/test_audiences.py)."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

from cdp_stream.activation.audiences.export import MEMBER_COLUMNS, csv_lines, csv_row
from cdp_stream.identity import BUILT_IN


def test_a_member_row_has_every_column_and_blanks_what_it_lacks() -> None:
    pid, at = uuid.uuid4(), datetime(2024, 3, 1, 10, tzinfo=UTC)
    member = SimpleNamespace(profile_id=pid, entered_at=at, identifiers={"email": "a@b.example"})
    row = csv_row(member)
    assert len(row) == len(MEMBER_COLUMNS) == 2 + len(BUILT_IN)
    assert dict(zip(MEMBER_COLUMNS, row, strict=True)) == {
        "profile_id": str(pid),
        "entered_at": "2024-03-01T10:00:00+00:00",
        **{t: "a@b.example" if t == "email" else "" for t in BUILT_IN},
    }
    assert csv_row(SimpleNamespace(profile_id=pid, entered_at=at, identifiers=None))[2:] == [
        ""
    ] * len(BUILT_IN)


def test_csv_lines_quote_what_needs_it_and_end_in_crlf() -> None:
    text = csv_lines([["a", 'say "hi", then'], ["b", ""]]).decode()
    assert text.endswith("\r\n") and text.count("\r\n") == 2
    assert list(csv.reader(io.StringIO(text))) == [["a", 'say "hi", then'], ["b", ""]]
