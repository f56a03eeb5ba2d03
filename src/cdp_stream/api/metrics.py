"""``GET /metrics``: Prometheus text format, counted from the tables so that every
resolver process is included, whichever process serves the scrape."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from cdp_stream.api.deps import Conn
from cdp_stream.profiles import dead_letters
from cdp_stream.profiles import repository as repo

router = APIRouter(tags=["metrics"])

_HELP = {
    "merges": ("cdp_profile_merges_total", "counter", "profile merges in effect"),
    "unmerges": ("cdp_profile_unmerges_total", "counter", "merges undone by an unmerge"),
    "refusals": ("cdp_identity_refusals_total", "counter", "links refused by identity limits"),
    "outbox": ("cdp_profile_updates_pending", "gauge", "profile updates not yet relayed"),
}
_DEAD = "cdp_dead_letters_total"
_CONSUMERS = ("resolver", "activation")  # always listed, 0 until one parks a record


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(conn: Conn) -> str:
    values = await repo.identity_counters(conn)
    lines = []
    for key, (name, kind, text) in _HELP.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {values[key]}"]
    parked = await dead_letters.counts(conn)
    lines += [
        f"# HELP {_DEAD} records a consumer could never apply, parked on cdp.dead-letters",
        f"# TYPE {_DEAD} counter",
        *(f'{_DEAD}{{consumer="{c}"}} {parked.get(c, 0)}' for c in sorted({*_CONSUMERS, *parked})),
    ]
    return "\n".join(lines) + "\n"
