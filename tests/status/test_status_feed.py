"""The status feed's sampler and fan-out, on trio's MockClock: one summary per interval for
the whole node, member changes within a member interval, bounded backlogs for slow clients."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any

import pytest
import trio

from quorum.metrics import Metrics
from quorum.routing.membership import Member
from quorum.sse import SSEParser
from quorum.status.feed import KEEPALIVE, StatusFeed, Subscription


class View:
    """A membership view the test changes by hand."""

    def __init__(self, *names: str) -> None:
        self.members = [Member(n, f"http://{n}:1", "alive", "ready", ("m",)) for n in names]

    def __call__(self) -> Sequence[Member]:
        return list(self.members)

    def set_state(self, name: str, state: str) -> None:
        self.members = [
            Member(m.name, m.url, state, m.node_state, m.models) if m.name == name else m
            for m in self.members
        ]


def events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    return [(e.event or "", json.loads(e.data)) for e in SSEParser().feed(data)]


def make_feed(view: View, metrics: Metrics | None = None, **kw: Any) -> StatusFeed:
    return StatusFeed("a", view, metrics or Metrics(), wall=lambda: 1000.0, **kw)


def test_subscription_over_its_backlog_drops_it_and_asks_for_a_snapshot() -> None:
    sub = Subscription(max_pending=3)
    assert sub.take() == (True, [])  # a new subscriber starts with a snapshot
    for i in range(3):
        sub.offer(b"%d" % i)
    assert sub.pending == 3
    sub.offer(b"3")  # one over: the backlog goes, a snapshot will say it all
    assert sub.pending == 0 and sub.resync and sub.dropped == 1
    for i in range(1000):  # a stalled client: nothing accumulates until it reads again
        sub.offer(b"x%d" % i)
    assert sub.pending == 0
    assert sub.take() == (True, [])
    sub.offer(b"after")
    assert sub.take() == (False, [b"after"])


async def test_one_summary_per_interval_is_framed_once_for_every_subscriber(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics()
    feed = make_feed(View("a", "b"), metrics)
    subs = [Subscription(64) for _ in range(3)]
    for sub in subs:
        sub.take()
        feed.subscribers.add(sub)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        metrics.requests.labels("/v1/chat/completions", "m", "200").inc(4)
        await trio.sleep(3.1)
        feed.stop()
    frames = [sub.take()[1] for sub in subs]
    # the same bytes objects: encoded once by the node, not once per subscriber
    assert all(f is g for f, g in zip(frames[0], frames[1], strict=True))
    assert all(f is g for f, g in zip(frames[0], frames[2], strict=True))
    got = events(b"".join(frames[0]))
    summaries = [d for kind, d in got if kind == "summary"]
    assert len(summaries) == 3 == len(feed.summaries)
    assert summaries[0]["models"]["m"]["requests"] == 4
    assert [s["requests"] for s in summaries[1:]] == [0, 0]
    # the members there when the node started are the baseline, not log entries
    assert [kind for kind, _ in got] == ["summary", "members"] * 3
    assert not feed.log


async def test_a_member_change_is_published_within_the_member_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    view = View("a", "b")
    feed = make_feed(view, interval_s=10.0, member_interval_s=0.25)
    sub = Subscription(64)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        await trio.sleep(1.0)
        sub.take()
        feed.subscribers.add(sub)
        view.set_state("b", "dead")
        changed_at = trio.current_time()
        await sub.wait()
        delay = trio.current_time() - changed_at
        feed.stop()
    assert delay <= 0.25
    got = events(b"".join(sub.take()[1]))
    assert got[0] == (
        "log",
        {
            "type": "member",
            "t": 1000.0,
            "name": "b",
            "url": "http://b:1",
            "state": "dead",
            "node_state": "ready",
            "incarnation": 0,
            "was_state": "alive",
            "was_node_state": "ready",
        },
    )
    assert got[1][0] == "members"
    assert [m["state"] for m in got[1][1]["members"]] == ["alive", "dead"]
    assert feed.log[-1]["state"] == "dead"


async def test_stream_starts_with_a_snapshot_and_resyncs_a_slow_reader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    view = View("a", "b")
    feed = make_feed(view, max_pending=4)
    feed.tick_members()
    feed.tick_summary(1.0)
    async with aclosing(feed.stream(keepalive_s=5.0)) as body:
        assert await body.__anext__() == b"retry: 2000\n\n"
        [(kind, snap)] = events(await body.__anext__())
        assert kind == "snapshot" and snap["self"] == "a"
        assert [m["name"] for m in snap["members"]] == ["a", "b"]
        assert len(snap["summaries"]) == 1 and len(snap["log"]) == 2
        [sub] = feed.subscribers
        for _ in range(50):  # the reader is slow: 100 frames while it reads nothing
            feed.tick_summary(1.0)
        assert sub.pending <= 4
        [(kind, snap)] = events(await body.__anext__())
        assert kind == "snapshot" and len(snap["summaries"]) == 51
        view.set_state("b", "suspect")
        feed.tick_members()
        assert [kind for kind, _ in events(await body.__anext__())] == ["log", "members"]
        start = trio.current_time()
        assert await body.__anext__() == KEEPALIVE  # silence: a comment keeps proxies open
        assert trio.current_time() - start == pytest.approx(5.0)
    assert not feed.subscribers  # closing the body ends the subscription


async def test_stream_over_max_subscribers_says_so_and_ends() -> None:
    feed = make_feed(View("a"), max_subscribers=1)
    async with aclosing(feed.stream()) as first, aclosing(feed.stream()) as second:
        await first.__anext__()
        assert feed.full
        [(kind, data)] = events(await second.__anext__())
        assert kind == "error" and "over 1 status streams" in data["message"]
        with pytest.raises(StopAsyncIteration):
            await second.__anext__()
    assert not feed.subscribers


async def test_a_failing_read_is_logged_and_sampling_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    view = View("a")
    calls = 0

    def flaky() -> Sequence[Member]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("view unavailable")
        return view()

    feed = StatusFeed("a", flaky, Metrics(), wall=lambda: 0.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        await trio.sleep(2.05)
        feed.stop()
    assert calls >= 8 and len(feed.summaries) == 2
    assert "sampling failed" in caplog.text


def test_ttft_quantiles_cover_the_last_ttft_window_intervals() -> None:
    metrics = Metrics()
    feed = make_feed(View("a"), metrics, ttft_window=3)
    metrics.ttft.labels("m").observe(0.04)
    metrics.requests.labels("/v1/chat/completions", "m", "200").inc()
    for _ in range(4):
        feed.tick_summary(1.0)
    p50 = [s["models"].get("m", {}).get("ttft_p50_ms") for s in feed.summaries]
    # the first token counts in three summaries, its request in the first only
    assert p50[:3] == [37.5, 37.5, 37.5] and p50[3] is None
    assert [s["requests"] for s in feed.summaries] == [1, 0, 0, 0]


async def test_streams_end_once_the_node_is_closing_and_new_ones_get_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stopping = False
    feed = StatusFeed("a", View("a"), Metrics(), closing=lambda: stopping)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        async with aclosing(feed.stream(keepalive_s=60.0)) as body:
            await body.__anext__()
            await body.__anext__()  # the snapshot
            stopping = True
            start = trio.current_time()
            with pytest.raises(StopAsyncIteration):
                while True:  # summaries may come first; then the end
                    await body.__anext__()
            assert trio.current_time() - start <= feed.member_interval_s
        assert feed.closed and not feed.subscribers
        async with aclosing(feed.stream()) as late:
            with pytest.raises(StopAsyncIteration):
                await late.__anext__()
        feed.stop()
