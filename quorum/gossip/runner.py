"""The gossip runner: trio tasks that move bytes between a transport and the sans-IO core.

:class:`GossipNode` is what the rest of Quorum uses::

    node = GossipNode(name="node-a", config=GossipConfig.local(keys=(key,)),
                      bind=("127.0.0.1", 7946), meta=NodeMeta(...), seeds=[("127.0.0.1", 7947)])
    host, port = await nursery.start(node.run)
    node.members(); node.set_load(Load(...)); await node.leave()

It holds no protocol logic: the receive task hands datagrams to the core, the timer task
ticks it at ``next_deadline()``, push-pulls run as short tasks, and the transport answers
push-pulls from peers. The core is only touched from trio tasks of one thread, never across
an ``await``, so it needs no lock.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence

import trio

from .config import GossipConfig, check_encryption
from .core import COUNTERS, GossipCore, check_meta
from .events import MemberEvent, Output, PushPullRequest, Send
from .messages import Addr, Load, MemberInfo, MemberState, NodeMeta
from .seeds import Resolver, resolve_seed
from .transport import TCP_COUNTERS, Transport, TransportError, TrioTransport

__all__ = ["GossipNode"]

log = logging.getLogger(__name__)

_RUNNER_COUNTERS = ("push_pull_failed", "event_callback_errors", "seed_resolve_failed")


class GossipNode:
    """One node's membership, running on trio.

    ``name``: unique in the cluster. ``config``: timings, limits, cluster name and keys.
    ``bind``: (host, port) for UDP and TCP; port 0 picks a free port. ``meta``: published in
    every alive message. ``seeds``: addresses of members to join through; may be empty or
    unreachable at first, they are retried (with backoff) while no other member is alive.
    ``advertise``: the address to publish when it differs from the bound one (e.g. bound to
    0.0.0.0). ``on_event``: called synchronously with each membership event (exceptions from
    it are counted, not raised). ``transport``: a ready transport instead of binding one
    (tests). ``rng``: randomness (default: a fresh ``random.Random``). ``resolver``: when
    given, ``seeds`` are ``(name, port)`` pairs resolved with it (in a worker thread, at most
    ``config.tcp_timeout`` seconds) on every join attempt, and every address found is tried
    (:mod:`~quorum.gossip.seeds`; failures counted in ``seed_resolve_failed``); without it,
    seeds are addresses.

    Raises :class:`~quorum.gossip.config.PlaintextGossipError` (a ``ValueError``) when
    ``config.keys`` is empty and ``bind`` is not a loopback address, before anything is
    bound; on loopback without keys it logs one warning. Raises ``ValueError`` when the meta
    does not fit ``config.max_meta_size``.
    """

    def __init__(
        self,
        name: str,
        config: GossipConfig,
        bind: Addr,
        meta: NodeMeta,
        seeds: Sequence[Addr] = (),
        *,
        load: Load | None = None,
        advertise: Addr | None = None,
        on_event: Callable[[MemberEvent], None] | None = None,
        transport: Transport | None = None,
        rng: random.Random | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._bind = bind
        self._meta = meta
        self._load = load
        self._seeds = list(seeds)
        self._advertise = advertise
        self._on_event = on_event
        self._transport = transport
        self._rng = rng or random.Random()
        self._resolver = resolver
        self._resolving: set[Addr] = set()
        self._core: GossipCore | None = None
        self._nursery: trio.Nursery | None = None
        self._wakeup = trio.Event()
        self._stop = trio.Event()
        self._left = trio.Event()
        self._pulling: set[Addr] = set()
        self._counters = dict.fromkeys(_RUNNER_COUNTERS, 0)
        check_meta(meta, config)  # fail fast, before run()
        if check_encryption(config, bind[0]):
            log.warning(
                "gossip of %s on %s:%d is unencrypted (no [gossip] keys): acceptable on "
                "loopback only",
                name,
                bind[0],
                bind[1],
            )

    # --- the public face -------------------------------------------------------------------

    @property
    def address(self) -> Addr | None:
        """The advertised gossip address once running, else None."""
        return None if self._core is None else self._core.addr

    def members(self) -> list[MemberInfo]:
        """Every known member including ourselves, sorted by name. Before :meth:`run` has
        bound its sockets, only ourselves (with port 0 if unknown)."""
        if self._core is None:
            addr = self._advertise or self._bind
            return [
                MemberInfo(
                    self.name,
                    addr,
                    MemberState.ALIVE,
                    1,
                    self._meta,
                    self._load,
                    1 if self._load is not None else 0,
                )
            ]
        return self._core.members()

    def member(self, name: str) -> MemberInfo | None:
        """One member's record, or None."""
        if self._core is None:
            return next((m for m in self.members() if m.name == name), None)
        return self._core.member(name)

    def set_meta(self, meta: NodeMeta) -> None:
        """Publish new meta (raises our incarnation). Raises ``ValueError`` when it does
        not fit ``config.max_meta_size``."""
        if self._core is None:
            check_meta(meta, self.config)
            self._meta = meta
        else:
            self._core.set_meta(meta)
            self._wakeup.set()

    def set_load(self, load: Load, *, resend: bool = False) -> None:
        """Publish new load figures (cheap: coalesced, sent with the next gossip);
        ``resend``: an equal load is queued again (``GossipCore.set_load``)."""
        if self._core is None:
            self._load = load
        else:
            self._core.set_load(load, resend=resend)

    @property
    def counters(self) -> dict[str, int]:
        """Totals: the core's (``received``, ``sent``, ``dropped_decrypt``,
        ``dropped_decode``, ``dropped_oversize``, ...), the transport's
        (``dropped_tcp_busy``, ``dropped_tcp_slow``, ``dropped_tcp_oversize``) and the
        runner's (``push_pull_failed``, ``event_callback_errors``, ``seed_resolve_failed``)."""
        base = dict.fromkeys(COUNTERS + TCP_COUNTERS, 0)
        if self._core is not None:
            base.update(self._core.counters)
        if self._transport is not None:
            base.update(self._transport.counters)
        base.update(self._counters)
        return base

    async def leave(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109 - the API's shape
        """Announce that we leave, wait until the news was sent its full number of times or
        ``timeout`` seconds pass, then make :meth:`run` return."""
        core = self._core
        if core is not None and not self._stop.is_set():
            self._dispatch_soon(core.leave(trio.current_time()))
            self._wakeup.set()
            with trio.move_on_after(timeout):
                await self._left.wait()
        self._stop.set()

    # --- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Addr] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, join, and gossip until :meth:`leave` or cancellation. Reports the bound
        (advertised) address through ``task_status.started``. Raises ``OSError`` when the
        address cannot be bound."""
        transport = self._transport
        if transport is None:
            transport = await TrioTransport.bind(
                self._bind[0],
                self._bind[1],
                max_datagram=self.config.max_datagram,
                max_frame=self.config.max_push_pull_bytes,
                exchange_timeout=self.config.tcp_timeout,
                max_connections=self.config.max_push_pull_conns,
            )
        self._transport = transport
        try:
            core = GossipCore(
                self.name,
                self._advertise or transport.local_addr,
                self._meta,
                self.config,
                rng=self._rng,
                now=trio.current_time(),
                seeds=self._seeds,
                load=self._load,
                epoch=time.time_ns(),  # this life: later than any earlier start of this node
            )
            self._core = core
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_loop, transport, core)
                await nursery.start(transport.serve, self._answer_push_pull)
                nursery.start_soon(self._timer_loop, core)
                task_status.started(core.addr)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            transport.close()

    async def _receive_loop(self, transport: Transport, core: GossipCore) -> None:
        while True:
            addr, data = await transport.receive()
            await self._dispatch(core.receive(trio.current_time(), addr, data))
            self._wakeup.set()

    async def _timer_loop(self, core: GossipCore) -> None:
        while True:
            await self._dispatch(core.tick(trio.current_time()))
            if core.leaving and core.leave_done:
                self._left.set()
            with trio.move_on_at(core.next_deadline()):
                await self._wakeup.wait()
            self._wakeup = trio.Event()

    async def _answer_push_pull(self, addr: Addr, data: bytes) -> bytes | None:
        assert self._core is not None
        answer, outputs = self._core.answer_push_pull(trio.current_time(), addr, data)
        await self._dispatch(outputs)
        self._wakeup.set()
        return answer

    async def _push_pull(self, request: PushPullRequest) -> None:
        core, transport = self._core, self._transport
        assert core is not None and transport is not None
        if request.addr in self._pulling:
            return
        self._pulling.add(request.addr)
        try:
            payload = core.push_pull_payload(request.join, trio.current_time())
            answer = await transport.exchange(request.addr, payload)
        except TransportError:
            self._counters["push_pull_failed"] += 1
            return
        finally:
            self._pulling.discard(request.addr)
        await self._dispatch(core.receive_push_pull(trio.current_time(), request.addr, answer))
        self._wakeup.set()

    async def _join_seed(self, seed: Addr) -> None:
        """One join attempt through a named seed: resolve it now, push-pull with each address
        found except our own."""
        core, resolver = self._core, self._resolver
        assert core is not None and self._nursery is not None and resolver is not None
        if seed in self._resolving:  # the previous attempt's lookup is still under way
            return
        self._resolving.add(seed)
        try:
            addrs = await resolve_seed(resolver, seed, within_s=self.config.tcp_timeout)
        except OSError:
            self._counters["seed_resolve_failed"] += 1
            return
        finally:
            self._resolving.discard(seed)
        for addr in addrs:
            if addr != core.addr:
                self._nursery.start_soon(self._push_pull, PushPullRequest(addr, join=True))

    def _dispatch_soon(self, outputs: list[Output]) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._dispatch, outputs)

    async def _dispatch(self, outputs: list[Output]) -> None:
        transport = self._transport
        assert transport is not None
        for out in outputs:
            if isinstance(out, Send):
                await transport.send(out.addr, out.data)
            elif isinstance(out, PushPullRequest):
                assert self._nursery is not None
                if out.join and self._resolver is not None:  # out.addr is a seed's name
                    self._nursery.start_soon(self._join_seed, out.addr)
                else:
                    self._nursery.start_soon(self._push_pull, out)
            elif self._on_event is not None:
                try:
                    self._on_event(out)
                except Exception:
                    self._counters["event_callback_errors"] += 1
