"""The scenarios' stock client against a server that breaks: whatever HTTP library the installed
openai SDK streams through (httpx up to 2.x, httpx2 from 3.x), a refused connection and a stream
cut after its first chunk become a recorded outcome, never an exception out of ``stream_chat``."""

from __future__ import annotations

import functools
import json

import trio

from quorum.scenarios.clients import make_client, stream_chat

CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}],
}


async def _serve_one_chunk_then_cut(stream: trio.SocketStream) -> None:
    """Reads the request head, answers a chunked SSE stream with one chunk, then closes
    without the terminating chunk: a node dying mid-stream, as the client sees it."""
    with trio.fail_after(10):
        received = b""
        while b"\r\n\r\n" not in received:
            data = await stream.receive_some(65536)
            if not data:
                return
            received += data
        event = f"data: {json.dumps(CHUNK)}\n\n".encode()
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + f"{len(event):x}\r\n".encode() + event + b"\r\n"
        )
    await stream.aclose()


async def test_a_stream_cut_after_its_first_chunk_is_recorded_as_broken() -> None:
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, _serve_one_chunk_then_cut, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port = listeners[0].socket.getsockname()[1]
        client = make_client(f"http://127.0.0.1:{port}", read_timeout_s=5.0)
        result = await stream_chat(client, "m", [{"role": "user", "content": "hi"}], deadline_s=10)
        await client.close()
        nursery.cancel_scope.cancel()
    assert result.content == "Hel"
    assert result.kind == "broken"
    assert result.error is not None


async def test_a_refused_connection_is_recorded_as_connect() -> None:
    with trio.socket.socket() as sock:  # bound, never listening: the port refuses
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        client = make_client(f"http://127.0.0.1:{port}", read_timeout_s=5.0)
        result = await stream_chat(client, "m", [{"role": "user", "content": "hi"}], deadline_s=10)
        await client.close()
    assert result.kind == "connect"
    assert not result.bytes_seen
