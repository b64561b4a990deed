"""The pure parts of the status feed: totals read from the metrics, per-interval summaries,
Prometheus-style histogram quantiles, member changes."""

from __future__ import annotations

import math

import pytest

from quorum.metrics import Metrics
from quorum.routing.membership import Member, MemberLoad
from quorum.status.sample import (
    Totals,
    histogram_quantile,
    member_changes,
    read_totals,
    summarize,
)

INF = math.inf


def test_histogram_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    # 10 observations: 4 in (0, 0.1], 4 in (0.1, 0.2], 2 in (0.2, 0.5]
    buckets = ((0.1, 4.0), (0.2, 8.0), (0.5, 10.0), (INF, 10.0))
    # rank 5 is the first of the 4 in (0.1, 0.2]: 0.1 + 0.1 * (5 - 4) / 4
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.125)
    # rank 9.9 lies in (0.2, 0.5]: 0.2 + 0.3 * (9.9 - 8) / 2
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.485)
    # the first bucket starts at 0
    assert histogram_quantile(0.2, buckets) == pytest.approx(0.05)


def test_histogram_quantile_in_the_inf_bucket_answers_the_highest_finite_bound() -> None:
    buckets = ((0.1, 1.0), (0.5, 2.0), (INF, 10.0))
    assert histogram_quantile(0.99, buckets) == 0.5


def test_histogram_quantile_of_nothing_is_none_and_q_is_checked() -> None:
    assert histogram_quantile(0.5, ()) is None
    assert histogram_quantile(0.5, ((0.1, 0.0), (INF, 0.0))) is None
    with pytest.raises(ValueError, match="outside"):
        histogram_quantile(1.5, ((INF, 1.0),))


def test_read_totals_sees_every_counter_the_request_path_updates() -> None:
    metrics = Metrics()
    metrics.requests.labels("/v1/chat/completions", "mock-chat", "200").inc(3)
    metrics.requests.labels("/v1/completions", "mock-chat", "200").inc(2)
    metrics.requests.labels("/v1/chat/completions", "mock-chat", "502").inc()
    metrics.ttft.labels("mock-chat").observe(0.03)
    metrics.attempt_failures.labels("node-b").inc(2)
    metrics.resumes.labels("resumed").inc()
    totals = read_totals(metrics)
    assert totals.requests == {("mock-chat", "200"): 5.0, ("mock-chat", "502"): 1.0}
    assert dict(totals.ttft["mock-chat"])[0.05] == 1.0
    assert totals.ttft["mock-chat"][-1] == (INF, 1.0)
    assert totals.attempt_failures == {"node-b": 2.0}
    assert totals.resumes == {"resumed": 1.0}


def test_summary_counts_what_happened_in_the_interval_only() -> None:
    metrics = Metrics()
    metrics.requests.labels("/v1/chat/completions", "mock-chat", "200").inc(10)
    metrics.ttft.labels("mock-chat").observe(5.0)  # before: must not weigh on the quantiles
    before = read_totals(metrics)
    metrics.requests.labels("/v1/chat/completions", "mock-chat", "200").inc(3)
    metrics.requests.labels("/v1/chat/completions", "mock-chat", "503").inc()
    metrics.requests.labels("/v1/chat/completions", "mock-reasoner", "400").inc()
    for _ in range(4):
        metrics.ttft.labels("mock-chat").observe(0.02)  # bucket (0.01, 0.025]
    metrics.attempt_failures.labels("node-c").inc()
    metrics.resumes.labels("failed").inc()
    summary, log = summarize(before, read_totals(metrics), dt=2.0, t=1000.0)
    chat = summary["models"]["mock-chat"]
    assert chat["requests"] == 4 and chat["errors"] == 1 and chat["rps"] == 2.0
    assert 10 < chat["ttft_p50_ms"] <= 25 and 10 < chat["ttft_p99_ms"] <= 25
    reasoner = summary["models"]["mock-reasoner"]
    assert reasoner == {
        "requests": 1,
        "errors": 0,
        "rps": 0.5,
        "ttft_p50_ms": None,
        "ttft_p99_ms": None,
    }
    assert (summary["requests"], summary["errors"]) == (5, 1)
    assert (summary["failovers"], summary["resumed"], summary["resume_failed"]) == (1, 0, 1)
    assert log == [
        {"type": "failover", "t": 1000.0, "node": "node-c", "count": 1},
        {"type": "resume", "t": 1000.0, "outcome": "failed", "count": 1},
    ]


def test_summary_of_a_quiet_interval_is_empty_and_a_reset_counter_counts_from_zero() -> None:
    quiet, log = summarize(Totals(), Totals(), dt=1.0, t=1.0)
    assert quiet["models"] == {} and quiet["requests"] == 0 and log == []
    before = Totals(requests={("m", "200"): 50.0})
    after = Totals(requests={("m", "200"): 3.0})  # the node restarted: 3 since then
    summary, _ = summarize(before, after, dt=1.0, t=2.0)
    assert summary["models"]["m"]["requests"] == 3


def member(name: str, state: str = "alive", node_state: str = "ready", **kw: object) -> Member:
    return Member(name, f"http://{name}:1", state, node_state, ("m",), **kw)  # type: ignore[arg-type]


def test_member_changes_reports_joins_state_changes_and_departures_not_load() -> None:
    before = {m.name: m for m in (member("a"), member("b"), member("c"))}
    after = [
        member("a", load=MemberLoad(in_flight=9)),  # load only: not news
        member("b", "dead"),
        member("d", "alive", "warming"),
    ]
    changes = member_changes(before, after, t=5.0)
    by_name = {c["name"]: c for c in changes}
    assert set(by_name) == {"b", "c", "d"}
    assert (by_name["b"]["was_state"], by_name["b"]["state"]) == ("alive", "dead")
    assert by_name["d"]["was_state"] is None and by_name["d"]["node_state"] == "warming"
    assert by_name["c"]["state"] == "gone" and by_name["c"]["was_state"] == "alive"
    drain = member_changes({"a": member("a")}, [member("a", node_state="draining")], t=6.0)
    assert [(c["was_node_state"], c["node_state"]) for c in drain] == [("ready", "draining")]
