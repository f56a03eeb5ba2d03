"""Reading client JSON into CRM fields: events and traits are client data, and a CRM field
should receive a trimmed text or a number, never an object or a blank."""

from __future__ import annotations

from typing import Any


def scalar(value: Any) -> str | int | float | None:
    """A JSON scalar worth showing (trimmed text, a number), else None."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def text(value: Any) -> str | None:
    """Trimmed text, else None."""
    return value.strip() or None if isinstance(value, str) else None


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
