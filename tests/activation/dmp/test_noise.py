"""Keyed Laplace noise (:mod:`cdp_stream.activation.dmp.noise`): pure."""

from __future__ import annotations

import math
import statistics

import pytest

from cdp_stream.activation.dmp.noise import LaplaceNoise


def test_laplace_noise_is_centred_with_the_stated_scale() -> None:
    noise = LaplaceNoise(0.5, b"k" * 32)
    samples = [noise.sample(("a", "country", "DE"), n) for n in range(20_000)]
    assert abs(statistics.fmean(samples)) < 0.1  # scale 2: sd of the mean ~0.02
    assert statistics.pvariance(samples) == pytest.approx(2 / 0.5**2, rel=0.1)
    # Laplace: P(|x| > b ln 2) = 1/2
    median_abs = statistics.median(abs(x) for x in samples)
    assert median_abs == pytest.approx(2 * math.log(2), rel=0.05)


def test_noise_repeats_for_an_unchanged_count_and_is_fresh_under_a_new_key() -> None:
    """Re-publishing an unchanged count must not hand out a new sample to average."""
    a, b = LaplaceNoise(1.0, b"a" * 32), LaplaceNoise(1.0, b"b" * 32)
    cell = ("aud", "overall", "all")
    assert {a.noisy(cell, 100) for _ in range(10)} == {a.noisy(cell, 100)}
    assert len({LaplaceNoise(1.0, bytes([i]) * 32).noisy(cell, 100) for i in range(50)}) > 3
    assert a.sample(cell, 100) != b.sample(cell, 100)
    assert a.noisy(cell, 0) >= 0
    assert min(a.noisy(("aud", "x", str(i)), 0) for i in range(200)) == 0  # clamped
    with pytest.raises(ValueError):
        LaplaceNoise(0, b"")
