"""Sealing identifiers: the forms a deleted person's identifier may be stored in."""

from __future__ import annotations

import hashlib

from cdp_stream.identity import EMAIL
from cdp_stream.sealing import SuppressionKeys
from cdp_stream.settings import Settings

ADA = "ada@example.com"


def keys(current: str, *old: str) -> SuppressionKeys:
    settings = Settings(suppression_key=current, suppression_old_keys=list(old))
    return SuppressionKeys.from_settings(settings)


def test_candidates_are_every_keys_seal_and_the_plain_digest_however_often_asked() -> None:
    rotating = keys("new", "old")
    expected = (
        rotating.seal(EMAIL, ADA),
        keys("old").seal(EMAIL, ADA),
        hashlib.sha256(f"{EMAIL}\x1f{ADA}".encode()).hexdigest(),
    )
    assert rotating.candidates(EMAIL, ADA) == expected
    assert rotating.candidates(EMAIL, ADA) == expected  # kept: the same answer


def test_each_set_of_keys_answers_with_its_own_seals() -> None:
    """A rotation makes new keys: what the old ones answered (and kept) is not theirs."""
    before, after = keys("first"), keys("second", "first")
    assert before.candidates(EMAIL, ADA)[0] == before.seal(EMAIL, ADA)
    assert after.candidates(EMAIL, ADA)[0] == after.seal(EMAIL, ADA)
    assert after.candidates(EMAIL, ADA)[1] == before.seal(EMAIL, ADA)
    assert before.seal(EMAIL, ADA) != after.seal(EMAIL, ADA)
