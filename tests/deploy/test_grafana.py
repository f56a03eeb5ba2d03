"""deploy/grafana/cdp-stream.json: every query parses and names only series cdp-stream exports.

The queries are parsed with Prometheus's own PromQL grammar (the npm package
``@prometheus-io/lezer-promql``, which Prometheus's web UI uses; ``make deploy-tools``
installs it), which also says which words are series (a vector selector's name) rather than
functions, labels or keywords. The exported names are read from ``cdp_stream.metrics`` (the
one module that defines every metric) through its registry, so a renamed or removed metric
fails here instead of leaving a panel that silently shows "No data".
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cdp_stream import metrics
from tests.conftest import unavailable

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE.parents[1] / "deploy" / "grafana" / "cdp-stream.json"
PROMQL = HERE / "promql"
# What Grafana puts in place of its interval variables before it sends a query.
_GRAFANA = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def parse(expressions: list[str]) -> list[tuple[list[int], set[str]]]:
    """Per expression: where the grammar fails (offsets), and the series it selects."""
    node = shutil.which("node")
    if node is None or not (PROMQL / "node_modules" / "@prometheus-io").is_dir():
        unavailable("node and the PromQL grammar (`make deploy-tools` installs it)")
    assert node is not None
    for variable, value in _GRAFANA.items():
        expressions = [e.replace(variable, value) for e in expressions]
    done = subprocess.run(
        [node, str(PROMQL / "parse.mjs")],
        input=json.dumps(expressions),
        capture_output=True,
        text=True,
        check=True,
    )
    return [(r["errors"], set(r["series"])) for r in json.loads(done.stdout)]


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


def test_the_grammar_reads_series_and_refuses_what_prometheus_refuses() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(cdp_x_bucket{route=~"/v1/.+", '
        'group="a b"}[$__rate_interval]))) / on (route) group_left cdp_y_total offset 5m '
        "and sum without (job) (increase(cdp:z_total[1h:5m])) > bool 0"
    )
    (errors, series), (unbalanced, _) = parse([expr, "sum(rate(cdp_x_total[5m])"])
    assert not errors and series == {"cdp_x_bucket", "cdp_y_total", "cdp:z_total"}
    assert unbalanced


def test_every_query_parses_and_names_series_the_code_exports() -> None:
    exported = metrics.metric_names()
    assert "cdp_events_accepted_total" in exported  # the registry was read
    assert "cdp_events_accepted_totl" not in exported
    queries = _queries()
    assert len(queries) >= 20
    for (title, expr), (errors, series) in zip(
        queries, parse([e for _, e in queries]), strict=True
    ):
        assert not errors, f"{title}: {expr} does not parse (at {errors})"
        assert series, f"{title}: {expr} selects no series"
        unknown = series - exported
        assert not unknown, f"{title}: {expr} names what cdp_stream.metrics does not export"


def test_the_dashboard_covers_each_stage() -> None:
    """Ingest rate and errors, end-to-end lag, resolver throughput and batch time, merges,
    activation and webhook health: the issue's list, each in some query."""
    used = set().union(*(series for _, series in parse([e for _, e in _queries()])))
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
