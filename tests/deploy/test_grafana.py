"""deploy/grafana/cdp-stream.json: every query names only series that cdp-stream exports.

The names are read from ``cdp_stream.metrics`` (the one module that defines every metric)
through its registry, so a renamed or removed metric fails here instead of leaving a
dashboard panel that silently shows "No data".
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cdp_stream import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "cdp-stream.json"

# PromQL words that are not series: keywords and set operators (functions and
# aggregations are recognised by the parenthesis that follows them).
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"and", "or", "unless", "inf", "nan"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")  # label matchers, once strings are gone
_RANGE = re.compile(r"\[[^\]]*\]")  # [5m], [$__rate_interval], subqueries' [1h:5m]
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_WORD = re.compile(r"(?<![\w:$.])[A-Za-z_:][\w:]*")
_CALL = re.compile(r"\s*\(")


def series_names(expr: str) -> set[str]:
    """The series a PromQL expression selects: its words that are not a function, an
    aggregation, a keyword, a label (in a matcher or a grouping) or a Grafana variable."""
    for pattern in (_STRING, _MATCHERS, _RANGE, _GROUPING):
        expr = pattern.sub(" ", expr)
    return {
        word.group()
        for word in _WORD.finditer(expr)
        if word.group().lower() not in _KEYWORDS and not _CALL.match(expr, word.end())
    }


def _panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        yield item
        yield from _panels(item.get("panels", []))


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _panels(_dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def test_series_names_reads_series_and_leaves_labels_functions_and_variables() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(cdp_x_bucket{route=~"/v1/.+", '
        'group="a b"}[$__rate_interval]))) / on (route) group_left cdp_y_total offset 5m '
        "and sum without (job) (increase(cdp:z_total[1h:5m])) > bool 0"
    )
    assert series_names(expr) == {"cdp_x_bucket", "cdp_y_total", "cdp:z_total"}


def test_every_query_names_a_series_the_code_exports() -> None:
    exported = metrics.metric_names()
    assert "cdp_events_accepted_total" in exported  # the registry was read
    assert "cdp_events_accepted_totl" not in exported
    queries = _queries()
    assert len(queries) >= 20
    unknown = {
        (title, name)
        for title, expr in queries
        for name in series_names(expr)
        if name not in exported
    }
    assert not unknown, f"queries name series cdp_stream.metrics does not export: {unknown}"
    for title, expr in queries:
        assert series_names(expr), f"{title}: {expr} selects no series"


def test_the_dashboard_covers_each_stage() -> None:
    """Ingest rate and errors, end-to-end lag, resolver throughput and batch time, merges,
    activation and webhook health: the issue's list, each in some query."""
    used = {name for _, expr in _queries() for name in series_names(expr)}
    for name in (
        "cdp_events_accepted_total",
        "cdp_events_rejected_total",
        "cdp_http_requests_total",
        "cdp_consumer_lag",
        "cdp_consumer_records_total",
        "cdp_consumer_step_duration_seconds_bucket",
        "cdp_profile_merges_total",
        "cdp_webhook_deliveries_total",
        "cdp_dead_letters_total",
        "cdp_profile_updates_outbox_rows",
    ):
        assert name in used, name


def test_the_dashboard_imports_into_any_grafana() -> None:
    """Every panel reads the dashboard's Prometheus variable (no data source uid of one
    Grafana), ids are unique, and panels stay inside the 24-column grid."""
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(dashboard["panels"]))
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
