"""What a node knows about the cluster: one ``Member`` record per node, including itself.

Two sources fill the view: ``GossipMembership`` reads the gossip layer (``quorum.gossip``)
when the node's config has a ``[gossip]`` table; ``StaticMembership`` polls a fixed list of
peer URLs over HTTP (``GET /health``) otherwise. The
router only reads ``members()``; it does not care where the view came from.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import trio

from quorum.backends.base import NodeState
from quorum.gossip import GossipNode, Load, MemberState, NodeMeta, Usage

__all__ = [
    "GossipMembership",
    "Member",
    "MemberLoad",
    "MemberState",
    "Membership",
    "NodeState",
    "StaticMembership",
    "gossip_meta",
    "routable_meta",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MemberLoad:
    """A node's load: ``in_flight`` requests, ``free_slots`` over its backends, ``queue_depth``."""

    in_flight: int = 0
    free_slots: int = 0
    queue_depth: int = 0


@dataclass(frozen=True, slots=True)
class Member:
    """One node as seen from here.

    ``state``: membership state (``MemberState``: alive, suspect, dead, left). ``node_state``:
    what the node says of itself (``NodeState``: warming, ready, draining). ``url``: its HTTP
    base URL (``http://127.0.0.1:32769``). ``models``: the models its backends serve.
    ``incarnation``: SWIM incarnation (0 for static peers). ``usage``: the node's per-key
    quota figures (``quorum.gossip.Usage``: key, window, requests, tokens, concurrent), at
    most ``quorum.gossip.MAX_USAGE`` (10) entries; for a peer, what its newest gossiped load
    carried; for this node, what ``local()`` returns, and :class:`GossipMembership`
    gossips it with the load. Empty for static peers (``/health`` does not carry it).
    """

    name: str
    url: str
    state: MemberState
    node_state: NodeState
    models: tuple[str, ...]
    load: MemberLoad = field(default_factory=MemberLoad)
    incarnation: int = 0
    weights: tuple[tuple[str, float], ...] = ()  # (model, routing weight), where not 1.0
    usage: tuple[Usage, ...] = ()

    def weight(self, model: str) -> float:
        """The routing weight of ``model`` on this node (1.0 unless configured)."""
        for name, weight in self.weights:
            if name == model:
                return weight
        return 1.0

    @property
    def routable(self) -> bool:
        """Alive and ready: may be sent new requests."""
        return self.state == MemberState.ALIVE and self.node_state == NodeState.READY

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "state": self.state,
            "node_state": self.node_state,
            "incarnation": self.incarnation,
            "models": list(self.models),
            "load": {
                "in_flight": self.load.in_flight,
                "free_slots": self.load.free_slots,
                "queue_depth": self.load.queue_depth,
            },
        }


class Membership(Protocol):
    """A source of the cluster view."""

    def members(self) -> Sequence[Member]:
        """Every known member, this node first."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Keep the view fresh for the node's lifetime (started with ``nursery.start``)."""
        ...


class StaticMembership:
    """Membership from a fixed peer list, refreshed by polling each peer's ``/health``.

    ``local``: a callable returning this node's own ``Member``. ``peers``: peer base URLs.
    A peer that answers is "alive" with what it reported; one that does not answer
    ``dead_after`` polls in a row is "dead" (it was "suspect" before that). A peer never
    heard from is listed under its URL with state "suspect".
    """

    def __init__(
        self,
        local: Callable[[], Member],
        peers: Sequence[str],
        *,
        interval: float = 1.0,
        timeout: float = 1.0,
        dead_after: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._local = local
        self._peers = [p.rstrip("/") for p in peers]
        self._known: dict[str, Member] = {
            url: Member(
                name=url,
                url=url,
                state=MemberState.SUSPECT,
                node_state=NodeState.WARMING,
                models=(),
            )
            for url in self._peers
        }
        self._misses: dict[str, int] = {url: 0 for url in self._peers}
        self._interval = interval
        self._timeout = timeout
        self._dead_after = dead_after
        self._transport = transport
        self._kick = trio.Event()

    def set_peers(self, peers: Sequence[str]) -> None:
        """Replace the peer list (keeping what is known of peers that stay) and poll now."""
        urls = [p.rstrip("/") for p in peers]
        self._known = {
            url: self._known.get(url)
            or Member(
                name=url,
                url=url,
                state=MemberState.SUSPECT,
                node_state=NodeState.WARMING,
                models=(),
            )
            for url in urls
        }
        self._misses = {url: self._misses.get(url, 0) for url in urls}
        self._peers = urls
        self._kick.set()

    def members(self) -> list[Member]:
        return [self._local(), *self._known.values()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll every peer each ``interval`` seconds, forever."""
        async with httpx.AsyncClient(timeout=self._timeout, transport=self._transport) as client:
            task_status.started()
            while True:
                async with trio.open_nursery() as nursery:
                    for url in self._peers:
                        nursery.start_soon(self._poll, client, url)
                with trio.move_on_after(self._interval):
                    await self._kick.wait()
                self._kick = trio.Event()

    async def _poll(self, client: httpx.AsyncClient, url: str) -> None:
        if url not in self._known:
            return  # removed by set_peers while this poll was under way
        try:
            response = await client.get(url + "/health")
            info = response.json()
            load = info.get("load", {})
            member = Member(
                name=str(info["node"]),
                url=str(info.get("url", url)),
                state=MemberState.ALIVE,
                node_state=NodeState(info.get("state", "ready")),
                models=tuple(str(m) for m in info.get("models", ())),
                load=MemberLoad(
                    in_flight=int(load.get("in_flight", 0)),
                    free_slots=int(load.get("free_slots", 0)),
                    queue_depth=int(load.get("queue_depth", 0)),
                ),
                weights=tuple((str(m), float(w)) for m, w in info.get("weights", {}).items()),
            )
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            if url not in self._known:
                return
            self._misses[url] += 1
            old = self._known[url]
            state = (
                MemberState.DEAD if self._misses[url] >= self._dead_after else MemberState.SUSPECT
            )
            if old.state != state:
                log.info("peer %s (%s) is %s: %s", old.name, url, state, exc)
            self._known[url] = replace(old, state=state)
            return
        if url in self._known:
            self._misses[url] = 0
            self._known[url] = member


class GossipMembership:
    """Membership from the gossip layer (SWIM with Lifeguard, ``quorum.gossip``).

    ``local``: returns this node's own ``Member``; its URL, models and node state are published
    as gossip metadata (a change raises the incarnation), its load and ``usage`` as versioned
    load values every ``publish_interval`` seconds when they changed (no incarnation bump),
    and again when the member count changes or ``refresh_interval`` passed: a load update has
    a bounded number of retransmissions, and a member that joined after they ran out must
    still learn it. ``usage`` must hold at most ``quorum.gossip.MAX_USAGE`` (10) entries with
    distinct (key, window), else :meth:`publish` raises ``ValueError`` (from ``Load``).
    :meth:`nudge` publishes sooner (within ``nudge_interval``): a quota figure that changed
    should reach the other entry nodes before they admit more of the same key.
    """

    def __init__(
        self,
        local: Callable[[], Member],
        gossip: GossipNode,
        *,
        publish_interval: float = 0.2,
        refresh_interval: float = 5.0,
        nudge_interval: float = 0.01,
    ) -> None:
        self._local = local
        self.gossip = gossip
        self._interval = publish_interval
        self._refresh = refresh_interval
        self._nudge_interval = nudge_interval
        self._nudged = trio.Event()
        self._published_at = -math.inf
        self._member_count = 0
        self._meta: NodeMeta | None = None
        self._load: Load | None = None

    def members(self) -> list[Member]:
        """This node, then every member gossip knows whose meta can be routed to (see
        :func:`routable_meta`); any other is left out of the view."""
        me = self._local()
        own = self.gossip.member(me.name)
        out = [replace(me, incarnation=own.incarnation) if own else me]
        for info in self.gossip.members():
            if info.name == me.name or not routable_meta(info.meta):
                continue
            load = info.load
            out.append(
                Member(
                    name=info.name,
                    url=info.meta.http_url,
                    state=info.state,
                    node_state=NodeState(info.meta.state),
                    models=tuple(info.meta.models),
                    load=MemberLoad(load.in_flight, load.free_slots, load.queue_depth)
                    if load
                    else MemberLoad(),
                    incarnation=info.incarnation,
                    usage=load.usage if load else (),
                    weights=tuple(
                        (m, w)
                        for m, w in zip(info.meta.models, info.meta.weights, strict=False)
                        if w != 1.0
                    ),
                )
            )
        return out

    def publish(self) -> None:
        """Tell the cluster this node's current meta and load (cheap when unchanged)."""
        me = self._local()
        meta = gossip_meta(me)
        if meta != self._meta:
            self._meta = meta
            self.gossip.set_meta(meta)
        load = Load(me.load.in_flight, me.load.free_slots, me.load.queue_depth, me.usage)
        count = len(self.gossip.members())
        now = trio.current_time()
        if (
            load != self._load
            or count != self._member_count
            or now - self._published_at >= self._refresh
        ):
            # a new member, or time: the same load again, for whoever missed it
            resend = load == self._load
            self._load, self._member_count, self._published_at = load, count, now
            self.gossip.set_load(load, resend=resend)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish meta and load every ``publish_interval`` seconds, and after a
        :meth:`nudge` (at most every ``nudge_interval``), forever."""
        self.publish()
        task_status.started()
        while True:
            with trio.move_on_after(self._interval):
                await self._nudged.wait()
                await trio.sleep(self._nudge_interval)  # one publish for a burst of nudges
            self._nudged = trio.Event()
            self.publish()

    def nudge(self) -> None:
        """Publish soon rather than at the next interval."""
        self._nudged.set()


def routable_meta(meta: NodeMeta) -> bool:
    """Whether a peer's gossip ``meta`` may enter the routing view: an ``http``/``https`` URL
    with a host and no user info, query or fragment, at most 2048 printable characters; at
    most 256 distinct model ids of 1..256 printable characters; a known node state; one
    finite weight in (0, 1000] per model, or none. The gossip codec refuses such meta
    already; this is the routing side's own check on the URL it will send prompts to, so a
    value that got past the codec another way is never routed to. Cached per ``NodeMeta``
    (frozen, hashable): the view is rebuilt for every request."""
    try:
        return _routable_meta(meta)
    except TypeError:  # unhashable: no NodeMeta constructor made it
        return False


@functools.lru_cache(maxsize=1024)
def _routable_meta(meta: NodeMeta) -> bool:
    try:
        url, models, state, weights = meta.http_url, meta.models, meta.state, meta.weights
        if type(url) is not str or not 0 < len(url) <= 2048 or not url.isprintable():
            return False
        if any(c.isspace() for c in url):
            return False
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port out of range
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or "@" in parts.netloc
            or parts.query
            or parts.fragment
        ):
            return False
        if type(models) is not tuple or len(models) > 256 or len(set(models)) != len(models):
            return False
        if not all(type(m) is str and 0 < len(m) <= 256 and m.isprintable() for m in models):
            return False
        if state not in NodeState.__members__.values():
            return False
        if type(weights) is not tuple or (weights and len(weights) != len(models)):
            return False
        return all(type(w) in (int, float) and math.isfinite(w) and 0 < w <= 1000 for w in weights)
    except (ValueError, TypeError, AttributeError):
        return False


def gossip_meta(member: Member) -> NodeMeta:
    """The gossip metadata that describes ``member`` (this node) to the others."""
    weights = tuple(member.weight(m) for m in member.models)
    return NodeMeta(
        http_url=member.url,
        models=member.models,
        state=member.node_state,
        weights=weights if any(w != 1.0 for w in weights) else (),
    )
