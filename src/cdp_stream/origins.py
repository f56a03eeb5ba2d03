"""How a source's allowed web origins are spelled: ``https://shop.example.com``,
``https://*.example.com`` or ``*``.

Validated where they are configured (the settings, the sources API); matched against a
request's ``Origin`` by ``cdp_stream.collector.cors``.
"""

import re

_PATTERN = re.compile(r"^(\*|https?://(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?)$")


def origin_pattern(value: str) -> str:
    """``value`` normalized (lower case, no trailing slash), or ValueError saying why."""
    pattern = value.strip().lower().rstrip("/")
    if not _PATTERN.match(pattern):
        raise ValueError(
            f"{value!r} is not an origin pattern: use scheme://host[:port], "
            "scheme://*.domain[:port] or *"
        )
    return pattern
