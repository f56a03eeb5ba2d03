"""The OpenAPI document is truthful: schemathesis generates requests for every operation
from ``/openapi.json`` alone and sends them, authenticated (a real write key, an API
token with every scope), to a server on the real Kafka and Postgres; every answer must be
a documented status with a documented content type, body schema and headers, and none a
server error. And a client generated from the document (openapi-python-client) sends
events and reads the profile they made."""

from __future__ import annotations

import asyncio
import base64
import importlib
import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from cdp_stream.activation.consumer import run_activation
from cdp_stream.app import Runtime, create_app
from cdp_stream.bus.memory import MemoryBus
from cdp_stream.profiles.credentials import source_for_write_key
from cdp_stream.profiles.db import make_engine
from cdp_stream.profiles.models import sources
from cdp_stream.resolver.consumer import run_resolver
from cdp_stream.settings import Settings
from tests.support import Server, eventually, running_pipeline

WRITE_KEY = "wk_openapi_" + uuid.uuid4().hex[:8]
API_TOKEN = "tok_openapi_" + uuid.uuid4().hex[:8]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
EXAMPLES = 25  # per operation and generation mode: the run stays around a minute


@pytest.fixture(scope="module")
async def server(kafka_bootstrap: str, pg_url: str, engine: AsyncEngine) -> AsyncIterator[Server]:
    """The collector and the API on a real socket, with a resolver and the activation
    consumer (CRM contacts) behind them. The sources
    and audiences the fuzzer creates are deleted after (a source allowing "*" would let
    any origin's preflight pass in the other tests on this database)."""
    async with engine.connect() as conn:
        before = set((await conn.execute(select(sources.c.id))).scalars())
    async with running_pipeline(
        kafka_bootstrap,
        pg_url,
        write_key=WRITE_KEY,
        api_token=API_TOKEN,
        loops=[run_resolver, run_activation],
    ) as runtime:
        served = Server(create_app(runtime))
        await served.start()
        try:
            yield served
        finally:
            await served.stop()
            async with engine.begin() as conn:
                bootstrap = await source_for_write_key(conn, WRITE_KEY)
                kept = before | {bootstrap.id if bootstrap else ""}
                await conn.execute(delete(sources).where(sources.c.id.not_in(kept)))


def credentials(operation: dict[str, Any]) -> dict[str, str]:
    """The Authorization its security requirement asks for (none: no header)."""
    schemes = {name for requirement in operation.get("security", []) for name in requirement}
    if "writeKey" in schemes:
        return {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
    if "bearerAuth" in schemes:
        return {"Authorization": f"Bearer {API_TOKEN}"}
    return {}


def fuzz(url: str, known: str) -> tuple[dict[str, Counter[int]], list[str]]:
    """Every operation of the document at ``url`` in both generation modes, and those with
    a profile ``ref`` once more on the ``known`` profile (so their 200s are checked too;
    the deletion last): the statuses each answered, and the failures."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: dict[str, Counter[int]] = {}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    on_known = sorted(
        (o for o in operations if "{ref}" in o.path), key=lambda o: o.method == "delete"
    )
    runs = [
        *((o, mode, {}) for o in operations for mode in schemathesis.GenerationMode),
        *((o, schemathesis.GenerationMode.POSITIVE, {"ref": known}) for o in on_known),
    ]
    for operation, mode, path in runs:
        seen = statuses.setdefault(operation.label, Counter())

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode, path_parameters=path))
        @hypothesis.settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        def check(case: schemathesis.Case) -> None:
            headers = credentials(case.operation.definition.raw)
            response = case.call_and_validate(base_url=url, headers=headers, checks=CHECKS)
            statuses[case.operation.label][response.status_code] += 1

        try:
            check()
        except hypothesis.errors.Unsatisfiable:
            assert mode is schemathesis.GenerationMode.NEGATIVE  # nothing to get wrong
        except (Exception, FailureGroup) as exc:  # each is reported, the others still run
            inner = getattr(exc, "exceptions", [])
            failures.append(f"{operation.label} ({mode.value}, {path}): {exc} {inner}")
        assert seen or mode is schemathesis.GenerationMode.NEGATIVE, operation.label
    return statuses, failures


# schemathesis's strategies draw from `random`, which hypothesis deprecates.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_every_operation_answers_as_documented(server: Server) -> None:
    user = "u-" + uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(base_url=server.url) as http:
        traits = {"email": f"{user}@example.com", "firstName": "Ada"}
        event = {"userId": user, "traits": traits}
        sent = await http.post("/v1/identify", json=event, auth=(WRITE_KEY, ""))
        assert sent.status_code == 200, sent.text
        profile = f"/v1/profiles/user_id:{user}"
        bearer = {"authorization": f"Bearer {API_TOKEN}"}

        async def contact() -> bool:
            return (await http.get(f"/v1/crm/contacts/user_id:{user}", headers=bearer)).is_success

        assert await eventually(contact)
        assert (await http.get(profile, headers=bearer)).status_code == 200
    statuses, failures = await asyncio.to_thread(fuzz, server.url, f"user_id:{user}")
    for label, seen in statuses.items():
        print(f"{label:45} {dict(sorted(seen.items()))}")
    assert not failures, "\n\n".join(failures)
    for label in ("GET /v1/profiles/{ref}/events", "GET /v1/crm/contacts/{ref}/interactions"):
        assert statuses[label][200], (label, statuses[label])  # the known profile's pages


async def test_a_generated_client_sends_events_and_reads_the_profile(
    server: Server, tmp_path: Path
) -> None:
    async with httpx.AsyncClient() as http:
        document = tmp_path / "openapi.json"
        document.write_bytes((await http.get(f"{server.url}/openapi.json")).content)
    tools = Path(sys.executable).parent
    generate = await asyncio.create_subprocess_exec(
        *(str(tools / "openapi-python-client"), "generate", "--meta", "none"),
        *("--path", str(document), "--output-path", str(tmp_path / "cdp_client")),
        env={**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"},  # it formats with ruff
    )
    assert await generate.wait() == 0
    sys.path.insert(0, str(tmp_path))
    try:
        gen = importlib.import_module("cdp_client")
        models = importlib.import_module("cdp_client.models")
        identify, batch, get_profile = (
            importlib.import_module(f"cdp_client.api.{name}")
            for name in (
                "collector.collect_identify_v1_identify_post",
                "collector.collect_batch_v1_batch_post",
                "profiles.get_profile_v1_profiles_ref_get",
            )
        )
    finally:
        sys.path.remove(str(tmp_path))

    user = "u-" + uuid.uuid4().hex[:8]
    email = f"{user}@example.com"
    writer = gen.Client(base_url=server.url, httpx_args={"auth": (WRITE_KEY, "")})
    traits = models.IdentifyTraitsType0.from_dict({"email": email})
    sent = await identify.asyncio(client=writer, body=models.Identify(user_id=user, traits=traits))
    assert isinstance(sent, models.Accepted) and sent.success
    events = [{"type": "track", "userId": user, "event": "Signed Up"}]
    sent = await batch.asyncio(client=writer, body=models.Batch(batch=events))
    assert isinstance(sent, models.Accepted) and sent.success

    reader = gen.AuthenticatedClient(base_url=server.url, token=API_TOKEN)

    async def profile() -> Any:
        found = await get_profile.asyncio(ref=f"email:{email}", client=reader)
        return found if isinstance(found, models.ProfileOut) else None

    found = await eventually(profile)
    assert {(i.type_, i.value) for i in found.identities} >= {("user_id", user), ("email", email)}
    unknown = await get_profile.asyncio_detailed(ref="email:nobody@example.com", client=reader)
    assert unknown.status_code == 404 and isinstance(unknown.parsed, models.Detail)


def test_the_document_declares_security_errors_and_retry_after() -> None:
    engine = make_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none", "test")
    document = create_app(Runtime(Settings(), "test", engine, MemoryBus())).openapi()
    schemes = document["components"]["securitySchemes"]
    assert schemes["writeKey"] == {**schemes["writeKey"], "type": "http", "scheme": "basic"}
    assert schemes["bearerAuth"]["scheme"] == "bearer"
    read = document["paths"]["/v1/profiles/{ref}"]["get"]
    assert read["security"] == [{"bearerAuth": ["profiles:read"]}]
    assert [p["name"] for p in read["parameters"]] == ["ref"]  # no `authorization` parameter
    detail = {"$ref": "#/components/schemas/Detail"}
    assert read["responses"]["404"]["content"]["application/json"]["schema"] == detail
    batch = document["paths"]["/v1/batch"]["post"]
    assert batch["security"] == [{"writeKey": []}]
    for code in ("429", "503"):
        assert batch["responses"][code]["headers"]["Retry-After"]["required"] is True
        error = batch["responses"][code]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/Error"}
    assert {"Error", "Detail", "Accepted", "WebhookAccepted"} <= document["components"][
        "schemas"
    ].keys()
    mailgun = document["paths"]["/v1/webhooks/mailgun/{source}"]["post"]
    assert mailgun["requestBody"]["content"]["application/json"]["schema"]["required"] == [
        "signature",
        "event-data",
    ]
