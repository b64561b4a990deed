"""How gossip bytes move: the transport interface and its real implementation on trio
(memberlist ``transport.go``, ``net_transport.go``).

A transport carries two things: datagrams (UDP) for probes and gossip, and request/answer
exchanges (TCP, length-prefixed frames) for push-pull and join. Both use the same port
number. Errors are translated here, at the boundary, into one exception::

    TransportError        the peer could not be reached, broke the stream, sent an
                          oversized frame, or took longer than the timeout

Cancellation (``trio.Cancelled``) is never translated.

Serving push-pulls is bounded, because anyone who reaches the port can connect before
anything is authenticated: at most ``max_connections`` are served at once (more are closed at
once, ``dropped_tcp_busy``), a request not read within the timeout is cut
(``dropped_tcp_slow``), and a frame announcing more than ``max_frame`` bytes is refused
before any of it is read (``dropped_tcp_oversize``). Memory held for unauthenticated bytes
is thus at most ``max_connections x max_frame``.
"""

from __future__ import annotations

import errno
import socket as stdlib_socket
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from .messages import Addr

__all__ = [
    "TCP_COUNTERS",
    "ExchangeHandler",
    "FrameTooLarge",
    "Transport",
    "TransportError",
    "TrioTransport",
    "read_frame",
    "write_frame",
]

_LEN = struct.Struct(">I")

ExchangeHandler = Callable[[Addr, bytes], Awaitable["bytes | None"]]
"""Server side of an exchange: ``(peer address, request frame) -> answer frame`` (None: close
without answering)."""


TCP_COUNTERS = ("dropped_tcp_busy", "dropped_tcp_slow", "dropped_tcp_oversize")
"""Push-pull connections a transport closed unanswered: over the concurrency bound, not read
within the timeout, announcing a frame over the limit."""


class TransportError(Exception):
    """An exchange with a peer failed (unreachable, broken, oversized, or too slow)."""


class FrameTooLarge(TransportError):
    """A frame announced more bytes than the limit; nothing of it was read."""


class Transport(Protocol):
    """What :class:`~quorum.gossip.runner.GossipNode` needs from the network."""

    @property
    def local_addr(self) -> Addr:
        """The address bound (the real port when port 0 was asked for)."""
        ...

    @property
    def counters(self) -> dict[str, int]:
        """Connections closed unanswered, by the keys of :data:`TCP_COUNTERS`."""
        ...

    async def send(self, addr: Addr, data: bytes) -> None:
        """Send one datagram; best effort, never raises for network errors."""
        ...

    async def receive(self) -> tuple[Addr, bytes]:
        """The next datagram and its sender."""
        ...

    async def exchange(self, addr: Addr, request: bytes) -> bytes:
        """Send ``request`` as one frame to ``addr`` over a stream, return the answer
        frame. Raises :class:`TransportError`."""
        ...

    async def serve(
        self,
        handler: ExchangeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer exchanges with ``handler`` until cancelled."""
        ...

    def close(self) -> None:
        """Release the sockets."""
        ...


async def write_frame(stream: trio.abc.SendStream, data: bytes) -> None:
    """Send ``data`` with a 4-byte big-endian length prefix."""
    await stream.send_all(_LEN.pack(len(data)) + data)


async def read_frame(stream: trio.abc.ReceiveStream, max_size: int) -> bytes:
    """Read one length-prefixed frame of at most ``max_size`` bytes. Raises
    :class:`TransportError` when the length is over the limit or the stream ends early."""
    header = await _read_exactly(stream, _LEN.size)
    (size,) = _LEN.unpack(header)
    if size > max_size:
        raise FrameTooLarge(f"frame of {size} bytes is over the limit of {max_size}")
    return await _read_exactly(stream, size)


async def _read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = await stream.receive_some(min(size - len(buf), 65536))
        if not chunk:
            raise TransportError("stream ended inside a frame")
        buf += chunk
    return bytes(buf)


class TrioTransport:
    """UDP socket plus TCP listener on one port number, on trio.

    Build it with :meth:`bind`. ``max_datagram``: larger datagrams are truncated by the
    kernel and then dropped by the core. ``max_frame``: largest push-pull frame in bytes.
    ``timeout``: seconds allowed for a whole exchange (connect, send, answer), and for
    reading a peer's request. ``max_connections``: push-pull requests served at once.
    """

    def __init__(
        self,
        udp: trio.socket.SocketType,
        listener: trio.SocketListener,
        *,
        max_datagram: int,
        max_frame: int,
        timeout: float,
        max_connections: int = 16,
    ) -> None:
        self._udp = udp
        self._listener = listener
        self._max_datagram = max_datagram
        self._max_frame = max_frame
        self._timeout = timeout
        self._max_connections = max_connections
        self._serving = 0
        self._counters = dict.fromkeys(TCP_COUNTERS, 0)
        host, port = udp.getsockname()[:2]
        self._local: Addr = (host, port)

    @classmethod
    async def bind(
        cls,
        host: str,
        port: int,
        *,
        max_datagram: int = 1400,
        max_frame: int = 1024 * 1024,
        exchange_timeout: float = 10.0,
        max_connections: int = 16,
    ) -> TrioTransport:
        """Bind UDP and TCP on ``host:port`` (port 0: any free port, the same for both).
        Raises ``OSError`` when the port is taken."""
        family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
        attempts = 20 if port == 0 else 1
        for attempt in range(attempts):
            udp = trio.socket.socket(family, stdlib_socket.SOCK_DGRAM)
            try:
                await udp.bind((host, port))
                real_port = udp.getsockname()[1]
                tcp = trio.socket.socket(family, stdlib_socket.SOCK_STREAM)
                try:
                    tcp.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
                    await tcp.bind((host, real_port))
                    tcp.listen(128)
                except BaseException:
                    tcp.close()
                    raise
            except OSError as exc:
                udp.close()
                if exc.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue
                raise
            except BaseException:
                udp.close()
                raise
            return cls(
                udp,
                trio.SocketListener(tcp),
                max_datagram=max_datagram,
                max_frame=max_frame,
                timeout=exchange_timeout,
                max_connections=max_connections,
            )
        raise AssertionError("unreachable")

    @property
    def local_addr(self) -> Addr:
        return self._local

    @property
    def counters(self) -> dict[str, int]:
        return self._counters

    async def send(self, addr: Addr, data: bytes) -> None:
        try:
            await self._udp.sendto(data, addr)
        except OSError:
            pass  # ICMP errors, unroutable hosts: UDP is best effort

    async def receive(self) -> tuple[Addr, bytes]:
        while True:
            try:
                data, addr = await self._udp.recvfrom(self._max_datagram + 1)
            except OSError:  # e.g. ECONNREFUSED reported for an earlier send
                continue
            return (addr[0], addr[1]), data

    async def exchange(self, addr: Addr, request: bytes) -> bytes:
        try:
            with trio.fail_after(self._timeout):
                stream = await trio.open_tcp_stream(addr[0], addr[1])
                async with stream:
                    await write_frame(stream, request)
                    return await read_frame(stream, self._max_frame)
        except trio.TooSlowError:
            raise TransportError(f"push-pull with {addr} timed out") from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise TransportError(f"push-pull with {addr} failed: {exc}") from None

    async def serve(
        self,
        handler: ExchangeHandler,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    stream = await self._listener.accept()
                except OSError:  # EMFILE and friends: back off a little
                    await trio.sleep(0.05)
                    continue
                if self._serving >= self._max_connections:
                    self._counters["dropped_tcp_busy"] += 1
                    await trio.aclose_forcefully(stream)
                    continue
                self._serving += 1
                nursery.start_soon(self._answer, stream, handler)

    async def _answer(self, stream: trio.SocketStream, handler: ExchangeHandler) -> None:
        try:
            await self._answer_one(stream, handler)
        finally:
            self._serving -= 1  # counted and freed before the peer can see the close
            await trio.aclose_forcefully(stream)

    async def _answer_one(self, stream: trio.SocketStream, handler: ExchangeHandler) -> None:
        try:
            peer = stream.socket.getpeername()
            with trio.move_on_after(self._timeout) as reading:
                request = await read_frame(stream, self._max_frame)
            if reading.cancelled_caught:
                self._counters["dropped_tcp_slow"] += 1
                return
            answer = await handler((peer[0], peer[1]), request)
            if answer is not None:
                with trio.move_on_after(self._timeout):
                    await write_frame(stream, answer)
        except FrameTooLarge:
            self._counters["dropped_tcp_oversize"] += 1
        except (OSError, TransportError, trio.BrokenResourceError):
            pass  # the peer hung up or misbehaved; the core counts what it received

    def close(self) -> None:
        self._udp.close()
        self._listener.socket.close()
