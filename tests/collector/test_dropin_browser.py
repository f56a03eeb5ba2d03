"""Segment's analytics.js 2.0 and RudderStack's JavaScript SDK v3, unchanged, in real
headless Chromium against the real collector (behind ``Gate``), broker, resolver and
database: each library's browser build from its npm package (pinned in
``browser/package.json``), served by the site, configured only by pointing its hosts at
the collector as its documentation says for a self-hosted data plane. Nothing comes from
the internet: every request a page makes is checked to stay on this machine.

Pages come from ``http://localhost:<port>`` (listed for the source), the collector is
``http://127.0.0.1:<port>``: every request to it is cross-origin.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse
from starlette.routing import Route

from cdp_stream.app import Runtime
from cdp_stream.profiles.credentials import ensure_source
from cdp_stream.resolver.consumer import run_resolver
from tests.collector.chromium import Chromium
from tests.support import (
    Gate,
    Server,
    free_port,
    gate_of,
    gated_collector,
    profile_events,
    running_pipeline,
    uid,
)

WRITE_KEY = "wk_dropin_" + uuid.uuid4().hex[:8]
API_TOKEN = "tok_dropin_" + uuid.uuid4().hex[:8]
# Another source, which lists the origin the first one does not: that origin's preflights
# pass, so the tracking paths' own per-source check is what refuses its events.
OTHER_KEY = "wk_other_" + uuid.uuid4().hex[:8]
NODE_MODULES = Path(__file__).parent / "browser" / "node_modules"


@dataclass(frozen=True)
class Library:
    """How a page loads one library and what the tests ask it."""

    name: str
    build: str  # the browser build in its npm package, served by the site at /js/<name>.js
    load: str  # the page's script: KEY, COLLECTOR, HOST and OPTIONS filled in
    loaded: str  # an expression, truthy once the library has its configuration
    anonymous_id: str
    call: str  # the object the page calls page/identify/track on


SEGMENT = Library(
    "analytics-next",
    "@segment/analytics-next/dist/umd/index.js",
    # @segment/analytics-next's npm instructions for a custom proxy: cdnURL for the
    # settings, the Segment.io integration's apiHost and protocol for the events.
    """
    window.analytics = AnalyticsNext.AnalyticsBrowser.load(
      {writeKey: KEY, cdnURL: COLLECTOR},
      {integrations: {"Segment.io": Object.assign(
        {apiHost: HOST + "/v1", protocol: "http"}, OPTIONS)}});
    analytics.page();
    """,
    "window.analytics && analytics.instance && analytics.instance.initialized",
    "analytics.instance.user().anonymousId()",
    "analytics",
)
RUDDERSTACK = Library(
    "rudder-analytics",
    "@rudderstack/analytics-js/dist/npm/modern/bundled/umd/index.js",
    # The data plane URL for events, configUrl (the control plane) for the source config.
    """
    var rudderanalytics = new window.rudderanalytics.RudderAnalytics();
    rudderanalytics.load(KEY, COLLECTOR, Object.assign({configUrl: COLLECTOR}, OPTIONS));
    rudderanalytics.ready(function () { window.rudderReady = true; });
    rudderanalytics.page();
    """,
    "window.rudderReady === true",
    "rudderanalytics.getAnonymousId()",
    "rudderanalytics",
)
LIBRARIES = [SEGMENT, RUDDERSTACK]
# Quick retries, so a test does not wait for the production backoff.
FAST = {
    SEGMENT.name: {"httpConfig": {"backoffConfig": {"maxBackoffInterval": 1}}},
    RUDDERSTACK.name: {"queueOptions": {"minRetryDelay": 200, "maxRetryDelay": 1000}},
}
# Batching on: three events per request, or whatever there is after ten seconds.
BATCHING = {
    SEGMENT.name: {"deliveryStrategy": {"strategy": "batching", "config": {"size": 3}}},
    RUDDERSTACK.name: {"queueOptions": {"batch": {"enabled": True, "maxItems": 3}}},
}


class Site:
    """The website: ``/<library>/<path>?options=<json>`` is a page loading that library;
    ``/js/<library>.js`` its build from node_modules."""

    def __init__(self, collector: str) -> None:
        host = urlsplit(collector).netloc
        builds = {f"/js/{lib.name}.js": NODE_MODULES / lib.build for lib in LIBRARIES}

        async def page(request: Request) -> HTMLResponse:
            library = {lib.name: lib for lib in LIBRARIES}[request.path_params["library"]]
            options = request.query_params.get("options", "{}")
            script = library.load
            for blank, value in (
                ("KEY", json.dumps(request.query_params.get("key", WRITE_KEY))),
                ("COLLECTOR", json.dumps(collector)),
                ("HOST", json.dumps(host)),
                ("OPTIONS", options),
            ):
                script = script.replace(blank, value)
            return HTMLResponse(
                f"<!doctype html><html><head><title>{request.url.path}</title>"
                f'<script src="/js/{library.name}.js"></script><script>{script}</script>'
                "</head><body></body></html>"
            )

        async def build(request: Request) -> FileResponse:
            return FileResponse(builds[request.url.path], media_type="text/javascript")

        self.server = Server(
            Starlette(
                routes=[
                    Route("/js/{name}", build),
                    Route("/{library}/{path:path}", page),
                ]
            )
        )
        self.origin = f"http://localhost:{self.server.port}"
        self.unlisted = f"http://127.0.0.1:{self.server.port}"

    def url(
        self, library: Library, path: str, origin: str | None = None, **options: Any
    ) -> str:
        query = f"?options={quote(json.dumps(options))}" if options else ""
        return f"{origin or self.origin}/{library.name}{path}{query}"


@pytest.fixture(scope="module")
def collector_port() -> int:
    """Chosen first: the site's pages need the collector's address."""
    return free_port()


@pytest.fixture(scope="module")
async def site(collector_port: int) -> AsyncIterator[Site]:
    web = Site(f"http://127.0.0.1:{collector_port}")
    await web.server.start()
    yield web
    await web.server.stop()


@pytest.fixture(scope="module")
async def runtime(kafka_bootstrap: str, pg_url: str, site: Site) -> AsyncIterator[Runtime]:
    async with running_pipeline(
        kafka_bootstrap,
        pg_url,
        write_key=WRITE_KEY,
        api_token=API_TOKEN,
        loops=[run_resolver],
        bootstrap_allowed_origins=[site.origin],
    ) as rt:
        async with rt.engine.begin() as conn:
            await ensure_source(conn, uid("src"), "other", OTHER_KEY, [site.unlisted])
        yield rt


@pytest.fixture(scope="module")
async def collector(collector_port: int, runtime: Runtime) -> AsyncIterator[Server]:
    async with gated_collector(runtime, collector_port) as server:
        yield server


@pytest.fixture
def gate(collector: Server) -> Gate:
    return gate_of(collector)


async def open_page(browser: Chromium, library: Library, url: str, context: str = "") -> str:
    """A tab of a visitor (a new one unless ``context``) showing ``url``, library loaded."""
    page = await browser.call("page", context=context or await browser.call("context"))
    await browser.call("goto", page=page, url=url)
    await browser.until(page, library.loaded)
    return page


async def call(browser: Chromium, page: str, library: Library, method: str, *args: Any) -> None:
    arguments = ", ".join(json.dumps(a) for a in args)
    await browser.call("eval", page=page, expression=f"{library.call}.{method}({arguments})")


async def events_of(ref: str, count: int, collector: Server) -> list[dict[str, Any]]:
    return await profile_events(collector.url, API_TOKEN, ref, count)


async def only_local_requests(browser: Chromium, page: str) -> list[str]:
    """The page's requests (method, path on the collector or site), after checking that
    none left this machine."""
    requests = await browser.call("requests", page=page)
    elsewhere = [r for r in requests if urlsplit(r.split(" ")[1]).hostname not in LOCAL]
    assert elsewhere == [], elsewhere
    return requests


LOCAL = {"localhost", "127.0.0.1"}


@pytest.mark.parametrize("library", LIBRARIES, ids=lambda lib: lib.name)
async def test_page_identify_and_an_order_land_on_one_profile(
    browser: Chromium, site: Site, collector: Server, gate: Gate, library: Library
) -> None:
    user, email = uid("user"), f"{uid('ada')}@example.com"
    page = await open_page(browser, library, site.url(library, "/shop", **FAST[library.name]))
    anonymous_id = await browser.call("eval", page=page, expression=library.anonymous_id)
    await call(browser, page, library, "identify", user, {"email": email, "plan": "pro"})
    order = {"order_id": uid("o"), "revenue": 30, "currency": "EUR"}
    await call(browser, page, library, "track", "Order Completed", order)

    events = await events_of(f"email:{email}", 3, collector)
    assert [e["type"] for e in events] == ["page", "identify", "track"]
    assert {e["anonymousId"] for e in events} == {anonymous_id}
    assert events[2]["event"] == "Order Completed" and events[2]["properties"] == order
    assert events[2]["channel"] == "purchase"
    assert events[0]["context"]["page"]["path"] == f"/{library.name}/shop"
    assert "writeKey" not in events[0]
    async with httpx.AsyncClient(base_url=collector.url) as http:
        auth = {"authorization": f"Bearer {API_TOKEN}"}
        profiles = [
            (await http.get(f"/v1/profiles/{ref}", headers=auth)).json()
            for ref in (f"user_id:{user}", f"anonymous_id:{anonymous_id}", f"email:{email}")
        ]
    assert len({p["id"] for p in profiles}) == 1
    assert profiles[0]["traits"]["plan"] == "pro"

    assert sorted(gate.delivered().values()) == [1, 1, 1]  # no resends
    sent = [r for r in await only_local_requests(browser, page) if r.startswith("POST")]
    paths = [urlsplit(r.split(" ")[1]).path for r in sent]
    if library is SEGMENT:
        assert paths == ["/v1/p", "/v1/i", "/v1/t"]
    else:
        assert paths == ["/v1/page", "/v1/identify", "/v1/track"]
