"""Shared fixtures: in-process nodes on real sockets (hypercorn on 127.0.0.1, port 0). The
helpers they are built on, and every other shared helper, are in ``tests/helpers.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio

# FAST, NODES and ROOT are re-exported for the test modules that still import them from here
# (tests/test_upstream.py); new code imports tests.helpers.
from tests.helpers import FAST, NODES, ROOT, Cluster, node_config, start_cluster
from tests.postgres import postgres_dsn, postgres_server

__all__ = ["postgres_dsn", "postgres_server"]  # fixtures: a real PostgreSQL server

__all__ += ["FAST", "NODES", "ROOT", "Cluster", "cluster", "http", "node_config", "start_cluster"]


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
