"""The website library (``static/cdp.js`` with its loader) in real headless Chromium,
against the real collector (uvicorn on a socket, behind ``Gate``), broker, resolver and
database.

Pages come from a second server, ``http://localhost:<port>``, a different origin from the
collector's ``http://127.0.0.1:<port>``: every send is a cross-origin request, allowed
because the source lists the site's origin. Each page is the copy-paste loader as
shipped, with the write key, the collector's address and test options filled in.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from cdp_stream.app import Runtime
from cdp_stream.collector.ratelimit import RateLimits
from cdp_stream.resolver.consumer import run_resolver
from tests.collector.chromium import Chromium
from tests.support import (
    Gate,
    Server,
    eventually,
    free_port,
    gate_of,
    gated_collector,
    running_pipeline,
    uid,
)

WRITE_KEY = "wk_web_" + uuid.uuid4().hex[:8]
API_TOKEN = "tok_web_" + uuid.uuid4().hex[:8]
# Quick retries so the tests do not wait for the production backoff.
FAST = {"flushInterval": 200, "retryBase": 200, "retryMax": 1000}
# The messageIds in the retry queues this site's tabs keep in localStorage.
STORED_QUEUE = (
    "Object.keys(localStorage).filter(k => k.startsWith('cdp_q_'))"
    ".flatMap(k => JSON.parse(localStorage.getItem(k)).q.map(x => x.e.messageId))"
)
LOADER = files("cdp_stream.collector").joinpath("static/loader.html").read_text()


def page_html(collector: str, path: str, options: dict[str, Any]) -> str:
    """The shipped loader with its three blanks filled, in a page titled by its path."""
    snippet = LOADER
    for blank, value in (
        ('"COLLECTOR/cdp.js"', json.dumps(collector + "/cdp.js")),
        ('"WRITE_KEY"', json.dumps(WRITE_KEY)),
        (",{});", "," + json.dumps({**FAST, **options}) + ");"),
    ):
        assert snippet.count(blank) == 1, blank
        snippet = snippet.replace(blank, value)
    return f"<!doctype html><html><head><title>{path}</title>{snippet}</head><body></body></html>"


class Site:
    """The website: any path is a page with the loader; ``?cdp=<json>`` adds options."""

    def __init__(self, collector: str) -> None:
        async def page(request: Request) -> HTMLResponse:
            options = json.loads(request.query_params.get("cdp", "{}"))
            return HTMLResponse(page_html(collector, request.url.path, options))

        self.server = Server(Starlette(routes=[Route("/{path:path}", page)]))
        self.origin = f"http://localhost:{self.server.port}"
        # Subdomains of one site (the browser maps *.cdp.test to this machine).
        self.subdomains = f"http://*.shop.cdp.test:{self.server.port}"

    def url(self, path: str, origin: str | None = None, **options: Any) -> str:
        query = "&" if "?" in path else "?"
        encoded = f"{query}cdp={quote(json.dumps(options))}" if options else ""
        return (origin or self.origin) + path + encoded

    def subdomain(self, name: str) -> str:
        return self.subdomains.replace("*", name)


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
        bootstrap_allowed_origins=[site.origin, site.subdomains],
    ) as rt:
        yield rt


@pytest.fixture(scope="module")
async def collector(collector_port: int, runtime: Runtime) -> AsyncIterator[Server]:
    async with gated_collector(runtime, collector_port) as server:
        yield server


@pytest.fixture
def gate(collector: Server) -> Gate:
    return gate_of(collector)


async def open_page(browser: Chromium, url: str, context: str | None = None) -> str:
    """A tab of a visitor (a new one unless ``context``) showing ``url``, library loaded."""
    page = await browser.call("page", context=context or await browser.call("context"))
    await browser.call("goto", page=page, url=url)
    await until_true(browser, page, "window.cdp && window.cdp.loaded === true")
    return page


async def until_true(browser: Chromium, page: str, expression: str, within_s: float = 20) -> None:
    async def probe() -> bool:
        return bool(await browser.call("eval", page=page, expression=expression))

    assert await eventually(probe, within_s), (expression, await browser.call("log"))


async def sent_everything(browser: Chromium, page: str) -> None:
    await until_true(browser, page, "cdp.stats().queued === 0")


async def events_of(
    collector: Server, ref: str, count: int, within_s: float = 20
) -> list[dict[str, Any]]:
    """The payloads of the profile's stored events, oldest first, once there are ``count``."""
    async with httpx.AsyncClient(base_url=collector.url) as http:

        async def probe() -> list[dict[str, Any]]:
            r = await http.get(
                f"/v1/profiles/{ref}/events",
                params={"limit": 100},
                headers={"authorization": f"Bearer {API_TOKEN}"},
            )
            items = r.json()["items"] if r.status_code == 200 else []
            return items if len(items) >= count else []

        items = await eventually(probe, within_s)
    assert len(items) == count, f"expected {count} events for {ref}, got {len(items)}"
    return [item["payload"] for item in reversed(items)]


async def test_page_views_across_reloads_keep_one_anonymous_id(
    browser: Chromium, site: Site, collector: Server, gate: Gate
) -> None:
    context = await browser.call("context")
    page = await open_page(
        browser, site.url("/pricing?utm_source=news&utm_medium=email&utm_campaign=spring"), context
    )
    await sent_everything(browser, page)
    await browser.call("reload", page=page)
    await sent_everything(browser, page)
    pricing = await browser.call("eval", page=page, expression="location.href")
    await browser.call("goto", page=page, url=site.url("/docs"), referer=pricing)
    await sent_everything(browser, page)
    await browser.call("reload", page=page)
    await sent_everything(browser, page)

    anonymous_id = await browser.call("eval", page=page, expression="cdp.user().anonymousId")
    events = await events_of(collector, f"anonymous_id:{anonymous_id}", 4)
    assert [e["type"] for e in events] == ["page"] * 4
    assert {e["anonymousId"] for e in events} == {anonymous_id}
    assert [e["context"]["page"]["path"] for e in events] == ["/pricing"] * 2 + ["/docs"] * 2
    assert [e["properties"]["title"] for e in events] == ["/pricing"] * 2 + ["/docs"] * 2
    assert events[0]["context"]["campaign"] == {
        "source": "news",
        "medium": "email",
        "name": "spring",
    }
    assert "campaign" not in events[2]["context"]
    assert events[2]["context"]["page"]["referrer"] == pricing
    assert len({e["context"]["sessionId"] for e in events}) == 1
    first = events[0]["context"]
    assert "Chrome" in first["userAgent"] and first["locale"]
    assert first["screen"]["width"] > 0 and first["library"]["name"] == "cdp.js"
    assert {e["channel"] for e in events} == {"website"}

    # Sent once each, as simple requests (no preflight), their answers readable (no retry).
    assert sorted(gate.delivered().values()) == [1, 1, 1, 1]
    assert gate.other_methods == []

    cookies = {c["name"]: c for c in await browser.call("cookies", context=context)}
    cookie = cookies["cdp_aid"]
    assert cookie["value"] == anonymous_id and cookie["sameSite"] == "Lax"
    assert cookie["domain"] == "localhost" and cookie["path"] == "/"
    assert abs(cookie["expires"] - (time.time() + 365 * 86400)) < 3600
    stored = await browser.call("eval", page=page, expression="localStorage.getItem('cdp_aid')")
    assert json.loads(stored) == anonymous_id


async def test_identify_links_the_visitor_to_the_user(
    browser: Chromium, site: Site, collector: Server, gate: Gate
) -> None:
    user, email = uid("web-user"), f"{uid('ada')}@example.com"
    page = await open_page(browser, site.url("/home"))
    anonymous_id = await browser.call("eval", page=page, expression="cdp.user().anonymousId")
    await browser.call(
        "eval",
        page=page,
        expression=f"cdp.identify({json.dumps(user)}, {{email: {json.dumps(email)}, plan: 'pro'}})",
    )
    await sent_everything(browser, page)
    await browser.call("goto", page=page, url=site.url("/account"))
    await sent_everything(browser, page)
    assert await browser.call("eval", page=page, expression="cdp.user().userId") == user

    events = await events_of(collector, f"user_id:{user}", 3)
    assert [e["type"] for e in events] == ["page", "identify", "page"]
    assert "userId" not in events[0] and events[2]["userId"] == user
    async with httpx.AsyncClient(base_url=collector.url) as http:
        auth = {"authorization": f"Bearer {API_TOKEN}"}
        by_user = (await http.get(f"/v1/profiles/user_id:{user}", headers=auth)).json()
        by_visitor = await http.get(f"/v1/profiles/anonymous_id:{anonymous_id}", headers=auth)
        by_email = (await http.get(f"/v1/profiles/email:{email}", headers=auth)).json()
    assert by_visitor.json()["id"] == by_user["id"] == by_email["id"]
    assert by_user["traits"]["plan"] == "pro"


async def test_events_sent_just_before_closing_the_tab_arrive(
    browser: Chromium, site: Site, collector: Server, gate: Gate
) -> None:
    page = await open_page(browser, site.url("/checkout", flushInterval=600_000))
    anonymous_id = await browser.call("eval", page=page, expression="cdp.user().anonymousId")
    await browser.call("eval", page=page, expression="cdp.track('Clicked Buy', {sku: 'A-1'})")
    assert await browser.call("eval", page=page, expression="cdp.stats().queued") == 2
    assert gate.requests == []  # nothing sent yet: the next flush is 10 minutes away

    await browser.call("close", page=page)

    events = await events_of(collector, f"anonymous_id:{anonymous_id}", 2)
    assert [(e["type"], e.get("event")) for e in events] == [
        ("page", None),
        ("track", "Clicked Buy"),
    ]
    assert events[1]["properties"] == {"sku": "A-1"}


async def test_collector_down_queues_and_delivers_once_after_it_returns(
    browser: Chromium, site: Site, collector: Server, gate: Gate
) -> None:
    context = await browser.call("context")
    page = await open_page(browser, site.url("/shop"), context)
    await sent_everything(browser, page)
    anonymous_id = await browser.call("eval", page=page, expression="cdp.user().anonymousId")

    await collector.stop()
    try:
        for n in range(3):
            await browser.call(
                "eval", page=page, expression=f"cdp.track('Viewed Item', {{n: {n}}})"
            )
        await until_true(browser, page, "cdp.stats().attempts >= 2")
        # The visitor goes on to another page of the site (the library from the HTTP cache):
        # the new page takes over the stored queue and adds its own page view.
        await browser.call("goto", page=page, url=site.url("/shop/basket"))
        await until_true(browser, page, "window.cdp && cdp.loaded && cdp.stats().queued === 4")
        await until_true(browser, page, "cdp.stats().attempts >= 1")
        stored = await browser.call("eval", page=page, expression=STORED_QUEUE)
        assert len(stored) == len(set(stored)) == 4
    finally:
        await collector.start()

    await sent_everything(browser, page)
    events = await events_of(collector, f"anonymous_id:{anonymous_id}", 5)
    assert [e.get("event") for e in events[1:4]] == ["Viewed Item"] * 3
    assert [e["properties"].get("n") for e in events[1:4]] == [0, 1, 2]
    assert {e["messageId"] for e in events[1:]} == set(stored)
    assert gate.delivered() == Counter({m: 1 for m in [events[0]["messageId"], *stored]})


async def test_consent_nothing_is_sent_or_stored_for_declined_categories(
    browser: Chromium, site: Site, collector: Server, gate: Gate
) -> None:
    context = await browser.call("context")
    page = await open_page(browser, site.url("/landing", requireConsent=True), context)
    assert await browser.call("eval", page=page, expression="cdp.stats()") == {
        "queued": 0,
        "held": 1,  # the page view waits for a decision
        "dropped": 0,
        "attempts": 0,
    }
    assert await browser.call("cookies", context=context) == []
    assert await browser.call("eval", page=page, expression="localStorage.length") == 0

    anonymous_id = await browser.call("eval", page=page, expression="cdp.user().anonymousId")
    await browser.call(
        "eval",
        page=page,
        expression="cdp.consent({analytics: 'denied', marketing: 'granted'}),"
        "cdp.track('Scrolled'),"
        "cdp.track('Viewed Offer', {}, {category: 'marketing'})",
    )
    await sent_everything(browser, page)
    events = await events_of(collector, f"anonymous_id:{anonymous_id}", 1)
    assert events[0]["event"] == "Viewed Offer"
    assert events[0]["context"]["consent"] == {
        "categoryPreferences": {"analytics": False, "marketing": True}
    }
    assert len(gate.delivered()) == 1  # the held page view and 'Scrolled' never left
    cookies = await browser.call("cookies", context=context)
    assert [c["value"] for c in cookies if c["name"] == "cdp_aid"] == [anonymous_id]


async def test_batches_by_count_and_by_time(
    browser: Chromium, site: Site, collector: Server, gate: Gate
) -> None:
    page = await open_page(browser, site.url("/list", flushAt=4, flushInterval=600_000))
    for n in range(2):
        await browser.call("eval", page=page, expression=f"cdp.track('Scrolled', {{n: {n}}})")
    assert await browser.call("eval", page=page, expression="cdp.stats().queued") == 3
    assert gate.sizes() == []
    await browser.call("eval", page=page, expression="cdp.track('Scrolled', {n: 2})")
    await sent_everything(browser, page)
    assert gate.sizes() == [4]  # the page view and three tracks, in one request

    gate.requests.clear()
    timed = await open_page(browser, site.url("/list", flushAt=100, flushInterval=300))
    await sent_everything(browser, timed)  # one event, well under flushAt, sent by time
    assert gate.sizes() == [1]


async def test_session_times_out_after_inactivity_and_reset_starts_over(
    browser: Chromium, site: Site, collector: Server, gate: Gate
) -> None:
    page = await open_page(browser, site.url("/blog", sessionTimeout=1000))
    first = await browser.call("eval", page=page, expression="cdp.user()")
    await browser.call("eval", page=page, expression="cdp.track('Read')")
    assert (await browser.call("eval", page=page, expression="cdp.user()")) == first
    await browser.call("eval", page=page, expression="new Promise(r => setTimeout(r, 1300))")
    await browser.call("eval", page=page, expression="cdp.track('Read')")
    later = await browser.call("eval", page=page, expression="cdp.user()")
    assert later["sessionId"] != first["sessionId"]
    assert later["anonymousId"] == first["anonymousId"]

    await browser.call("eval", page=page, expression="cdp.identify('u-reset'), cdp.reset()")
    after = await browser.call("eval", page=page, expression="cdp.user()")
    assert after["anonymousId"] != first["anonymousId"] and after["userId"] is None
    cookie = await browser.call("eval", page=page, expression="document.cookie")
    assert f"cdp_aid={after['anonymousId']}" in cookie
    await sent_everything(browser, page)


async def test_a_shared_cookie_domain_keeps_one_visitor_across_subdomains(
    browser: Chromium, site: Site, collector: Server, gate: Gate
) -> None:
    context = await browser.call("context")
    shared = {"cookieDomain": ".shop.cdp.test"}
    www = await open_page(browser, site.url("/", site.subdomain("www"), **shared), context)
    visitor = await browser.call("eval", page=www, expression="cdp.user().anonymousId")
    await sent_everything(browser, www)
    blog = await open_page(browser, site.url("/post", site.subdomain("blog"), **shared), context)
    assert await browser.call("eval", page=blog, expression="cdp.user().anonymousId") == visitor
    await sent_everything(browser, blog)
    cookies = [c for c in await browser.call("cookies", context=context) if c["name"] == "cdp_aid"]
    assert [(c["domain"], c["value"]) for c in cookies] == [(".shop.cdp.test", visitor)]

    # Without the option each subdomain keeps its own cookie: another visitor.
    alone = await open_page(browser, site.url("/", site.subdomain("help")), context)
    assert await browser.call("eval", page=alone, expression="cdp.user().anonymousId") == visitor
    other = await open_page(browser, site.url("/", site.subdomain("help")))
    assert await browser.call("eval", page=other, expression="cdp.user().anonymousId") != visitor
    events = await events_of(collector, f"anonymous_id:{visitor}", 3)  # www, blog, help
    assert [e["context"]["page"]["url"].split("/")[2].split(".")[0] for e in events] == [
        "www",
        "blog",
        "help",
    ]


async def test_retries_back_off_exponentially_and_honour_retry_after(
    browser: Chromium, site: Site, collector: Server, gate: Gate
) -> None:
    page = await open_page(browser, site.url("/retry"))
    await sent_everything(browser, page)
    record_sends = (
        "window.sends = []; const send = window.fetch;"
        "window.fetch = (...a) => (sends.push(performance.now()), send(...a))"
    )
    await browser.call("eval", page=page, expression=record_sends)

    gate.answers.extend([503, 503])  # with Retry-After: 1
    await browser.call("eval", page=page, expression="cdp.track('Retried')")
    await sent_everything(browser, page)
    sends = await browser.call("eval", page=page, expression="sends")
    assert len(sends) == 3, sends
    assert all(later - earlier >= 950 for earlier, later in itertools.pairwise(sends)), sends

    await collector.stop()
    try:
        await browser.call("eval", page=page, expression="sends.length = 0, cdp.track('Later')")
        await until_true(browser, page, "sends.length >= 5")  # refused connections
    finally:
        await collector.start()
    sends = await browser.call("eval", page=page, expression="sends")
    gaps = [later - earlier for earlier, later in itertools.pairwise(sends)]
    # retryBase 200 ms doubling up to retryMax 1000 ms, each with 50-100% jitter.
    assert 100 <= gaps[0] <= 600, gaps  # (timers may fire late on a busy machine)
    assert gaps[2] > gaps[0] and gaps[3] > gaps[0], gaps
    assert max(gaps) <= 1800, gaps
    await sent_everything(browser, page)


async def test_the_collectors_rate_limit_is_honoured_and_nothing_is_lost(
    browser: Chromium, site: Site, collector: Server, gate: Gate
) -> None:
    """The real token bucket (the gate only records): 2 events at once, then 2 per
    second, for this test; the page's batches of 2 meet 429s, wait their Retry-After and
    all arrive once."""
    page = await open_page(browser, site.url("/limited", flushAt=2, flushInterval=100))
    await sent_everything(browser, page)
    gate.requests.clear()
    state = gate.app.state  # the collector's App, behind the gate
    unlimited, state.rate_limits = state.rate_limits, RateLimits(2.0, 2)
    try:
        for n in range(8):
            await browser.call("eval", page=page, expression=f"cdp.track('Limited', {{n: {n}}})")
        await sent_everything(browser, page)
    finally:
        state.rate_limits = unlimited
    statuses = Counter(status for status, _ in gate.requests)
    assert statuses[429] >= 1 and set(statuses) == {200, 429}, statuses
    delivered = gate.delivered()
    assert sum(delivered.values()) == 8 and set(delivered.values()) == {1}, delivered


async def test_a_tab_closed_while_the_collector_is_down_is_sent_by_the_next_tab(
    browser: Chromium, site: Site, collector: Server, gate: Gate
) -> None:
    context = await browser.call("context")
    first = await open_page(browser, site.url("/news"), context)
    await sent_everything(browser, first)
    await collector.stop()
    try:
        await browser.call("eval", page=first, expression="cdp.track('Shared')")
        await until_true(browser, first, "cdp.stats().attempts >= 1")
        stored = await browser.call("eval", page=first, expression=STORED_QUEUE)
        await browser.call("close", page=first)  # its beacon is refused too
        later = await open_page(browser, site.url("/news/2"), context)  # a new tab
        await until_true(browser, later, "cdp.stats().queued === 2")  # adopted + its own view
    finally:
        await collector.start()
    await sent_everything(browser, later)
    assert gate.delivered()[stored[0]] == 1
    assert await browser.call("eval", page=later, expression=STORED_QUEUE) == []


async def test_a_send_without_an_answer_times_out_and_is_retried(
    browser: Chromium, site: Site
) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the browser gives up and closes

    port = free_port()
    silent = await asyncio.start_server(never_answer, "127.0.0.1", port)
    try:
        page = await open_page(
            browser, site.url("/slow", host=f"http://127.0.0.1:{port}", timeout=300)
        )
        await until_true(browser, page, "cdp.stats().attempts >= 3")
        assert await browser.call("eval", page=page, expression="cdp.stats().queued") == 1
        await browser.call("close", page=page)
    finally:
        silent.close()


async def test_a_page_of_an_origin_the_source_does_not_list_is_refused(
    browser: Chromium, site: Site, collector: Server, gate: Gate
) -> None:
    other_origin = site.url("/elsewhere").replace("localhost", "127.0.0.1")
    page = await open_page(browser, other_origin)
    await until_true(browser, page, "cdp.stats().attempts >= 1")
    assert await browser.call("eval", page=page, expression="cdp.stats().queued") == 1
    queued = await browser.call("eval", page=page, expression=STORED_QUEUE)
    answers = {status for status, ids in gate.requests if set(ids) & set(queued)}
    assert len(queued) == 1 and answers == {403}
    # Last in this module: its tab keeps retrying (the 403 is unreadable to the page, like a
    # network error) until the module's browser closes.
