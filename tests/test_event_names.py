"""One spelling of the spec's event names: every stage agrees on what an email event is."""

from __future__ import annotations

import sys

import pytest

from cdp_stream.activation.crm.interactions import interaction_of
from cdp_stream.collector.intake import channel_of
from cdp_stream.event_names import (
    EMAIL_EVENTS,
    PURCHASE_EVENTS,
    UNSUBSCRIBED,
    WHITESPACE,
    name_key,
)
from cdp_stream.resolver import computed

TS = "2026-01-01T00:00:00.000000Z"


def test_names_are_compared_trimmed_and_lower_cased() -> None:
    assert name_key("  Email Opened\t") == "email opened"


def test_sql_trims_what_python_trims() -> None:
    """``WHITESPACE`` (SQL's ``btrim`` set) is exactly what ``str.strip()`` removes."""
    assert set(WHITESPACE) == {c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()}


@pytest.mark.parametrize("name", [*EMAIL_EVENTS, "Email Unsubscribed", " marked as SPAM "])
def test_every_accepted_email_name_is_an_email_for_the_collector_and_the_crm(name: str) -> None:
    event = {"type": "track", "event": name, "timestamp": TS}
    assert channel_of(event) == "email"
    interaction = interaction_of(event, key_pages=[])
    assert interaction is not None and interaction.kind.startswith("email_")


def test_the_unsubscribe_aliases_are_one_interaction() -> None:
    kinds = {
        interaction.kind
        for name in ("Unsubscribed", "Email Unsubscribed")
        if (interaction := interaction_of({"type": "track", "event": name, "timestamp": TS}, []))
    }
    assert kinds == {"email_unsubscribed"}
    assert EMAIL_EVENTS["email unsubscribed"] == UNSUBSCRIBED


def test_email_and_purchase_names_do_not_overlap() -> None:
    assert not set(EMAIL_EVENTS) & PURCHASE_EVENTS


@pytest.mark.parametrize(
    ("name", "counter"),
    [
        ("Email Opened", "email_opens"),
        ("email link clicked", "email_clicks"),
        ("EMAIL BOUNCED", "email_bounces"),
    ],
)
def test_the_computed_counters_use_the_same_names(name: str, counter: str) -> None:
    assert computed.of_event({"type": "track", "event": name}, TS)[counter] == 1
