"""The node-to-node hop client (h11 over trio) against a server the test controls."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial

import h11
import pytest
import trio

from quorum.routing.hop import HopError, HopPool

Handler = Callable[[trio.SocketStream, h11.Connection], Awaitable[bool]]


async def respond(stream: trio.SocketStream, conn: h11.Connection, chunks: list[bytes]) -> bool:
    """Answer 200 with ``chunks`` as the chunked body; True keeps the connection open."""
    data = conn.send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]))
    for chunk in chunks:
        data += conn.send(h11.Data(data=chunk))
    await stream.send_all(data + conn.send(h11.EndOfMessage()))
    conn.start_next_cycle()
    return True


class Server:
    """What the test server saw: connections ``accepted``; ``closed`` is set each time it
    closed one (replaced by a fresh event)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.closed = trio.Event()


async def serve(handler: Handler, seen: Server, *, task_status: trio.TaskStatus[int]) -> None:
    async def one(stream: trio.SocketStream) -> None:
        seen.accepted += 1
        conn = h11.Connection(h11.SERVER)
        try:
            async with stream:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        conn.receive_data(data)
                    elif isinstance(event, h11.EndOfMessage):
                        if not await handler(stream, conn):
                            return
        finally:
            seen.closed.set()
            seen.closed = trio.Event()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(one, listeners)


async def start(nursery: trio.Nursery, handler: Handler) -> tuple[str, Server]:
    seen = Server()
    port = await nursery.start(serve, handler, seen)
    return f"http://127.0.0.1:{port}", seen


async def post(pool: HopPool, base: str) -> bytes:
    async with pool.post(base, "/x", b"{}", {"content-type": "application/json"}) as response:
        assert response.status == 200
        return await response.read()


async def test_sequential_requests_reuse_one_connection(nursery: trio.Nursery) -> None:
    base, seen = await start(nursery, partial_respond([b"data: a\n\n", b"data: b\n\n"]))
    pool = HopPool()
    for _ in range(5):
        assert await post(pool, base) == b"data: a\n\ndata: b\n\n"
    assert seen.accepted == 1
    await pool.aclose()


async def test_a_connection_the_peer_closed_while_idle_is_replaced(
    nursery: trio.Nursery,
) -> None:
    async def answer_then_close(stream: trio.SocketStream, conn: h11.Connection) -> bool:
        await respond(stream, conn, [b"ok"])
        return False  # closes after each answer, as a keep-alive timeout would

    base, seen = await start(nursery, answer_then_close)
    pool = HopPool()
    closed = seen.closed
    assert await post(pool, base) == b"ok"
    await closed.wait()  # the pooled connection is closed at the server's end now
    assert await post(pool, base) == b"ok"
    assert seen.accepted == 2
    await pool.aclose()


async def test_an_unreachable_peer_is_a_hop_error() -> None:
    pool = HopPool(connect_timeout_s=1.0)
    with pytest.raises(HopError):
        await post(pool, "http://127.0.0.1:9")


async def test_a_body_cut_mid_way_is_a_hop_error_and_the_connection_is_not_reused(
    nursery: trio.Nursery,
) -> None:
    async def cut(stream: trio.SocketStream, conn: h11.Connection) -> bool:
        head = conn.send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]))
        await stream.send_all(head + conn.send(h11.Data(data=b"data: partial")))
        return False

    base, seen = await start(nursery, cut)
    pool = HopPool()
    for _ in range(2):
        with pytest.raises(HopError):
            await post(pool, base)
    assert seen.accepted == 2


def partial_respond(chunks: list[bytes]) -> Handler:
    return partial(respond, chunks=chunks)


async def test_cancelled_while_waiting_for_the_head_closes_the_connection(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    release = trio.Event()

    async def slow(stream: trio.SocketStream, conn: h11.Connection) -> bool:
        await release.wait()
        return await respond(stream, conn, [b"late"])

    base, seen = await start(nursery, slow)
    pool = HopPool()
    with trio.move_on_after(0.1):
        await post(pool, base)
    release.set()
    assert await post(pool, base) == b"late"  # a new connection: the first was closed
    assert seen.accepted == 2
    await pool.aclose()
