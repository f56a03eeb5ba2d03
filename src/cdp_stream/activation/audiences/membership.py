"""Audience membership: who matches each audience's rule (``rules.py``), kept current as
profiles change (``apply_updates``), as time passes (``expire``) and, for a new audience,
over every existing profile (``backfill.py``).

Membership is always recomputed from the profile as it is now in Postgres, never from the
update's payload, so a redelivered, reordered or stale update changes nothing, and the
three paths agree: one evaluation, one diff. Only a change of membership writes: the
``audience_members`` row appears or goes, and ``audience_changes`` records ``enter`` /
``exit`` at ``now``. A profile that is no longer canonical (merged away) or no longer
exists leaves every audience. Per-profile advisory locks (taken in id order) serialize the
consumer, the expiry timer and back-fills on the same profile; ``INSERT .. ON CONFLICT`` /
``DELETE .. RETURNING`` make sure a change is recorded once even so.

A deleted person's memberships and changes are erased by
``profiles.erasure.delete_group`` before the tombstone is published; the tombstone
then finds nothing to leave and records nothing, so the erased profile id is not written
back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from cdp_stream import metrics
from cdp_stream.activation.audiences import repository as aud_repo
from cdp_stream.activation.audiences.matching import Audience, diff, wanted
from cdp_stream.activation.audiences.rules import (
    EventView,
    Rule,
    event_specs,
    longest_window,
    time_may_admit,
)
from cdp_stream.profiles import repository as repo
from cdp_stream.profiles.db import retrying
from cdp_stream.retry import Stopping, stopped_within
from cdp_stream.updates import ProfileUpdate

log = logging.getLogger(__name__)


async def _timeline(
    conn: AsyncConnection, profile_ids: Sequence[uuid.UUID], rules: Sequence[Rule], now: datetime
) -> dict[uuid.UUID, list[EventView]]:
    """The profiles' events the rules may count: within the longest window, of the types
    they name and, where every condition on a type names the event, of those names;
    payloads only if a condition looks into them (a busy person's week of events is read
    for every update of theirs)."""
    windows = [w for w in map(longest_window, rules) if w is not None]
    if not windows or not profile_ids:
        return {}
    specs = [spec for r in rules for spec, _ in event_specs(r)]
    unnamed = {s.type for s in specs if s.name is None}
    named = {
        (s.type, name)
        for s in specs
        if (name := s.normal_name) is not None and s.type not in unnamed
    }
    return await aud_repo.load_events(
        conn,
        profile_ids,
        since=now - max(windows),
        types=sorted(unnamed),
        names=sorted(named),
        payloads=any(s.where for s in specs),
    )


async def reconcile(
    conn: AsyncConnection,
    chosen: Sequence[Audience],
    profile_ids: Iterable[uuid.UUID],
    now: datetime,
    canonical: Mapping[uuid.UUID, Mapping[str, Any]] | None = None,
) -> int:
    """Bring membership of ``profile_ids`` in ``chosen`` to what the rules say now; the
    number of enter / exit changes recorded. The caller holds the profiles' locks.
    ``canonical``: the canonical ones among them, if the caller read them already in
    this transaction (``repo.canonical_profiles``); else they are read here."""
    ids = sorted(set(profile_ids))
    if not ids or not chosen:
        return 0
    if canonical is None:
        canonical = await repo.canonical_profiles(conn, ids)
    timeline = await _timeline(conn, list(canonical), [a.rule for a in chosen], now)
    current = await aud_repo.current_members(conn, ids, [a.id for a in chosen])
    entering, leaving = diff(wanted(chosen, canonical, timeline, now), current)
    changes: list[dict[str, Any]] = []
    if entering:
        entered = await aud_repo.enter(conn, entering, now)
        changes += [{"audience_id": a, "profile_id": p, "change": "enter"} for a, p in entered]
    if leaving:
        left = await aud_repo.leave(conn, leaving)
        changes += [{"audience_id": a, "profile_id": p, "change": "exit"} for a, p in left]
    if changes:
        await aud_repo.record_changes(conn, [{**c, "at": now} for c in changes])
        for c in changes:
            metrics.audience_transitions.labels(c["change"]).inc()
    return len(changes)


async def apply_updates(
    conn: AsyncConnection,
    updates: Sequence[ProfileUpdate],
    now: datetime,
    read: Mapping[uuid.UUID, Mapping[str, Any]],
) -> None:
    """Re-evaluate every audience for the profiles a micro-batch of profile updates names,
    inside the caller's transaction. Merged-away and deleted profiles leave everything.
    ``read``: ``repo.canonical_profiles`` of (at least) the updates' profiles, read in
    this transaction (by the CRM feed, which needs them too). It was read before these
    locks; a change the resolver made since comes with an update of its own, which
    evaluates the profile again."""
    ids = sorted({i for u in updates for i in u.profile_ids()})
    if not ids:
        return
    chosen = await aud_repo.load_audiences(conn)
    if not chosen:
        return
    await aud_repo.lock_profiles(conn, ids)
    await reconcile(conn, chosen, ids, now, {i: read[i] for i in ids if i in read})


async def _crossed(
    conn: AsyncConnection, audience: Audience, now: datetime, since: datetime | None
) -> set[uuid.UUID]:
    """Profiles for which an event the rule counts left its window after the last check
    (``since``) and by ``now``: the only ones whose answer time alone can have changed.

    Members: events that left after the member entered (before that, entering already
    saw them gone), so without ``since`` (the first run after a start) the catch-up is
    exact whatever the downtime. Non-members, only for rules time can admit ("did not
    visit in 7 days"): events that left after ``since``, or within the last window when
    there is no ``since``.
    """
    found: set[uuid.UUID] = set()
    for spec, _ in event_specs(audience.rule):
        found |= await aud_repo.members_with_events_left(conn, audience.id, spec, now, since)
        if time_may_admit(audience.rule):
            lower = (since if since is not None else now - spec.window) - spec.window
            found |= await aud_repo.profiles_with_events_left(conn, spec, now, lower)
    return found


async def expire(conn: AsyncConnection, now: datetime, since: datetime | None = None) -> int:
    """Re-evaluate the profiles whose counted events have left a time-window audience's
    window (as time passes, without any new event) and record who exits (or, for "did not
    ... in the last N days" rules, enters). ``since``: the previous run's ``now``, to look
    only at what crossed since; None catches up from each membership's start. Returns
    the number of changes recorded."""
    chosen = [a for a in await aud_repo.load_audiences(conn) if longest_window(a.rule) is not None]
    candidates = {a.id: await _crossed(conn, a, now, since) for a in chosen}
    everyone = set().union(*candidates.values())
    if not everyone:
        return 0
    await aud_repo.lock_profiles(conn, everyone)  # all at once, in order: no deadlock
    return sum([await reconcile(conn, [a], candidates[a.id], now) for a in chosen])


async def run_expiry(engine: AsyncEngine, stop: asyncio.Event, interval_s: float) -> None:
    """``expire`` every ``interval_s`` until ``stop``; each run looks only at windows
    crossed since the previous successful one (the first catches up)."""
    since: datetime | None = None
    while not stop.is_set():
        now = datetime.now(UTC)
        try:
            changed = await retrying(engine, functools.partial(expire, now=now, since=since), stop)
        except Stopping:
            return
        except Exception:  # a timer that dies silently would freeze memberships
            log.exception("audience expiry failed; retrying next interval")
        else:
            since = now
            if changed:
                log.info("audience expiry: %d membership changes", changed)
        await stopped_within(stop, interval_s)
