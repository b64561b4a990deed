"""The Grafana dashboards under deploy/grafana/ query only series a node's /metrics exposes,
and cover what an operator watches: requests by status and model, TTFT quantiles, failovers,
resumes, members by state, gossip packets by outcome."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, node_config, start_cluster

DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))

# Words of PromQL that stand where a metric name could, and are not one.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or"}
KEYWORDS |= {"unless", "offset", "inf", "nan", "atan2"}

# Series names a metric family of each type exposes (Prometheus text format, as
# prometheus-client writes it; a counter's family name has no ``_total``).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, Grafana
    variables, label matchers, ranges, label lists (``by (...)``, ``on (...)``...), function
    and aggregation names, keywords and numbers are taken out."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.start() and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # the exponent or unit of a number: 1e3, 5m
        if s[m.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if m.group().lower() in KEYWORDS:
            continue
        names.add(m.group())
    return names


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target, in rows too, and every query variable."""

    def walk(node: Any, where: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                yield where, node["expr"]
            for key, value in node.items():
                yield from walk(value, f"{where}/{node.get('title', key)}")
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, where)

    yield from walk(dashboard.get("panels", []), "panels")
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        if m := re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", text):
            text = m.group(1)  # label_values(selector, label): the label is no metric
        elif m := re.fullmatch(r"\s*(?:query_result|metrics)\((.*)\)\s*", text):
            text = m.group(1)
        yield f"variable {variable.get('name')}", text


def exposed(text: str) -> set[str]:
    """Every series name the exposition ``text`` declares, samples or not: a labelled
    counter that has counted nothing yet has only its HELP and TYPE lines."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def test_metric_names_are_found_past_functions_labels_ranges_and_variables() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(quorum_ttft_seconds_bucket{instance=~"$'
        'instance", model!="x"}[$__rate_interval]))) / on (model) group_left quorum_x offset 5m'
    )
    assert metric_names(expr) == {"quorum_ttft_seconds_bucket", "quorum_x"}
    assert metric_names("sum(rate(quorum_requests_total[1m])) * 1e3 > bool 2") == {
        "quorum_requests_total"
    }
    # the checker catches a name /metrics does not expose
    text = "# HELP quorum_ttft_seconds t\n# TYPE quorum_ttft_seconds histogram\n"
    assert "quorum_ttft_seconds_bucket" in exposed(text)
    assert "quorum_ttft_bucket" not in exposed(text)
    assert "quorum_ttft_seconds" not in exposed(text)  # a histogram has no bare series


async def test_every_dashboard_query_names_a_series_a_node_exposes(
    nursery: trio.Nursery,
) -> None:
    assert DASHBOARDS, "no dashboard under deploy/grafana/"
    cluster = await start_cluster(nursery, [node_config("node-a")])  # gossip on: every series
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(cluster.url("node-a") + "/metrics")
    cluster["node-a"].stop()
    available = exposed(response.text)
    used: set[str] = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        found = list(queries(dashboard))
        assert found, f"{path.name} has no query"
        for where, expr in found:
            names = metric_names(expr)
            assert names, f"{path.name} {where}: no metric in {expr!r}"
            missing = names - available
            assert not missing, f"{path.name} {where}: {sorted(missing)} not in /metrics"
            used |= names
    wanted = {
        "quorum_requests_total",  # by status and model
        "quorum_ttft_seconds_bucket",  # quantiles
        "quorum_attempt_failures_total",  # failovers
        "quorum_resumes_total",
        "quorum_members",  # by state
        "quorum_gossip_packets_total",  # by outcome
    }
    assert wanted <= used, f"not charted: {sorted(wanted - used)}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_dashboard_is_importable_json_with_a_datasource_variable(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
