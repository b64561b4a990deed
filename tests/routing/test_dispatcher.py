"""The dispatcher without sockets: three nodes built from their configs (not run), a fake
membership that shows each node's own view of the others, a fake hop that hands a forwarded
request to the other node's ``quorum.api.answer``, the mock backends, and ``MockClock``.
Each test takes milliseconds of real time."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from quorum.api import answer
from quorum.config import NodeConfig
from quorum.errors import ApiError
from quorum.node import Node
from quorum.routing.hop import HopError
from quorum.routing.membership import Member
from quorum.routing.relay import Reply
from quorum.sse import SSEParser

CHAT = "/v1/chat/completions"
NAMES = ("n1", "n2", "n3")
MESSAGES = [{"role": "user", "content": "Tell me about rivers."}]


def config(name: str) -> NodeConfig:
    return NodeConfig.from_mapping(
        {
            "node": {"name": name, "listen": "127.0.0.1:0", "url": f"http://{name}"},
            "cluster": {"secret": "a test cluster secret"},
            "backends": [{"model": "m", "kind": "mock", "ttft_ms": 5, "itl_ms": 5, "slots": 2}],
            "debug": {"faults": True},
        }
    )


class FakeMembership:
    """Every node of ``cluster`` as alive, with its current load, this node first."""

    def __init__(self, cluster: dict[str, Node], me: str) -> None:
        self.cluster = cluster
        self.me = me
        self.down: set[str] = set()

    def members(self) -> Sequence[Member]:
        names = [self.me, *(n for n in self.cluster if n != self.me)]
        return [self.cluster[n].self_member() for n in names if n not in self.down]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()


class FakeResponse:
    """What ``HopPool.post`` yields, from another node's ``Reply``."""

    def __init__(self, reply: Reply, cut_after: int | None) -> None:
        self.status = reply.status
        self.headers = reply.headers
        self._reply = reply
        self._cut_after = cut_after

    async def body(self) -> AsyncIterator[bytes]:
        if isinstance(self._reply.body, bytes):
            yield self._reply.body
            return
        async with _closing(self._reply.body) as chunks:
            sent = 0
            async for chunk in chunks:
                if self._cut_after is not None and sent >= self._cut_after:
                    raise HopError("the fake link was cut")
                sent += 1
                yield chunk

    async def read(self, limit: int = 1 << 20) -> bytes:
        parts = [chunk async for chunk in self.body()]
        data = b"".join(parts)
        if len(data) > limit:
            raise HopError(f"the answer is over {limit} bytes")
        return data


@asynccontextmanager
async def _closing(body: Any) -> AsyncIterator[Any]:
    try:
        yield body
    finally:
        await body.aclose()


class FakeHop:
    """Hands a POST to the node whose URL it names, in this process. ``cut``: node name →
    items of its answers after which the link breaks (a node dying mid-stream);
    ``cut_next``: the same for the next post only, whichever node it goes to."""

    def __init__(self, cluster: dict[str, Node]) -> None:
        self.cluster = cluster
        self.cut: dict[str, int] = {}
        self.cut_next: int | None = None
        self.posts: list[str] = []

    @asynccontextmanager
    async def post(
        self, base: str, path: str, body: bytes, headers: dict[str, str]
    ) -> AsyncIterator[FakeResponse]:
        name = base.removeprefix("http://")
        self.posts.append(name)
        node = self.cluster[name]
        try:
            reply = await answer(node.dispatcher, path, body, headers)
        except ApiError as exc:
            reply = Reply(exc.status, {}, json.dumps(exc.body()).encode())
        cut, self.cut_next = self.cut_next, None
        yield FakeResponse(reply, cut if cut is not None else self.cut.get(name))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def aclose(self) -> None:
        pass


@pytest.fixture
async def cluster(nursery: trio.Nursery) -> dict[str, Node]:
    nodes = {name: Node(config(name)) for name in NAMES}
    hop = FakeHop(nodes)
    for name, node in nodes.items():
        node.dispatcher.membership = FakeMembership(nodes, name)
        node.dispatcher.hop = hop  # type: ignore[assignment]
        node.dispatcher.nursery = nursery
        for backend in node.backends.values():
            await nursery.start(backend.run)
    return nodes


def hop_of(cluster: dict[str, Node]) -> FakeHop:
    hop = cluster["n1"].dispatcher.hop
    assert isinstance(hop, FakeHop)
    return hop


async def ask(
    node: Node, headers: dict[str, str] | None = None, **body: Any
) -> tuple[Reply, list[dict[str, Any]]]:
    """Send a chat request to ``node``; the reply and, for a stream, its events."""
    payload = {"model": "m", "messages": MESSAGES, **body}
    reply = await answer(node.dispatcher, CHAT, json.dumps(payload).encode(), headers or {})
    if isinstance(reply.body, bytes):
        return reply, [json.loads(reply.body)]
    parser = SSEParser()
    events = []
    async for chunk in reply.body:
        for event in parser.feed(chunk):
            if not event.is_done:
                events.append(json.loads(event.data))
    return reply, events


def text(events: list[dict[str, Any]]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for event in events
        for choice in event.get("choices", [])
    )


def busy(cluster: dict[str, Node]) -> int:
    return sum(
        b.load().busy + b.load().queued for n in cluster.values() for b in n.backends.values()
    )


# --- failover and resume -----------------------------------------------------------------------


async def test_a_failure_before_the_first_byte_moves_the_request_on(
    cluster: dict[str, Node], autojump_clock: trio.testing.MockClock
) -> None:
    _, reference = await ask(cluster["n1"], stream=True, seed=4)
    reply, events = await ask(cluster["n1"], {"x-quorum-fault": "status=500"}, stream=True, seed=4)
    assert reply.headers["x-quorum-attempts"] == "2"
    assert text(events) == text(reference)
    assert sum("role" in c["delta"] for e in events for c in e["choices"]) == 1
    assert busy(cluster) == 0


async def test_a_stream_cut_mid_way_resumes_exactly_elsewhere(
    cluster: dict[str, Node], autojump_clock: trio.testing.MockClock
) -> None:
    _, reference = await ask(cluster["n1"], stream=True, seed=6, max_tokens=40)
    # n1 serves itself first when it can: make it busy so the stream goes to a peer
    cluster["n1"].dispatcher.membership.down.add("n1")  # type: ignore[attr-defined]
    hop = hop_of(cluster)
    hop.cut_next = 5  # whichever serves first breaks; the other resumes
    _, events = await ask(cluster["n1"], stream=True, seed=6, max_tokens=40)
    assert sorted(hop.posts[-2:]) == ["n2", "n3"]
    assert "error" not in events[-1]
    assert text(events) == text(reference)
    assert len({e["id"] for e in events}) == 1
    assert cluster["n1"].dispatcher.metrics.resumes.labels("resumed")._value.get() >= 1
    assert busy(cluster) == 0


async def test_when_nobody_can_resume_the_stream_ends_with_one_error_event(
    cluster: dict[str, Node], autojump_clock: trio.testing.MockClock
) -> None:
    cluster["n1"].dispatcher.membership.down.add("n1")  # type: ignore[attr-defined]
    hop_of(cluster).cut = {"n2": 3, "n3": 3}
    _, events = await ask(cluster["n1"], stream=True, seed=2, max_tokens=40)
    assert "error" in events[-1] and events[-1]["error"]["code"] == "stream_broken"
    assert sum("error" in e for e in events) == 1
    await trio.sleep(1)
    assert busy(cluster) == 0


# --- breakers ----------------------------------------------------------------------------------


def half_open(node: Node, peer: str) -> None:
    breaker = node.dispatcher.breakers.get(peer)
    for _ in range(breaker.failure_threshold):
        breaker.record_failure(trio.current_time())
    assert breaker.state(trio.current_time() + breaker.cooldown_s) == "half_open"


async def test_a_half_open_breaker_lets_exactly_one_request_through(
    cluster: dict[str, Node], autojump_clock: trio.testing.MockClock
) -> None:
    entry = cluster["n1"]
    membership = entry.dispatcher.membership
    membership.down.update({"n1", "n3"})  # type: ignore[attr-defined]
    half_open(entry, "n2")
    await trio.sleep(entry.dispatcher.breakers.get("n2").cooldown_s)
    outcomes: list[int] = []

    async def one() -> None:
        try:
            reply, _ = await ask(entry, {"x-quorum-single-flight": "off"}, stream=False)
            outcomes.append(reply.status)
        except ApiError as exc:
            outcomes.append(exc.status)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    # one trial went to n2 and closed the breaker; the others found its trial taken
    assert sorted(outcomes) == [200, 503, 503]
    assert hop_of(cluster).posts.count("n2") == 1
    assert entry.dispatcher.breakers.get("n2").state(trio.current_time()) == "closed"


async def test_a_resume_claims_the_breaker_of_the_node_it_resumes_on(
    cluster: dict[str, Node], autojump_clock: trio.testing.MockClock
) -> None:
    entry = cluster["n1"]
    down = entry.dispatcher.membership.down  # type: ignore[attr-defined]
    down.update({"n1", "n3"})  # the stream starts on n2
    half_open(entry, "n3")
    await trio.sleep(entry.dispatcher.breakers.get("n3").cooldown_s)
    hop_of(cluster).cut_next = 6
    payload = {"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": 40}
    reply = await answer(entry.dispatcher, CHAT, json.dumps(payload).encode(), {})
    assert not isinstance(reply.body, bytes)
    first = await anext(reply.body)
    down.discard("n3")  # n2 is about to break: n3, half-open, is where it can resume
    rest = [chunk async for chunk in reply.body]
    assert b"stream_broken" not in b"".join([first, *rest])
    assert hop_of(cluster).posts[-1] == "n3"
    # the resume was n3's trial: its success closed the breaker
    assert entry.dispatcher.breakers.get("n3").state(trio.current_time()) == "closed"


# --- load, single-flight, cancellation -----------------------------------------------------------


async def test_load_counts_serving_here_apart_from_relaying_elsewhere(
    cluster: dict[str, Node], autojump_clock: trio.testing.MockClock
) -> None:
    entry, server = cluster["n1"], cluster["n2"]
    entry.dispatcher.membership.down.update({"n1", "n3"})  # type: ignore[attr-defined]
    seen: dict[str, int] = {}

    async def watch() -> None:
        await trio.sleep(0.2)  # mid-request
        seen.update(
            entry_serving=entry.dispatcher.serving,
            entry_relaying=entry.dispatcher.relaying,
            entry_gossiped=entry.load().in_flight,
            server_serving=server.dispatcher.serving,
            server_gossiped=server.load().in_flight,
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await ask(entry, {"x-quorum-single-flight": "off"}, max_tokens=100)
    assert seen == {
        "entry_serving": 0,
        "entry_relaying": 1,
        "entry_gossiped": 0,
        "server_serving": 1,
        "server_gossiped": 1,
    }
    entry.dispatcher.membership.down = set()  # type: ignore[attr-defined]
    cluster["n2"].dispatcher.membership.down.add("n2")  # type: ignore[attr-defined]

    async def local_watch() -> None:
        await trio.sleep(0.2)
        seen.update(local_gossiped=entry.load().in_flight, local_serving=entry.dispatcher.serving)

    entry.dispatcher.membership.down.update({"n2", "n3"})  # type: ignore[attr-defined]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(local_watch)
        await ask(entry, {"x-quorum-single-flight": "off"}, max_tokens=100)
    # a local non-streamed request is one generation, counted once
    assert (seen["local_gossiped"], seen["local_serving"]) == (1, 1)
    assert entry.dispatcher.busy == 0


async def test_identical_deterministic_requests_share_one_generation(
    cluster: dict[str, Node], autojump_clock: trio.testing.MockClock
) -> None:
    replies: list[tuple[Reply, list[dict[str, Any]]]] = []

    async def one() -> None:
        replies.append(await ask(cluster["n1"], stream=True, seed=11))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    assert {r.headers["x-quorum-shared"] for r, _ in replies} == {"3"}
    assert len({text(events) for _, events in replies}) == 1
    assert cluster["n1"].dispatcher.single_flight.flights == {}


async def test_a_client_that_leaves_mid_stream_frees_the_slot_across_the_hop(
    cluster: dict[str, Node], autojump_clock: trio.testing.MockClock
) -> None:
    entry = cluster["n1"]
    entry.dispatcher.membership.down.add("n1")  # type: ignore[attr-defined]
    payload = {"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": 500}
    reply = await answer(entry.dispatcher, CHAT, json.dumps(payload).encode(), {})
    assert not isinstance(reply.body, bytes)
    await anext(reply.body)
    assert busy(cluster) == 1
    await reply.body.aclose()  # type: ignore[attr-defined]
    await trio.sleep(0.01)
    assert busy(cluster) == 0
    assert entry.dispatcher.busy == 0


@pytest.mark.parametrize("where", ["local", "forwarded"])
async def test_a_stream_closed_before_its_first_byte_is_read_frees_everything(
    cluster: dict[str, Node], autojump_clock: trio.testing.MockClock, where: str
) -> None:
    # the HTTP layer could not send the head (the client left) and closes the body unread
    entry = cluster["n1"]
    entry.dispatcher.membership.down.update(  # type: ignore[attr-defined]
        {"n2", "n3"} if where == "local" else {"n1"}
    )
    payload = {"model": "m", "messages": MESSAGES, "stream": True, "max_tokens": 500}
    reply = await answer(entry.dispatcher, CHAT, json.dumps(payload).encode(), {})
    assert not isinstance(reply.body, bytes)
    assert busy(cluster) == 1
    await reply.body.aclose()  # type: ignore[attr-defined]
    await trio.sleep(0.01)
    assert busy(cluster) == 0
    assert (entry.dispatcher.busy, entry.dispatcher.relaying) == (0, 0)


async def test_the_client_s_own_error_from_another_node_keeps_its_type(
    cluster: dict[str, Node], autojump_clock: trio.testing.MockClock
) -> None:
    entry = cluster["n1"]
    entry.dispatcher.membership.down.add("n1")  # type: ignore[attr-defined]
    cyclic = {"type": "object", "properties": {"b": {"$ref": "#"}}, "required": ["b"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "s", "schema": cyclic}}
    with pytest.raises(ApiError) as refused:  # streamed: raised before the head
        await ask(entry, stream=True, response_format=response_format)
    error = refused.value.body()["error"]
    assert refused.value.status == 400
    assert (error["type"], error["param"]) == ("invalid_request_error", "response_format")
    reply, (body,) = await ask(entry, response_format=response_format)  # relayed as answered
    assert reply.status == 400
    assert (body["error"]["type"], body["error"]["param"]) == (
        "invalid_request_error",
        "response_format",
    )
    assert entry.dispatcher.breakers.get("n2").consecutive_failures == 0
    assert entry.dispatcher.breakers.get("n3").consecutive_failures == 0
