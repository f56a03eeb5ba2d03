"""Sealing identifiers: how a deleted person's identifiers are stored without naming them.

The digest, the key and the rotation are described in ``cdp_stream.profiles.suppression``
(the table and the re-keying). This part is pure, no I/O: the identity rules carry the
keys to every place that resolves identifiers (the resolver and the API).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from cdp_stream.settings import Settings


@dataclass(frozen=True)
class _Key:
    id: str
    siv: AESSIV

    @classmethod
    def of(cls, secret: str) -> _Key:
        material = secret.encode()
        key_id = hmac.new(material, b"cdp-suppression-key-id", hashlib.sha256).hexdigest()[:12]
        return cls(key_id, AESSIV(hashlib.sha512(material).digest()))

    def seal(self, inner: bytes) -> str:
        return self.siv.encrypt(inner, None).hex()

    def open(self, sealed: str) -> bytes | None:
        try:
            return self.siv.decrypt(bytes.fromhex(sealed), None)
        except (InvalidTag, ValueError):
            return None


def _inner(type_: str, value: str) -> bytes:
    return hashlib.sha256(f"{type_}\x1f{value}".encode()).digest()


# Identifiers whose candidates a resolver keeps: every batch looks up every identifier it
# holds, and the same people come back batch after batch (a seal costs a few µs: a SHA-256
# and an AES-SIV). ~0.5 KiB an entry: a few MiB at most.
CANDIDATES_CACHED = 8_192


@dataclass(frozen=True)
class SuppressionKeys:
    """The current key (None: unkeyed, plain SHA-256) and the keys being rotated out."""

    current: _Key | None = None
    old: tuple[_Key, ...] = field(default=())
    _cached: Callable[[str, str], tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # on the keys, not on self: no reference cycle, so a set of keys made for one batch
        # (activation's rules) is freed as soon as it is dropped
        sealing = (*([self.current] if self.current else []), *self.old)
        uncached = functools.partial(_candidates, sealing)
        cached = functools.lru_cache(maxsize=CANDIDATES_CACHED)(uncached)
        object.__setattr__(self, "_cached", cached)

    @classmethod
    def from_settings(cls, settings: Settings) -> SuppressionKeys:
        current = settings.suppression_key
        return cls(
            _Key.of(current.get_secret_value()) if current else None,
            tuple(_Key.of(k.get_secret_value()) for k in settings.suppression_old_keys),
        )

    @property
    def key_id(self) -> str | None:
        return self.current.id if self.current else None

    def seal(self, type_: str, value: str) -> str:
        """How a deletion stores the identifier now."""
        inner = _inner(type_, value)
        return self.current.seal(inner) if self.current else inner.hex()

    def candidates(self, type_: str, value: str) -> tuple[str, ...]:
        """Every form a stored row for the identifier may have: the current key's seal, each
        old key's, the plain digest."""
        return self._cached(type_, value)


def _candidates(keys: tuple[_Key, ...], type_: str, value: str) -> tuple[str, ...]:
    inner = _inner(type_, value)
    return (*[k.seal(inner) for k in keys], inner.hex())
