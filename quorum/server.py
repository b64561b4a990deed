"""The node's HTTP server: hypercorn's HTTP/1.1 protocol on trio, behind a listener that caps
connections and gives every write to a client a deadline.

Why not ``hypercorn.trio.serve`` as is: a client that stops reading its stream would pin the
stream, the backend slot behind it and the hop connection forever. Hypercorn writes to the
socket inside a shielded cancel scope (``TCPServer.protocol_send``), so no deadline of the
application can interrupt it, and it has no connection cap. Here each accepted connection is
wrapped so that ``send_all`` gives up after ``send_timeout_s`` (the connection is then closed:
hypercorn sees it as a client that left, the request's nursery is cancelled and the slot is
freed), and a listener refuses connections over ``max_connections`` by closing them at once.

A streamed answer's head can be held back and written together with its first chunk: an
ASGI ``http.response.start`` message with ``HOLD_HEAD`` (``quorum.edge``) set
makes the connection keep the head's bytes and send them with the next write (one send and
one scheduling round instead of two before the client's first byte). The app sets it only
when that first chunk is already in hand. And each connection's ``Departure``
(``quorum.edge.CLIENT``, seen by the tasks hypercorn runs for it) says when the client has
gone: its end of file, a failed read, or the connection closed.

Each write to a client takes hypercorn's per-connection send lock. ``trio.Lock`` yields a
scheduling round even when it is free, so every write, the first token's included, waited
one round before its bytes left; on an entry node that round let the channel's reader take
the next frames first. The connection's lock here (``_SendLock``) takes no round when free.
The same connection (``_TCPServer``) also trims what hypercorn pays per write, per read and
per request in cancel scopes and locks; each is said where it is done.

The rest is hypercorn's own trio worker (``hypercorn/trio/run.py``, ``worker_serve``): the same
``TCPServer`` per connection, the same lifespan and graceful shutdown. Written against
hypercorn 0.18 (pinned in pyproject.toml).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import MAX_RECV as _MAX_RECV
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import (
    AppWrapper,
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    ConnectionState,
    LifespanState,
    Scope,
)
from hypercorn.utils import ShutdownError, raise_shutdown, repr_socket_addr, wrap_app

from quorum.edge import CLIENT, HOLD_HEAD, Departure

__all__ = ["ConnectionGuard", "serve"]

log = logging.getLogger(__name__)

# True while hypercorn writes a held head: the connection keeps the next write it is given.
# hypercorn writes from the task that called the app's ``send``, so the flag is seen there.
_HOLD_NEXT_WRITE: ContextVar[bool] = ContextVar("quorum_hold_next_write", default=False)


class ConnectionGuard:
    """What the listener counts: ``active`` connections now, ``refused`` over the cap since
    start, ``send_timeouts`` connections closed because the client stopped reading.

    ``max_connections``: connections served at once. ``send_timeout_s``: seconds one write
    to a client may block before the connection is closed.
    """

    def __init__(self, *, max_connections: int, send_timeout_s: float) -> None:
        if max_connections < 1 or send_timeout_s <= 0:
            raise ValueError("max_connections must be >= 1 and send_timeout_s > 0")
        self.max_connections = max_connections
        self.send_timeout_s = send_timeout_s
        self.active = 0
        self.refused = 0
        self.send_timeouts = 0


class _GuardedStream(trio.abc.HalfCloseableStream):
    """A client connection whose writes have a deadline; ``socket`` is there for hypercorn,
    which reads the peer's address from it."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, guard: ConnectionGuard) -> None:
        self._stream = stream
        self._guard = guard
        self._closed = False
        self._unread = b""
        self._held = b""  # a response head, sent with the next write
        self.departure = Departure()
        self.socket = getattr(stream, "socket", None)

    def unread(self, data: bytes) -> None:
        """Give ``data`` back: the next ``receive_some`` returns it first."""
        self._unread = data + self._unread

    async def send_all(self, data: bytes | bytearray | memoryview, *, shield: bool = False) -> None:
        """``data`` written within the connection's write deadline, and with ``shield``, also
        shielded from every cancellation but that deadline's: hypercorn shields its writes
        so that a cancelled task never leaves half a message on the connection, and one
        scope does both (a cancel scope entered and closed per write is not free)."""
        if _HOLD_NEXT_WRITE.get():
            _HOLD_NEXT_WRITE.set(False)
            self._held += data
            return
        if self._held:
            data, self._held = self._held + data, b""
        with trio.CancelScope(
            deadline=trio.current_time() + self._guard.send_timeout_s, shield=shield
        ) as scope:
            await self._stream.send_all(data)
        if scope.cancelled_caught:
            self._guard.send_timeouts += 1
            await self.aclose()
            raise trio.BrokenResourceError(
                f"the client read nothing for {self._guard.send_timeout_s} s"
            )

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._unread:
            size = len(self._unread) if max_bytes is None else max_bytes
            data, self._unread = self._unread[:size], self._unread[size:]
            return data
        try:
            received = await self._stream.receive_some(max_bytes)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.departure.set_gone()
            raise
        if not received:
            self.departure.set_gone()
        return received

    async def aclose(self) -> None:
        self.departure.set_gone()
        if not self._closed:
            self._closed = True
            self._guard.active -= 1
        await self._stream.aclose()


class _SendLock:
    """A mutex for one connection's writes, used as ``async with lock:``. Taking it when it
    is free takes no scheduling round (``trio.Lock`` takes one); when it is held, the task
    waits in FIFO order and is handed the lock by the holder's release, so a steady stream
    of writers cannot starve a waiter. A waiter cancelled while it waits leaves the queue.

    Hypercorn's ``TCPServer.protocol_send`` holds it around a shielded ``send_all``, which
    is the checkpoint a write still has.
    """

    __slots__ = ("_held", "_waiting")

    def __init__(self) -> None:
        self._held = False
        self._waiting = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        """True while a task holds the lock."""
        return self._held

    async def __aenter__(self) -> None:
        if self._held:
            await self._waiting.park()  # returns holding it: the release handed it over
        else:
            self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._waiting.unpark(count=1):
            self._held = False


class _IdleTimer:
    """Hypercorn's keep-alive timer of one connection (``TrioSingleTask``'s interface:
    ``restart(task_group, action)``, ``stop()``) without its ``trio.Lock``, which took a
    scheduling round on every request's start and end even when free, and without
    ``nursery.start``'s wait for the timer's task to begin: the cancel scope is made here
    and handed to the task, so a ``stop()`` before that task runs still ends it. Neither
    method waits, so two calls cannot interleave."""

    __slots__ = ("_scope",)

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        """Cancel the running timer, if any, and start ``action`` in ``task_group``."""
        if self._scope is not None:
            self._scope.cancel()
        self._scope = trio.CancelScope()
        task_group._nursery.start_soon(_run_within, self._scope, action)

    async def stop(self) -> None:
        """Cancel the running timer, if any."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None


async def _run_within(scope: trio.CancelScope, action: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await action()


class _TCPServer(TCPServer):
    """Hypercorn's connection, with a send lock that takes no scheduling round when free, one
    cancel scope per write where hypercorn's shield and the write deadline took two, a
    keep-alive timer without a lock (``_IdleTimer``), and, when hypercorn has no
    ``read_timeout`` (a node sets none), reads without a cancel scope each."""

    stream: _GuardedStream  # type: ignore[assignment]

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: WorkerContext,
        state: LifespanState,
        stream: _GuardedStream,
    ) -> None:
        # hypercorn annotates its stream as SSLStream; it uses only the Stream methods
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]
        self.send_lock = _SendLock()  # type: ignore[assignment]
        self.idle_task = _IdleTimer()  # type: ignore[assignment]

    async def protocol_send(self, event: Event) -> None:
        if type(event) is not RawData:
            await super().protocol_send(event)
            return
        # hypercorn's, with its shielded scope and the write deadline's made one
        async with self.send_lock:
            try:
                await self.stream.send_all(event.data, shield=True)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())

    async def _read_data(self) -> None:
        if self.config.read_timeout is not None:
            await super()._read_data()
            return
        # hypercorn's loop without ``fail_after(inf)``: a cancel scope entered on every read
        # and alive for as long as the connection waits for bytes (~1.1 KB while it does)
        while True:
            try:
                data = await self.stream.receive_some(_MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            await self.protocol.handle(RawData(bytes(data)))
            if not data:
                break
        await self.protocol.handle(Closed())


async def _first_bytes(stream: _GuardedStream, preface: bytes, timeout_s: float) -> bytes | None:
    """The connection's first bytes: enough to tell ``preface`` from anything else (an HTTP
    request differs at its first byte). None when the client sent nothing in time or left."""
    data = b""
    with trio.move_on_after(timeout_s):
        try:
            while len(data) < len(preface) and preface.startswith(data):
                more = await stream.receive_some(65536)
                if not more:
                    return data or None
                data += more
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        return data
    return None


class _GuardedListener(trio.abc.Listener[_GuardedStream]):
    def __init__(self, listener: trio.SocketListener, guard: ConnectionGuard) -> None:
        self._listener = listener
        self._guard = guard

    async def accept(self) -> _GuardedStream:
        while True:
            stream = await self._listener.accept()
            if self._guard.active < self._guard.max_connections:
                self._guard.active += 1
                return _GuardedStream(stream, self._guard)
            if not self._guard.refused:
                log.warning(
                    "over %d client connections: refusing more until some close",
                    self._guard.max_connections,
                )
            self._guard.refused += 1
            await stream.aclose()

    async def aclose(self) -> None:
        await self._listener.aclose()


async def _holding_heads(
    app: ASGIFramework, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """``app``, whose response heads marked :data:`HOLD_HEAD` are held for the next write."""

    async def holding_send(message: ASGISendEvent) -> None:
        if message.get(HOLD_HEAD):
            token = _HOLD_NEXT_WRITE.set(True)
            try:
                await send(message)
            finally:
                _HOLD_NEXT_WRITE.reset(token)
        else:
            await send(message)

    await app(scope, receive, holding_send)


async def serve(
    app: ASGIFramework,
    config: Config,
    guard: ConnectionGuard,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    channel: Callable[[trio.abc.Stream, bytes], Awaitable[None]] | None = None,
    channel_preface: bytes = b"",
    first_bytes_timeout_s: float = 30.0,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``config.bind`` (plain HTTP/1.1) until ``shutdown_trigger`` returns,
    then shut down gracefully (``config.graceful_timeout``). Reports the bound URLs
    (``["http://127.0.0.1:32768"]``) through ``task_status``.

    ``channel``: a connection that starts with ``channel_preface`` (instead of an HTTP
    request) is handed to ``channel(stream, bytes read after the preface)``, the
    node-to-node channel (``quorum.channel``); every other goes to hypercorn with its first
    bytes given back. A connection that sends nothing within ``first_bytes_timeout_s`` is
    closed."""
    wrapped = wrap_app(partial(_holding_heads, app), config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            listeners = []
            binds = []
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                listeners.append(_GuardedListener(listener, guard))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            task_status.started(binds)
            http = partial(
                _TCPServer, wrapped, config, context, ConnectionState(lifespan_state.copy())
            )

            async def handler(stream: _GuardedStream) -> None:
                if channel is not None:
                    first = await _first_bytes(stream, channel_preface, first_bytes_timeout_s)
                    if first is None:
                        await stream.aclose()
                        return
                    if first.startswith(channel_preface):
                        await channel(stream, first[len(channel_preface) :])
                        return
                    stream.unread(first)
                CLIENT.set(stream.departure)  # for the tasks hypercorn starts from this one
                await http(stream)

            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(
                        partial(
                            trio.serve_listeners, handler, listeners, handler_nursery=server_nursery
                        )
                    )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other = error.split((ShutdownError, KeyboardInterrupt))
                if other is not None:
                    raise other from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
