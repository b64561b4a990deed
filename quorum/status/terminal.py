"""The status view in a terminal: ``quorum status [URL]`` follows a node's feed
(``GET /cluster/events``, ``quorum.status.feed``) and redraws with rich's ``Live`` on every
event (the feed sends a summary each second); ``--once`` prints one frame. ``quorum members``
prints ``members_table`` too.

Tables fit the terminal without cutting anything to "…": when the natural layout (a column per
figure) is wider than the terminal, a compact one stacks the state over the node state, the
three load figures in one cell and the models one per line; a cell still too wide folds onto
further lines (rich's ``overflow="fold"``).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from quorum.gateway.keys import auth_headers
from quorum.sse import SSEParser, SSEProtocolError

__all__ = ["ClusterView", "FeedError", "describe", "members_table", "render", "watch"]

STATE_STYLE = {
    "alive": "green",
    "ready": "green",
    "suspect": "yellow",
    "warming": "yellow",
    "dead": "bold red",
    "left": "dim",
    "draining": "blue",
}
SPARKS = "▁▂▃▄▅▆▇█"


class FeedError(Exception):
    """The node's feed could not be followed: refused (``status`` set), or not a feed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ClusterView:
    """What the feed has said so far: ``self_name``, ``members`` (the feed's JSON),
    ``summaries`` (the last ``history``), ``log`` (the last ``max_log`` entries)."""

    def __init__(self, history: int = 300, max_log: int = 100) -> None:
        self.self_name = "?"
        self.interval_s = 1.0
        self.members: list[dict[str, Any]] = []
        self.summaries: deque[dict[str, Any]] = deque(maxlen=history)
        self.log: deque[dict[str, Any]] = deque(maxlen=max_log)
        self.connection = "connecting"
        self.ready = False

    def apply(self, kind: str, data: Mapping[str, Any]) -> None:
        """Take one event of the feed (``snapshot``, ``members``, ``summary``, ``log``)."""
        if kind == "snapshot":
            self.self_name = str(data.get("self", "?"))
            self.interval_s = float(data.get("interval_s", 1.0))
            self.members = list(data.get("members", []))
            self.summaries.clear()
            self.summaries.extend(data.get("summaries", []))
            self.log.clear()
            self.log.extend(data.get("log", []))
            self.ready = True
        elif kind == "members":
            self.members = list(data.get("members", []))
        elif kind == "summary":
            self.summaries.append(dict(data))
        elif kind == "log":
            self.log.append(dict(data))


def _styled(value: str) -> Text:
    return Text(value, style=STATE_STYLE.get(value, ""))


def members_table(members: Sequence[Mapping[str, Any]], self_name: str, console: Console) -> Table:
    """The members as a table as wide as ``console`` allows (module docstring): name, state,
    node state, incarnation, in flight, free slots, queue, URL, models."""
    title = f"members as seen by {self_name}"
    wide = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (
        ("name", "left"),
        ("state", "left"),
        ("node", "left"),
        ("incarnation", "right"),
        ("in flight", "right"),
        ("free slots", "right"),
        ("queue", "right"),
        ("url", "left"),
        ("models", "left"),
    ):
        wide.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for m in members:
        load = m.get("load") or {}
        wide.add_row(
            str(m.get("name", "")),
            _styled(str(m.get("state", ""))),
            _styled(str(m.get("node_state", ""))),
            str(m.get("incarnation", 0)),
            str(load.get("in_flight", "")),
            str(load.get("free_slots", "")),
            str(load.get("queue_depth", "")),
            str(m.get("url", "")),
            ", ".join(str(x) for x in m.get("models", [])),
        )
    natural = Measurement.get(console, console.options.update_width(1 << 16), wide).maximum
    if natural <= console.width:
        return wide
    compact = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    compact.add_column("name", overflow="fold")
    compact.add_column("state", overflow="fold")
    compact.add_column("inc", justify="right", overflow="fold")
    compact.add_column("load", overflow="fold")
    compact.add_column("url", overflow="fold")
    compact.add_column("models", overflow="fold")
    for m in members:
        load = m.get("load") or {}
        state = _styled(str(m.get("state", "")))
        state.append("\n")
        state.append_text(_styled(str(m.get("node_state", ""))))
        compact.add_row(
            str(m.get("name", "")),
            state,
            str(m.get("incarnation", 0)),
            f"{load.get('in_flight', '?')} in flight\n{load.get('free_slots', '?')} free\n"
            f"{load.get('queue_depth', '?')} queued",
            str(m.get("url", "")),
            "\n".join(str(x) for x in m.get("models", [])),
        )
    return compact


def _spark(values: Sequence[float]) -> str:
    top = max(values, default=0.0)
    if top <= 0:
        return SPARKS[0] * len(values)
    return "".join(
        SPARKS[min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1) + 0.5))] for v in values
    )


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0f} ms"


def traffic_table(view: ClusterView, console: Console) -> Table:
    """Requests through this node by model: req/s over the last 10 intervals, errors over the
    kept history, TTFT p50/p99 of the latest summary (over the feed's TTFT window, 10 s), and
    a sparkline of req/s."""
    summaries = list(view.summaries)
    models = sorted({m for s in summaries for m in s.get("models", {})})
    spark_width = max(8, min(60, console.width - 60))
    table = Table(title=f"traffic through {view.self_name}", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model", overflow="fold")
    table.add_column("req/s", justify="right")
    table.add_column("errors", justify="right")
    table.add_column("TTFT p50", justify="right")
    table.add_column("TTFT p99", justify="right")
    table.add_column(f"req/s, last {spark_width} s", overflow="crop", no_wrap=True)
    for model in models:
        rates = [float(s.get("models", {}).get(model, {}).get("rps", 0.0)) for s in summaries]
        recent = rates[-10:]
        latest: dict[str, Any] = summaries[-1].get("models", {}).get(model, {})
        errors = sum(int(s.get("models", {}).get(model, {}).get("errors", 0)) for s in summaries)
        table.add_row(
            model,
            f"{sum(recent) / max(1, len(recent)):.1f}",
            str(errors),
            _ms(latest.get("ttft_p50_ms")),
            _ms(latest.get("ttft_p99_ms")),
            _spark(rates[-spark_width:]),
        )
    if not models:
        table.add_row("(no requests yet)", "", "", "", "", "")
    return table


def describe(entry: Mapping[str, Any]) -> tuple[str, str]:
    """A log entry of the feed as (text, rich style)."""
    kind = entry.get("type")
    count = int(entry.get("count", 0) or 0)
    plural = "s" if count != 1 else ""
    if kind == "member":
        name, state, node = entry.get("name"), entry.get("state"), entry.get("node_state")
        if state == "gone":
            return f"{name} is no longer in the view", "yellow"
        if entry.get("was_state") is None:
            return f"{name} joined ({state}, {node}) at {entry.get('url')}", "green"
        parts = []
        if entry.get("was_state") != state:
            parts.append(f"{entry.get('was_state')} → {state}")
        if entry.get("was_node_state") != node:
            parts.append(f"{entry.get('was_node_state')} → {node}")
        style = (
            STATE_STYLE.get(str(state), "") if state != "alive" else STATE_STYLE.get(str(node), "")
        )
        return f"{name}: {', '.join(parts) or 'changed'}", style
    if kind == "failover":
        return (
            f"{count} attempt{plural} on {entry.get('node')} failed before the first token; "
            "moved to another node",
            "yellow",
        )
    if kind == "resume":
        if entry.get("outcome") == "resumed":
            return f"{count} stream{plural} broke mid-way and resumed on another node", "green"
        return f"{count} stream{plural} broke mid-way and could not be resumed", "red"
    return json.dumps(dict(entry)), ""


def render(view: ClusterView, console: Console, *, log_lines: int = 8) -> RenderableType:
    """One frame: a header, the members, the traffic, failovers and resumes, the last
    ``log_lines`` events."""
    counts: dict[str, int] = {}
    for m in view.members:
        counts[str(m.get("state"))] = counts.get(str(m.get("state")), 0) + 1
    header = Text(f"Quorum: {len(view.members)} members (", style="bold")
    header.append(", ".join(f"{n} {s}" for s, n in counts.items()), style="bold")
    header.append(f")   {view.connection}", style="bold")
    summaries = list(view.summaries)
    minutes = len(summaries) * view.interval_s / 60
    failures = Text(
        f"last {minutes:.0f} min: {sum(int(s.get('failovers', 0)) for s in summaries)} failovers, "
        f"{sum(int(s.get('resumed', 0)) for s in summaries)} streams resumed, "
        f"{sum(int(s.get('resume_failed', 0)) for s in summaries)} could not be resumed"
    )
    events = Text()
    for entry in list(view.log)[-log_lines:][::-1]:
        text, style = describe(entry)
        stamp = time.strftime("%H:%M:%S", time.localtime(float(entry.get("t", 0))))
        events.append(f"{stamp}  ", style="dim")
        events.append(text + "\n", style=style)
    if not view.log:
        events.append("no events yet\n", style="dim")
    return Group(
        header,
        members_table(view.members, view.self_name, console),
        traffic_table(view, console),
        failures,
        Text("\nrecent events", style="bold"),
        events,
    )


def _events(
    client: httpx.Client, url: str, *, read_timeout_s: float
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The feed's events, as (kind, payload) pairs, until the node closes it. Raises
    ``FeedError`` for a refusal or something that is not the feed, ``httpx.HTTPError`` for a
    network failure (including ``read_timeout_s`` of silence)."""
    timeout = httpx.Timeout(5.0, read=read_timeout_s)
    with client.stream("GET", url.rstrip("/") + "/cluster/events", timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise FeedError(
                f"{url} answered {response.status_code}: {message}", response.status_code
            )
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            raise FeedError(f"{url}/cluster/events is not an event stream (an older node?)")
        parser = SSEParser(max_event_bytes=8 << 20)
        for chunk in response.iter_bytes():
            try:
                events = parser.feed(chunk)
            except SSEProtocolError as exc:
                raise FeedError(f"{url}: {exc}") from None
            for event in events:
                try:
                    payload = json.loads(event.data)
                except ValueError:
                    continue
                if isinstance(payload, dict):
                    yield event.event or "message", payload


def watch(
    url: str,
    *,
    once: bool = False,
    console: Console | None = None,
    read_timeout_s: float = 10.0,
    max_backoff_s: float = 10.0,
    frames: int | None = None,
) -> int:
    """Follow ``url``'s feed and draw it; returns the exit status. ``once``: print the first
    complete frame (after the snapshot) and return 0, or 1 if the node cannot be followed.
    Live: redraw on every change the feed sends (the member list comes each second, after the
    summary), reconnect with backoff (up to ``max_backoff_s``) when the feed breaks, until
    Ctrl-C (``KeyboardInterrupt`` reaches the caller) or, if given, ``frames`` redraws. A
    refusal (4xx) ends it with status 1. A node under ``[auth]`` serves the feed to admins:
    the key is read from ``QUORUM_API_KEY``."""
    console = console or Console(highlight=False)
    view = ClusterView()
    with httpx.Client(headers=auth_headers()) as client:
        if once:
            try:
                for kind, data in _events(client, url, read_timeout_s=read_timeout_s):
                    view.apply(kind, data)
                    if view.ready:
                        view.connection = f"from {url}"
                        console.print(render(view, console))
                        return 0
            except (FeedError, httpx.HTTPError) as exc:
                console.print(f"[red]quorum status: {exc or type(exc).__name__}")
                return 1
            console.print(f"[red]quorum status: {url} closed the feed before its snapshot")
            return 1
        backoff = 0.5
        drawn = 0
        with Live(render(view, console), console=console, auto_refresh=False) as live:
            while frames is None or drawn < frames:
                try:
                    for kind, data in _events(client, url, read_timeout_s=read_timeout_s):
                        view.apply(kind, data)
                        view.connection = f"live from {url}"
                        backoff = 0.5
                        if kind != "summary":  # its members event follows at once
                            live.update(render(view, console), refresh=True)
                            drawn += 1
                            if frames is not None and drawn >= frames:
                                return 0
                    why = "the node closed the feed"
                except FeedError as exc:
                    if exc.status is not None and 400 <= exc.status < 500:
                        live.stop()
                        console.print(f"[red]quorum status: {exc}")
                        return 1
                    why = str(exc)
                except httpx.HTTPError as exc:
                    why = str(exc) or type(exc).__name__
                view.connection = f"disconnected from {url} ({why}); retrying in {backoff:g} s"
                live.update(render(view, console), refresh=True)
                drawn += 1
                time.sleep(backoff)
                backoff = min(backoff * 2, max_backoff_s)
        return 0
