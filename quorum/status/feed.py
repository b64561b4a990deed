"""The live status feed of one node (``GET /cluster/events``): a server-sent-events stream of
the cluster as this node sees it, for the status page and ``quorum status``.

One sampler per node (``StatusFeed.run``) reads the membership view every
``member_interval_s`` (0.25 s) and the request metrics every ``interval_s`` (1 s); each event
is framed once and the same bytes go to every subscriber. Events (``event:`` field, and the
same name in the JSON ``type``):

==============  ==============================================================================
``snapshot``    first on every connection, and again after a subscriber fell behind:
                ``{"self", "t", "interval_s", "members": [...], "summaries": [...], "log": [...]}``
                (summaries of the last ``history`` intervals, the last ``max_log`` log entries)
``members``     the whole member list (``Member.as_json()``), on any change of state, node
                state, incarnation, URL or models, and every interval (the loads move)
``summary``     one interval's requests, errors, failovers, resumes, and TTFT p50/p99 by
                model over the last ``ttft_window`` intervals (``sample.summarize``)
``log``         one entry: a member change, a failover, a resume
==============  ==============================================================================

A slow or stalled client costs a bounded amount: each subscriber holds at most
``max_pending`` frames (shared bytes, not copies); past that its backlog is dropped and it is
sent a fresh snapshot instead (the snapshot says everything the dropped frames said). A client
that stops reading altogether is closed by the server's write deadline
(``quorum.server.ConnectionGuard``). At most ``max_subscribers`` streams are open at once.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from quorum.metrics import Metrics
from quorum.routing.membership import Member
from quorum.status.sample import Totals, member_changes, read_totals, summarize

if TYPE_CHECKING:
    from quorum.routing.dispatch import Dispatcher

__all__ = ["StatusFeed", "Subscription"]

log = logging.getLogger(__name__)


def frame(kind: str, payload: dict[str, Any]) -> bytes:
    """One SSE event: ``event: <kind>`` and the payload as one JSON ``data:`` line."""
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()


KEEPALIVE = b": keepalive\n\n"


class Subscription:
    """One client's place in the feed: a bounded backlog of frames and a wake-up.

    ``max_pending``: frames held at most; one more drops the backlog, counts it in ``dropped``
    and marks the subscriber for a resync (a fresh snapshot next). A new subscription starts
    marked, so its first event is a snapshot.
    """

    __slots__ = ("_frames", "_max", "_wake", "closed", "dropped", "resync")

    def __init__(self, max_pending: int) -> None:
        self._frames: deque[bytes] = deque()
        self._max = max_pending
        self._wake = trio.Event()
        self.resync = True
        self.dropped = 0
        self.closed = False
        self._wake.set()

    @property
    def pending(self) -> int:
        """Frames waiting to be sent."""
        return len(self._frames)

    def offer(self, data: bytes) -> None:
        """Queue ``data``; never blocks. Over ``max_pending``: drop the backlog, resync."""
        if self.resync:
            pass  # a snapshot is due anyway and will say what this frame says
        elif len(self._frames) >= self._max:
            self._frames.clear()
            self.dropped += 1
            self.resync = True
        else:
            self._frames.append(data)
        self._wake.set()

    def take(self) -> tuple[bool, list[bytes]]:
        """What to send now: (whether a snapshot is due, the frames queued); clears both."""
        resync, frames = self.resync, list(self._frames)
        self.resync = False
        self._frames.clear()
        if self._wake.is_set():
            self._wake = trio.Event()
        return resync, frames

    async def wait(self) -> None:
        """Until something is queued (or a snapshot is due, or ``close`` was called)."""
        await self._wake.wait()

    def close(self) -> None:
        """End this subscriber's stream at its next wake-up, which is now."""
        self.closed = True
        self._wake.set()


class StatusFeed:
    """The sampler and fan-out of one node's status events (module docstring).

    ``name``: this node. ``members``: the membership view (``Dispatcher.members``; this node
    first). ``metrics``: the node's ``Metrics``. ``wall``: unix time in seconds, for the
    timestamps clients show (sleeps use trio's clock). ``history``: summaries kept for a new
    subscriber's charts (300 at 1 s: five minutes); ``max_log``: log entries kept.
    ``ttft_window``: TTFT quantiles are over the last this many intervals (10 s).
    ``closing``: true once the node is about to stop (draining with nothing left in flight):
    the streams then end, so that the server's graceful shutdown does not wait for viewers.
    """

    def __init__(
        self,
        name: str,
        members: Callable[[], Sequence[Member]],
        metrics: Metrics,
        *,
        interval_s: float = 1.0,
        member_interval_s: float = 0.25,
        history: int = 300,
        max_log: int = 100,
        max_subscribers: int = 32,
        max_pending: int = 64,
        ttft_window: int = 10,
        closing: Callable[[], bool] = lambda: False,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0 or member_interval_s <= 0:
            raise ValueError("intervals must be > 0")
        if min(max_subscribers, max_pending, ttft_window) < 1:
            raise ValueError("max_subscribers, max_pending and ttft_window must be >= 1")
        self.name = name
        self._members = members
        self._metrics = metrics
        self.interval_s = interval_s
        self.member_interval_s = member_interval_s
        self.max_subscribers = max_subscribers
        self.max_pending = max_pending
        self._wall = wall
        self._closing = closing
        self.closed = False
        self.summaries: deque[dict[str, Any]] = deque(maxlen=history)
        self.log: deque[dict[str, Any]] = deque(maxlen=max_log)
        self.subscribers: set[Subscription] = set()
        self._view: dict[str, Member] = {}
        self._member_list: list[dict[str, Any]] = []
        self._totals = Totals()
        self._window: deque[Totals] = deque([Totals()], maxlen=ttft_window)
        self._snapshot: bytes | None = None
        self._cancel = trio.CancelScope()

    @classmethod
    def for_dispatcher(cls, dispatcher: Dispatcher, **options: Any) -> StatusFeed:
        """The feed of the node ``dispatcher`` routes for (``options``: as ``__init__``); it
        is closing once the dispatcher drains with nothing in flight."""
        return cls(
            dispatcher.name,
            dispatcher.members,
            dispatcher.metrics,
            closing=lambda: dispatcher.draining and dispatcher.busy == 0,
            **options,
        )

    # --- sampling (sync, so tests drive it step by step) ------------------------------------

    def tick_members(self) -> None:
        """Read the membership view; on a change, publish the log entries and the members."""
        members = list(self._members())
        changes = member_changes(self._view, members, t=self._wall())
        listed = [m.as_json() for m in members]
        moved = [{**m, "load": None} for m in listed] != [
            {**m, "load": None} for m in self._member_list
        ]
        self._view = {m.name: m for m in members}
        self._member_list = listed
        for entry in changes:
            self.log.append(entry)
            self._publish("log", entry)
        if changes or moved:
            self._publish("members", {"type": "members", "members": listed})

    def tick_summary(self, dt: float) -> None:
        """Summarize the ``dt`` seconds since the last call and publish it with the members
        (their loads change without a membership change)."""
        totals = read_totals(self._metrics)
        summary, entries = summarize(
            self._totals, totals, dt=dt, t=self._wall(), ttft_since=self._window[0]
        )
        self._totals = totals
        self._window.append(totals)
        self.summaries.append(summary)
        for entry in entries:
            self.log.append(entry)
            self._publish("log", entry)
        self._publish("summary", summary)
        self._publish("members", {"type": "members", "members": self._member_list})

    def snapshot(self) -> dict[str, Any]:
        """Everything a new subscriber needs to draw the page (module docstring). Takes a
        fresh look at the members first, so that the log goes on from what it shows."""
        self.tick_members()
        return {
            "type": "snapshot",
            "self": self.name,
            "t": round(self._wall(), 3),
            "interval_s": self.interval_s,
            "members": self._member_list,
            "summaries": list(self.summaries),
            "log": list(self.log),
        }

    def snapshot_frame(self) -> bytes:
        """``snapshot()`` as an SSE frame, built once per change however many ask for it."""
        if self._snapshot is None:
            self._snapshot = frame("snapshot", self.snapshot())
        return self._snapshot

    def _publish(self, kind: str, payload: dict[str, Any]) -> None:
        self._snapshot = None
        data = frame(kind, payload)
        for sub in self.subscribers:
            sub.offer(data)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample until ``stop()``: members every ``member_interval_s``, a summary every
        ``interval_s``. A failing read is logged and retried next time: the status page must
        never take a node down."""
        with self._cancel:
            self._totals = read_totals(self._metrics)
            self._window.clear()
            self._window.append(self._totals)
            # The members there at the start are the baseline, not news.
            members = list(self._members())
            self._view = {m.name: m for m in members}
            self._member_list = [m.as_json() for m in members]
            task_status.started()
            last = trio.current_time()
            next_members = last + self.member_interval_s
            next_summary = last + self.interval_s
            while True:
                await trio.sleep_until(min(next_members, next_summary))
                now = trio.current_time()
                try:
                    if now >= next_members:
                        next_members = now + self.member_interval_s
                        self.tick_members()
                        if self._closing():
                            self.close()
                    if now >= next_summary:
                        next_summary = max(next_summary + self.interval_s, now)
                        self.tick_summary(now - last)
                        last = now
                except Exception:
                    log.exception("status feed of %s: sampling failed", self.name)

    def stop(self) -> None:
        """End ``run`` and every stream (the app calls this when it stops serving)."""
        self._cancel.cancel()
        self.close()

    def close(self) -> None:
        """End every stream now and refuse new ones (``closed``)."""
        self.closed = True
        for sub in self.subscribers:
            sub.close()

    # --- subscribers ------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """Whether ``max_subscribers`` streams are open."""
        return len(self.subscribers) >= self.max_subscribers

    async def stream(self, keepalive_s: float = 15.0) -> AsyncIterator[bytes]:
        """One subscriber's response body: a snapshot, then every event as it is published,
        with an SSE comment after ``keepalive_s`` of silence. Ends when the client goes away
        (the request is cancelled; the subscription is removed then) or the feed closes. Over
        ``max_subscribers``: one ``error`` event and the end."""
        if self.closed:
            return
        if self.full:
            yield frame(
                "error",
                {"type": "error", "message": f"over {self.max_subscribers} status streams"},
            )
            return
        sub = Subscription(self.max_pending)
        self.subscribers.add(sub)
        try:
            yield b"retry: 2000\n\n"
            while True:
                with trio.move_on_after(keepalive_s):
                    await sub.wait()
                if sub.closed:
                    return
                resync, frames = sub.take()
                if resync:
                    yield self.snapshot_frame()
                elif frames:
                    yield b"".join(frames)
                else:
                    yield KEEPALIVE
        finally:
            self.subscribers.discard(sub)
