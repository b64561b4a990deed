"""Shared fixtures: in-process nodes on real sockets (hypercorn on 127.0.0.1, port 0)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from quorum.config import BackendConfig, NodeConfig
from quorum.node import Node

ROOT = Path(__file__).resolve().parent.parent
NODES = ROOT / "nodes"

# Fast timings so real-socket tests take milliseconds per stream.
FAST = {"ttft_ms": 5, "itl_ms": 1}


def node_config(name: str, *, fast: bool = True, **overrides: Any) -> NodeConfig:
    """The shipped ``nodes/<name>.toml`` on port 0 with no peers (set after start)."""
    config = NodeConfig.from_toml(NODES / f"{name}.toml")
    backends = config.backends
    if fast:
        backends = tuple(
            dataclasses.replace(b, options={**b.options, **FAST}) if b.kind == "mock" else b
            for b in backends
        )
    return dataclasses.replace(config, port=0, peers=(), backends=backends, **overrides)


@dataclasses.dataclass
class Cluster:
    nodes: dict[str, Node]

    def url(self, name: str) -> str:
        return self.nodes[name].url

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]


async def start_cluster(
    nursery: trio.Nursery, configs: list[NodeConfig], *, transport: Any = None
) -> Cluster:
    """Start nodes in ``nursery``, point each at the others, and wait until every node sees
    every other one alive."""
    nodes = {c.name: Node(c, transport=transport) for c in configs}
    for node in nodes.values():
        await nursery.start(node.run)
    for node in nodes.values():
        node.membership.set_peers([n.url for n in nodes.values() if n is not node])
    with trio.fail_after(10):
        while not all(
            all(m.state == "alive" and m.node_state == "ready" for m in node.membership.members())
            for node in nodes.values()
        ):
            await trio.sleep(0.01)
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


def mock_backend_config(model: str, **options: Any) -> BackendConfig:
    return BackendConfig(model=model, kind="mock", options={**FAST, **options})
