"""The profile API (``/v1/profiles``, ``/metrics``) on the real Postgres server.

Events go straight into the database through the resolver's ``apply_with_retry``; the app
runs in this process (memory bus) and is driven through httpx's ASGI transport. The
database is shared by the whole session, so every test uses its own identifiers.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.api.profiles import ProfileOut
from cdp_stream.app import Runtime, create_app
from cdp_stream.bus.kafka import KafkaBus
from cdp_stream.identity import Identifier, IdentityRules
from cdp_stream.profiles import repository
from cdp_stream.profiles.credentials import ensure_token
from cdp_stream.profiles.models import profile_update_outbox
from cdp_stream.resolver.consumer import apply_with_retry, relay_outbox
from cdp_stream.settings import Settings
from tests import support
from tests.support import eventually, stored_event, uid

RULES = IdentityRules.from_settings(Settings())
API_TOKEN = "tok_api_" + uuid.uuid4().hex
READ_TOKEN = "tok_read_" + uuid.uuid4().hex  # profiles:read only
OTHER_TOKEN = "tok_other_" + uuid.uuid4().hex  # neither profiles:read nor profiles:write
AUTH = {"authorization": f"Bearer {API_TOKEN}"}
READ_ONLY = {"authorization": f"Bearer {READ_TOKEN}"}
SOURCE = "src_api_test"


@pytest.fixture(scope="module")
async def runtime(pg_url: str) -> AsyncIterator[Runtime]:
    settings = Settings(
        database_url=pg_url,
        kafka_bootstrap=None,  # the in-process memory bus
        bootstrap_write_key="wk_api_" + uuid.uuid4().hex,
        bootstrap_api_token=API_TOKEN,
    )
    rt = await Runtime.start(settings, "api-test")
    async with rt.engine.begin() as conn:
        await ensure_token(
            conn, f"tok_r_{uuid.uuid4().hex[:8]}", "read", READ_TOKEN, ("profiles:read",)
        )
        await ensure_token(
            conn, f"tok_o_{uuid.uuid4().hex[:8]}", "other", OTHER_TOKEN, ("audiences:write",)
        )
    yield rt
    await rt.stop()


@pytest.fixture(scope="module")
async def api(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime, ["api"]))
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
        yield client


@pytest.fixture(scope="module")
def db(runtime: Runtime) -> AsyncEngine:
    return runtime.engine


# --- helpers ---------------------------------------------------------------------------


def ev(type_: str, ts: str, **fields: Any) -> dict[str, Any]:
    return stored_event(SOURCE, type_, ts, **fields)


async def put(db: AsyncEngine, *events: dict[str, Any]) -> None:
    """One resolver batch, committed."""
    await apply_with_retry(db, list(events), RULES)


async def get(api: httpx.AsyncClient, path: str, **params: Any) -> Any:
    r = await api.get(path, headers=AUTH, params=params)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


async def timeline(api: httpx.AsyncClient, ref: str, **params: Any) -> list[dict[str, Any]]:
    """Every event of the profile, following ``next`` to the end."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        page = await get(
            api, f"/v1/profiles/{ref}/events", **params, **({"cursor": cursor} if cursor else {})
        )
        items += page["items"]
        cursor = page["next"]
        if cursor is None:
            return items
    raise AssertionError("the timeline never ended")


def message_ids(items: list[dict[str, Any]]) -> list[str]:
    return [i["message_id"] for i in items]


def idents(profile: dict[str, Any]) -> set[tuple[str, str]]:
    return {(i["type"], i["value"]) for i in profile["identities"]}


async def counters(api: httpx.AsyncClient) -> dict[str, float]:
    """The process's metrics (the resolver's batches run in this process here)."""
    r = await api.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = support.parse(r.text)
    return {name: support.value(samples, name) for name, _ in samples}


# --- lookup ----------------------------------------------------------------------------


async def test_lookup_by_id_and_every_identifier(api: httpx.AsyncClient, db: AsyncEngine) -> None:
    user, anon, zd = uid("u"), uid("a"), uid("zd")
    email = f"{uid('ada')}@example.com"
    await put(
        db,
        ev(
            "identify",
            "2024-01-01T00:00:00Z",
            userId=user,
            anonymousId=anon,
            traits={"email": email, "name": "Ada"},
            context={"externalIds": [{"id": zd, "type": "zendesk"}]},
        ),
    )
    by_user = await get(api, f"/v1/profiles/user_id:{user}")
    pid = by_user["id"]
    assert idents(by_user) == {
        ("user_id", user),
        ("anonymous_id", anon),
        ("email", email),
        ("zendesk", zd),
    }
    assert by_user["traits"] == {"email": email, "name": "Ada"}
    assert by_user["computed"]["event_count"] == 1
    assert by_user["merged_from"] == []
    refs = [
        pid,
        pid.upper(),
        f"anonymous_id:{anon}",
        f"email:{email}",
        f"email:  {email.upper()}  ",  # normalized like ingestion: trimmed, lower-cased
        f"EMAIL:{email.title()}",
        f"zendesk:{zd}",
        f"Zendesk:{zd}",
    ]
    for ref in refs:
        assert (await get(api, f"/v1/profiles/{ref}"))["id"] == pid, ref


async def test_lookup_answers_the_json_profile_out_gives(
    api: httpx.AsyncClient, db: AsyncEngine
) -> None:
    """The lookup encodes its answer itself (orjson, bypassing the response model): the
    bytes are those of ``ProfileOut``, identities sorted, merged ids sorted, by any ref."""
    user, a, b, c = uid("u"), uid("a"), uid("b"), uid("c")
    traits = {"name": "Zoë", "score": 0.1, "big": 1e16, "nested": {"k": [1, "x", None]}}
    await put(db, ev("page", "2024-02-01T00:00:00Z", anonymousId=a))
    await put(db, ev("page", "2024-02-02T00:00:00Z", anonymousId=b))
    await put(
        db, ev("identify", "2024-02-03T00:00:00.5Z", userId=user, anonymousId=a, traits=traits)
    )
    await put(db, ev("page", "2024-02-03T00:00:00Z", anonymousId=c))
    for anon in (b, c):  # two merges into the first profile
        await put(db, ev("track", "2024-02-04T00:00:00Z", event="E", userId=user, anonymousId=anon))
    r = await api.get(f"/v1/profiles/user_id:{user}", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.content == ProfileOut.model_validate_json(r.content).model_dump_json().encode()
    profile = r.json()
    assert list(profile) == list(ProfileOut.model_fields)
    assert profile["traits"] == traits
    assert idents(profile) == {("user_id", user), *(("anonymous_id", x) for x in (a, b, c))}
    assert profile["identities"] == sorted(
        profile["identities"], key=lambda i: (i["type"], i["value"])
    )
    assert len(profile["merged_from"]) == 2
    assert profile["merged_from"] == sorted(profile["merged_from"])
    assert profile["created_at"].endswith("Z") and profile["updated_at"].endswith("Z")
    for ref in (f"anonymous_id:{a}", profile["id"], *profile["merged_from"]):
        again = await api.get(f"/v1/profiles/{ref}", headers=AUTH)
        assert again.content == r.content, ref


@pytest.mark.parametrize(
    "ref",
    [
        str(uuid.uuid4()),
        "user_id:nobody-" + uuid.uuid4().hex,
        "email:nobody-" + uuid.uuid4().hex + "@example.com",
        "zendesk:nobody",
        "anonymous_id:undefined",  # a blocked value never names a profile
        "not-a-ref",
    ],
)
async def test_unknown_profile_is_404(api: httpx.AsyncClient, ref: str) -> None:
    for path in ("", "/events", "/identities", "/merges"):
        r = await api.get(f"/v1/profiles/{ref}{path}", headers=AUTH)
        assert r.status_code == 404, (path, r.text)
    r = await api.post(f"/v1/profiles/{ref}/unmerge", headers=AUTH)
    assert r.status_code == 404


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer"},
        {"authorization": "Bearer wrong-" + uuid.uuid4().hex},
        {"authorization": f"Basic {API_TOKEN}"},
        {"authorization": API_TOKEN},
    ],
    ids=["none", "empty", "wrong", "basic", "no-scheme"],
)
async def test_bad_token_is_401(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    for path in ("", "/events", "/identities", "/merges"):
        r = await api.get(f"/v1/profiles/user_id:x{path}", headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    r = await api.post("/v1/profiles/user_id:x/unmerge", headers=headers)
    assert r.status_code == 401


async def test_token_without_read_scope_is_403(api: httpx.AsyncClient, db: AsyncEngine) -> None:
    user = uid("u")
    await put(db, ev("identify", "2024-01-01T00:00:00Z", userId=user))
    other = {"authorization": f"Bearer {OTHER_TOKEN}"}
    for path in ("", "/events", "/identities", "/merges"):
        r = await api.get(f"/v1/profiles/user_id:{user}{path}", headers=other)
        assert r.status_code == 403, (path, r.text)
        assert "profiles:read" in r.json()["detail"]
        r = await api.get(f"/v1/profiles/user_id:{user}{path}", headers=READ_ONLY)
        assert r.status_code == 200, (path, r.text)


# --- merges and refusals ---------------------------------------------------------------


async def test_merged_profile(api: httpx.AsyncClient, db: AsyncEngine) -> None:
    anon, user = uid("a"), uid("u")
    email = f"{uid('grace')}@example.com"
    seen = ev("page", "2024-02-01T00:00:00Z", anonymousId=anon, channel="web")
    signup = ev(
        "track",
        "2024-02-02T00:00:00Z",
        event="Signed Up",
        anonymousId="undefined",  # blocked: links nothing
        context={"traits": {"email": email}},
    )
    await put(db, seen)
    await put(db, signup)
    anon_profile = await get(api, f"/v1/profiles/anonymous_id:{anon}")
    email_profile = await get(api, f"/v1/profiles/email:{email}")
    assert anon_profile["id"] != email_profile["id"]
    assert idents(email_profile) == {("email", email)}

    login = ev(
        "identify", "2024-02-03T00:00:00Z", userId=user, anonymousId=anon, traits={"email": email}
    )
    await put(db, login)
    profile = await get(api, f"/v1/profiles/user_id:{user}")
    assert profile["id"] == anon_profile["id"]  # the oldest profile is the canonical one
    assert profile["merged_from"] == [email_profile["id"]]
    assert idents(profile) == {("user_id", user), ("anonymous_id", anon), ("email", email)}
    assert profile["computed"]["event_count"] == 3
    for ref in (f"anonymous_id:{anon}", f"email:{email}", email_profile["id"]):
        assert await get(api, f"/v1/profiles/{ref}") == profile, ref

    # the merged-away id works everywhere a ref does
    merges = await get(api, f"/v1/profiles/{email_profile['id']}/merges")
    assert merges == await get(api, f"/v1/profiles/user_id:{user}/merges")
    assert merges["refusals"] == []
    [merge] = merges["merges"]
    assert merge["canonical_id"] == anon_profile["id"]
    assert merge["merged_id"] == email_profile["id"]
    assert (merge["source_id"], merge["message_id"]) == (SOURCE, login["messageId"])
    assert merge["undone_at"] is None
    assert isinstance(merge["id"], int) and merge["created_at"]

    identities = await get(api, f"/v1/profiles/{email_profile['id']}/identities")
    assert [(i["type"], i["value"]) for i in identities] == [
        ("anonymous_id", anon),
        ("email", email),
        ("user_id", user),
    ]
    assert all(i["created_at"] for i in identities)

    events = await timeline(api, email_profile["id"])
    assert message_ids(events) == [login["messageId"], signup["messageId"], seen["messageId"]]


async def test_refused_merge(api: httpx.AsyncClient, db: AsyncEngine) -> None:
    u1, u2, device = uid("u1"), uid("u2"), uid("shared")
    first = ev("identify", "2024-03-01T00:00:00Z", userId=u1, anonymousId=device)
    second = ev("identify", "2024-03-02T00:00:00Z", userId=u2, anonymousId=device)
    await put(db, first)
    await put(db, second)
    p1 = await get(api, f"/v1/profiles/user_id:{u1}")
    p2 = await get(api, f"/v1/profiles/user_id:{u2}")
    assert p1["id"] != p2["id"]
    assert idents(p1) == {("user_id", u1), ("anonymous_id", device)}
    assert idents(p2) == {("user_id", u2)}
    assert (await get(api, f"/v1/profiles/anonymous_id:{device}"))["id"] == p1["id"]
    assert p1["merged_from"] == p2["merged_from"] == []

    merges = await get(api, f"/v1/profiles/user_id:{u2}/merges")
    assert merges["merges"] == []
    [refusal] = merges["refusals"]
    assert (refusal["type"], refusal["value"]) == ("anonymous_id", device)
    assert refusal["other_profile_id"] == p1["id"]
    assert "at most 1" in refusal["reason"]
    assert (refusal["source_id"], refusal["message_id"]) == (SOURCE, second["messageId"])
    assert (await get(api, f"/v1/profiles/user_id:{u1}/merges")) == {
        "merges": [],
        "refusals": [],
        "splits": [],
    }

    assert (await counters(api))["cdp_identity_refusals_total"] >= 1
    text = (await api.get("/metrics")).text
    assert "# TYPE cdp_profile_merges_total counter" in text
    assert "# TYPE cdp_identity_refusals_total counter" in text


async def test_metrics_count_merges_and_refusals(api: httpx.AsyncClient, db: AsyncEngine) -> None:
    before = await counters(api)
    a, b, user, other = uid("a"), uid("b"), uid("u"), uid("u")
    await put(db, ev("page", "2024-03-01T00:00:00Z", anonymousId=a))
    await put(db, ev("page", "2024-03-01T00:00:01Z", anonymousId=b))
    await put(db, ev("identify", "2024-03-01T00:00:02Z", userId=user, anonymousId=a))
    await put(db, ev("identify", "2024-03-01T00:00:03Z", userId=user, anonymousId=b))
    await put(db, ev("identify", "2024-03-01T00:00:04Z", userId=other, anonymousId=a))
    after = await counters(api)
    assert after["cdp_profile_merges_total"] - before["cdp_profile_merges_total"] == 1
    assert after["cdp_identity_refusals_total"] - before["cdp_identity_refusals_total"] == 1
    assert after["cdp_profile_unmerges_total"] == before["cdp_profile_unmerges_total"]


# --- timeline --------------------------------------------------------------------------


async def test_timeline_pages_newest_first(api: httpx.AsyncClient, db: AsyncEngine) -> None:
    user = uid("u")
    kinds = [
        ("identify", "web"),
        ("track", "web"),
        ("page", "web"),
        ("track", "mobile"),
        ("screen", "mobile"),
        ("track", "server"),
        ("page", "web"),
    ]
    sent = [
        ev(kind, f"2024-04-0{n + 1}T12:00:00.{n:06d}Z", userId=user, channel=channel, event="E")
        for n, (kind, channel) in enumerate(kinds)
    ]
    await put(db, *sent[4:])  # arrival order does not matter
    await put(db, *sent[:4])
    newest_first = [e["messageId"] for e in reversed(sent)]
    ref = f"user_id:{user}"

    sizes, seen, cursor = [], [], None
    while True:
        page = await get(
            api, f"/v1/profiles/{ref}/events", limit=3, **({"cursor": cursor} if cursor else {})
        )
        sizes.append(len(page["items"]))
        seen += message_ids(page["items"])
        cursor = page["next"]
        if cursor is None:
            break
    assert sizes == [3, 3, 1]
    assert seen == newest_first

    everything = await get(api, f"/v1/profiles/{ref}/events")
    assert everything["next"] is None
    assert message_ids(everything["items"]) == newest_first
    first = everything["items"][0]
    assert first["type"] == "page" and first["channel"] == "web" and first["event"] == "E"
    assert first["source_id"] == SOURCE
    assert first["payload"] == sent[-1]
    assert first["timestamp"].startswith("2024-04-07T12:00:00.000006")

    assert await get(api, f"/v1/profiles/{ref}/events", limit=7) == everything
    assert message_ids(await timeline(api, ref, limit=1)) == newest_first

    def expect(pred: Any) -> list[str]:
        return [e["messageId"] for e in reversed(sent) if pred(e)]

    assert message_ids(await timeline(api, ref, type="track", limit=2)) == expect(
        lambda e: e["type"] == "track"
    )
    assert message_ids(await timeline(api, ref, channel="mobile")) == expect(
        lambda e: e["channel"] == "mobile"
    )
    assert message_ids(await timeline(api, ref, type="page", channel="web", limit=1)) == expect(
        lambda e: e["type"] == "page" and e["channel"] == "web"
    )
    assert message_ids(await timeline(api, ref, type="alias")) == []
    since = "2024-04-05T12:00:00.000004Z"  # inclusive
    assert message_ids(await timeline(api, ref, since=since, limit=2)) == newest_first[:3]
    assert (
        message_ids(await timeline(api, ref, since="2024-04-05T14:00:00+02:00"))
        == (newest_first[:3])
    )
    assert message_ids(await timeline(api, ref, since="2025-01-01T00:00:00Z")) == []


async def test_timeline_pages_through_equal_timestamps(
    api: httpx.AsyncClient, db: AsyncEngine
) -> None:
    user = uid("u")
    sent = [ev("track", "2024-04-01T00:00:00Z", userId=user, event=f"e{n}") for n in range(5)]
    await put(db, *sent)
    ids = message_ids(await timeline(api, f"user_id:{user}", limit=2))
    assert sorted(ids) == sorted(e["messageId"] for e in sent)
    assert len(ids) == 5


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor",
        "%%%",
        base64.urlsafe_b64encode(b"yesterday|3").decode(),
        base64.urlsafe_b64encode(b"2024-01-01T00:00:00+00:00|x").decode(),
        base64.urlsafe_b64encode(b"2024-01-01T00:00:00+00:00").decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        base64.urlsafe_b64encode(b"2024-01-01T00:00:00+00:00|99999999999999999999").decode(),
        base64.urlsafe_b64encode(b"0001-01-01T00:00:00+14:00|1").decode(),
    ],
    ids=[
        "garbage",
        "not-base64",
        "bad-date",
        "bad-id",
        "no-id",
        "not-utf8",
        "id-overflows-bigint",
        "date-before-year-1",
    ],
)
async def test_timeline_invalid_cursor_is_400(
    api: httpx.AsyncClient, db: AsyncEngine, cursor: str
) -> None:
    user = uid("u")
    await put(db, ev("track", "2024-01-01T00:00:00Z", userId=user))
    r = await api.get(
        f"/v1/profiles/user_id:{user}/events", headers=AUTH, params={"cursor": cursor}
    )
    assert r.status_code == 400, r.text


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": -1},
        {"limit": 1001},
        {"limit": "x"},
        {"since": "not-a-date"},
        {"since": "0001-01-01T00:00:00+14:00"},  # before year 1 in UTC
    ],
    ids=["limit-0", "limit-negative", "limit-too-big", "limit-not-int", "since-bad", "since-y0"],
)
async def test_timeline_invalid_params_are_422(
    api: httpx.AsyncClient, db: AsyncEngine, params: dict[str, Any]
) -> None:
    user = uid("u")
    await put(db, ev("track", "2024-01-01T00:00:00Z", userId=user))
    r = await api.get(f"/v1/profiles/user_id:{user}/events", headers=AUTH, params=params)
    assert r.status_code == 422, r.text


# --- unmerge ---------------------------------------------------------------------------


async def snapshot(api: httpx.AsyncClient, ref: str) -> dict[str, Any]:
    profile = await get(api, f"/v1/profiles/{ref}")
    return {
        "id": profile["id"],
        "identities": idents(profile),
        "traits": profile["traits"],
        "computed": profile["computed"],
        "events": message_ids(await timeline(api, profile["id"])),
    }


async def merge_two(
    api: httpx.AsyncClient, db: AsyncEngine, *, new_user_id: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    """An anonymous profile and an email profile, then an identify that merges them
    (carrying a user id neither had when ``new_user_id``). Returns the two sides as they
    were before the merge, the merging event, and a ref to the merged profile."""
    anon, user = uid("a"), uid("u")
    email = f"{uid('lin')}@example.com"
    await put(
        db,
        ev(
            "page",
            "2024-06-01T00:00:00Z",
            anonymousId=anon,
            channel="web",
            context={"traits": {"plan": "free", "city": "Oslo"}},
        ),
    )
    second = {"userId": user} if not new_user_id else {"anonymousId": "null"}
    await put(
        db,
        ev(
            "identify",
            "2024-06-02T00:00:00Z",
            traits={"email": email, "plan": "pro"},
            channel="mobile",
            **second,
        ),
    )
    anon_side = await snapshot(api, f"anonymous_id:{anon}")
    email_side = await snapshot(api, f"email:{email}")
    merging = ev(
        "identify",
        "2024-06-03T00:00:00Z",
        userId=user,
        anonymousId=anon,
        traits={"email": email, "name": "Lin"},
    )
    await put(db, merging)
    merged = await get(api, f"/v1/profiles/anonymous_id:{anon}")
    assert merged["merged_from"] == [email_side["id"]]
    return anon_side, email_side, merging, f"email:{email}"


async def test_unmerge_needs_write_scope(api: httpx.AsyncClient, db: AsyncEngine) -> None:
    _, _, _, ref = await merge_two(api, db, new_user_id=False)
    r = await api.post(f"/v1/profiles/{ref}/unmerge", headers=READ_ONLY)
    assert r.status_code == 403
    assert "profiles:write" in r.json()["detail"]
    r = await api.post(
        f"/v1/profiles/{ref}/unmerge", headers={"authorization": f"Bearer {OTHER_TOKEN}"}
    )
    assert r.status_code == 403
    assert len((await get(api, f"/v1/profiles/{ref}"))["merged_from"]) == 1  # nothing undone


@pytest.mark.parametrize("new_user_id", [False, True], ids=["known-ids", "new-user-id"])
async def test_unmerge_restores_each_side(
    api: httpx.AsyncClient, db: AsyncEngine, new_user_id: bool
) -> None:
    """Each side gets back its identities, events and traits; the merging event lands on
    one side, together with the identifiers it brought and its traits."""
    anon_side, email_side, merging, ref = await merge_two(api, db, new_user_id=new_user_id)
    merged = await get(api, f"/v1/profiles/{ref}")
    r = await api.post(f"/v1/profiles/{ref}/unmerge", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    kept, restored = body["profile"], body["restored"]
    assert kept["id"] == merged["id"] == anon_side["id"]
    assert restored["id"] == email_side["id"]
    assert kept["merged_from"] == restored["merged_from"] == []
    assert body["undone_merge"] == (await get(api, f"/v1/profiles/{ref}/merges"))["merges"][0]["id"]

    user = ("user_id", merging["userId"])
    after = {p["id"]: p for p in (kept, restored)}
    timelines = {pid: message_ids(await timeline(api, pid)) for pid in after}
    [holder] = [pid for pid, ids in timelines.items() if merging["messageId"] in ids]
    for side in (anon_side, email_side):
        pid = side["id"]
        extra_events = [merging["messageId"]] if pid == holder else []
        assert timelines[pid] == extra_events + side["events"], pid
        brought = {user} - anon_side["identities"] - email_side["identities"]
        extra_ids = brought if pid == holder else set()
        assert idents(after[pid]) == side["identities"] | extra_ids, (
            f"{'kept' if pid == kept['id'] else 'restored'} side {pid}: identities "
            f"{idents(after[pid])} (had {side['identities']} before the merge; the merging "
            f"event, bringing {brought}, is on {'this' if pid == holder else 'the other'} side)"
        )
        expected_traits = dict(side["traits"])
        if pid == holder:
            expected_traits.update(merging["traits"])
        assert after[pid]["traits"] == dict(sorted(expected_traits.items())), pid
        count = side["computed"]["event_count"] + (1 if pid == holder else 0)
        assert after[pid]["computed"]["event_count"] == count, pid
        if pid != holder:
            assert after[pid]["computed"] == side["computed"], pid
        for ident_type, value in side["identities"]:
            assert (await get(api, f"/v1/profiles/{ident_type}:{value}"))["id"] == pid
    # the merging event's new user id stays with the event that brought it
    owner = email_side["id"] if user in email_side["identities"] else holder
    assert (await get(api, f"/v1/profiles/{user[0]}:{user[1]}"))["id"] == owner
    # the responses are the profiles as the API now shows them
    assert await get(api, f"/v1/profiles/{kept['id']}") == kept
    assert await get(api, f"/v1/profiles/{restored['id']}") == restored


async def test_unmerge_bookkeeping(api: httpx.AsyncClient, db: AsyncEngine) -> None:
    anon_side, email_side, merging, ref = await merge_two(api, db, new_user_id=False)
    before = await counters(api)
    r = await api.post(f"/v1/profiles/{ref}/unmerge", headers=AUTH)
    assert r.status_code == 200, r.text
    undone = r.json()["undone_merge"]

    for pid in (anon_side["id"], email_side["id"]):
        r = await api.post(f"/v1/profiles/{pid}/unmerge", headers=AUTH)
        assert r.status_code == 409, r.text

    merges = await get(api, f"/v1/profiles/{anon_side['id']}/merges")
    [merge] = merges["merges"]
    assert merge["id"] == undone
    assert (merge["canonical_id"], merge["merged_id"]) == (anon_side["id"], email_side["id"])
    assert merge["message_id"] == merging["messageId"]
    assert merge["undone_at"] is not None
    assert merge["undone_at"] >= merge["created_at"]

    after = await counters(api)
    assert after["cdp_profile_unmerges_total"] == before["cdp_profile_unmerges_total"] + 1
    assert after["cdp_profile_merges_total"] == before["cdp_profile_merges_total"]  # happened


async def test_unmerge_undoes_the_last_merge_only(api: httpx.AsyncClient, db: AsyncEngine) -> None:
    a, b, c, user = uid("a"), uid("b"), uid("c"), uid("u")
    for n, anon in enumerate((a, b, c)):
        await put(db, ev("page", f"2024-07-0{n + 1}T00:00:00Z", anonymousId=anon))
    await put(db, ev("identify", "2024-07-04T00:00:00Z", userId=user, anonymousId=a))
    await put(db, ev("track", "2024-07-05T00:00:00Z", userId=user, anonymousId=b))
    await put(db, ev("track", "2024-07-06T00:00:00Z", userId=user, anonymousId=c))
    pa = await get(api, f"/v1/profiles/anonymous_id:{a}")
    pb = await get(api, f"/v1/profiles/anonymous_id:{b}")
    pc = await get(api, f"/v1/profiles/anonymous_id:{c}")
    assert pa["id"] == pb["id"] == pc["id"]
    assert len(pa["merged_from"]) == 2

    r = await api.post(f"/v1/profiles/user_id:{user}/unmerge", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["restored"]["identities"] == [{"type": "anonymous_id", "value": c}]
    assert len(r.json()["profile"]["merged_from"]) == 1
    assert (await get(api, f"/v1/profiles/anonymous_id:{b}"))["id"] == pa["id"]

    r = await api.post(f"/v1/profiles/user_id:{user}/unmerge", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["restored"]["identities"] == [{"type": "anonymous_id", "value": b}]
    assert r.json()["profile"]["merged_from"] == []
    r = await api.post(f"/v1/profiles/user_id:{user}/unmerge", headers=AUTH)
    assert r.status_code == 409
    merges = await get(api, f"/v1/profiles/user_id:{user}/merges")
    assert len(merges["merges"]) == 2
    assert all(m["undone_at"] for m in merges["merges"])


# --- what the console reads --------------------------------------------------------------


async def test_traits_say_when_and_by_which_source(api: httpx.AsyncClient, db: AsyncEngine) -> None:
    user = uid("u")
    older = stored_event("src_crm", "identify", "2024-05-01T00:00:00Z", userId=user)
    older["traits"] = {"plan": "free", "name": "Ada"}
    newer = stored_event("src_web", "identify", "2024-05-02T00:00:00Z", userId=user)
    newer |= {"traits": {"plan": "pro"}, "context": {"traits_set_once": {"first": "x"}}}
    await put(db, newer)
    await put(db, older)  # late: it sets nothing the newer one set
    traits = await get(api, f"/v1/profiles/user_id:{user}/traits")
    assert traits == [
        {"name": "first", "value": "x", "set_at": "2024-05-02T00:00:00Z", "set_once": True,
         "source_id": "src_web"},
        {"name": "name", "value": "Ada", "set_at": "2024-05-01T00:00:00Z", "set_once": False,
         "source_id": "src_crm"},
        {"name": "plan", "value": "pro", "set_at": "2024-05-02T00:00:00Z", "set_once": False,
         "source_id": "src_web"},
    ]  # fmt: skip


async def test_graph_groups_identifiers_by_the_profile_that_brought_them(
    api: httpx.AsyncClient, db: AsyncEngine
) -> None:
    anon, user, other = uid("a"), uid("u"), uid("u")
    await put(db, ev("page", "2024-06-01T00:00:00Z", anonymousId=anon))
    await put(
        db, ev("identify", "2024-06-02T00:00:00Z", userId=user, traits={"email": f"{user}@x.io"})
    )
    login = ev("identify", "2024-06-03T00:00:00Z", userId=user, anonymousId=anon)
    await put(db, login)
    await put(db, ev("identify", "2024-06-04T00:00:00Z", userId=other, anonymousId=anon))
    graph = await get(api, f"/v1/profiles/email:{user}@x.io/graph")
    profile = await get(api, f"/v1/profiles/user_id:{user}")
    assert graph["canonical_id"] == profile["id"]
    atoms = {a["id"]: {(i["type"], i["value"]) for i in a["identities"]} for a in graph["atoms"]}
    assert graph["atoms"][0]["id"] == profile["id"]
    assert sorted(atoms.values(), key=len) == [
        {("anonymous_id", anon)},
        {("user_id", user), ("email", f"{user}@x.io")},
    ]
    [merge] = graph["merges"]
    assert merge["message_id"] == login["messageId"] and set(atoms) == {
        merge["canonical_id"],
        merge["merged_id"],
    }
    assert graph["refusals"] == []  # refused links show on the profile that was refused
    [refusal] = (await get(api, f"/v1/profiles/user_id:{other}/graph"))["refusals"]
    assert (refusal["type"], refusal["value"]) == ("anonymous_id", anon)
    assert refusal["other_profile_id"] == profile["id"]


async def test_search_lists_identifiers_by_prefix(api: httpx.AsyncClient, db: AsyncEngine) -> None:
    stem = uid("typeahead")
    for n in range(3):
        await put(db, ev("identify", "2024-07-01T00:00:00Z", userId=f"{stem}-{n}",
                         traits={"email": f"{stem}.{n}@Example.com"}))  # fmt: skip
    found = await get(api, "/v1/profiles", starts_with=f"email:{stem.upper()}.", limit=2)
    assert [f["value"] for f in found] == [f"{stem}.0@example.com", f"{stem}.1@example.com"]
    owner = await get(api, f"/v1/profiles/user_id:{stem}-0")
    assert found[0] == {
        "type": "email",
        "value": f"{stem}.0@example.com",
        "profile_id": owner["id"],
    }
    last = await get(api, f"/v1/profiles/user_id:{stem}-2")
    assert await get(api, "/v1/profiles", starts_with=f"user_id:{stem}-2") == [
        {"type": "user_id", "value": f"{stem}-2", "profile_id": last["id"]}
    ]
    assert await get(api, "/v1/profiles", starts_with=f"email:{uid('nobody')}") == []
    r = await api.get("/v1/profiles", params={"starts_with": "email:"}, headers=AUTH)
    assert r.status_code == 422


async def test_consent_and_whether_the_dmp_counts_the_person(
    api: httpx.AsyncClient, db: AsyncEngine
) -> None:
    user = uid("u")
    await put(db, ev("identify", "2024-08-01T00:00:00Z", userId=user))
    ref = f"/v1/profiles/user_id:{user}/consent"
    assert await get(api, ref) == {
        "trait": None, "context": None, "context_at": None, "opted_out": False,
    }  # fmt: skip
    choice = {"categoryPreferences": {"marketing": False}}
    await put(db, ev("track", "2024-08-02T00:00:00Z", event="Consent", userId=user,
                     context={"consent": choice}))  # fmt: skip
    assert await get(api, ref) == {
        "trait": None, "context": choice, "context_at": "2024-08-02T00:00:00Z", "opted_out": True,
    }  # fmt: skip


async def test_an_unmerge_sticks_until_its_split_is_removed(
    api: httpx.AsyncClient, db: AsyncEngine
) -> None:
    """After an unmerge, the event that linked the two profiles arriving again is refused
    (shown under ``refusals`` with the split under ``splits`` in ``/merges``); removing
    the split needs ``profiles:write``, and then the next such event merges them."""
    anon_side, email_side, merging, ref = await merge_two(api, db, new_user_id=False)
    r = await api.post(f"/v1/profiles/{ref}/unmerge", headers=AUTH)
    assert r.status_code == 200, r.text
    kept, restored = anon_side["id"], email_side["id"]
    again = {k: v for k, v in merging.items() if k not in ("messageId", "timestamp")}
    await put(db, ev("identify", "2024-06-04T00:00:00Z", **again))
    assert (await get(api, f"/v1/profiles/{kept}"))["merged_from"] == []

    merges = await get(api, f"/v1/profiles/{kept}/merges")
    [split] = merges["splits"]
    assert (split["profile_id"], split["other_id"]) == (kept, restored)
    assert split["merge_id"] == r.json()["undone_merge"]
    refused = merges["refusals"] + (await get(api, f"/v1/profiles/{restored}/merges"))["refusals"]
    assert refused and all("split" in x["reason"] for x in refused)
    assert {x["other_profile_id"] for x in refused} <= {kept, restored}

    path = f"/v1/profiles/{kept}/splits/{ref}"
    assert (await api.delete(path, headers=READ_ONLY)).status_code == 403
    assert (await api.delete(path, headers=AUTH)).status_code == 204
    assert (await api.delete(path, headers=AUTH)).status_code == 404  # not split any more
    assert (await get(api, f"/v1/profiles/{kept}/merges"))["splits"] == []
    await put(db, ev("identify", "2024-06-05T00:00:00Z", **again))
    assert (await get(api, f"/v1/profiles/{kept}"))["merged_from"] == [restored]


# --- the updates a request writes, and only those, published by it ---------------------


@pytest.fixture
async def on_kafka(kafka_bootstrap: str, pg_url: str) -> AsyncIterator[Runtime]:
    """A runtime on the real broker, with topics of its own."""
    settings = Settings(
        database_url=pg_url,
        kafka_bootstrap=kafka_bootstrap,
        bootstrap_api_token=API_TOKEN,
        topic_partitions=1,
        topic_namespace=f"test-{uid()}.",
    )
    rt = await Runtime.start(settings, "api-publish-test")
    yield rt
    await rt.stop()


async def published(rt: Runtime, until: Callable[[dict[bytes, list[bytes]]], bool]) -> Any:
    """The profile updates on the runtime's topic by key, read by a fresh group until
    ``until`` holds (or a few seconds pass)."""
    consumer = rt.bus.consumer(f"test-publish-{uid()}", [rt.settings.topics.profile_updates])
    await consumer.start()
    seen: dict[bytes, list[bytes]] = {}

    async def probe() -> bool:
        for m in await consumer.getmany(1000, 200):
            seen.setdefault(m.key or b"", []).append(m.value)
        return until(seen)

    try:
        await eventually(probe, within_s=10)
    finally:
        await consumer.stop()
    return seen


async def outbox_keys(db: AsyncEngine, keys: list[str]) -> list[str]:
    async with db.connect() as conn:
        rows = await conn.execute(
            select(profile_update_outbox.c.key).where(profile_update_outbox.c.key.in_(keys))
        )
        return sorted(rows.scalars())


async def someone(db: AsyncEngine) -> str:
    """A person whose batch left its updates in the outbox (no resolver relays here)."""
    user = uid("pub")
    await put(db, ev("identify", "2024-06-01T00:00:00Z", userId=user, traits={"plan": "pro"}))
    async with db.connect() as conn:
        pid = await repository.profile_for_identifier(conn, Identifier("user_id", user))
    assert pid is not None
    return str(pid)


async def test_erasure_publishes_its_tombstone_and_nothing_else(on_kafka: Runtime) -> None:
    """DELETE publishes the tombstone it wrote; the updates of resolver batches waiting in
    the outbox (another person's, and the erased person's own) are the resolvers'."""
    db = on_kafka.engine
    erased, other = await someone(db), await someone(db)
    assert await outbox_keys(db, [erased, other]) == sorted([erased, other])
    transport = httpx.ASGITransport(app=create_app(on_kafka, ["api"]))
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
        r = await client.delete(f"/v1/profiles/{erased}", headers=AUTH)
    assert r.status_code == 204, r.text
    seen = await published(on_kafka, lambda s: erased.encode() in s)
    assert [orjson.loads(v)["type"] for v in seen[erased.encode()]] == ["deleted"]
    assert other.encode() not in seen
    assert await outbox_keys(db, [erased, other]) == [other]  # the erased one's went too


async def test_unmerge_publishes_its_two_updates(on_kafka: Runtime) -> None:
    db = on_kafka.engine
    bystander = await someone(db)
    transport = httpx.ASGITransport(app=create_app(on_kafka, ["api"]))
    async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
        _, _, _, ref = await merge_two(client, db, new_user_id=False)
        r = await client.post(f"/v1/profiles/{ref}/unmerge", headers=AUTH)
    assert r.status_code == 200, r.text
    kept, restored = r.json()["profile"]["id"], r.json()["restored"]["id"]
    seen = await published(on_kafka, lambda s: {kept.encode(), restored.encode()} <= s.keys())
    assert {kept, restored} <= {k.decode() for k in seen}
    for pid, other in ((kept, restored), (restored, kept)):
        assert orjson.loads(seen[pid.encode()][-1])["split_from"] == other
    assert bystander.encode() not in seen
    assert await outbox_keys(db, [bystander]) == [bystander]


async def test_erasure_with_the_bus_down_leaves_its_tombstone_to_the_resolvers(
    on_kafka: Runtime,
) -> None:
    """The bus unreachable: the person is erased all the same (204), the tombstone stays
    in the outbox, and the resolvers' relay publishes it once the bus is back."""
    db = on_kafka.engine
    erased = await someone(db)
    down = KafkaBus("127.0.0.1:1", client_id=f"down-{uid()}", publish_timeout_s=2)
    try:
        app = create_app(replace(on_kafka, bus=down), ["api"])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cdp.test") as client:
            r = await client.delete(f"/v1/profiles/{erased}", headers=AUTH)
            assert r.status_code == 204, r.text
            assert (await client.get(f"/v1/profiles/{erased}", headers=AUTH)).status_code == 404
    finally:
        await down.stop()
    async with db.connect() as conn:
        rows = await conn.execute(
            select(profile_update_outbox.c.payload).where(profile_update_outbox.c.key == erased)
        )
        assert [orjson.loads(p)["type"] for p in rows.scalars()] == ["deleted"]
    await relay_outbox(db, on_kafka.bus, on_kafka.settings.topics.profile_updates)
    seen = await published(on_kafka, lambda s: erased.encode() in s)
    assert [orjson.loads(v)["type"] for v in seen[erased.encode()]] == ["deleted"]
    assert await outbox_keys(db, [erased]) == []
