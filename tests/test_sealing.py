"""Sealing identifiers: the forms a deleted person's identifier may be stored in."""

from __future__ import annotations

import gc
import hashlib
import weakref

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


def test_keys_made_for_one_batch_are_freed_when_dropped() -> None:
    """Activation makes its identity rules, keys included, for each batch: what they keep
    must not hold them in a cycle that only a collection frees."""
    batch_keys = keys("k")
    batch_keys.candidates(EMAIL, ADA)
    gone = weakref.ref(batch_keys)
    gc.disable()
    try:
        del batch_keys
        assert gone() is None
    finally:
        gc.enable()
