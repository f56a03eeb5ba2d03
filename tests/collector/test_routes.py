"""The tracking endpoints read the ASGI messages themselves (no Starlette ``Request`` on
the hot path): a body in several messages, a client gone mid-body, repeated headers."""

from __future__ import annotations

import gzip
from typing import Any

import pytest
from starlette.requests import ClientDisconnect

from cdp_stream.collector._json import BadRequest
from cdp_stream.collector.routes import raw_headers, read_body


def receiving(*messages: dict[str, Any]) -> Any:
    pending = list(messages)

    async def receive() -> dict[str, Any]:
        return pending.pop(0)

    return receive


def part(body: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_a_body_in_several_messages_is_read_whole() -> None:
    receive = receiving(part(b'{"userId":'), part(b""), part(b'"u"}', more=False))
    assert await read_body(receive, {}, 100) == b'{"userId":"u"}'


async def test_a_body_over_the_limit_without_a_length_is_refused_as_it_arrives() -> None:
    receive = receiving(part(b"x" * 60), part(b"x" * 60), part(b"never read", more=False))
    with pytest.raises(BadRequest) as info:
        await read_body(receive, {}, 100)
    assert info.value.status == 413


async def test_a_client_gone_mid_body_is_a_disconnect_not_a_shorter_body() -> None:
    receive = receiving(part(b'{"userId":'), {"type": "http.disconnect"})
    with pytest.raises(ClientDisconnect):
        await read_body(receive, {}, 100)


async def test_a_gzip_body_is_inflated_by_its_header() -> None:
    receive = receiving(part(gzip.compress(b'{"a":1}'), more=False))
    headers = raw_headers({"headers": [(b"content-encoding", b" GZip ")]})
    assert await read_body(receive, headers, 100) == b'{"a":1}'


def test_the_first_of_repeated_headers_is_the_one_read() -> None:
    scope = {"headers": [(b"authorization", b"Basic first"), (b"authorization", b"Basic second")]}
    assert raw_headers(scope) == {b"authorization": b"Basic first"}
