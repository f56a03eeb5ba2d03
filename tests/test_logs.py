"""Structured logs (``cdp_stream.logs``): JSON lines outside a terminal, each with its
stage and what the code knew (partition, offset, profile id...), readable lines in the
console form; and no personal data or secret in any process's output after real
traffic (``tests/operated.py``: every stage a ``cdp-stream`` process)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from cdp_stream import logs
from tests.operated import Stages
from tests.support import eventually

log = logging.getLogger("tests.logs")


@pytest.fixture
def configured() -> Iterator[None]:
    """``logs.configure`` replaces the root handlers (pytest's too): put them back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_context_and_mask_personal_data(
    configured: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("info", "json", secrets=["s3cr3t-write-key"])
    logs.set_stage("resolver")
    with logs.bind(topic="cdp.events", partition=3, offset=41, messageId="m-1"):
        log.warning("refused for a.b@example.com, +49 151 2345678, key s3cr3t-write-key")
    log.debug("under the level: not written")
    [line] = capsys.readouterr().err.splitlines()
    got = orjson.loads(line)
    assert got["level"] == "warning" and got["logger"] == "tests.logs"
    assert {k: got[k] for k in ("stage", "topic", "partition", "offset", "messageId")} == {
        "stage": "resolver",
        "topic": "cdp.events",
        "partition": 3,
        "offset": 41,
        "messageId": "m-1",
    }
    assert got["message"] == "refused for <email>, <phone>, key <secret>"


def test_console_lines_are_readable(configured: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("debug", "console")
    logs.set_stage("activation")
    with logs.bind(profile_id="p-1"):
        log.debug("applied")
    [line] = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        r"\[activation\] \S+ \S+ DEBUG tests\.logs: applied \(profile_id=p-1\)", line
    )


def test_every_process_logs_json_lines_with_their_stage(stages: Stages) -> None:
    for role in ("collector", "api", "resolver", "activation"):
        lines = [orjson.loads(line) for line in stages.log_lines(role)]  # each one JSON
        assert lines, role
        assert {line["stage"] for line in lines} <= {role, "collector", "api"}, role


async def test_a_line_about_a_record_says_where_it_is(stages: Stages) -> None:
    """The record on cdp.events that is not an event: its partition and offset; a
    refused webhook delivery: its profile."""

    [junk] = await _lines(stages, "resolver", "not an event")
    assert junk["stage"] == "resolver" and junk["topic"].endswith("cdp.events")
    assert isinstance(junk["partition"], int) and isinstance(junk["offset"], int)
    refused = await _lines(stages, "activation", "webhook delivery")
    assert all(line["stage"] == "activation" and line["profile_id"] for line in refused)


async def test_no_personal_data_or_secret_in_any_output(stages: Stages) -> None:
    """After traffic full of e-mail addresses and phone numbers, with write key, API
    token, webhook secret and suppression key configured: none of them in any output."""
    await _lines(stages, "resolver", "not an event")  # the last of the traffic, resolved
    await _lines(stages, "activation", "webhook delivery")  # and activated
    output = stages.output()
    assert stages.personal
    secrets = [stages.write_key, stages.api_token, stages.webhook_secret, stages.suppression_key]
    for value in [*stages.personal, *secrets]:
        assert value not in output
        assert value.lstrip("+") not in output
    assert "@example.com" not in output


def _json(stages: Stages, role: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stages.log_lines(role)]


async def _lines(stages: Stages, role: str, text: str) -> list[dict[str, Any]]:
    """The lines of ``role`` whose message has ``text``, once there are some."""

    async def probe() -> list[dict[str, Any]]:
        return [line for line in _json(stages, role) if text in line["message"]]

    found: list[dict[str, Any]] = await eventually(probe, within_s=60)
    return found
