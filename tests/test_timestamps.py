"""The fixed-width UTC form the collector writes and the stages read back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from cdp_stream.timestamps import event_time, utc_text


def test_utc_text_is_fixed_width_utc() -> None:
    berlin = timezone(timedelta(hours=1))
    assert (
        utc_text(datetime(2026, 1, 2, 4, 4, 5, 6, tzinfo=berlin)) == "2026-01-02T03:04:05.000006Z"
    )


TIMES = st.datetimes(min_value=datetime(1000, 1, 1), timezones=st.just(UTC))


@given(TIMES, TIMES)
def test_the_text_sorts_as_the_times_and_reads_back(a: datetime, b: datetime) -> None:
    text = utc_text(a)
    assert len(text) == 27
    assert event_time(text) == (a, text)
    assert (text < utc_text(b)) == (a < b)


def test_event_time_brings_other_forms_to_the_fixed_width_one() -> None:
    assert event_time("2026-01-02T04:04:05+01:00") == (
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "2026-01-02T03:04:05.000000Z",
    )
