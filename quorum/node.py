"""One Quorum node: its backends, its cluster view, its dispatcher and its HTTP server, wired
together from a ``NodeConfig`` and run in one trio nursery.

::

    node = Node(NodeConfig.from_toml("nodes/node-a.toml"))
    url = await nursery.start(node.run)     # "http://127.0.0.1:32768"
    ...
    node.stop()                             # graceful: stop accepting, finish, return
"""

from __future__ import annotations

import base64
import binascii
import logging
import socket
from collections.abc import Callable
from typing import Any

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from quorum.api import create_app
from quorum.backends.base import Backend
from quorum.backends.mock import MockBackend
from quorum.backends.upstream import UpstreamBackend
from quorum.config import BackendConfig, ConfigError, NodeConfig
from quorum.gossip import GossipConfig, GossipNode
from quorum.routing.dispatch import Dispatcher
from quorum.routing.membership import (
    GossipMembership,
    Member,
    MemberLoad,
    Membership,
    StaticMembership,
    gossip_meta,
)

__all__ = ["Node", "make_backend"]

log = logging.getLogger(__name__)


def make_backend(config: BackendConfig, *, source: str = "<config>") -> Backend:
    """Build the backend a ``[[backends]]`` table describes; raises ``ConfigError``."""
    try:
        if config.kind == "mock":
            return MockBackend.from_config(config.model, config.options)
        return UpstreamBackend.from_config(config.model, config.options)
    except ValueError as exc:
        raise ConfigError(f"{source}: backend {config.model!r}: {exc}") from None


class Node:
    """A node process's parts. ``transport``: httpx transport for static membership's
    polls; ``tap``: called with every body chunk the node's hops receive (tests record
    what crosses the hop)."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        tap: Callable[[bytes], None] | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.backends: dict[str, Backend] = {
            b.model: make_backend(b, source=config.source) for b in config.backends
        }
        self.url: str = config.url or f"http://{config.host}:{config.port}"
        self.draining = False
        self.gossip: GossipNode | None = None
        self.membership: Membership = StaticMembership(
            self.self_member, config.peers, transport=transport
        )
        self.dispatcher = Dispatcher(
            config.name,
            self.backends,
            self.membership,
            config=config.routing,
            tap=tap,
        )
        self.app = create_app(
            self.dispatcher,
            health=self.health,
            drain=self.start_drain,
            max_body_bytes=config.max_body_bytes,
        )
        self.dispatcher.metrics.watch(
            in_flight=lambda: self.dispatcher.in_flight,
            member_states=lambda: [m.state for m in self.membership.members()],
            gossip=lambda: self.gossip.counters if self.gossip is not None else None,
        )
        self._shutdown = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._hconfig = HypercornConfig()

    @property
    def node_state(self) -> str:
        """ "draining" once stopping, "warming" while any backend warms, else "ready"."""
        if self.draining:
            return "draining"
        if any(b.state == "warming" for b in self.backends.values()):
            return "warming"
        return "ready"

    def load(self) -> MemberLoad:
        loads = [b.load() for b in self.backends.values()]
        return MemberLoad(
            in_flight=self.dispatcher.in_flight,
            free_slots=sum(x.free for x in loads),
            queue_depth=sum(x.queued for x in loads),
        )

    def self_member(self) -> Member:
        return Member(
            name=self.name,
            url=self.url,
            state="alive",
            node_state=self.node_state,
            models=tuple(self.backends),
            load=self.load(),
            weights=tuple((m, b.weight) for m, b in self.backends.items() if b.weight != 1.0),
        )

    def health(self) -> dict[str, Any]:
        """The ``GET /health`` document."""
        load = self.load()
        return {
            "status": "ok",
            "node": self.name,
            "url": self.url,
            "state": self.node_state,
            "models": list(self.backends),
            "weights": {m: b.weight for m, b in self.backends.items() if b.weight != 1.0},
            "load": {
                "in_flight": load.in_flight,
                "free_slots": load.free_slots,
                "queue_depth": load.queue_depth,
            },
            "backends": {
                model: {
                    "kind": b.kind,
                    "state": b.state,
                    "slots": b.load().slots,
                    "busy": b.load().busy,
                    "queued": b.load().queued,
                }
                for model, b in self.backends.items()
            },
        }

    async def drain(self, timeout_s: float = 60.0) -> None:
        """Stop taking new requests, finish the ones under way (at most ``timeout_s``), then
        stop. Gossip says "draining" at once, so other nodes stop sending work here, and
        "left" at the end, so nobody takes the exit for a death. Idempotent."""
        if self.draining:
            await self._shutdown.wait()
            return
        self.draining = True
        self.dispatcher.draining = True
        if isinstance(self.membership, GossipMembership):
            self.membership.publish()
        log.info("node %s draining: %d requests in flight", self.name, self.dispatcher.in_flight)
        with trio.move_on_after(timeout_s):
            await self.dispatcher.wait_idle()
        # What is left are idle keep-alive connections: hypercorn's graceful wait for them
        # (5 s) would only delay the exit. It reads the value when the shutdown begins.
        self._hconfig.graceful_timeout = min(self._hconfig.graceful_timeout, 0.5)
        if self.dispatcher.in_flight:
            log.warning(
                "node %s: drain timed out with %d in flight", self.name, self.dispatcher.in_flight
            )
        self.stop()

    def start_drain(self) -> dict[str, Any]:
        """Begin ``drain`` in the background (``POST /admin/drain``); returns the state."""
        if self._nursery is not None and not self.draining:
            self._nursery.start_soon(self.drain)
        return {"node": self.name, "state": "draining", "in_flight": self.dispatcher.in_flight}

    def stop(self) -> None:
        """Begin a graceful stop: the server stops accepting and ``run`` returns."""
        self.draining = True
        self.dispatcher.draining = True
        self._shutdown.set()

    async def _serve(
        self,
        hconfig: HypercornConfig,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # hypercorn returns once its graceful shutdown is done; then the rest is cancelled.
        await serve(
            self.app, hconfig, shutdown_trigger=self._shutdown.wait, task_status=task_status
        )
        if self.gossip is not None:
            await self.gossip.leave(timeout=2.0)  # announce "left", not a death
        scope.cancel()

    async def _gossip_node(self) -> GossipNode:
        settings = self.config.gossip
        assert settings is not None
        try:
            keys = tuple(base64.b64decode(k, validate=True) for k in settings.keys)
            preset = GossipConfig.lan if settings.preset == "lan" else GossipConfig.local
            config = preset(cluster_name=settings.cluster, keys=keys)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"{self.config.source}: [gossip].keys: {exc}") from None

        def resolve(host: str, port: int) -> tuple[str, int]:
            return socket.gethostbyname(host), port

        seeds = [await trio.to_thread.run_sync(resolve, *s) for s in settings.seeds]
        advertise = None
        if settings.advertise is not None:
            advertise = await trio.to_thread.run_sync(resolve, *settings.advertise)
        elif settings.bind[0] in ("0.0.0.0", "::"):
            advertise = await trio.to_thread.run_sync(
                resolve, socket.gethostname(), settings.bind[1]
            )
        try:
            return GossipNode(
                self.name,
                config,
                settings.bind,
                gossip_meta(self.self_member()),
                seeds,
                advertise=advertise,
            )
        except ValueError as exc:  # plaintext on a reachable bind, or an oversized meta
            raise ConfigError(f"{self.config.source}: [gossip]: {exc}") from None

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``stop()``; reports the node's HTTP base URL once it is listening."""
        hconfig = self._hconfig
        hconfig.bind = [
            f"[{self.config.host}]:{self.config.port}"
            if ":" in self.config.host
            else f"{self.config.host}:{self.config.port}"
        ]
        hconfig.accesslog = None
        hconfig.errorlog = logging.getLogger("hypercorn.error")
        hconfig.keep_alive_timeout = 75
        hconfig.graceful_timeout = 5
        hconfig.include_server_header = False
        hconfig.backlog = 4096  # the default 100 reset connections at 256 concurrent connects
        try:
            async with trio.open_nursery() as nursery:
                for backend in self.backends.values():
                    await nursery.start(backend.run)
                binds = await nursery.start(self._serve, hconfig, nursery.cancel_scope)
                if self.config.url is None:
                    self.url = binds[0]
                self.dispatcher.nursery = nursery
                self._nursery = nursery
                if self.config.gossip is not None:
                    self.gossip = await self._gossip_node()
                    await nursery.start(self.gossip.run)
                    self.membership = GossipMembership(self.self_member, self.gossip)
                    self.dispatcher.membership = self.membership
                await nursery.start(self.membership.run)
                log.info("node %s serving %s on %s", self.name, list(self.backends), self.url)
                task_status.started(self.url)
        finally:
            with trio.CancelScope(shield=True):
                await self.dispatcher.aclose()
