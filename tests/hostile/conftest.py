"""The hostile-client suite's cluster fixture: ``hostile-a`` and ``hostile-b`` as real node
processes, started from temp TOML configs (written with ``tomli-w``) on free loopback ports,
each ended by its pid.

The process start lives in this one fixture function, so that it can be swapped for a shared
launcher without touching the tests. The layout and configs are in ``hostile_cluster``.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hostile_cluster import (
    NAMES,
    ROOT,
    START_DEADLINE_S,
    HostileCluster,
    NodeProcess,
    fresh_port,
    node_table,
    stop,
)

from quorum.launch import write_config


@pytest.fixture(scope="module")
def hostile_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileCluster]:
    """Start ``hostile-a`` and ``hostile-b`` as ``python -m quorum node`` processes (each
    seeded with the other's gossip address, so either can be started again and rejoin) and
    wait until each sees the other alive and ready; end both by pid afterwards."""
    workdir = tmp_path_factory.mktemp("hostile")
    key = base64.b64encode(os.urandom(32)).decode()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    taken: set[int] = set()
    ports = {name: (fresh_port(taken), fresh_port(taken)) for name in NAMES}
    for name in NAMES:
        seeds = [f"127.0.0.1:{ports[other][1]}" for other in NAMES if other != name]
        table = node_table(name, *ports[name], seeds, key)
        write_config(workdir / f"{name}.toml", table)

    def start(name: str) -> NodeProcess:
        log_path = workdir / f"{name}.log"
        with log_path.open("ab") as log:  # a restarted node appends to its log
            popen = subprocess.Popen(
                [sys.executable, "-m", "quorum", "node", "--config", str(workdir / f"{name}.toml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=env,
            )
        return NodeProcess(name, f"http://127.0.0.1:{ports[name][0]}", popen, log_path)

    cluster = HostileCluster({}, workdir, start)
    try:
        for name in NAMES:
            cluster.nodes[name] = start(name)
        cluster.wait_converged(START_DEADLINE_S)
        yield cluster
    finally:
        for node in cluster.nodes.values():
            stop(node)
