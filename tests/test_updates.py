"""The ``cdp.profile-updates`` contract (``cdp_stream.updates``): what the resolver writes
is a valid :class:`ProfileUpdate`, byte for byte what the model writes; updates of before
the version field read as version 1; an unknown version is refused."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from cdp_stream.updates import ProfileUpdate, updated_payload


def test_the_resolvers_payload_is_the_models() -> None:
    pid, merged = str(uuid.uuid4()), [str(uuid.uuid4())]
    traits = {"email": "a@example.com", "plan": None, "nested": {"n": [1, 2.5, True]}}
    computed = {"order_count": 2, "last_seen": "2026-01-01T00:00:00.000000Z"}
    written = updated_payload(pid, merged, traits, computed)
    model = ProfileUpdate(
        profile_id=pid, merged_ids=merged, changed_traits=traits, changed_computed=computed
    )
    assert written == model.payload(without_events=True)
    assert ProfileUpdate.model_validate_json(written) == model


def test_an_update_without_version_or_events_list_is_read_as_version_1() -> None:
    event = {"messageId": "m-1", "type": "track"}
    old = ProfileUpdate.model_validate_json(
        b'{"profile_id": "p", "event": {"messageId": "m-1", "type": "track"}}'
    )
    assert (old.version, old.type, old.events) == (1, "updated", [event])


@pytest.mark.parametrize(
    "raw",
    [b'{"version": 2, "profile_id": "p"}', b'{"profile_id": "p", "merged_ids": 5}', b"{}"],
)
def test_what_is_not_an_update_of_a_known_version_is_refused(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        ProfileUpdate.model_validate_json(raw)


def test_the_profiles_an_update_names_profile_first_malformed_left_out() -> None:
    pid, merged = uuid.uuid4(), uuid.uuid4()
    update = ProfileUpdate(profile_id=str(pid), merged_ids=["not-a-uuid", str(merged)])
    assert update.profile_ids() == [pid, merged]
    assert update.split_ids() == []
    assert ProfileUpdate(profile_id="junk").profile_ids() == []


def test_an_unmerge_names_both_profiles_it_made() -> None:
    pid, other = uuid.uuid4(), uuid.uuid4()
    update = ProfileUpdate(profile_id=str(pid), split_from=str(other))
    assert update.split_ids() == [pid, other]
    assert ProfileUpdate(profile_id=str(pid), split_from="junk").split_ids() == []
