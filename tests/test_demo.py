"""``cdp-stream demo``: the seeded population (pure), and the README's quick start, run as
a user runs it: ``cdp-stream up`` on the embedded default, then the demo command as
printed, ending in the console with the demo data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx

from cdp_stream import demo
from cdp_stream.events import MODELS
from tests.support import serving_up

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_same_seed_gives_the_same_people() -> None:
    first = list(demo.population(50, 3, NOW))
    assert first == list(demo.population(50, 3, NOW))
    assert first != list(demo.population(50, 4, NOW))
    ids = [e["messageId"] for p in first for e in p.events]
    assert len(ids) == len(set(ids))


def test_every_event_is_valid_and_in_the_past() -> None:
    for person in demo.population(200, 7, NOW):
        for event in person.events:
            MODELS[event["type"]].model_validate(event)
            assert event["timestamp"] < NOW.isoformat().replace("+00:00", "Z")


def test_the_population_holds_what_the_console_shows() -> None:
    people = list(demo.population(500, 7, NOW))
    names = Counter(e.get("event") for p in people for e in p.events)
    assert names["Order Completed"] and names["Order Refunded"] and names["Email Opened"]
    assert any(p.email is None for p in people)  # never signed in: anonymous profiles
    signed_in_twice = [
        p
        for p in people
        if len({e["anonymousId"] for e in p.events if e["type"] == "identify"}) > 1
    ]
    assert signed_in_twice  # several devices, merged by the sign-ins
    guests = [e for p in people for e in p.events if str(e.get("userId", "")).endswith("-guest")]
    assert guests  # a second user id on a device: a refused link
    choices = [
        e["context"]["consent"]
        for p in people
        for e in p.events
        if e.get("event") == "Consent Updated"
    ]
    refused = [c for c in choices if not c["categoryPreferences"]["marketing"]]
    assert 0 < len(refused) < len(choices) / 2  # some leave the DMP counts


def test_readme_quick_start_ends_in_the_console_with_demo_data(tmp_path: Path) -> None:
    """The quick start's two commands: ``make run`` is ``cdp-stream up`` (here on a free
    port and a data directory of its own), then the demo line verbatim, with
    ``--people 40`` appended to keep the test short."""
    block = re.search(r"```bash\n(CDP_BOOTSTRAP_WRITE_KEY=\S+ CDP_BOOTSTRAP_API_TOKEN=\S+) "
                      r"\.venv/bin/cdp-stream demo\n```", README.read_text())  # fmt: skip
    assert block is not None, "the README's quick start no longer shows the demo command"
    keys = dict(pair.split("=", 1) for pair in block.group(1).split())
    with serving_up(tmp_path, **keys) as (_, port):
        done = subprocess.run(
            [Path(sys.executable).parent / "cdp-stream", "demo", "--people", "40"],
            env={**os.environ, **keys, "CDP_HTTP_PORT": str(port)},  # the port `up` has
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        closing = done.stdout.strip().splitlines()[-1]
        base = f"http://127.0.0.1:{port}"
        assert closing.startswith(f"Open {base}/ , sign in with your API token and look up ")
        email = closing.split("look up ")[1].split(";")[0]
        token = {"authorization": f"Bearer {keys['CDP_BOOTSTRAP_API_TOKEN']}"}
        assert httpx.get(f"{base}/", timeout=10).text.startswith("<!doctype html>")
        person = httpx.get(f"{base}/v1/profiles/email:{email}", headers=token, timeout=10)
        assert person.status_code == 200
        audiences = httpx.get(f"{base}/v1/audiences", headers=token, timeout=10).json()
        assert {a["name"] for a in audiences} >= set(demo.AUDIENCES)
