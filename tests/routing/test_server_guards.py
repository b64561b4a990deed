"""The node's HTTP server against slow and hostile clients, over real loopback sockets (the
deadlines on virtual time: while both sides wait, the clock jumps)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import trio.testing

from quorum.config import NodeConfig
from quorum.node import Node, drain_token_path


def config(**node: Any) -> NodeConfig:
    return NodeConfig.from_mapping(
        {
            "node": {"name": "solo", "listen": "127.0.0.1:0", **node},
            "backends": [{"model": "m", "kind": "mock", "ttft_ms": 5, "itl_ms": 5, "slots": 2}],
        }
    )


@pytest.fixture
async def node(nursery: trio.Nursery) -> AsyncIterator[Node]:
    node = Node(config(body_timeout_s=2.0, max_connections=3))
    await nursery.start(node.run)
    yield node
    node.stop()


async def raw(node: Node) -> trio.SocketStream:
    url = urlsplit(node.url)
    assert url.hostname is not None and url.port is not None
    return await trio.open_tcp_stream(url.hostname, url.port)


async def read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
        if b"\r\n\r\n" in data and data.endswith(b"}"):
            break
    return data


async def test_a_body_that_never_finishes_gets_408(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    stream = await raw(node)
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 500\r\n\r\n" + b'{"model": "m", "messages": ['
    )
    with trio.fail_after(10):
        answer = await read_all(stream)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"request_timeout"' in answer
    await stream.aclose()


async def test_connections_over_the_cap_are_closed_at_once(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    held = [await raw(node) for _ in range(3)]
    await trio.sleep(0.1)
    extra = await raw(node)
    with trio.fail_after(5):
        assert await extra.receive_some(100) == b""
    assert node.connections.refused == 1
    for stream in [*held, extra]:
        await stream.aclose()


async def test_drain_needs_the_token_from_this_machine_and_no_browser(node: Node) -> None:
    url = node.url + "/admin/drain"
    token = drain_token_path(node.url).read_text()
    assert (drain_token_path(node.url).stat().st_mode & 0o777) == 0o600
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.post(url)).status_code == 401
        wrong = await http.post(url, headers={"authorization": "Bearer " + "x" * len(token)})
        assert wrong.status_code == 401
        csrf = await http.post(
            url, headers={"authorization": f"Bearer {token}", "origin": "http://evil.example"}
        )
        assert csrf.status_code == 403
        proxied = await http.post(
            url, headers={"authorization": f"Bearer {token}", "x-forwarded-for": "10.1.1.1"}
        )
        assert proxied.status_code == 403
        assert not node.draining
        accepted = await http.post(url, headers={"authorization": f"Bearer {token}"})
        assert accepted.status_code == 202
    assert node.draining


async def test_a_streamed_answers_head_leaves_with_its_first_chunk(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    send_all = trio.SocketStream.send_all

    async def recorded(self: trio.SocketStream, data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", recorded)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            text = "".join([chunk async for chunk in response.aiter_text()])
    assert text.endswith("data: [DONE]\n\n")
    heads = [w for w in writes if w.startswith(b"HTTP/1.1 200")]
    assert len(heads) == 1
    head, _, rest = heads[0].partition(b"\r\n\r\n")
    assert b"text/event-stream" in head
    # the same write carries the first chunk: the role and the first token
    assert b'"role":"assistant"' in rest and b'"content":' in rest
