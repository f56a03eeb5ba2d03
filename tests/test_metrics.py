"""Prometheus metrics (``cdp_stream.metrics``) as an operator scrapes them: every stage a
``cdp-stream`` process on the real broker and server (``tests/operated.py``), real
traffic through them, then each ``/metrics`` scraped and the numbers checked against
what the traffic did."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from cdp_stream import metrics
from tests.operated import Stages
from tests.support import Samples, eventually, value


def test_every_name_follows_the_conventions() -> None:
    """``cdp_`` prefix, counters ``_total``, times in ``_seconds``; labels only of bounded
    sets (no profile, user or message id)."""
    names = metrics.metric_names()
    assert all(n.startswith("cdp_") for n in names)
    for family in metrics.REGISTRY.collect():
        if family.type == "counter":
            assert not family.name.endswith("_total")  # the client adds it
        if family.type == "histogram":  # a time in seconds, or a size in records
            assert family.name.endswith(("_seconds", "_records")), family.name
    labels = {
        label
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
        for label in m._labelnames
    }
    assert labels == {
        *("route", "method", "status", "stage", "source", "reason", "group", "topic"),
        *("partition", "step", "consumer", "lock", "cause", "outcome", "direction"),
    }


def test_the_readme_lists_every_metric_and_alarms_only_on_real_ones() -> None:
    """README, "Operating it": its table names each metric once, and every metric its
    alarms query is one the code exports."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Operating it")[1].split("\n## ")[0]
    table = section.split("**Logs.**")[0]
    alarms = section.split("**Alarms**")[1].split("\n### ")[0]
    listed = set(re.findall(r"`(cdp_\w+)`", table))
    families = {
        f.name + ("_total" if f.type == "counter" else "") for f in metrics.REGISTRY.collect()
    }
    assert listed == families
    queried = set(re.findall(r"\b(cdp_\w+)", alarms))
    assert queried and queried <= metrics.metric_names()


async def test_collector_counts_requests_and_events_across_its_workers(stages: Stages) -> None:
    """Two workers share the port; a scrape of either shows both workers' counts."""
    for _ in range(3):  # each scrape may land on either worker: the same totals
        got = await stages.scrape("collector")
        batch = {"route": "/v1/batch", "method": "POST", "status": "200"}
        assert value(got, "cdp_http_requests_total", **batch) == stages.batches
        assert value(got, "cdp_http_request_duration_seconds_count", route="/v1/batch") == (
            stages.batches
        )
        assert value(got, "cdp_events_accepted_total") == stages.accepted
        assert value(got, "cdp_events_rejected_total", stage="collector", reason="invalid") == 1
        assert value(got, "cdp_produce_duration_seconds_count", stage="collector") == (
            stages.batches
        )
        assert value(got, "cdp_produce_failures_total") == 0


async def test_resolver_counts_what_it_stored_merged_and_set_aside(stages: Stages) -> None:
    async def settled() -> Samples | None:
        got = await stages.scrape("resolver")
        done = value(got, "cdp_resolver_events_total", outcome="stored") == stages.accepted
        return got if done and _idle(got, "resolver") and _rejected_junk(got) else None

    got = await eventually(settled, within_s=60, interval=0.5)
    # every record of cdp.events: the events, and the one that is not an event
    assert value(got, "cdp_consumer_records_total", group="resolver") == stages.accepted + 1
    assert value(got, "cdp_resolver_events_total", outcome="duplicate") == 0
    assert value(got, "cdp_profile_merges_total") == 1
    steps = {"poll", "decode", "apply", "commit"}
    for step in steps:
        count = value(got, "cdp_consumer_step_duration_seconds_count", step=step)
        assert count >= 1, step
    assert value(got, "cdp_consumer_batch_records_sum", group="resolver") == stages.accepted + 1
    assert value(got, "cdp_lock_wait_seconds_count", lock="identifiers") >= 1
    assert value(got, "cdp_profile_updates_relayed_total") >= 1
    assert ("cdp_profile_updates_outbox_rows", frozenset()) in got
    assert value(got, "cdp_dead_letters_total") == 0


async def test_activation_counts_its_feed_audiences_webhooks_and_dmp(stages: Stages) -> None:
    def wanted(got: Samples) -> dict[str, bool]:
        return {
            "enter": value(got, "cdp_audience_transitions_total", direction="enter") >= 8,
            "webhook retry": value(got, "cdp_webhook_deliveries_total", outcome="retry") >= 1,
            "suppressed": value(got, "cdp_dmp_buckets_total", outcome="suppressed") >= 1,
            "idle": _idle(got, "activation"),
        }

    last: Samples = {}

    async def settled() -> bool:
        nonlocal last
        last = await stages.scrape("activation")
        return all(wanted(last).values())

    if not await eventually(settled, within_s=90, interval=0.5):
        tail = "\n".join(stages.log_lines("activation")[-20:])
        pytest.fail(f"{wanted(last)}; lag {_lag(last, 'activation')}\n{tail}")
    assert value(last, "cdp_consumer_records_total", group="activation") >= 1
    assert value(last, "cdp_webhook_deliveries_total", outcome="delivered") == 0
    # 8 visitors is far under k = 100: nothing published, every bucket suppressed
    assert value(last, "cdp_dmp_buckets_total", outcome="published") == 0


async def test_api_counts_its_routes_and_the_unmerge(stages: Stages) -> None:
    got = await stages.scrape("api")
    lookups = {"route": "/v1/profiles/{ref}", "method": "GET"}
    assert value(got, "cdp_http_requests_total", status="200", **lookups) >= 3
    assert value(got, "cdp_http_requests_total", route="/v1/audiences", status="201") == 1
    assert value(got, "cdp_profile_unmerges_total") == 1


def _lag(samples: Samples, group: str) -> list[float]:
    return [
        v
        for (n, labels), v in samples.items()
        if n == "cdp_consumer_lag" and ("group", group) in labels
    ]


def _idle(samples: Samples, group: str) -> bool:
    """The group's lag is measured on every partition of its topic (6), and is 0."""
    lag = _lag(samples, group)
    return len(lag) == 6 and not any(lag)


def _rejected_junk(samples: Samples) -> bool:
    return value(samples, "cdp_events_rejected_total", reason="not_an_event") == 1
