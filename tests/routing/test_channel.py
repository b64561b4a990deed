"""The node-to-node channel: forwards share one connection per peer, a peer that does not
speak it gets the HTTP hop, a channel request without the cluster's signature gets 401,
garbage closes the channel, a slow reader holds the sender to its credit (and a credit frees
the stream it names), frames queued together leave in one send, and a request's first frames
leave at once, without the writer task, when the connection is idle."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from functools import partial

import httpx
import pytest
import trio
import trio.testing

from quorum.channel import serve_channel
from quorum.routing.channel import (
    CREDIT,
    DATA,
    END,
    HEAD,
    OPEN,
    PREFACE,
    WINDOW,
    ChannelPool,
    ChannelRefused,
    FrameReader,
    FrameWriter,
    frame,
)
from quorum.routing.relay import Reply
from tests.helpers import MESSAGES, node_config, start_cluster


async def test_forwards_share_one_channel_and_no_http_connection(nursery: trio.Nursery) -> None:
    cluster = await start_cluster(nursery, [node_config("node-a"), node_config("node-c")])
    entry = cluster["node-a"]
    body = {"model": "mock-coder", "messages": MESSAGES, "max_tokens": 8}
    statuses: list[int] = []

    async with httpx.AsyncClient(base_url=cluster.url("node-a"), timeout=10) as http:

        async def one(i: int) -> None:
            payload = {**body, "stream": bool(i % 2), "seed": i}
            statuses.append((await http.post("/v1/chat/completions", json=payload)).status_code)

        async with trio.open_nursery() as clients:
            for i in range(20):
                clients.start_soon(one, i)
        answer = await http.post("/v1/chat/completions", json=body)
    assert statuses == [200] * 20
    assert answer.status_code == 200 and answer.headers["x-quorum-node"] == "node-c"
    assert entry.dispatcher.channel is not None
    assert entry.dispatcher.channel.open_channels == 1
    c = cluster["node-c"]
    assert entry.dispatcher.hop.idle(("127.0.0.1", int(c.url.rsplit(":", 1)[1]))) == 0
    assert c.connections.active == 1  # the channel alone


async def test_a_peer_that_does_not_speak_the_channel_is_left_to_the_http_hop(
    nursery: trio.Nursery,
) -> None:
    async def http_only(stream: trio.SocketStream) -> None:
        await stream.receive_some(1024)
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, http_only, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    pool = ChannelPool(retry_s=30)
    await nursery.start(pool.run)
    base = f"http://127.0.0.1:{port}"
    assert pool.usable(base)
    with pytest.raises(ChannelRefused, match="does not speak the channel"):
        async with pool.post(base, "/v1/chat/completions", b"{}", {}):
            pass
    assert not pool.usable(base)  # for retry_s: the caller takes the HTTP hop


async def _channel_server(
    nursery: trio.Nursery, handler: object
) -> tuple[str, list[trio.SocketStream]]:
    async def accept(stream: trio.SocketStream) -> None:
        data = b""
        while len(data) < len(PREFACE):
            data += await stream.receive_some(1024)
        await serve_channel(stream, handler, buffered=data[len(PREFACE) :])  # type: ignore[arg-type]

    listeners = await nursery.start(partial(trio.serve_tcp, accept, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", []


async def test_a_channel_request_without_the_signed_headers_is_refused(
    nursery: trio.Nursery,
) -> None:
    called = []

    async def handler(path: str, body: bytes, headers: Mapping[str, str]) -> Reply:
        called.append(path)
        return Reply(200, {}, b"served")

    base, _ = await _channel_server(nursery, handler)
    pool = ChannelPool()
    await nursery.start(pool.run)
    async with pool.post(base, "/v1/chat/completions", b"{}", {"x-request-id": "r"}) as r:
        assert r.status == 401
        assert json.loads(await r.read())["error"]["code"] == "invalid_internal_headers"
    signed = {"x-quorum-forwarded": "node-a", "x-quorum-signature": "v2 1 00"}
    async with pool.post(base, "/v1/chat/completions", b"{}", signed) as r:
        assert r.status == 200 and await r.read() == b"served"  # the handler checks it
    assert called == ["/v1/chat/completions"]


async def test_garbage_on_the_channel_closes_it(nursery: trio.Nursery) -> None:
    async def handler(path: str, body: bytes, headers: Mapping[str, str]) -> Reply:
        raise AssertionError("never called")

    base, _ = await _channel_server(nursery, handler)
    port = int(base.rsplit(":", 1)[1])
    for junk in (b"\x00\x00\x00\x03abc", b"\x7f\xff\xff\xff", frame("x", 1), frame(OPEN, 1)):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(PREFACE + junk)
        with trio.fail_after(5):
            received = b""
            while more := await stream.receive_some(1024):
                received += more
        assert received.startswith(b"QUORUM-CHANNEL/1 OK")  # then closed, nothing served
        await stream.aclose()


async def test_a_slow_reader_holds_the_server_to_its_credit(nursery: trio.Nursery) -> None:
    produced = []

    async def body() -> AsyncIterator[bytes]:
        for i in range(64):  # 2 MiB in 32 KiB pieces
            produced.append(i)
            yield bytes([i % 256]) * 32768

    async def handler(path: str, data: bytes, headers: Mapping[str, str]) -> Reply:
        return Reply(200, {}, body())

    base, _ = await _channel_server(nursery, handler)
    port = int(base.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    signed = {"x-quorum-forwarded": "a"}
    await stream.send_all(PREFACE + frame(OPEN, 1, "/v1/chat/completions", signed, b"{}"))
    reader = FrameReader(stream, 1 << 22)
    accepted = await stream.receive_some(len(b"QUORUM-CHANNEL/1 OK\r\n\r\n"))
    assert accepted.startswith(b"QUORUM-CHANNEL/1 OK")
    got = 0
    with trio.move_on_after(1.0):  # read without ever granting credit
        while True:
            fields = await reader.next()
            assert fields is not None
            if fields[0] == DATA:
                got += len(fields[2])
            else:
                assert fields[0] == HEAD
    assert got == WINDOW  # no more than the window without credit
    assert len(produced) <= WINDOW // 32768 + 2
    await stream.aclose()


async def test_credit_frees_the_stream_it_names_not_the_newest_one(nursery: trio.Nursery) -> None:
    async def big() -> AsyncIterator[bytes]:
        for i in range(32):  # 1 MiB: four windows
            yield bytes([i]) * 32768

    async def stalled() -> AsyncIterator[bytes]:
        yield b"x"
        await trio.sleep_forever()

    async def handler(path: str, data: bytes, headers: Mapping[str, str]) -> Reply:
        return Reply(200, {}, big() if path == "/big" else stalled())

    base, _ = await _channel_server(nursery, handler)
    stream = await trio.open_tcp_stream("127.0.0.1", int(base.rsplit(":", 1)[1]))
    signed = {"x-quorum-forwarded": "a"}
    await stream.send_all(PREFACE + frame(OPEN, 1, "/big", signed, b"{}"))
    accepted = b"QUORUM-CHANNEL/1 OK\r\n\r\n"
    assert await stream.receive_some(len(accepted)) == accepted
    reader = FrameReader(stream, 1 << 22)
    got = 0
    with trio.fail_after(5):
        while got < WINDOW:  # stream 1 uses up its window ...
            fields = await reader.next()
            assert fields is not None
            got += len(fields[2]) if fields[0] == DATA else 0
        # ... then stream 2 opens (the newest), and stream 1 is granted a window more
        await stream.send_all(frame(OPEN, 3, "/stalled", signed, b"{}"))
        await stream.send_all(frame(CREDIT, 1, WINDOW))
        while got < 2 * WINDOW:
            fields = await reader.next()
            assert fields is not None
            got += len(fields[2]) if fields[0] == DATA and fields[1] == 1 else 0
    await stream.aclose()


class _CountingStream(trio.abc.Stream):
    """A socket stream that counts its ``send_all`` calls."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sends: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends.append(bytes(data))
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_an_answers_frames_leave_in_one_send_and_arrive_as_one_chunk(
    nursery: trio.Nursery,
) -> None:
    counted: list[_CountingStream] = []

    async def accept(stream: trio.SocketStream) -> None:
        data = b""
        while len(data) < len(PREFACE):
            data += await stream.receive_some(1024)
        counted.append(_CountingStream(stream))
        await serve_channel(counted[-1], handler, buffered=data[len(PREFACE) :])

    async def body() -> AsyncIterator[bytes]:
        for event in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
            yield event

    async def handler(path: str, data: bytes, headers: Mapping[str, str]) -> Reply:
        return Reply(200, {"content-type": "text/event-stream"}, body())

    listeners = await nursery.start(partial(trio.serve_tcp, accept, 0, host="127.0.0.1"))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    pool = ChannelPool()
    await nursery.start(pool.run)
    signed = {"x-quorum-forwarded": "a"}
    with trio.fail_after(5):
        async with pool.post(base, "/v1/chat/completions", b"{}", signed) as response:
            await trio.sleep(0.2)  # every DATA frame is queued before the body is read
            chunks = [chunk async for chunk in response.body()]
    assert chunks == [b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"]
    assert response.complete
    # the preface's answer, then HEAD, three DATA and END in a single send
    sends = counted[0].sends
    assert len(sends) == 2, sends
    reader = FrameReader(trio.testing.MemoryReceiveStream(), 1 << 20, sends[1])
    kinds = [(await reader.next() or [None])[0] for _ in range(5)]
    assert kinds == [HEAD, DATA, DATA, DATA, END]


async def test_the_writer_holds_writers_back_over_its_limit_and_breaks_with_its_stream() -> None:
    send, receive = trio.testing.lockstep_stream_pair()
    writer = FrameWriter(send, limit=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.write(b"a" * 4)  # under the limit: returns at once
        await trio.testing.wait_all_tasks_blocked()  # the writer now sends it, blocked
        await writer.write(b"b" * 4)
        done = []

        async def over() -> None:
            await writer.write(b"c" * 8)  # 12 queued: waits until the writer takes them
            done.append(True)

        nursery.start_soon(over)
        await trio.testing.wait_all_tasks_blocked()
        assert not done
        assert await receive.receive_some() == b"a" * 4
        await trio.testing.wait_all_tasks_blocked()
        assert done  # taken by the next send
        assert await receive.receive_some() == b"b" * 4 + b"c" * 8
        await receive.aclose()
        await writer.write(b"d")
        await trio.testing.wait_all_tasks_blocked()  # its send fails: the writer breaks
    assert writer.error is not None and "broke" in writer.error
    with pytest.raises(trio.BrokenResourceError):
        await writer.write(b"e")


async def test_a_peers_channel_takes_as_many_requests_as_the_node_takes_clients(
    nursery: trio.Nursery,
) -> None:
    # node-c takes 3 clients (max_connections), so a peer's channel carries 3 requests
    # at once (it was a fixed 1,024, so forwards past it were refused whatever the config)
    cluster = await start_cluster(
        nursery, [node_config("node-a"), node_config("node-c", max_connections=3)]
    )
    body = {"model": "mock-coder", "messages": MESSAGES, "stream": True}
    stalled = {"x-quorum-fault": "stall_after=2"}
    async with httpx.AsyncClient(base_url=cluster.url("node-a"), timeout=10) as http:
        async with AsyncExitStack() as open_streams:
            for _ in range(3):
                response = await open_streams.enter_async_context(
                    http.stream("POST", "/v1/chat/completions", json=body, headers=stalled)
                )
                assert response.status_code == 200
                assert response.headers["x-quorum-node"] == "node-c"
            over = await http.post("/v1/chat/completions", json=body)
            assert over.status_code == 502
            assert "node-c answered 503" in over.json()["error"]["message"]
            assert "channel holds too many requests" in over.json()["error"]["message"]
        # the three closed: the channel takes requests again
        again = await http.post("/v1/chat/completions", json={**body, "stream": False})
        assert again.status_code == 200


async def test_a_write_asked_for_now_leaves_at_once_on_an_idle_socket_and_keeps_its_order() -> None:
    a, b = trio.socket.socketpair()
    sender, receiver = trio.SocketStream(a), trio.SocketStream(b)
    writer = FrameWriter(sender)
    # no writer task yet: only a write made at once can reach the peer
    await writer.write(b"first", now=True)
    with trio.fail_after(5):
        assert await receiver.receive_some() == b"first"
    await writer.write(b"queued")
    await writer.write(b"behind", now=True)  # something is queued: it goes after it
    # a write the socket cannot take whole: its rest is queued, in front of what follows
    big = bytes(range(256)) * 40_000  # 10 MB: more than a socket buffer
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        got = b""
        with trio.fail_after(5):
            while len(got) < len(b"queuedbehind"):
                got += await receiver.receive_some()
        assert got == b"queuedbehind"
        await trio.testing.wait_all_tasks_blocked()
        await writer.write(big, now=True)
        await writer.write(b"tail")
        got = b""
        with trio.fail_after(10):
            while len(got) < len(big) + 4:
                got += await receiver.receive_some()
        assert got == big + b"tail"
        writer.close()
    await sender.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await writer.write(b"after", now=True)
    await receiver.aclose()


async def test_a_ready_answers_head_leaves_with_its_first_chunk_and_alone_otherwise() -> None:
    from quorum.channel import _send_body, _Served  # the serving side's body writer

    sent: list[tuple[bytes, bool]] = []

    async def send(data: bytes, first: bool) -> None:
        sent.append((data, first))

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    head = frame(HEAD, 1, 200, {})
    await _send_body(send, 1, _Served(), chunks(), head, hold=True)
    assert sent == [
        (head + frame(DATA, 1, b"data: 1\n\n"), True),
        (frame(DATA, 1, b"data: 2\n\n"), False),
        (frame(END, 1), False),
    ]
    sent.clear()
    await _send_body(send, 1, _Served(), chunks(), head, hold=False)
    assert sent[0] == (head, True) and sent[1] == (frame(DATA, 1, b"data: 1\n\n"), False)
