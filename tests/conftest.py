"""Shared fixtures: in-process nodes on real sockets (hypercorn on 127.0.0.1, port 0)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from quorum.config import NodeConfig
from quorum.node import Node
from quorum.routing.membership import StaticMembership

ROOT = Path(__file__).resolve().parent.parent
NODES = ROOT / "nodes"

# Fast timings so real-socket tests take milliseconds per stream.
FAST = {"ttft_ms": 5, "itl_ms": 1}


def node_config(name: str, *, fast: bool = True, **overrides: Any) -> NodeConfig:
    """The shipped ``nodes/<name>.toml`` on port 0: gossip on port 0 with the LOCAL preset
    and no seeds (``start_cluster`` points each node at the first), no static peers."""
    config = NodeConfig.from_toml(NODES / f"{name}.toml")
    backends = config.backends
    if fast:
        backends = tuple(
            dataclasses.replace(b, options={**b.options, **FAST}) if b.kind == "mock" else b
            for b in backends
        )
    gossip = config.gossip
    if gossip is not None:
        gossip = dataclasses.replace(gossip, bind=("127.0.0.1", 0), seeds=(), preset="local")
    # The tests inject faults (x-quorum-fault), as the scenarios do.
    overrides = {"debug_faults": True, **overrides}
    return dataclasses.replace(
        config, port=0, peers=(), backends=backends, gossip=gossip, **overrides
    )


@dataclasses.dataclass
class Cluster:
    nodes: dict[str, Node]

    def url(self, name: str) -> str:
        return self.nodes[name].url

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]


async def start_cluster(
    nursery: trio.Nursery,
    configs: list[NodeConfig],
    *,
    tap: Any = None,
    ready: bool = True,
) -> Cluster:
    """Start nodes in ``nursery`` and wait until every node sees every other one alive (and
    ready, if ``ready``). Gossip nodes join through the first node; static ones are given
    each other's URLs."""
    nodes: dict[str, Node] = {}
    seed = None
    for config in configs:
        if config.gossip is not None and seed is not None:
            config = dataclasses.replace(
                config, gossip=dataclasses.replace(config.gossip, seeds=(seed,))
            )
        node = Node(config, tap=tap)
        await nursery.start(node.run)
        if node.gossip is not None and seed is None:
            seed = node.gossip.address
        nodes[config.name] = node
    for node in nodes.values():
        if isinstance(node.membership, StaticMembership):
            node.membership.set_peers([n.url for n in nodes.values() if n is not node])

    def converged() -> bool:
        return all(
            len(node.membership.members()) == len(nodes)
            and all(
                m.state == "alive" and (m.node_state == "ready" or not ready)
                for m in node.membership.members()
            )
            for node in nodes.values()
        )

    with trio.move_on_after(15):
        while not converged():
            await trio.sleep(0.01)
    if not converged():
        views = {
            name: [(m.name, m.state, m.node_state) for m in node.membership.members()]
            for name, node in nodes.items()
        }
        raise AssertionError(f"the cluster did not converge in 15 s: {views}")
    return Cluster(nodes)


@pytest.fixture
async def cluster(nursery: trio.Nursery) -> AsyncIterator[Cluster]:
    """node-a, node-b, node-c from nodes/*.toml, fast timings, on loopback port 0."""
    c = await start_cluster(nursery, [node_config(n) for n in ("node-a", "node-b", "node-c")])
    yield c
    for node in c.nodes.values():
        node.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client
