"""Single-flight: identical concurrent deterministic requests share one generation.

A request is shareable when its answer is determined by its body (``seed`` set, or
``temperature: 0``) and the client did not opt out (``x-quorum-single-flight: off``). The
first such request starts a ``Flight`` in the node's nursery; identical ones that arrive
while it runs follow it from its first byte (``x-quorum-shared`` counts them). Like Go's
``golang.org/x/sync/singleflight``, but for streams: every follower replays the chunks so far
and then follows live.

The table of flights is keyed by a digest of what the client sent (path, pin, fault, body),
and bounded by the requests in progress: a flight leaves the table when it ends, and it ends
when its last client has left.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any

import trio

from quorum.errors import ApiError, UpstreamFailed
from quorum.routing.headers import SHARED, SINGLE_FLIGHT
from quorum.routing.relay import Reply, stream_error
from quorum.wire import Request

__all__ = ["Flight", "SingleFlight", "shareable"]

log = logging.getLogger(__name__)


class SingleFlight:
    """The flights of one node. ``nursery``: where flights run (the node's own), so that a
    client that leaves does not end the work of the others."""

    def __init__(self) -> None:
        self.flights: dict[bytes, Flight] = {}
        self.nursery: trio.Nursery | None = None

    @staticmethod
    def key(path: str, pin: str | None, fault: str, body: bytes) -> bytes:
        """What changes the answer or its route: the path, a pin, a fault and the body."""
        extra = f"{pin or ''}\0{fault}".encode()
        return hashlib.sha256(path.encode() + b"\0" + extra + b"\0" + body).digest()

    async def join(self, key: bytes, start: Callable[[], Awaitable[Reply]]) -> Reply:
        """This client's reply from the flight under ``key``, starting it with ``start()``
        (in the node's nursery) if none runs."""
        flight = self.flights.get(key)
        if flight is None:
            flight = Flight()
            self.flights[key] = flight

            async def run() -> None:
                try:
                    with flight.scope:
                        await flight.run(start())
                finally:
                    flight.finish()
                    if self.flights.get(key) is flight:
                        del self.flights[key]

            assert self.nursery is not None, "SingleFlight.nursery is set by the node"
            self.nursery.start_soon(run)
        return await flight.reply()


def shareable(request: Request, headers: Mapping[str, str]) -> bool:
    """Deterministic (``seed`` set, or temperature 0) and not opted out."""
    if headers.get(SINGLE_FLIGHT, "").lower() in ("off", "0", "false", "no"):
        return False
    return request.seed is not None or request.raw.get("temperature") == 0


class Flight:
    """One generation shared by identical concurrent requests.

    The generation runs in the node's nursery, not in any one client's request, so a client
    that leaves does not end it for the others. Every client is counted from the moment it
    asks (``shared`` and ``clients``) until it has its whole answer or leaves, so the work
    is cancelled as soon as nobody waits for it, even a non-streamed answer still being
    generated. Nothing the generation raises escapes into the node's nursery: an
    ``ApiError`` is every client's answer, anything else is logged and answered as a 502
    (before the head) or ends the shared stream with an error event (after it). Every
    follower gets the whole stream from its first byte.
    """

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.started = trio.Event()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.error: ApiError | None = None
        self.chunks: list[bytes] = []
        self.done = False
        self.clients = 0  # clients attached now
        self.shared = 0  # clients that asked for this flight in all
        self._changed = trio.Event()

    async def run(self, reply_coro: Any) -> None:
        try:
            reply: Reply = await reply_coro
        except ApiError as exc:
            self.error = exc
            return
        except Exception:
            log.exception("a shared generation failed before its head")
            self.error = UpstreamFailed("The shared generation failed before its first byte.")
            return
        self.status, self.headers = reply.status, reply.headers
        if isinstance(reply.body, bytes):
            self.chunks.append(reply.body)
            return
        self.started.set()
        try:
            async with aclosing(reply.body) as body:  # type: ignore[type-var]
                async for chunk in body:
                    self._append(chunk)
        except Exception:
            log.exception("a shared stream failed")
            self._append(stream_error("The shared stream failed on this node."))

    def _append(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self._changed.set()
        self._changed = trio.Event()

    def finish(self) -> None:
        self.done = True
        self.started.set()
        self._changed.set()

    def leave(self) -> None:
        """One client is done with the flight; the last one to leave stops the work."""
        self.clients -= 1
        if not self.clients and not self.done:
            self.scope.cancel()

    async def reply(self) -> Reply:
        """This client's answer: the shared error, the shared body, or a follower of the
        shared stream (which leaves the flight when it is closed)."""
        self.clients += 1
        self.shared += 1
        try:
            await self.started.wait()
            if self.error is not None:
                raise self.error
            if not self.chunks and self.done:
                raise UpstreamFailed("the shared generation ended before it produced anything")
        except BaseException:
            self.leave()
            raise
        headers = self.headers | {SHARED: str(self.shared)}
        if not self.headers.get("content-type", "").startswith("text/event-stream"):
            self.leave()
            return Reply(self.status, headers, b"".join(self.chunks))
        return Reply(self.status, headers, Follower(self))


class Follower(AsyncIterator[bytes]):
    """One client's view of a shared stream: every chunk from the first. ``aclose`` (also
    when it was never iterated) leaves the flight."""

    def __init__(self, flight: Flight) -> None:
        self._flight = flight
        self._next = 0
        self._left = False

    def __aiter__(self) -> Follower:
        return self

    async def __anext__(self) -> bytes:
        flight = self._flight
        while self._next >= len(flight.chunks):
            if flight.done or self._left:
                await self.aclose()
                raise StopAsyncIteration
            await flight._changed.wait()
        self._next += 1
        return flight.chunks[self._next - 1]

    async def aclose(self) -> None:
        if not self._left:
            self._left = True
            self._flight.leave()
