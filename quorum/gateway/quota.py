"""Quotas per API key that hold across the whole cluster.

A key may have three limits (``[[auth.keys]]``): ``requests_per_minute``,
``tokens_per_minute`` and ``max_concurrent``. Each node counts, per key, what it admitted as
the entry node: requests and tokens in the current window, and requests open now. It
gossips those figures (``quorum.gossip.messages.Usage``, piggybacked on its load), and the
entry node decides from the cluster's sum: its own figures plus the newest heard from every
other node.

Windows are fixed minutes of unix time (window ``w`` is ``[60 w, 60 w + 60)``), the same on
every node (clocks within NTP's reach). Within a window a node's counts only grow, so the
figures heard from a node for a window merge by max, as a G-counter's entries do (Shapiro et
al., "Conflict-free Replicated Data Types", 2011): an old gossip message arriving late never
lowers them, and a node that dies keeps counting for the rest of the window. Concurrency is
a gauge: the newest figure from each live node, none from a dead one.

Over-admission is bounded by what arrives within one dissemination: a node does not see
requests admitted elsewhere that its gossip has not brought yet. With ``N`` entry nodes each
admitting ``r`` requests of a key per dissemination time ``D`` (a load update reaches every
node within a few gossip intervals: ``quorum scenario quota`` measures it), at most
``(N - 1) * r * D``-worth of requests beyond the limit can be admitted in a window, and none
once the figures have spread. Tokens are known only when a request ends, so a key may go
over ``tokens_per_minute`` by what the requests open at the crossing produce; the next
request is then refused until the window ends.

Answers carry the figures of the tightest limit (the least available, relative to its size)
as ``x-quota-allowed``, ``x-quota-available``, ``x-quota-reset`` (whole seconds until the
window frees capacity), and OpenAI's ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests``, ``x-ratelimit-reset-requests`` and the ``-tokens``
triple for the limits the key has.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from quorum.errors import Saturated

__all__ = ["WINDOW_S", "Figures", "Grant", "Limits", "QuotaBoard", "duration", "quota_headers"]

WINDOW_S = 60.0
"""The window of ``*_per_minute`` limits, seconds."""

MAX_PEERS = 1024
"""Nodes whose figures are kept: more than any cluster Quorum runs, a bound on the table."""


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's quotas, each ``None`` for no limit: ``requests_per_minute``,
    ``tokens_per_minute`` (prompt + completion), ``max_concurrent`` (requests open at once)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None

    @property
    def any(self) -> bool:
        return any(
            x is not None
            for x in (self.requests_per_minute, self.tokens_per_minute, self.max_concurrent)
        )


class Figures(NamedTuple):
    """One key's figures on one node: ``window`` index (unix seconds // 60), ``requests``
    and ``tokens`` counted in it, ``concurrent`` open now. The shape gossip carries."""

    key: str
    window: int
    requests: int
    tokens: int
    concurrent: int


class _Heard(Protocol):
    """A peer's figures for one key (``quorum.gossip.messages.Usage``), read only."""

    @property
    def key(self) -> str: ...
    @property
    def window(self) -> int: ...
    @property
    def requests(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def concurrent(self) -> int: ...


@dataclass(slots=True)
class _Count:
    window: int = -1
    requests: int = 0
    tokens: int = 0
    concurrent: int = 0

    def roll(self, window: int) -> None:
        """Start ``window`` when it is newer than the one counted (concurrency carries)."""
        if window > self.window:
            self.window, self.requests, self.tokens = window, 0, 0


@dataclass(slots=True)
class Grant:
    """An admitted request of ``key``: ``headers`` to send with its answer's head;
    ``release()`` once it has ended (idempotent)."""

    board: QuotaBoard
    key: str
    headers: dict[str, str] = field(default_factory=dict)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.board._release(self.key)


class QuotaBoard:
    """The quota figures of every key, as this node knows them.

    ``node``: this node's name (its own figures are never taken from gossip). ``clock``: unix
    seconds. ``keys``: the configured key names; figures of other keys, from gossip, are
    dropped (the table is bounded by the config). ``peers``: the membership view as
    ``(name, alive, figures)`` rows, read (``hear_members``) whenever the cluster's
    figures are asked for. ``on_change``: called when this node's own figures change (the
    node publishes them sooner).
    """

    def __init__(
        self,
        node: str,
        keys: Iterable[str],
        *,
        clock: Callable[[], float] = time.time,
        peers: Callable[[], Iterable[tuple[str, bool, Iterable[_Heard]]]] | None = None,
    ) -> None:
        self.node = node
        self._keys = frozenset(keys)
        self._clock = clock
        self._peers_view = peers
        self.on_change: Callable[[], None] | None = None  # own figures changed: gossip them
        self._own: dict[str, _Count] = {}
        self._peers: dict[str, dict[str, _Count]] = {}  # node -> key -> newest figures

    # --- this node's counts ------------------------------------------------------------

    def admit(self, key: str, limits: Limits) -> Grant:
        """Admit one request of ``key`` under ``limits``: counts it (request and concurrency)
        and returns its ``Grant``. Raises ``Saturated`` (429 ``rate_limit_exceeded``, with
        ``retry_after`` seconds) when the cluster's figures leave no room."""
        now = self._clock()
        window = self.window(now)
        requests, tokens, concurrent = self.cluster(key, now)
        reset = self.reset(now)
        if limits.max_concurrent is not None and concurrent >= limits.max_concurrent:
            raise self._refused(
                key, f"{concurrent} requests open, its limit is {limits.max_concurrent}", 1.0
            )
        if limits.requests_per_minute is not None and requests >= limits.requests_per_minute:
            raise self._refused(
                key,
                f"{requests} requests this minute, its limit is {limits.requests_per_minute}",
                reset,
            )
        if limits.tokens_per_minute is not None and tokens >= limits.tokens_per_minute:
            raise self._refused(
                key,
                f"{tokens} tokens this minute, its limit is {limits.tokens_per_minute}",
                reset,
            )
        own = self._own.setdefault(key, _Count())
        own.roll(window)
        own.requests += 1
        own.concurrent += 1
        self._changed()
        headers = quota_headers(limits, requests + 1, tokens, concurrent + 1, reset)
        return Grant(self, key, headers)

    def add_tokens(self, key: str, tokens: int) -> None:
        """Count ``tokens`` (prompt + completion of a request that ended) in the current
        window. Negative counts are ignored."""
        if tokens <= 0:
            return
        own = self._own.setdefault(key, _Count())
        own.roll(self.window(self._clock()))
        own.tokens += tokens
        self._changed()

    def _release(self, key: str) -> None:
        own = self._own.get(key)
        if own is not None and own.concurrent > 0:
            own.concurrent -= 1
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def headers(self, key: str, limits: Limits) -> dict[str, str]:
        """The quota headers of ``key`` now, without counting anything."""
        now = self._clock()
        requests, tokens, concurrent = self.cluster(key, now)
        return quota_headers(limits, requests, tokens, concurrent, self.reset(now))

    # --- the cluster's figures -----------------------------------------------------------

    def figures(self, limit: int | None = None) -> tuple[Figures, ...]:
        """This node's own figures to gossip: the current window's, for every key with a
        count in it or a request open, by key name. ``limit``: at most that many (a gossip
        packet holds ten); when more keys are active, a different slice each second, so
        that every key's figures go out at least every ``ceil(active / limit)`` seconds
        (receivers keep what they last heard of a key: its counts only grow within a
        window)."""
        now = self._clock()
        window = self.window(now)
        out = []
        for key in sorted(self._own):
            own = self._own[key]
            own.roll(window)
            if own.requests or own.tokens or own.concurrent:
                out.append(Figures(key, window, own.requests, own.tokens, own.concurrent))
        if limit is not None and len(out) > limit:
            start = (int(now) * limit) % len(out)
            out = (out + out)[start : start + limit]
        return tuple(out)

    def hear_members(self, members: Iterable[tuple[str, bool, Iterable[_Heard]]]) -> None:
        """Take the figures of every member in a membership view: ``(name, alive,
        figures)``; a member not alive has no request open any more."""
        for name, alive, figures in members:
            self.hear(name, figures)
            if not alive:
                self.gone(name)

    def hear(self, node: str, figures: Iterable[_Heard]) -> None:
        """Take ``node``'s gossiped figures: per key, a newer window replaces an older one,
        the same window merges by max (an old message never lowers a count), an older
        window is ignored; concurrency is taken from the newest. Unknown keys, our own name
        and nodes past ``MAX_PEERS`` are ignored."""
        if node == self.node:
            return
        table = self._peers.get(node)
        if table is None:
            if len(self._peers) >= MAX_PEERS:
                return
            table = self._peers[node] = {}
        for f in figures:
            if f.key not in self._keys:
                continue
            count = table.setdefault(f.key, _Count())
            if f.window < count.window:
                continue
            if f.window > count.window:
                count.window, count.requests, count.tokens = f.window, f.requests, f.tokens
            else:
                count.requests = max(count.requests, f.requests)
                count.tokens = max(count.tokens, f.tokens)
            count.concurrent = f.concurrent

    def gone(self, node: str) -> None:
        """``node`` is dead or left: its requests are no longer open (its counts in the
        window stay counted)."""
        for count in self._peers.get(node, {}).values():
            count.concurrent = 0

    def cluster(self, key: str, now: float | None = None) -> tuple[int, int, int]:
        """``(requests, tokens, concurrent)`` of ``key`` in the current window, summed over
        this node and every node heard from (the ``peers`` view is read first)."""
        if self._peers_view is not None:
            self.hear_members(self._peers_view())
        window = self.window(self._clock() if now is None else now)
        requests = tokens = concurrent = 0
        own = self._own.get(key)
        if own is not None:
            own.roll(window)
            requests, tokens, concurrent = own.requests, own.tokens, own.concurrent
        for table in self._peers.values():
            count = table.get(key)
            if count is None:
                continue
            if count.window == window:
                requests += count.requests
                tokens += count.tokens
            if count.window >= window - 1:  # a node quiet for longer has nothing open
                concurrent += count.concurrent
        return requests, tokens, concurrent

    # --- time ----------------------------------------------------------------------------

    @staticmethod
    def window(now: float) -> int:
        """The window index of unix time ``now``."""
        return int(now // WINDOW_S)

    def reset(self, now: float) -> float:
        """Seconds from ``now`` until the current window ends."""
        return (self.window(now) + 1) * WINDOW_S - now

    def _refused(self, key: str, why: str, retry_after: float) -> Saturated:
        return Saturated(
            f"Key '{key}' is over its quota: {why}, counted over the whole cluster. "
            f"Retry in {math.ceil(retry_after)} s.",
            retry_after=retry_after,
        )


def duration(seconds: float) -> str:
    """OpenAI's form of a reset time: ``"1s"``, ``"6m0s"``, ``"59s"`` (whole seconds,
    rounded up)."""
    whole = max(0, math.ceil(seconds))
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def quota_headers(
    limits: Limits, requests: int, tokens: int, concurrent: int, reset: float
) -> dict[str, str]:
    """The quota headers for a key with ``limits`` whose cluster figures are ``requests``
    and ``tokens`` this window and ``concurrent`` open, ``reset`` seconds before the window
    ends. Empty for a key without limits."""
    rows: list[tuple[int, int, float]] = []  # (allowed, available, reset)
    headers: dict[str, str] = {}
    if limits.requests_per_minute is not None:
        allowed = limits.requests_per_minute
        available = max(0, allowed - requests)
        rows.append((allowed, available, reset))
        headers["x-ratelimit-limit-requests"] = str(allowed)
        headers["x-ratelimit-remaining-requests"] = str(available)
        headers["x-ratelimit-reset-requests"] = duration(reset)
    if limits.tokens_per_minute is not None:
        allowed = limits.tokens_per_minute
        available = max(0, allowed - tokens)
        rows.append((allowed, available, reset))
        headers["x-ratelimit-limit-tokens"] = str(allowed)
        headers["x-ratelimit-remaining-tokens"] = str(available)
        headers["x-ratelimit-reset-tokens"] = duration(reset)
    if limits.max_concurrent is not None:
        allowed = limits.max_concurrent
        rows.append((allowed, max(0, allowed - concurrent), 1.0))
    if not rows:
        return {}
    allowed, available, until = min(rows, key=lambda r: (r[1] / r[0], r[1]))
    headers["x-quota-allowed"] = str(allowed)
    headers["x-quota-available"] = str(available)
    headers["x-quota-reset"] = str(math.ceil(until))
    return headers
