"""Prometheus metrics of one node (``GET /metrics``), with ``prometheus-client``.

Each node has its own ``CollectorRegistry`` (several nodes may share a process in tests).
Counters are updated on the request path; cluster and gossip figures are read when scraped.

====================================  =====================================================
``quorum_requests_total``             answered requests, by endpoint, model and status code
``quorum_ttft_seconds``               entry node: request received → first token sent
``quorum_attempt_failures_total``     attempts that failed before the first token, by node
``quorum_resumes_total``              streams that broke after the first token, by outcome
                                      (``resumed`` elsewhere, or ``failed``: error event)
``quorum_in_flight``                  requests under way here, by role: ``serving`` (on this
                                      node's backends) or ``relaying`` (entry node of)
``quorum_members``                    members of the cluster as this node sees them, by state
``quorum_gossip_packets_total``       gossip datagrams by outcome (accepted, dropped_*...)
``quorum_policy_actions_total``       entry node: governance rules that fired, by ``policy``
                                      (configured names only), ``on`` (input, output) and
                                      ``action`` (block; redact: one per match replaced)
====================================  =====================================================
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# TTFT buckets in seconds: from a zero-latency mock (ms) to a busy GPU (tens of seconds).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _Live(Collector):
    """Figures read at scrape time from the node."""

    def __init__(
        self,
        in_flight: Callable[[], Mapping[str, int]],
        member_states: Callable[[], Sequence[str]],
        gossip: Callable[[], Mapping[str, int] | None],
    ) -> None:
        self._in_flight = in_flight
        self._states = member_states
        self._gossip = gossip

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        in_flight = GaugeMetricFamily(
            "quorum_in_flight", "Requests under way here, by role", labels=["role"]
        )
        for role, value in self._in_flight().items():
            in_flight.add_metric([role], value)
        yield in_flight
        members = GaugeMetricFamily(
            "quorum_members", "Members as this node sees them, by state", labels=["state"]
        )
        tally = Tally(self._states())
        for state in ("alive", "suspect", "dead", "left"):  # MemberState's values
            members.add_metric([state], tally.get(state, 0))
        yield members
        counters = self._gossip()
        if counters is not None:
            packets = CounterMetricFamily(
                "quorum_gossip_packets", "Gossip datagrams by outcome", labels=["outcome"]
            )
            for key in ("received", "accepted", "sent"):
                packets.add_metric([key], counters.get(key, 0))
            for key, value in counters.items():
                if key.startswith("dropped_"):
                    packets.add_metric([key], value)
            yield packets


class Metrics:
    """One node's metrics. The ``observe_*`` methods are cheap enough for every request."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "quorum_requests",
            "Answered requests",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "quorum_ttft_seconds",
            "Entry node: request received to first token sent",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.attempt_failures = Counter(
            "quorum_attempt_failures",
            "Attempts that failed before the first token",
            ["node"],
            registry=self.registry,
        )
        self.resumes = Counter(
            "quorum_resumes",
            "Streams broken after the first token",
            ["outcome"],
            registry=self.registry,
        )
        # by API key name (the configured names only: a bounded label set; never the key)
        self.key_requests = Counter(
            "quorum_key_requests",
            "Entry node: requests answered, by API key name and status",
            ["key", "status"],
            registry=self.registry,
        )
        self.key_tokens = Counter(
            "quorum_key_tokens",
            "Entry node: prompt + completion tokens of finished requests, by API key name",
            ["key"],
            registry=self.registry,
        )

        # by policy name: the configured names only (a bounded label set)
        self.policy_actions = Counter(
            "quorum_policy_actions",
            "Entry node: governance rules that fired, by policy, direction and action",
            ["policy", "on", "action"],
            registry=self.registry,
        )

    def policy_action(self, policy: str, on: str, action: str) -> None:
        """Count one firing of ``policy`` (a configured name) ``on`` "input" or "output",
        ``action`` "block" or "redact" (each redacted match counts once)."""
        self.policy_actions.labels(policy, on, action).inc()

    def watch(
        self,
        in_flight: Callable[[], Mapping[str, int]],
        member_states: Callable[[], Sequence[str]],
        gossip: Callable[[], Mapping[str, int] | None],
    ) -> None:
        """Register the figures read at scrape time (the node calls this once)."""
        self.registry.register(_Live(in_flight, member_states, gossip))

    def render(self) -> bytes:
        """The exposition text for ``GET /metrics``."""
        return generate_latest(self.registry)
