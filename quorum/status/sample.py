"""What the status feed reads from a node, and what it derives, with no I/O: totals read from
the node's Prometheus metrics (``quorum.metrics``), the per-interval summary of two totals, and
the member changes between two views.

::

    before = read_totals(metrics)
    ...one second later...
    after = read_totals(metrics)
    summary, log = summarize(before, after, dt=1.0, t=time.time())
    changes = member_changes(old_view, new_view, t=time.time())

TTFT quantiles are estimated from histogram buckets the way Prometheus's ``histogram_quantile``
does (linear interpolation inside the bucket that holds the rank; an answer in the ``+Inf``
bucket is the highest finite bound), so the page, the terminal and a Grafana panel agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from quorum.metrics import Metrics
from quorum.routing.membership import Member

__all__ = [
    "Totals",
    "histogram_quantile",
    "member_changes",
    "read_totals",
    "summarize",
]


@dataclass(frozen=True, slots=True)
class Totals:
    """Counter values of one node at one moment (monotonic since the node started).

    ``requests``: ``{(model, status): count}`` over every endpoint. ``ttft``: ``{model:
    ((le_seconds, cumulative_count), ...)}`` ascending, the last bound ``inf``.
    ``attempt_failures``: ``{node: count}``, attempts that failed before the first token (each
    one moved a request to the next candidate: a failover). ``resumes``: ``{outcome: count}``,
    outcome "resumed" or "failed".
    """

    requests: Mapping[tuple[str, str], float] = field(default_factory=dict)
    ttft: Mapping[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    attempt_failures: Mapping[str, float] = field(default_factory=dict)
    resumes: Mapping[str, float] = field(default_factory=dict)


def read_totals(metrics: Metrics) -> Totals:
    """The current totals of ``metrics`` (prometheus-client's public ``collect()``); costs a
    walk over the label sets, each a handful here."""
    requests: dict[tuple[str, str], float] = {}
    for family in metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                key = (s.labels["model"], s.labels["status"])
                requests[key] = requests.get(key, 0.0) + s.value
    buckets: dict[str, list[tuple[float, float]]] = {}
    for family in metrics.ttft.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                buckets.setdefault(s.labels["model"], []).append((float(s.labels["le"]), s.value))
    failures = {
        s.labels["node"]: s.value
        for family in metrics.attempt_failures.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    resumes = {
        s.labels["outcome"]: s.value
        for family in metrics.resumes.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    return Totals(
        requests=requests,
        ttft={model: tuple(sorted(b)) for model, b in buckets.items()},
        attempt_failures=failures,
        resumes=resumes,
    )


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q``-quantile (0..1) of a histogram given as ascending ``(upper_bound,
    cumulative_count)`` pairs ending with ``inf``; None when it holds no observation.

    As Prometheus's ``histogram_quantile``: the rank ``q x total`` is located in its bucket and
    interpolated linearly between the bucket's bounds (the first bucket starts at 0); a rank
    in the ``+Inf`` bucket answers the highest finite bound. Raises ``ValueError`` for ``q``
    outside [0, 1].
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        if not math.isinf(bound):
            lower = bound
        below = count
    return lower


def _delta(after: Mapping[Any, float], before: Mapping[Any, float]) -> dict[Any, float]:
    """Growth of each counter; a counter that went down (a restarted node) counts from 0."""
    out = {}
    for key, value in after.items():
        grown = value - before.get(key, 0.0)
        if grown < 0:
            grown = value
        if grown > 0:
            out[key] = grown
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def summarize(
    before: Totals,
    after: Totals,
    *,
    dt: float,
    t: float,
    ttft_since: Totals | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary of what happened between two totals ``dt`` seconds apart, ending at unix
    time ``t``, and the log entries it implies (failovers, resumes).

    Summary: ``{"type": "summary", "t", "dt", "requests", "errors", "models": {model:
    {"rps", "requests", "errors", "ttft_p50_ms", "ttft_p99_ms"}}, "failovers", "resumed",
    "resume_failed"}``; ``errors`` are answers with status >= 500. TTFT quantiles are over the
    first tokens since ``ttft_since`` (default ``before``: a longer window gives a steadier
    line at a few requests a second), None for a model with none. Log entries: ``{"type":
    "failover", "t", "node", "count"}`` and ``{"type": "resume", "t", "outcome", "count"}``.
    """
    since = ttft_since or before
    dt = max(dt, 1e-9)
    models: dict[str, dict[str, Any]] = {}
    for (model, status), n in _delta(after.requests, before.requests).items():
        entry = models.setdefault(model, {"requests": 0, "errors": 0})
        entry["requests"] += int(n)
        if status.isdigit() and int(status) >= 500:
            entry["errors"] += int(n)
    for model, buckets in after.ttft.items():
        old = dict(since.ttft.get(model, ()))
        grown = tuple((le, max(0.0, count - old.get(le, 0.0))) for le, count in buckets)
        if grown and grown[-1][1] > 0:
            entry = models.setdefault(model, {"requests": 0, "errors": 0})
            entry["ttft_p50_ms"] = _ms(histogram_quantile(0.5, grown))
            entry["ttft_p99_ms"] = _ms(histogram_quantile(0.99, grown))
    for entry in models.values():
        entry["rps"] = round(entry["requests"] / dt, 3)
        entry.setdefault("ttft_p50_ms", None)
        entry.setdefault("ttft_p99_ms", None)
    failovers = _delta(after.attempt_failures, before.attempt_failures)
    resumes = _delta(after.resumes, before.resumes)
    summary = {
        "type": "summary",
        "t": round(t, 3),
        "dt": round(dt, 3),
        "requests": sum(m["requests"] for m in models.values()),
        "errors": sum(m["errors"] for m in models.values()),
        "models": dict(sorted(models.items())),
        "failovers": int(sum(failovers.values())),
        "resumed": int(resumes.get("resumed", 0)),
        "resume_failed": int(resumes.get("failed", 0)),
    }
    log: list[dict[str, Any]] = [
        {"type": "failover", "t": summary["t"], "node": node, "count": int(n)}
        for node, n in sorted(failovers.items())
    ]
    log += [
        {"type": "resume", "t": summary["t"], "outcome": outcome, "count": int(n)}
        for outcome, n in sorted(resumes.items())
    ]
    return summary, log


def _identity(member: Member) -> tuple[Any, ...]:
    return (member.state, member.node_state)


def member_changes(
    before: Mapping[str, Member], after: Sequence[Member], *, t: float
) -> list[dict[str, Any]]:
    """Log entries for what differs between two views (``before`` keyed by name): a member
    that appeared, changed its state or node state, or disappeared. (An incarnation that rose
    without a change of state is a refuted suspicion that the log already showed as
    suspect -> alive; URL, models and load are not news.)

    Each entry: ``{"type": "member", "t", "name", "url", "state", "node_state",
    "incarnation", "was_state", "was_node_state"}`` (``was_*`` None for a new member; a member
    gone from the view is reported with ``state`` "gone"). Load changes are not changes here.
    """
    out: list[dict[str, Any]] = []
    seen = set()
    for m in after:
        seen.add(m.name)
        old = before.get(m.name)
        if old is not None and _identity(old) == _identity(m):
            continue
        out.append(
            {
                "type": "member",
                "t": round(t, 3),
                "name": m.name,
                "url": m.url,
                "state": m.state,
                "node_state": m.node_state,
                "incarnation": m.incarnation,
                "was_state": old.state if old else None,
                "was_node_state": old.node_state if old else None,
            }
        )
    for name, old in before.items():
        if name not in seen:
            out.append(
                {
                    "type": "member",
                    "t": round(t, 3),
                    "name": name,
                    "url": old.url,
                    "state": "gone",
                    "node_state": old.node_state,
                    "incarnation": old.incarnation,
                    "was_state": old.state,
                    "was_node_state": old.node_state,
                }
            )
    return out
