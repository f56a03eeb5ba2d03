"""Fixtures of the collector's browser tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.collector.chromium import Chromium


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Chromium]:
    """One headless Chromium per test module."""
    chromium = await Chromium.launch()
    yield chromium
    await chromium.close()
