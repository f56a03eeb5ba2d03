"""``GET /cdp.js``: the website library as served (caching, compression, size budget), and
the loader that ships with it. Its behaviour in a browser: test_library_browser.py."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path

import httpx
import pytest

from cdp_stream.app import Runtime, create_app
from cdp_stream.bus.memory import MemoryBus
from cdp_stream.profiles.db import make_engine
from cdp_stream.settings import Settings
from tests.conftest import unavailable

STATIC = files("cdp_stream.collector").joinpath("static")
LIBRARY = STATIC.joinpath("cdp.js").read_text()
LOADER = STATIC.joinpath("loader.html").read_text()
BUDGET_GZIPPED = 6 * 1024


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    engine = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none", "test")  # unused
    app = create_app(Runtime(Settings(), "test", engine, MemoryBus()), ["collector"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as c:
        yield c
    await engine.dispose()


async def test_served_gzipped_with_an_etag_and_cache_headers(client: httpx.AsyncClient) -> None:
    r = await client.get("/cdp.js", headers={"accept-encoding": "gzip, br"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert r.headers["content-encoding"] == "gzip"
    assert r.headers["cache-control"] == "public, max-age=3600"
    assert r.text == LIBRARY  # httpx inflated it
    assert re.fullmatch(r'"[0-9a-f]{32}"', r.headers["etag"])

    plain = await client.get("/cdp.js", headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers and plain.text == LIBRARY
    assert plain.headers["etag"] == r.headers["etag"]


async def test_a_matching_if_none_match_is_a_304_without_body(client: httpx.AsyncClient) -> None:
    etag = (await client.get("/cdp.js")).headers["etag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}'):
        r = await client.get("/cdp.js", headers={"if-none-match": header})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    stale = await client.get("/cdp.js", headers={"if-none-match": '"an-old-release"'})
    assert stale.status_code == 200 and stale.text == LIBRARY


async def test_the_library_stays_within_its_size_budget(client: httpx.AsyncClient) -> None:
    async with client.stream("GET", "/cdp.js", headers={"accept-encoding": "gzip"}) as r:
        wire = b"".join([chunk async for chunk in r.aiter_raw()])
    assert gzip.decompress(wire).decode() == LIBRARY
    on_the_wire = len(wire)
    print(f"cdp.js: {len(LIBRARY.encode())} bytes, {on_the_wire} gzipped (budget {BUDGET_GZIPPED})")
    assert on_the_wire < BUDGET_GZIPPED


def test_the_loader_stubs_exactly_the_library_api() -> None:
    stubbed = re.search(r'"([a-z ]+)"\.split\(" "\)', LOADER)
    assert stubbed is not None
    api_object = LIBRARY[LIBRARY.index("const api = {") :]
    api = set(re.findall(r"^    (\w+)", api_object, re.MULTILINE))
    assert set(stubbed.group(1).split()) <= api
    assert {"page", "track", "identify", "alias", "reset", "consent"} <= api


def test_library_and_loader_are_valid_javascript(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        unavailable("node")
        return
    script = re.search(r"<script>(.*)</script>", LOADER, re.DOTALL)
    assert script is not None
    (tmp_path / "loader.js").write_text(script.group(1))
    (tmp_path / "cdp.js").write_text(LIBRARY)
    for name in ("loader.js", "cdp.js"):
        done = subprocess.run([node, "--check", str(tmp_path / name)], capture_output=True)
        assert done.returncode == 0, done.stderr.decode()


def test_the_readme_shows_the_loader_as_shipped() -> None:
    script = re.search(r"<script>.*</script>", LOADER, re.DOTALL)
    assert script is not None
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    shown = script.group(0).replace("COLLECTOR", "https://cdp.example.com")
    assert "\n".join("  " + line for line in shown.splitlines()) in readme  # in a list item
