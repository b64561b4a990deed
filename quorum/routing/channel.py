"""The node-to-node channel: one persistent connection per peer, requests multiplexed on it
as msgpack frames, instead of one HTTP/1.1 request (and a pooled connection) per forward.

A channel opens on the peer's ordinary HTTP port: the client sends :data:`PREFACE` where an
HTTP request line would be, and the node's server, seeing it, answers :data:`ACCEPTED` and
speaks frames from then on (``quorum.server`` looks at a connection's first bytes; a node
that predates the channel answers 400 and closes, and the client falls back to HTTP). Each
request on the channel carries the same signed internal headers as an HTTP forward and is
checked the same way (``quorum.routing.headers``): the cluster HMAC authenticates every
request, so a channel opened by anyone else serves nothing but 401s.

Frames: a 4-byte big-endian length, then a msgpack array whose first item is the type::

    client -> server   OPEN   [1, id, path, headers, body]    a request
                       CANCEL [2, id]                         the client left: stop it
                       CREDIT [3, id, bytes]                  more DATA may come
    server -> client   HEAD   [4, id, status, headers]        the answer's head
                       DATA   [5, id, bytes]                  body bytes, as produced
                       END    [6, id]                         the answer is whole
                       RESET  [7, id, message]                it broke after its head

Flow control is per stream, by credit as in HTTP/2 (RFC 9113, section 5.2): the server sends
at most :data:`WINDOW` bytes of DATA beyond what the client has acknowledged with CREDIT,
so one slow reader never fills the connection for the others. A CANCEL reaches the serving
node at once (no connection to tear down), and it stops the generation there. When the
connection breaks, every open request on it fails with ``HopError``: before its head that is
a failed attempt (the entry node tries another node), after it a broken stream (resumed
elsewhere), exactly as with the HTTP hop.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import msgpack  # type: ignore[import-untyped]
import trio

from quorum.routing.hop import HopError

__all__ = [
    "ACCEPTED",
    "PREFACE",
    "WINDOW",
    "ChannelPool",
    "ChannelResponse",
    "FrameReader",
    "FrameWriter",
    "frame",
]

PREFACE = b"QUORUM-CHANNEL/1\r\n\r\n"
"""What a client sends first on a new connection, in place of an HTTP request."""
ACCEPTED = b"QUORUM-CHANNEL/1 OK\r\n\r\n"
"""What a node that speaks the channel answers to :data:`PREFACE`."""
WINDOW = 256 * 1024
"""Bytes of DATA a server may send on one stream beyond what the client acknowledged."""

OPEN, CANCEL, CREDIT, HEAD, DATA, END, RESET = range(1, 8)

_READ = 65536


class ChannelError(HopError):
    """The channel broke or a peer sent a frame that does not parse."""


def frame(*fields: Any) -> bytes:
    """One frame: the 4-byte length and the msgpack array of ``fields``."""
    payload: bytes = msgpack.packb(fields, use_bin_type=True)
    return len(payload).to_bytes(4, "big") + payload


class FrameReader:
    """Frames from ``stream``, at most ``max_frame`` bytes each. ``buffered``: bytes already
    read from the stream (after the preface)."""

    def __init__(
        self, stream: trio.abc.ReceiveStream, max_frame: int, buffered: bytes = b""
    ) -> None:
        self._stream = stream
        self._max = max_frame
        self._buffer = bytearray(buffered)

    async def next(self) -> list[Any] | None:
        """The next frame's fields, None at a clean end of the stream. Raises
        ``ChannelError`` for a frame over the limit, one that is not a msgpack array with
        an int type first, or a stream that ends mid-frame."""
        while True:
            if len(self._buffer) >= 4:
                size = int.from_bytes(self._buffer[:4], "big")
                if size > self._max:
                    raise ChannelError(f"a frame of {size} bytes is over {self._max}")
                if len(self._buffer) >= 4 + size:
                    payload = bytes(self._buffer[4 : 4 + size])
                    del self._buffer[: 4 + size]
                    try:
                        fields = msgpack.unpackb(payload, raw=False, strict_map_key=True)
                    except Exception as exc:  # msgpack raises several types for garbage
                        raise ChannelError(f"a frame does not parse: {exc!r}") from None
                    if not isinstance(fields, list) or not fields or type(fields[0]) is not int:
                        raise ChannelError("a frame is not an array with a type first")
                    return fields
            try:
                data = await self._stream.receive_some(_READ)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ChannelError(f"the channel broke: {exc!r}") from None
            if not data:
                if self._buffer:
                    raise ChannelError("the channel ended mid-frame")
                return None
            self._buffer += data


class FrameWriter:
    """The one writer of frames to ``stream``: frames queued with :meth:`write` are sent by
    :meth:`run` (one task per connection), every frame queued while a send was under way
    joined into the next send. A short answer's HEAD, DATA and END, or the frames of many
    streams under load, then cost one send instead of one each; and no request's
    cancellation can stop a send half way through a frame, which would leave the
    connection unreadable.

    ``limit``: queued bytes over which :meth:`write` waits for the send to take them (the
    connection's backpressure). After a send fails, or after :meth:`close`, every write
    raises ``trio.BrokenResourceError``.

    ``write(data, now=True)`` on a socket stream (one with a ``socket``) whose writer is idle
    writes ``data`` at once, from the caller, with one non-blocking ``send`` and no
    checkpoint; whatever the socket did not take goes to the writer as usual. That saves the
    writer task's wake-up (one scheduling round) on the path to the peer. The channel asks
    for it only for a request's first frames (OPEN; HEAD with the first DATA), which a
    client's TTFT waits on; later frames, and any written while a send is under way, are
    still joined into one send. Nothing can cancel a non-blocking ``send`` half way, so a
    frame is never cut.
    """

    def __init__(self, stream: trio.abc.SendStream, limit: int = WINDOW) -> None:
        self._stream = stream
        self._limit = limit
        self._queue: list[bytes] = []
        self._queued = 0
        self._has_frames = trio.Event()
        self._taken = trio.Event()  # set when the queue was taken (or the writer broke)
        self._sending = False  # run() is in a send_all: nothing may be written beside it
        # trio's socket (non-blocking); its fileno() is -1 once closed, never a reused number
        self._socket: Any = getattr(stream, "socket", None)
        self.error: str | None = None

    async def write(self, data: bytes, now: bool = False) -> None:
        """Queue ``data`` (whole frames) for the next send (``now``: write it at once when
        the writer is idle, see the class). Returns at once, without a checkpoint, while
        the queue is under ``limit``; waits for room otherwise. Raises
        ``trio.BrokenResourceError`` when the writer is broken or closed."""
        if self.error is not None:
            raise trio.BrokenResourceError(self.error)
        if now and self._socket is not None and not self._queue and not self._sending:
            try:
                sent = os.write(self._socket.fileno(), data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._break(f"the channel broke: {exc!r}")
                raise trio.BrokenResourceError(self.error) from None
            if sent == len(data):
                return
            data = data[sent:]  # the rest, first in the queue: the writer sends it next
        self._queue.append(data)
        self._queued += len(data)
        self._has_frames.set()
        while self._queued > self._limit and self.error is None:
            if self._taken.is_set():
                self._taken = trio.Event()
            await self._taken.wait()
        if self.error is not None:
            raise trio.BrokenResourceError(self.error)

    async def run(self) -> None:
        """Send what is queued, as it is queued, until :meth:`close` or a failed send
        (whose error is kept in ``error``; the task then returns)."""
        try:
            while True:
                await self._has_frames.wait()
                if self.error is not None:
                    return
                self._has_frames = trio.Event()
                data = self._queue[0] if len(self._queue) == 1 else b"".join(self._queue)
                self._queue.clear()
                self._queued = 0
                self._taken.set()
                self._sending = True
                await self._stream.send_all(data)
                self._sending = False
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._break(f"the channel broke: {exc!r}")
        finally:
            self._break("the channel is closed")

    def close(self) -> None:
        """Stop: :meth:`run` returns once its send under way (if any) is done; what is
        still queued is dropped."""
        self._break("the channel is closed")

    def _break(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self._queue.clear()
        self._queued = 0
        self._has_frames.set()
        self._taken.set()


class _Stream:
    """One request's receiving side on a client connection."""

    __slots__ = ("arrived", "chunks", "credit_owed", "done", "error", "head", "headers", "status")

    def __init__(self) -> None:
        self.head = trio.Event()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []  # DATA not read yet
        self.arrived: trio.Event | None = None  # set for a reader waiting for chunks
        self.error: str | None = None
        self.done = False  # END, or failed: no more chunks
        self.credit_owed = 0

    def put(self, data: bytes) -> None:
        if not self.done:  # DATA after END is the peer's mistake: dropped
            self.chunks.append(data)
            self._wake()

    def end(self) -> None:
        self.done = True
        self.head.set()
        self._wake()

    def fail(self, message: str) -> None:
        if self.done:
            return
        self.error = message
        self.end()

    def _wake(self) -> None:
        if self.arrived is not None:
            self.arrived.set()
            self.arrived = None


class _Connection:
    """A client's channel to one peer: the stream, its writer, the open requests."""

    def __init__(self, peer: tuple[str, int], stream: trio.abc.Stream, reader: FrameReader) -> None:
        self.peer = peer
        self.stream = stream
        self.reader = reader
        self.writer = FrameWriter(stream)
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.closed = False

    async def send(self, data: bytes, now: bool = False) -> None:
        """Queue ``data`` for the writer (``now``: written at once if the writer is idle,
        see ``FrameWriter``); ``ChannelError`` when the channel is closed or broken."""
        if self.closed:
            raise ChannelError("the channel is closed")
        try:
            await self.writer.write(data, now)
        except trio.BrokenResourceError as exc:
            raise ChannelError(str(exc)) from None

    async def write_frames(self) -> None:
        """The writer's task: when a send fails, the connection is closed."""
        await self.writer.run()
        with trio.CancelScope(shield=True):
            await self.close(self.writer.error or "the channel is closed")

    async def read_frames(self, tap: Callable[[bytes], None] | None) -> None:
        """Hand every frame to its stream until the connection ends."""
        reason = "the peer closed the channel"
        try:
            while True:
                fields = await self.reader.next()
                if fields is None:
                    break
                self._dispatch(fields, tap)
        except ChannelError as exc:
            reason = str(exc)
        finally:
            with trio.CancelScope(shield=True):
                await self.close(reason)

    def _dispatch(self, fields: list[Any], tap: Callable[[bytes], None] | None) -> None:
        try:
            kind, sid = fields[0], fields[1]
        except IndexError:
            raise ChannelError("a frame without a stream id") from None
        stream = self.streams.get(sid)
        if stream is None:
            return  # a stream the client already closed: its last frames are dropped
        if kind == HEAD and len(fields) == 4 and isinstance(fields[2], int):
            headers = fields[3]
            if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
            ):
                raise ChannelError("a HEAD frame's headers are not a map of strings")
            stream.status, stream.headers = fields[2], headers
            stream.head.set()
        elif kind == DATA and len(fields) == 3 and isinstance(fields[2], bytes):
            if tap is not None:
                tap(fields[2])
            stream.put(fields[2])
        elif kind == END:
            stream.end()
        elif kind == RESET:
            stream.fail(f"the peer reset the stream: {fields[2] if len(fields) > 2 else ''}")
        else:
            raise ChannelError(f"an unexpected frame of type {kind!r}")

    async def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.writer.close()
        for stream in self.streams.values():
            stream.fail(reason)
        await self.stream.aclose()


class ChannelResponse:
    """An answer arriving on a channel, with the HTTP hop's response interface: ``status``,
    ``headers`` (lower-case names), ``complete``, ``body()``, ``read(limit)``."""

    def __init__(self, connection: _Connection, sid: int, stream: _Stream) -> None:
        self.status = stream.status
        self.headers = stream.headers
        self.complete = False
        self._connection = connection
        self._sid = sid
        self._stream = stream

    async def body(self) -> AsyncGenerator[bytes]:
        """The body's bytes as they arrive; raises ``HopError`` if it breaks. DATA frames
        that arrived while the reader was busy come joined, as one chunk: a relay that fell
        behind catches up in fewer, larger writes of the same bytes."""
        stream = self._stream
        while True:
            if not stream.chunks and not stream.done:
                stream.arrived = arrived = trio.Event()
                await arrived.wait()
            if not stream.chunks:  # and done
                if stream.error is not None:
                    raise HopError(stream.error)
                self.complete = True
                return
            chunks = stream.chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            stream.chunks = []
            stream.credit_owed += len(data)
            if stream.credit_owed >= WINDOW // 2:
                owed, stream.credit_owed = stream.credit_owed, 0
                await self._connection.send(frame(CREDIT, self._sid, owed))
            yield data

    async def read(self, limit: int = 1 << 20) -> bytes:
        """The whole body; ``HopError`` when it is over ``limit`` bytes."""
        parts = []
        size = 0
        async for chunk in self.body():
            size += len(chunk)
            if size > limit:
                raise HopError(f"the answer is over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)


class ChannelPool:
    """Channels to other nodes, one per peer (``http://host:port``), opened on first use.

    ``connect_timeout_s``: seconds to connect and be accepted. ``retry_s``: after a peer
    refused the channel (a node that predates it) or could not be reached, how long
    :meth:`usable` says no, so that the caller takes the HTTP hop. ``tap``: test hook, called
    with every DATA payload received. ``connect``: opens a stream to ``(host, port)``
    (default ``trio.open_tcp_stream``). Needs :meth:`run` (the connections' reader tasks
    live in its nursery); until it runs, :meth:`usable` is False.
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float = 2.0,
        retry_s: float = 30.0,
        max_frame: int = 64 << 20,
        tap: Callable[[bytes], None] | None = None,
        connect: Callable[[str, int], Awaitable[trio.abc.Stream]] | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout_s
        self._retry_s = retry_s
        self._max_frame = max_frame
        self._tap = tap
        self._connect = connect or trio.open_tcp_stream
        self._connections: dict[tuple[str, int], _Connection] = {}
        self._opening: dict[tuple[str, int], trio.Event] = {}
        self._refused_until: dict[tuple[str, int], float] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the connections' reader tasks, for the pool's lifetime."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                with trio.CancelScope(shield=True):
                    await self.aclose()

    def usable(self, base: str) -> bool:
        """Whether to try the channel to ``base`` now (running, and the peer has not
        refused it lately)."""
        if self._nursery is None:
            return False
        peer = _peer(base)
        return trio.current_time() >= self._refused_until.get(peer, -math.inf)

    @property
    def open_channels(self) -> int:
        return sum(not c.closed for c in self._connections.values())

    @asynccontextmanager
    async def post(
        self, base: str, path: str, body: bytes, headers: Mapping[str, str]
    ) -> AsyncIterator[ChannelResponse]:
        """Send a request on the channel to ``base``; yields the answer once its head
        arrived; leaving before its END cancels it on the serving node. Raises
        ``HopError`` (``ChannelRefused`` when the peer does not speak the channel)."""
        connection = await self._connection(_peer(base))
        sid = connection.next_id
        connection.next_id += 1
        stream = _Stream()
        connection.streams[sid] = stream
        try:
            # at once if the writer is idle: the request's TTFT waits on it
            opened = frame(OPEN, sid, path, dict(headers), body)
            await connection.send(opened, True)
            await stream.head.wait()
            if stream.error is not None and not stream.status:
                raise HopError(stream.error)
            response = ChannelResponse(connection, sid, stream)
            yield response
        finally:
            del connection.streams[sid]
            if not stream.done and not connection.closed:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    try:
                        await connection.send(frame(CANCEL, sid))
                    except HopError:
                        pass

    async def aclose(self) -> None:
        for connection in list(self._connections.values()):
            await connection.close("the node is stopping")
        self._connections.clear()

    async def _connection(self, peer: tuple[str, int]) -> _Connection:
        while True:
            connection = self._connections.get(peer)
            if connection is not None and not connection.closed:
                return connection
            opening = self._opening.get(peer)
            if opening is None:
                break
            await opening.wait()  # another request is opening it: share that one
        self._opening[peer] = trio.Event()
        try:
            connection = await self._open(peer)
            self._connections[peer] = connection
            return connection
        finally:
            self._opening.pop(peer).set()

    async def _open(self, peer: tuple[str, int]) -> _Connection:
        if self._nursery is None:
            raise ChannelRefused("the channel pool is not running")
        try:
            with trio.fail_after(self._connect_timeout):
                stream = await self._connect(*peer)
                try:
                    await stream.send_all(PREFACE)
                    answer = b""
                    while len(answer) < len(ACCEPTED) and ACCEPTED.startswith(answer):
                        data = await stream.receive_some(_READ)
                        if not data:
                            break
                        answer += data
                except BaseException:
                    await stream.aclose()
                    raise
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            self._refused_until[peer] = trio.current_time() + self._retry_s
            raise ChannelRefused(f"cannot open a channel to {peer[0]}:{peer[1]}: {exc!r}") from None
        if not answer.startswith(ACCEPTED):
            await stream.aclose()
            self._refused_until[peer] = trio.current_time() + self._retry_s
            raise ChannelRefused(f"{peer[0]}:{peer[1]} does not speak the channel")
        reader = FrameReader(stream, self._max_frame, answer[len(ACCEPTED) :])
        connection = _Connection(peer, stream, reader)
        self._nursery.start_soon(connection.read_frames, self._tap)
        self._nursery.start_soon(connection.write_frames)
        return connection


class ChannelRefused(HopError):
    """The channel to a peer could not be opened (before any request was sent on it)."""


@functools.lru_cache(maxsize=1024)  # a member's URL, read for every forward to it
def _peer(base: str) -> tuple[str, int]:
    url = urlsplit(base)
    if url.scheme != "http" or url.hostname is None:
        raise HopError(f"the hop speaks plain http, not {base!r}")
    return (url.hostname, url.port or 80)
