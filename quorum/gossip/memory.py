"""An in-memory network for ``GossipNode``s on one trio loop (memberlist ``mock_transport.go``).

Datagrams are dropped, delayed and duplicated from a seeded ``random.Random``; ``partition``
cuts groups of addresses apart (datagrams and push-pull exchanges alike) until ``heal``.
Delivery runs on trio time, so under ``MockClock`` a minute of gossip takes milliseconds.

::

    network = MemoryNetwork(nursery, seed=1, loss=0.1, delay=0.002)
    node = GossipNode("a", config, bind=("10.0.0.1", 7946), meta=meta,
                      transport=network.transport(("10.0.0.1", 7946)))
"""

from __future__ import annotations

import math
import random

import trio

from .messages import Addr
from .transport import TCP_COUNTERS, ExchangeHandler, TransportError

__all__ = ["MemoryNetwork", "MemoryTransport"]


class MemoryNetwork:
    """The fake network. ``loss``/``duplicate``: probabilities in [0, 1]; ``delay``: seconds
    of one-way latency (each datagram gets ``delay * U(0.5, 1.5)``)."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        seed: int = 0,
        loss: float = 0.0,
        duplicate: float = 0.0,
        delay: float = 0.001,
    ) -> None:
        self._nursery = nursery
        self._rng = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.delay = delay
        self._transports: dict[Addr, MemoryTransport] = {}
        self._groups: list[set[Addr]] = []
        self.delivered = 0
        self.dropped = 0

    def transport(self, addr: Addr) -> MemoryTransport:
        """A transport bound at ``addr``; raises ``OSError`` if the address is taken."""
        if addr in self._transports:
            raise OSError(f"{addr} is already bound")
        transport = MemoryTransport(self, addr)
        self._transports[addr] = transport
        return transport

    def partition(self, *groups: set[Addr]) -> None:
        """Only addresses in the same group reach each other (those in none reach nobody)."""
        self._groups = [set(g) for g in groups]

    def heal(self) -> None:
        self._groups = []

    def reachable(self, a: Addr, b: Addr) -> bool:
        if not self._groups:
            return True
        return any(a in g and b in g for g in self._groups)

    def _unbind(self, addr: Addr) -> None:
        self._transports.pop(addr, None)

    def _send(self, source: Addr, addr: Addr, data: bytes) -> None:
        copies = 2 if self._rng.random() < self.duplicate else 1
        for _ in range(copies):
            if self._rng.random() < self.loss or not self.reachable(source, addr):
                self.dropped += 1
                continue
            delay = self.delay * self._rng.uniform(0.5, 1.5)
            self._nursery.start_soon(self._deliver, source, addr, data, delay)

    async def _deliver(self, source: Addr, addr: Addr, data: bytes, delay: float) -> None:
        await trio.sleep(delay)
        target = self._transports.get(addr)
        if target is None or not self.reachable(source, addr):
            self.dropped += 1
            return
        self.delivered += 1
        target._inbox_send.send_nowait((source, data))

    async def _exchange(self, source: Addr, addr: Addr, request: bytes) -> bytes:
        await trio.sleep(self.delay)
        target = self._transports.get(addr)
        if target is None or target._handler is None or not self.reachable(source, addr):
            raise TransportError(f"{addr} cannot be reached from {source}")
        answer = await target._handler(source, request)
        if answer is None:
            raise TransportError(f"{addr} refused the exchange")
        await trio.sleep(self.delay)
        return answer


class MemoryTransport:
    """One node's end of a ``MemoryNetwork`` (the ``Transport`` protocol)."""

    def __init__(self, network: MemoryNetwork, addr: Addr) -> None:
        self._network = network
        self._addr = addr
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[Addr, bytes]](math.inf)
        self._handler: ExchangeHandler | None = None

    @property
    def local_addr(self) -> Addr:
        return self._addr

    @property
    def counters(self) -> dict[str, int]:
        """Always zero: the in-memory network has no connections to refuse."""
        return dict.fromkeys(TCP_COUNTERS, 0)

    async def send(self, addr: Addr, data: bytes) -> None:
        self._network._send(self._addr, addr, data)
        await trio.lowlevel.checkpoint()

    async def receive(self) -> tuple[Addr, bytes]:
        return await self._inbox.receive()

    async def exchange(self, addr: Addr, request: bytes) -> bytes:
        return await self._network._exchange(self._addr, addr, request)

    async def serve(
        self,
        handler: ExchangeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._handler = handler
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._handler = None

    def close(self) -> None:
        self._network._unbind(self._addr)
        self._inbox_send.close()
