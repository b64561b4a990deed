"""Hostile requests against one node's request path, without sockets and on virtual time:
a node built from its config (not run), its mock backend started in the test's nursery, and
requests handed to ``quorum.api.answer`` as the HTTP layer would."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from quorum.api import answer
from quorum.config import NodeConfig
from quorum.errors import ApiError
from quorum.node import Node
from quorum.routing.dispatch import Reply
from quorum.routing.headers import ClusterSigner
from quorum.routing.headers import created_time as _created
from quorum.routing.headers import request_id as _request_id
from quorum.routing.relay import kind as _kind
from quorum.server import ConnectionGuard, _GuardedStream
from quorum.sse import SSEProtocolError

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


def config(**node: Any) -> NodeConfig:
    table: dict[str, Any] = {
        "node": {"name": "solo", "listen": "127.0.0.1:0", **node},
        "backends": [{"model": "m", "kind": "mock", "ttft_ms": 5, "itl_ms": 5, "slots": 2}],
        "debug": {"faults": True},
    }
    return NodeConfig.from_mapping(table)


@pytest.fixture
async def node(nursery: trio.Nursery) -> AsyncIterator[Node]:
    node = Node(config())
    for backend in node.backends.values():
        await nursery.start(backend.run)
    node.dispatcher.nursery = nursery
    yield node


def busy(node: Node) -> int:
    load = node.backends["m"].load()
    return load.busy + load.queued


async def ask(node: Node, body: dict[str, Any], headers: dict[str, str] | None = None) -> Reply:
    return await answer(node.dispatcher, CHAT, json.dumps(body).encode(), headers or {})


async def collect(reply: Reply) -> bytes:
    if isinstance(reply.body, bytes):
        return reply.body
    parts = []
    async for chunk in reply.body:
        parts.append(chunk)
    return b"".join(parts)


# --- internal headers ------------------------------------------------------------------------


async def test_a_forged_forward_with_a_huge_resume_point_is_refused(node: Node) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    body["quorum_resume"] = {"events": 10**12, "text": {}}
    with pytest.raises(ApiError) as refused:
        await ask(node, body, {"x-quorum-forwarded": "node-x"})
    assert refused.value.status == 401
    assert "x-quorum-forwarded" in refused.value.message
    assert busy(node) == 0


async def test_internal_headers_signed_with_another_key_are_refused(node: Node) -> None:
    body = json.dumps({"model": "m", "messages": MESSAGES}).encode()
    headers = {"x-quorum-forwarded": "node-x", "x-quorum-created": "99999999999999999999"}
    stranger = ClusterSigner([b"s" * 32], "quorum")
    headers["x-quorum-signature"] = stranger.sign("POST", CHAT, body, headers)
    with pytest.raises(ApiError) as refused:
        await node.dispatcher.handle(_parse(body), body, CHAT, headers)
    assert refused.value.status == 401


async def test_a_signed_forward_is_served_with_its_created_time(node: Node) -> None:
    body = json.dumps({"model": "m", "messages": MESSAGES}).encode()
    headers = {"x-quorum-forwarded": "node-x", "x-quorum-created": "1700000000"}
    headers["x-quorum-signature"] = node.dispatcher.signer.sign("POST", CHAT, body, headers)
    reply = await node.dispatcher.handle(_parse(body), body, CHAT, headers)
    assert json.loads(await collect(reply))["created"] == 1700000000


def _parse(body: bytes) -> Any:
    from quorum.wire import parse_chat_request, parse_json_body

    return parse_chat_request(parse_json_body(body))


def test_a_signature_covers_body_headers_and_time() -> None:
    now = [1_000_000.0]
    signer = ClusterSigner([b"k" * 32, b"old-key-material"], "c", clock=lambda: now[0])
    body = b'{"model": "m"}'
    headers = {"x-quorum-forwarded": "a", "x-quorum-fault": ""}
    headers["x-quorum-signature"] = signer.sign("POST", CHAT, body, headers)
    signer.verify("POST", CHAT, body, headers)
    for changed in (
        {"body": b'{"model": "n"}'},
        {"path": "/v1/completions"},
        {"headers": {**headers, "x-quorum-fault": "status=500"}},
        {"headers": {**headers, "x-quorum-created": "1"}},
        {"headers": {**headers, "x-quorum-caller": "admin"}},  # another key's name
        {"headers": {**headers, "x-quorum-signature": "v1 1000000 00"}},
        {"headers": {**headers, "x-quorum-signature": "v2 x y"}},
        {
            "headers": {
                **headers,
                "x-quorum-signature": headers["x-quorum-signature"].replace("v2", "v1"),
            }
        },
    ):
        args = {"path": CHAT, "body": body, "headers": headers} | changed
        with pytest.raises(ApiError) as refused:
            signer.verify("POST", args["path"], args["body"], args["headers"])
        assert refused.value.status == 401
    now[0] += 11  # past the replay window
    with pytest.raises(ApiError, match="replay window"):
        signer.verify("POST", CHAT, body, headers)
    # a node still on the old key is understood by one that already signs with the new one
    rotated = ClusterSigner([b"old-key-material"], "c", clock=lambda: now[0])
    headers["x-quorum-signature"] = rotated.sign("POST", CHAT, body, headers)
    signer.verify("POST", CHAT, body, headers)


def test_client_header_values_are_sanitised() -> None:
    assert _request_id({"x-request-id": "abcdéfghij"}) != "abcdéfghij"
    assert _request_id({"x-request-id": "abc-def_123"}) == "abc-def_123"
    assert _created({"x-quorum-created": "9" * 5000}) < 10**12
    fullwidth = "".join(chr(0xFF10 + int(d)) for d in "12345678")  # str.isdigit() says yes
    assert _created({"x-quorum-created": fullwidth}) != 12345678


def test_an_event_that_is_not_a_chunk_object_breaks_the_stream() -> None:
    for data in (b"[1, 2]", b'"text"', b'{"choices": 5}', b'{"choices": [{"delta": 3}]}'):
        with pytest.raises(SSEProtocolError):
            _kind(data)


# --- faults and breakers -----------------------------------------------------------------------


async def test_faults_are_refused_unless_the_node_allows_them(nursery: trio.Nursery) -> None:
    node = Node(config())
    node.dispatcher.allow_faults = False
    with pytest.raises(ApiError) as refused:
        await ask(node, {"model": "m", "messages": MESSAGES}, {"x-quorum-fault": "status=500"})
    assert refused.value.status == 403 and refused.value.code == "permission_denied"


async def test_pinned_failures_do_not_open_the_pinned_nodes_breaker(node: Node) -> None:
    for _ in range(5):
        with pytest.raises(ApiError):
            await ask(
                node,
                {"model": "m", "messages": MESSAGES},
                {"x-quorum-fault": "status=500", "x-quorum-pin": "solo"},
            )
    assert node.dispatcher.breakers.get("solo").consecutive_failures == 0


# --- shared generations and deadlines ------------------------------------------------------------


async def test_a_client_leaving_a_shared_unary_request_frees_its_slot(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    body = {"model": "m", "messages": MESSAGES, "seed": 1}
    with trio.move_on_after(5):
        await ask(node, body, {"x-quorum-fault": "stall_after=2"})
    await trio.sleep(0.1)
    assert node.dispatcher.single_flight.flights == {}
    assert busy(node) == 0


async def test_a_stalled_unary_request_fails_over_then_times_out_with_504(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    node = Node(config())
    node.dispatcher.config = type(node.dispatcher.config)(unary_timeout_s=3.0)
    for backend in node.backends.values():
        await nursery.start(backend.run)
    with pytest.raises(ApiError) as timed_out:
        await ask(node, {"model": "m", "messages": MESSAGES}, {"x-quorum-fault": "stall_after=2"})
    assert timed_out.value.status == 504
    await trio.sleep(0.1)
    assert busy(node) == 0


async def test_a_shared_generation_that_raises_answers_instead_of_ending_the_node(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    async def broken(*args: Any) -> Reply:
        raise RuntimeError("a bug in the request path")

    node.dispatcher._route = broken  # type: ignore[method-assign]
    body = {"model": "m", "messages": MESSAGES, "temperature": 0}
    with pytest.raises(ApiError) as failed:
        await ask(node, body)
    assert failed.value.status == 502
    # the node's nursery is intact: the next request is served
    node.dispatcher._route = type(node.dispatcher)._route.__get__(node.dispatcher)  # type: ignore[method-assign]
    reply = await ask(node, body)
    assert json.loads(await collect(reply))["choices"][0]["message"]["content"]


async def test_followers_of_a_shared_stream_that_never_read_still_leave(
    node: Node, autojump_clock: trio.testing.MockClock
) -> None:
    body = {"model": "m", "messages": MESSAGES, "seed": 3, "stream": True}
    replies = [await ask(node, body, {"x-quorum-fault": "stall_after=2"}) for _ in range(2)]
    for reply in replies:
        assert not isinstance(reply.body, bytes)
        await reply.body.aclose()  # type: ignore[attr-defined]
    await trio.sleep(0.1)
    assert node.dispatcher.single_flight.flights == {}
    assert busy(node) == 0


# --- the server's guards ------------------------------------------------------------------


async def test_a_client_that_stops_reading_is_disconnected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    guard = ConnectionGuard(max_connections=2, send_timeout_s=5.0)
    _client, server = trio.testing.lockstep_stream_pair()  # a send waits for the reader
    guarded = _GuardedStream(server, guard)  # type: ignore[arg-type]
    guard.active += 1
    start = trio.current_time()
    with pytest.raises(trio.BrokenResourceError):
        await guarded.send_all(b"data: {}\n\n")
    assert trio.current_time() - start == pytest.approx(5.0)
    assert guard.send_timeouts == 1 and guard.active == 0
