"""The hop's connection pool against a real node on loopback: how many idle connections it
keeps per peer and when it closes them (idle time on virtual time)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import trio
import trio.testing

from quorum.config import NodeConfig
from quorum.node import Node
from quorum.routing.hop import HopPool

BODY = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
).encode()


async def test_the_pool_keeps_at_most_max_idle_and_closes_idle_ones(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    node = Node(
        NodeConfig.from_mapping(
            {
                "node": {"name": "peer", "listen": "127.0.0.1:0"},
                "backends": [{"model": "m", "kind": "mock", "ttft_ms": 50, "slots": 8}],
            }
        )
    )
    await nursery.start(node.run)
    url = urlsplit(node.url)
    peer = (str(url.hostname), int(url.port or 80))
    pool = HopPool(max_idle=2, idle_timeout_s=10.0)
    await nursery.start(pool.run)

    async def one() -> None:
        async with pool.post(node.url, "/v1/chat/completions", BODY, {}) as response:
            assert response.status == 200
            await response.read()

    async with trio.open_nursery() as clients:
        for _ in range(5):  # five at once: five connections
            clients.start_soon(one)
    assert pool.idle(peer) == 2  # three were closed on return, not kept
    await one()  # a kept connection is reused
    assert pool.idle(peer) == 2
    await trio.sleep(16)  # past the idle timeout and the sweeper's next round
    assert pool.idle(peer) == 0
    await pool.aclose()
    node.stop()
