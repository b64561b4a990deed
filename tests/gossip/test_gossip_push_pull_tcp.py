"""Push-pull over TCP, before anything is authenticated: connections served at once, the time
to read a request and the bytes read are bounded. Real sockets on 127.0.0.1, on MockClock."""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgpack
import trio
import trio.testing
from gossip_helpers import CONFIG, seal_payload

from quorum.gossip import GossipNode, NodeMeta, codec
from quorum.gossip.core import GossipCore
from quorum.gossip.messages import MAX_HOST_LEN, MAX_NAME_LEN, MAX_USAGE, MemberState
from quorum.gossip.transport import TrioTransport, read_frame, write_frame

TIMEOUT = 5.0
MAX_FRAME = 4096


async def echo(addr: tuple[str, int], request: bytes) -> bytes:
    return b"answer to " + request


@asynccontextmanager
async def serving(*, max_connections: int = 2) -> AsyncIterator[TrioTransport]:
    """A transport answering push-pulls with ``echo`` on 127.0.0.1, closed afterwards."""
    transport = await TrioTransport.bind(
        "127.0.0.1",
        0,
        max_frame=MAX_FRAME,
        exchange_timeout=TIMEOUT,
        max_connections=max_connections,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(transport.serve, echo)
            yield transport
            nursery.cancel_scope.cancel()
    finally:
        transport.close()


async def closed_by_server(stream: trio.SocketStream) -> bool:
    """Whether the server closed ``stream`` (EOF or reset) without sending anything."""
    try:
        return await stream.receive_some(100) == b""
    except trio.BrokenResourceError:
        return True


async def test_excess_push_pull_connections_are_closed_at_once_and_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(max_connections=2) as transport:
        await excess_connections(transport)


async def excess_connections(transport: TrioTransport) -> None:
    host, port = transport.local_addr
    start = trio.current_time()
    stalled = [await trio.open_tcp_stream(host, port) for _ in range(2)]  # they send nothing
    await trio.testing.wait_all_tasks_blocked()
    excess = await trio.open_tcp_stream(host, port)
    assert await closed_by_server(excess)
    assert trio.current_time() - start < TIMEOUT  # at once, not at a deadline
    assert transport.counters["dropped_tcp_busy"] == 1
    for stream in stalled:  # the stalled ones are cut at the read deadline
        assert await closed_by_server(stream)
    assert trio.current_time() - start >= TIMEOUT
    assert transport.counters["dropped_tcp_slow"] == 2
    async with await trio.open_tcp_stream(host, port) as stream:  # their slots are free again
        await write_frame(stream, b"ping")
        assert await read_frame(stream, 100) == b"answer to ping"
    for stream in [*stalled, excess]:
        await stream.aclose()


async def test_a_request_trickling_in_is_cut_at_the_read_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as transport, await trio.open_tcp_stream(*transport.local_addr) as stream:
        start = trio.current_time()
        await stream.send_all(struct.pack(">I", 1000) + b"x" * 10)
        for _ in range(3):  # a byte now and then keeps no deadline away
            await trio.sleep(TIMEOUT / 4)
            try:
                await stream.send_all(b"x")
            except trio.BrokenResourceError:
                break
        assert await closed_by_server(stream)
        assert TIMEOUT <= trio.current_time() - start < 2 * TIMEOUT
        assert transport.counters["dropped_tcp_slow"] == 1


async def test_a_frame_announcing_more_than_the_limit_is_refused_unread(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as transport, await trio.open_tcp_stream(*transport.local_addr) as stream:
        start = trio.current_time()
        await stream.send_all(struct.pack(">I", MAX_FRAME + 1))
        assert await closed_by_server(stream)
        assert trio.current_time() == start
        assert transport.counters["dropped_tcp_oversize"] == 1


async def test_a_gossip_node_counts_refused_connections(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    config = CONFIG.replace(max_push_pull_conns=1, tcp_timeout=2.0, push_pull_interval=0)
    node = GossipNode("a", config, ("127.0.0.1", 0), NodeMeta("http://127.0.0.1:1", ("m",)))
    addr = await nursery.start(node.run)
    first = await trio.open_tcp_stream(*addr)
    await trio.testing.wait_all_tasks_blocked()
    second = await trio.open_tcp_stream(*addr)
    assert await closed_by_server(second)
    assert await closed_by_server(first)
    assert node.counters["dropped_tcp_busy"] == 1 and node.counters["dropped_tcp_slow"] == 1
    await first.aclose()
    await second.aclose()
    await node.leave(timeout=0.1)


def test_frame_limit_is_what_the_largest_push_pull_of_the_largest_cluster_needs() -> None:
    """Every member at its largest: a 128-character name, a 64-character host, a meta of
    max_meta_size bytes, the largest numbers, a load with MAX_USAGE usage entries of 64-byte
    keys. Such a push-pull fits the frame limit and is taken; the default limit is far below
    the 8 MiB it used to be."""
    config = CONFIG.replace(max_push_pull_members=40)
    meta = ["http://h/" + "u" * 937, [], "draining"]  # 960 bytes encoded
    assert len(msgpack.packb(meta)) == config.max_meta_size
    host = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255%" + "z" * 18
    assert len(host) == MAX_HOST_LEN
    usage = [[f"key-{i}".ljust(64, "k"), 2**40, *[2**53 - 1] * 3] for i in range(MAX_USAGE)]
    most = [*[2**31 - 1] * 3, usage]
    entries = [
        [
            f"{i:03d}".ljust(MAX_NAME_LEN, "n"),
            [host, 65535],
            "suspect",
            2**53 - 2,
            meta,
            most,
            2**53 - 1,
        ]
        for i in range(config.max_push_pull_members)
    ]
    sender = "s" * MAX_NAME_LEN
    payload = msgpack.packb([9, sender, False, entries])
    data = seal_payload(payload, config=config, src=sender, epoch=2**63 - 1, sent=0.0)
    assert len(data) <= config.max_push_pull_bytes
    assert config.max_push_pull_bytes - len(data) < 64  # and the limit is tight
    core = GossipCore(
        "a", ("10.0.0.1", 7946), NodeMeta("http://x", ()), config, rng=random.Random(1), now=0.0
    )
    answer, _ = core.answer_push_pull(0.0, ("10.0.0.2", 7946), data)
    assert answer is not None and core.counters["dropped_push_pull"] == 0
    assert sum(m.state is MemberState.SUSPECT for m in core.members()) == 0  # unknown: ignored
    assert CONFIG.max_push_pull_bytes < 1.2 * 1024 * 1024 < 8 * 1024 * 1024
    assert CONFIG.max_push_pull_bytes == codec.max_push_pull_size(512, 960) + 29
