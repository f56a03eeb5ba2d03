"""Events are client data: a field read as an object is one, or empty."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import pytest

from cdp_stream.payload import as_mapping


@pytest.mark.parametrize("value", [None, "x", 1, [{"a": 1}], True])
def test_anything_but_an_object_reads_as_empty(value: Any) -> None:
    assert as_mapping(value) == {}


@pytest.mark.parametrize("value", [{"a": 1}, OrderedDict(a=1)])
def test_an_object_is_itself(value: Any) -> None:
    assert as_mapping(value) is value
