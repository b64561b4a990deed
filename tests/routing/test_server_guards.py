"""The node's HTTP server against slow and hostile clients, over real loopback sockets (the
deadlines on virtual time: while both sides wait, the clock jumps)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import trio.testing

from quorum.config import NodeConfig
from quorum.node import Node, drain_token_path
from quorum.routing.relay import StreamBody
from quorum.server import ConnectionGuard, _GuardedStream, _IdleTimer, _SendLock


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
    events = [json.loads(e[6:]) for e in rest.split(b"\r\n")[1].split(b"\n\n") if e]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant"
    assert any(d.get("content") for d in deltas), deltas


async def test_only_a_first_chunk_with_bytes_in_it_holds_the_head() -> None:
    """The head is held for the first write only when that write has bytes to carry."""

    async def chunks(*parts: bytes) -> AsyncGenerator[bytes]:
        for part in parts:
            yield part

    for parts, ready in (((b"", b"data: x\n\n"), False), ((b"data: x\n\n",), True), ((), False)):
        body = await StreamBody.start(chunks(*parts))
        assert body.ready is ready, parts
        assert b"".join([c async for c in body]) == b"".join(parts)


async def test_a_client_that_leaves_with_a_request_pipelined_behind_its_stream_is_noticed(
    node: Node,
) -> None:
    """With a second request queued behind a stream, the server reads nothing more from
    the connection until the stream ends: the client's leaving shows first as a failed
    write, and that must cancel the generation as a read of EOF would (the failed write
    raises into the reply, and hypercorn closes the connection, which ends the read)."""
    backend = node.backends["m"]
    body = (
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":5000}'
    )
    post = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    stream = await raw(node)
    await stream.send_all(post + b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
    with trio.fail_after(5):
        head = b""
        while b"data:" not in head:
            head += await stream.receive_some(65536)
    assert head.startswith(b"HTTP/1.1 200")
    assert backend.load().busy == 1
    await stream.aclose()
    with trio.fail_after(3):  # 5,000 tokens at 5 ms would take 25 s
        while backend.load().busy:
            await trio.sleep(0.01)
    assert backend.load().queued == 0


async def test_an_http2_stream_reset_cancels_its_generation_and_not_the_connection(
    nursery: trio.Nursery,
) -> None:
    """On HTTP/2 (prior knowledge) a client drops one answer with RST_STREAM and keeps the
    connection: the reset stream's generation stops at once, not at its next write (tokens
    come every 10 s here); the connection still serves."""
    node = Node(
        NodeConfig.from_mapping(
            {
                "node": {"name": "slow", "listen": "127.0.0.1:0"},
                "backends": [{"model": "m", "kind": "mock", "ttft_ms": 5, "itl_ms": 10_000}],
            }
        )
    )
    await nursery.start(node.run)
    h2_connection = pytest.importorskip("h2.connection", reason="needs the h2 package")
    h2_events = pytest.importorskip("h2.events", reason="needs the h2 package")
    h2_errors = pytest.importorskip("h2.errors", reason="needs the h2 package")
    backend = node.backends["m"]
    stream = await raw(node)
    conn = h2_connection.H2Connection()
    conn.initiate_connection()
    body = (
        b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":5000}'
    )
    request = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":scheme", "http"),
        (":authority", "x"),
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
    ]
    conn.send_headers(1, request)
    conn.send_data(1, body, end_stream=True)
    await stream.send_all(conn.data_to_send())

    async def until(done: Any) -> list[Any]:
        seen: list[Any] = []
        with trio.fail_after(5):
            while not done(seen):
                data = await stream.receive_some(65536)
                assert data, "the server closed the connection"
                seen += conn.receive_data(data)
                for event in seen:
                    if isinstance(event, h2_events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, 1)
                await stream.send_all(conn.data_to_send())
        return seen

    await until(lambda seen: any(isinstance(e, h2_events.DataReceived) for e in seen))
    assert backend.load().busy == 1
    conn.reset_stream(1, error_code=h2_errors.ErrorCodes.CANCEL)
    await stream.send_all(conn.data_to_send())
    with trio.fail_after(3):
        while backend.load().busy:
            await trio.sleep(0.01)
    conn.send_headers(
        3,
        [(":method", "GET"), (":path", "/v1/models"), (":scheme", "http"), (":authority", "x")],
        end_stream=True,
    )
    await stream.send_all(conn.data_to_send())
    seen = await until(
        lambda seen: any(isinstance(e, h2_events.StreamEnded) and e.stream_id == 3 for e in seen)
    )
    statuses = [
        dict(e.headers).get(b":status")
        for e in seen
        if isinstance(e, h2_events.ResponseReceived) and e.stream_id == 3
    ]
    assert statuses == [b"200"]
    await stream.aclose()
    node.stop()


# --- the connection's send lock -------------------------------------------------------------


async def test_the_send_lock_takes_no_scheduling_round_when_free() -> None:
    lock = _SendLock()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)  # scheduled: runs at this task's next yield
        async with lock:
            assert lock.locked() and ran == []  # trio.Lock would have let "other" run here
        assert not lock.locked()


async def test_the_send_lock_hands_over_in_order_and_skips_a_cancelled_waiter() -> None:
    lock = _SendLock()
    order: list[str] = []

    async def write(name: str, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with lock:
                order.append(name)
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        async with lock:
            await nursery.start(write, "first")
            cancelled = await nursery.start(write, "cancelled")
            await nursery.start(write, "last")
            await trio.testing.wait_all_tasks_blocked()
            cancelled.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert lock.locked() and order == []
    assert order == ["first", "last"] and not lock.locked()


# --- the connection's keep-alive timer ------------------------------------------------------


async def test_an_idle_keep_alive_connection_is_closed_after_the_timeout_and_a_busy_one_is_not(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    keep_alive = 2.0  # a node's idle timer is its body_timeout_s
    slow = NodeConfig.from_mapping(
        {
            "node": {"name": "slow", "listen": "127.0.0.1:0", "body_timeout_s": keep_alive},
            "backends": [
                {"model": "m", "kind": "mock", "ttft_ms": 5, "itl_ms": 100, "slots": 1,
                 "output_tokens": [80, 80]}
            ],
        }
    )  # fmt: skip
    node = Node(slow)
    await nursery.start(node.run)
    stream = await raw(node)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    await stream.send_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    started = trio.current_time()
    answer = b""
    with trio.fail_after(30):  # 80 tokens 100 ms apart: busy past the keep-alive
        while not answer.endswith(b"\r\n0\r\n\r\n"):
            more = await stream.receive_some(65536)
            assert more, "the node closed a busy connection"
            answer += more
    answered = trio.current_time()
    assert answer.startswith(b"HTTP/1.1 200") and answered - started > keep_alive
    with trio.fail_after(30):
        assert await stream.receive_some(100) == b""  # closed by the node, idle
    assert keep_alive <= trio.current_time() - answered < keep_alive + 0.5
    await stream.aclose()
    node.stop()


async def test_the_idle_timer_stopped_before_its_task_runs_never_fires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timer = _IdleTimer()
    fired: list[str] = []

    async def action(name: str) -> None:
        await trio.sleep(1)
        fired.append(name)

    class Group:  # hypercorn's TaskGroup as the timer uses it
        def __init__(self, nursery: trio.Nursery) -> None:
            self._nursery = nursery

    async with trio.open_nursery() as nursery:
        group = Group(nursery)
        await timer.restart(group, lambda: action("stopped at once"))
        await timer.stop()  # its task has not run yet
        await timer.restart(group, lambda: action("replaced"))
        await trio.testing.wait_all_tasks_blocked()
        await timer.restart(group, lambda: action("kept"))
    assert fired == ["kept"]


# --- one cancel scope per write ----------------------------------------------------------------


async def test_a_shielded_write_finishes_under_a_cancelled_task_and_still_has_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    guard = ConnectionGuard(max_connections=10, send_timeout_s=1.0)
    ours, theirs = trio.testing.lockstep_stream_pair()  # a write waits for the peer to read
    connection = _GuardedStream(ours, guard)  # type: ignore[arg-type]
    received = bytearray()

    async def read(count: int) -> None:
        await trio.sleep(0.5)  # the writer's task is cancelled meanwhile
        while len(received) < count:
            received.extend(await theirs.receive_some(count - len(received)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read, 1000)
        with trio.CancelScope() as task:
            nursery.cancel_scope.deadline = trio.current_time() + 30
            task.deadline = trio.current_time() + 0.1
            await connection.send_all(b"x" * 1000, shield=True)
            await trio.lowlevel.checkpoint()  # the task's cancellation lands after the write
        assert task.cancelled_caught and bytes(received) == b"x" * 1000

    with trio.CancelScope() as task:  # unshielded, the same cancellation cuts the write
        task.deadline = trio.current_time() + 0.1
        await connection.send_all(b"y" * 1000, shield=False)
    assert task.cancelled_caught and guard.send_timeouts == 0

    connection = _GuardedStream(trio.testing.lockstep_stream_pair()[0], guard)  # type: ignore[arg-type]
    started = trio.current_time()
    with pytest.raises(trio.BrokenResourceError):  # nobody reads: the deadline still holds
        await connection.send_all(b"z" * 1000, shield=True)
    assert trio.current_time() - started == pytest.approx(1.0)
    assert guard.send_timeouts == 1
