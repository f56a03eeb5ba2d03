"""Keyed Laplace noise for published counts (docs/dmp.md, step 3): deterministic for a key,
a cell and an exact count, so an unchanged count is not re-noised (averaging repeated
draws would strip the noise). Pure."""

from __future__ import annotations

import hashlib
import hmac
import math


class LaplaceNoise:
    """Laplace noise of scale 1/epsilon (sensitivity 1), a deterministic function of a
    secret key, the cell and the exact count (see docs/dmp.md for why)."""

    def __init__(self, epsilon: float, key: bytes) -> None:
        if not epsilon > 0:
            raise ValueError("epsilon must be > 0")
        self.epsilon = epsilon
        self._key = key

    def sample(self, cell: tuple[str, ...], exact: int) -> float:
        """Inverse CDF of Laplace(0, 1/epsilon) at a uniform in (0, 1) from HMAC-SHA256."""
        message = "\x1f".join((*cell, str(exact))).encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        u = ((int.from_bytes(digest[:8], "big") >> 11) + 0.5) / 2**53 - 0.5  # (-0.5, 0.5)
        return -math.copysign(1 / self.epsilon, u) * math.log(1 - 2 * abs(u))

    def noisy(self, cell: tuple[str, ...], exact: int) -> int:
        """Rounded (floating-point noise's low bits leak, integers do not) and >= 0."""
        return max(0, round(exact + self.sample(cell, exact)))
