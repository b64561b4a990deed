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
import hashlib
import logging
import os
import secrets
import socket
import sqlite3
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from hypercorn.config import Config as HypercornConfig

from quorum.api import PARSERS, answer, create_app
from quorum.backends.base import Backend, NodeState
from quorum.backends.headers import DEFAULT as DEFAULT_POLICY
from quorum.backends.headers import HeaderPolicy
from quorum.backends.llamacpp import LlamaCppBackend
from quorum.backends.mock import MockBackend
from quorum.backends.upstream import UpstreamBackend
from quorum.c1 import Conversations
from quorum.channel import serve_channel
from quorum.config import BackendConfig, ConfigError, ConversationSettings, NodeConfig
from quorum.conversations import ConversationStore, SQLiteStore
from quorum.errors import InvalidRequest
from quorum.gateway.gate import Gate
from quorum.gateway.quota import QuotaBoard
from quorum.gossip import MAX_USAGE, GossipConfig, GossipNode, MemberState, Usage
from quorum.gossip.config import is_loopback
from quorum.gossip.seeds import BlockingResolver, system_resolver
from quorum.routing.channel import PREFACE
from quorum.routing.dispatch import Dispatcher, Reply
from quorum.routing.headers import ClusterSigner
from quorum.routing.membership import (
    GossipMembership,
    Member,
    MemberLoad,
    Membership,
    StaticMembership,
    gossip_meta,
)
from quorum.server import ConnectionGuard, serve

__all__ = ["Node", "drain_token_path", "hop_signer", "make_backend", "open_store"]

log = logging.getLogger(__name__)


def make_backend(
    config: BackendConfig, *, source: str = "<config>", policy: HeaderPolicy = DEFAULT_POLICY
) -> Backend:
    """Build the backend a ``[[backends]]`` table describes; an upstream's headers pass by
    ``policy`` (``[headers]``). Raises ``ConfigError``."""
    try:
        if config.kind == "mock":
            return MockBackend.from_config(config.model, config.options)
        if config.kind == "llamacpp":
            return LlamaCppBackend.from_config(config.model, config.options, policy=policy)
        return UpstreamBackend.from_config(config.model, config.options, policy=policy)
    except ValueError as exc:
        raise ConfigError(f"{source}: backend {config.model!r}: {exc}") from None


async def open_store(settings: ConversationSettings, source: str) -> ConversationStore:
    """The conversation store ``[conversations]`` names, opened (migrations applied). Raises
    ``ConfigError`` in one line when it cannot be: a directory that cannot be made, a
    database that cannot be reached, PostgreSQL without the ``postgres`` extra."""
    limits = {
        "max_messages": settings.max_messages,
        "max_message_bytes": settings.max_message_bytes,
        "max_conversations": settings.max_conversations,
    }
    if settings.store == "sqlite":
        assert settings.path is not None
        try:
            await trio.to_thread.run_sync(
                lambda: settings.path.parent.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            )
            return await SQLiteStore.open(settings.path, **limits)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"{source}: conversations.path: {settings.path}: {exc}") from None
    try:
        from quorum.conversations.postgres import PostgresStore
    except ImportError:
        raise ConfigError(
            f'{source}: conversations.store = "postgres" needs psycopg: '
            "pip install 'quorum[postgres]'"
        ) from None
    assert settings.dsn is not None
    try:
        return await PostgresStore.open(settings.dsn, **limits)
    except Exception as exc:  # psycopg's errors, the pool's timeout: the database is not there
        raise ConfigError(
            f"{source}: conversations.dsn: cannot open the database: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def drain_token_path(url: str) -> Path:
    """Where the node whose base URL is ``url`` keeps its drain token while it runs:
    ``$XDG_RUNTIME_DIR`` (or the temp dir) ``/quorum-<uid>/drain-<host>-<port>.token``, a
    file only its user can read. ``quorum drain`` sends it as a bearer token."""
    parts = urlsplit(url)
    host = (parts.hostname or "localhost").replace(":", "_")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    return base / f"quorum-{os.getuid()}" / f"drain-{host}-{port}.token"


def _loopback_url(bound: str) -> str | None:
    """The loopback URL that reaches a listener bound at ``bound`` (``http://0.0.0.0:P`` ->
    ``http://127.0.0.1:P``, ``http://[::]:P`` -> ``http://[::1]:P``, a loopback address ->
    itself); None when loopback does not reach it."""
    parts = urlsplit(bound)
    host = parts.hostname or ""
    reach = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if not is_loopback(reach):
        return None
    return f"{parts.scheme}://{f'[{reach}]' if ':' in reach else reach}:{parts.port}"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def hop_signer(config: NodeConfig) -> ClusterSigner:
    """The signer of this node's internal headers (``quorum.routing.headers``), keyed from
    the gossip keys or ``[cluster] secret``. Without either, only a node that listens on
    loopback alone may run (with a key derived from the cluster name, and a warning): raises
    ``ConfigError`` otherwise."""
    cluster = config.gossip.cluster if config.gossip is not None else "quorum"
    secrets = config.hop_secrets()
    if not secrets:
        binds = [config.host] + ([config.gossip.bind[0]] if config.gossip is not None else [])
        exposed = [host for host in binds if not is_loopback(host)]
        if exposed:
            raise ConfigError(
                f"{config.source}: the node listens on {exposed[0]}, beyond loopback, but has "
                "no key to sign node-to-node requests with: set [gossip].keys (or "
                "[cluster].secret for a static cluster)."
            )
        log.warning(
            "node %s: no [gossip].keys or [cluster].secret; node-to-node requests are signed "
            "with a key anyone on this machine can derive (fine for a loopback-only cluster)",
            config.name,
        )
        secrets = (hashlib.sha256(b"quorum loopback cluster " + cluster.encode()).digest(),)
    return ClusterSigner(secrets, cluster)


class Node:
    """A node process's parts. ``transport``: httpx transport for static membership's
    polls; ``tap``: called with every body chunk the node's hops receive (tests record
    what crosses the hop). ``resolver``: resolves gossip seed and advertise names
    (:mod:`quorum.gossip.seeds`; tests inject their own). ``quota_clock``: unix seconds for
    the quota windows (``quorum.gateway.quota``; tests fix it)."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        tap: Callable[[bytes], None] | None = None,
        resolver: BlockingResolver = system_resolver,
        quota_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.gate: Gate | None = None  # [auth]'s checks, set below
        self._resolver = resolver
        self.name = config.name
        self.backends: dict[str, Backend] = {
            b.model: make_backend(b, source=config.source, policy=config.headers)
            for b in config.backends
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
            signer=hop_signer(config),
            config=config.routing,
            allow_faults=config.debug_faults,
            tap=tap,
            headers=config.headers,
            policies=config.policies,
        )
        if config.auth is not None:
            board = QuotaBoard(
                config.name, config.auth.names, clock=quota_clock, peers=self._peer_figures
            )
            self.gate = Gate(config.auth, board, open_metrics=config.open_metrics)
            board.on_change = self._quota_changed
            self.dispatcher.on_tokens = self._count_tokens
        else:
            log.warning(
                "node %s has no [auth]: every client that reaches it may use it, with no "
                "quota (`quorum keys new NAME` makes a key)",
                config.name,
            )
        settings = config.conversations
        self.conversations = Conversations(
            self.dispatcher, shared=settings is not None and settings.store == "postgres"
        )
        self.drain_token = secrets.token_urlsafe(32)
        self.app = create_app(
            self.dispatcher,
            health=self.health,
            drain=self.start_drain,
            drain_token=self.drain_token,
            max_body_bytes=config.max_body_bytes,
            body_timeout_s=config.body_timeout_s,
            gate=self.gate,
            conversations=self.conversations,
        )
        self.dispatcher.metrics.watch(
            in_flight=lambda: {
                "serving": self.dispatcher.serving,
                "relaying": self.dispatcher.relaying,
            },
            member_states=lambda: [m.state for m in self.membership.members()],
            gossip=lambda: self.gossip.counters if self.gossip is not None else None,
        )
        self._shutdown = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._hconfig = HypercornConfig()
        self.connections = ConnectionGuard(
            max_connections=config.max_connections, send_timeout_s=config.send_timeout_s
        )

    @property
    def node_state(self) -> NodeState:
        """Draining once stopping, warming while any backend warms, else ready."""
        if self.draining:
            return NodeState.DRAINING
        if any(b.state == "warming" for b in self.backends.values()):  # a BackendState
            return NodeState.WARMING
        return NodeState.READY

    def load(self) -> MemberLoad:
        """What this node gossips: ``in_flight`` is what its backends are serving (busy
        slots), so ``in_flight + free_slots`` is their capacity; requests it only relays
        elsewhere are not load here."""
        loads = [b.load() for b in self.backends.values()]
        return MemberLoad(
            in_flight=sum(x.busy for x in loads),
            free_slots=sum(x.free for x in loads),
            queue_depth=sum(x.queued for x in loads),
        )

    def _count_tokens(self, key: str, tokens: int) -> None:
        assert self.gate is not None
        self.gate.add_tokens(key, tokens)
        self.dispatcher.metrics.key_tokens.labels(key).inc(tokens)

    def _quota_changed(self) -> None:
        if isinstance(self.membership, GossipMembership):
            self.membership.nudge()

    def _peer_figures(self) -> list[tuple[str, bool, tuple[Usage, ...]]]:
        """The quota figures other members gossip, for the quota board."""
        return [
            (m.name, m.state == MemberState.ALIVE or m.state == MemberState.SUSPECT, m.usage)
            for m in self.membership.members()
            if m.name != self.name
        ]

    def self_member(self) -> Member:
        usage: tuple[Usage, ...] = ()
        if self.gate is not None:
            usage = tuple(Usage(*f) for f in self.gate.board.figures(MAX_USAGE))
        return Member(
            name=self.name,
            url=self.url,
            state=MemberState.ALIVE,
            node_state=self.node_state,
            models=tuple(self.backends),
            load=self.load(),
            weights=tuple((m, b.weight) for m, b in self.backends.items() if b.weight != 1.0),
            usage=usage,
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
                "relaying": self.dispatcher.relaying,
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
        log.info("node %s draining: %d requests under way", self.name, self.dispatcher.busy)
        with trio.move_on_after(timeout_s):
            await self.dispatcher.wait_idle()
        # What is left are idle keep-alive connections: hypercorn's graceful wait for them
        # (5 s) would only delay the exit. It reads the value when the shutdown begins.
        self._hconfig.graceful_timeout = min(self._hconfig.graceful_timeout, 0.5)
        if self.dispatcher.busy:
            log.warning(
                "node %s: drain timed out with %d under way", self.name, self.dispatcher.busy
            )
        self.stop()

    def start_drain(self) -> dict[str, Any]:
        """Begin ``drain`` in the background (``POST /admin/drain``); returns the state."""
        if self._nursery is not None and not self.draining:
            self._nursery.start_soon(self.drain)
        return {"node": self.name, "state": NodeState.DRAINING, "in_flight": self.dispatcher.busy}

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
        # serve returns once its graceful shutdown is done; then the rest is cancelled.
        await serve(
            self.app,
            hconfig,
            self.connections,
            shutdown_trigger=self._shutdown.wait,
            channel=self._serve_channel,
            channel_preface=PREFACE,
            first_bytes_timeout_s=self.config.body_timeout_s,
            task_status=task_status,
        )
        if self.gossip is not None:
            await self.gossip.leave(timeout=2.0)  # announce "left", not a death
        scope.cancel()

    async def _serve_channel(self, stream: trio.abc.Stream, buffered: bytes) -> None:
        """A peer's channel (``quorum.channel``): its forwards answered as over HTTP."""

        async def handler(path: str, body: bytes, headers: Mapping[str, str]) -> Reply:
            if path not in PARSERS:
                raise InvalidRequest(f"There is no endpoint POST {path}.", status=404)
            return await answer(self.dispatcher, path, body, headers)

        await serve_channel(
            stream,
            handler,
            buffered=buffered,
            max_frame=self.config.max_body_bytes + (1 << 16),
            # a peer's channel carries up to as many requests as client connections would
            max_streams=self.config.max_connections,
        )

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
            # An address literal (IPv4 or IPv6) is itself; of a name's addresses, the first
            # of the bound socket's family (an IPv4 socket cannot answer on IPv6).
            found = self._resolver(host, port)
            v6 = ":" in settings.bind[0]
            return next((a for a in found if (":" in a[0]) == v6), found[0])

        # Seeds stay names: the gossip runner resolves them on every join attempt, so that
        # peers that appear later (a headless Service's pods) are found.
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
                settings.seeds,
                advertise=advertise,
                resolver=self._resolver,
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
        # hypercorn's idle timer runs from accept to a complete request head, and between
        # requests: so a head trickled a byte at a time is cut off like a slow body is
        hconfig.keep_alive_timeout = self.config.body_timeout_s
        hconfig.graceful_timeout = 5
        hconfig.include_server_header = False
        hconfig.backlog = 4096  # the default 100 reset connections at 256 concurrent connects
        token_files: list[Path] = []
        try:
            if self.config.conversations is not None:
                self.conversations.store = await open_store(
                    self.config.conversations, self.config.source
                )
            async with trio.open_nursery() as nursery:
                for backend in self.backends.values():
                    await nursery.start(backend.run)
                binds = await nursery.start(self._serve, hconfig, nursery.cancel_scope)
                if self.config.url is None:
                    self.url = binds[0]
                # /admin/drain answers loopback only: when the node's URL names another
                # address (a pod IP, a compose service), `quorum drain http://127.0.0.1:PORT`
                # on its machine must find the token too.
                for url in dict.fromkeys(u for u in (self.url, _loopback_url(binds[0])) if u):
                    token_files.append(drain_token_path(url))
                    await trio.to_thread.run_sync(_write_private, token_files[-1], self.drain_token)
                self.dispatcher.nursery = nursery
                await nursery.start(self.dispatcher.hop.run)
                if self.dispatcher.channel is not None:
                    await nursery.start(self.dispatcher.channel.run)
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
                if self.conversations.store is not None:
                    await self.conversations.store.aclose()
            for token_file in token_files:
                token_file.unlink(missing_ok=True)
