"""What a profile is as a CRM contact: its fields, which identity it shows, its lifecycle
stage (subscriber, lead, customer: never lowered). Pure: the feed (``feed.py``) reads the
profile and writes the contact. The rules: docs/crm.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from cdp_stream.activation.crm._values import text
from cdp_stream.identity import EMAIL, PHONE, USER_ID, IdentityRules
from cdp_stream.payload import as_mapping
from cdp_stream.timestamps import event_time

STAGES = ("subscriber", "lead", "customer")  # in order: a contact only moves right
CONTACT_FIELDS = (
    "email",
    "phone",
    "user_id",
    "first_name",
    "last_name",
    "company",
    "job_title",
    "lifecycle_stage",
    "first_touch_source",
    "last_activity_at",
)
IDENTITY_TYPES = (EMAIL, USER_ID, PHONE)  # the identities a contact shows


def _pick(values: list[str], preferred: str | None) -> str | None:
    """The identity the traits currently name, else the oldest (``values`` are oldest
    first): a person with several emails shows the one they last gave."""
    if preferred is not None and preferred in values:
        return preferred
    return values[0] if values else None


def _names(traits: Mapping[str, Any]) -> tuple[str | None, str | None]:
    first = text(traits.get("firstName")) or text(traits.get("first_name"))
    last = text(traits.get("lastName")) or text(traits.get("last_name"))
    full = text(traits.get("name"))
    if full and not (first and last):
        head, _, rest = full.partition(" ")
        first = first or head
        last = last or (rest.strip() or None)
    return first, last


def is_customer(computed: Mapping[str, Any]) -> bool:
    """Whether the profile has ordered (then it is a customer, whatever else it did)."""
    count = computed.get("order_count")
    return isinstance(count, int) and count > 0


def may_become_contact(ids: Mapping[str, list[str]]) -> bool:
    """Only a profile with an email or a user id is a contact."""
    return bool(ids.get(EMAIL) or ids.get(USER_ID))


def contact_of(
    traits: Mapping[str, Any],
    computed: Mapping[str, Any],
    ids: Mapping[str, list[str]],
    rules: IdentityRules,
    *,
    lead: bool,
    stage_before: str | None,
) -> dict[str, Any] | None:
    """The contact fields of a profile, or None when it has neither email nor user id.

    ``ids`` maps identity type to values, oldest first; ``lead``: a form submit or sign-up
    is stored for it; ``stage_before``: the contact's current stage, which is never lowered.
    """
    emails, user_ids, phones = ids.get(EMAIL, []), ids.get(USER_ID, []), ids.get(PHONE, [])
    if not emails and not user_ids:
        return None
    first, last = _names(traits)
    company = traits.get("company")
    company = text(company) or text(as_mapping(company).get("name"))
    touch = as_mapping(computed.get("first_touch"))
    stage = "customer" if is_customer(computed) else "subscriber"
    if stage == "subscriber" and lead:
        stage = "lead"
    if stage_before in STAGES and STAGES.index(stage_before) > STAGES.index(stage):
        stage = stage_before
    last_seen = computed.get("last_seen")
    return {
        "email": _pick(emails, rules.normalize(EMAIL, traits.get("email"))),
        "phone": _pick(phones, rules.normalize(PHONE, traits.get("phone"))),
        "user_id": _pick(user_ids, None),
        "first_name": first,
        "last_name": last,
        "company": company,
        "job_title": text(traits.get("title"))
        or text(traits.get("job_title"))
        or text(traits.get("jobTitle")),
        "lifecycle_stage": stage,
        "first_touch_source": text(touch.get("source")) or text(touch.get("referrer")),
        "last_activity_at": event_time(last_seen)[0] if isinstance(last_seen, str) else None,
    }


def unchanged(
    before: Mapping[str, Any] | None, contact: Mapping[str, Any], activity_resolution_s: float
) -> bool:
    """Whether the stored contact already has these fields (then nothing is written or
    sent). Last activity counts as changed only once it moved ``activity_resolution_s``
    past the stored one: it moves with every event a known person sends, and rewriting
    (and webhooking) the contact for each was most of the CRM feed's work."""
    if before is None:
        return False
    if any(before[f] != contact[f] for f in CONTACT_FIELDS if f != "last_activity_at"):
        return False
    was: datetime | None = before["last_activity_at"]
    now: datetime | None = contact["last_activity_at"]
    if was is None or now is None:
        return was is now
    return timedelta(0) <= now - was < timedelta(seconds=activity_resolution_s)


def contact_json(profile_id: uuid.UUID, contact: Mapping[str, Any]) -> dict[str, Any]:
    """A contact as the webhook and the API show it (times as ISO 8601)."""
    out: dict[str, Any] = {"profile_id": str(profile_id)}
    for name in (*CONTACT_FIELDS, "created_at", "updated_at"):
        value = contact.get(name)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    return out
