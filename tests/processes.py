"""Real `quorum node` processes on loopback, from the shipped nodes/*.toml on free ports: for
tests that kill a node with -9 or look at a cluster from outside. Every process is ended by its
own pid (``stop_node_processes``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from tests.conftest import ROOT

NAMES = ("node-a", "node-b", "node-c")


@dataclass
class NodeProcess:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    models: tuple[str, ...]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_node_processes(
    tmp: Path,
    names: tuple[str, ...] = NAMES,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> list[NodeProcess]:
    """`python3 -m quorum node` for each nodes/<name>.toml, rewritten to free HTTP and
    gossip ports on 127.0.0.1 (seeds pointed at each other) and then by ``edit`` (called with
    each parsed config, to change in place); returns once every node answers /health and the
    first sees them all alive. The caller ends them (``stop_node_processes``).

    A port that ``free_port`` found free can be taken by another process before the node
    binds it (an outgoing connection's ephemeral port, say); a start that fails for that
    alone is tried again on new ports, at most three times in all."""
    for _ in range(2):
        try:
            return _start_node_processes(tmp, names, edit)
        except _PortTaken:
            pass
    return _start_node_processes(tmp, names, edit)


class _PortTaken(AssertionError):
    """A node could not listen: its port was taken between ``free_port`` and its bind."""


def _start_node_processes(
    tmp: Path,
    names: tuple[str, ...],
    edit: Callable[[dict[str, Any]], None] | None,
) -> list[NodeProcess]:
    http_ports = {n: free_port() for n in names}
    gossip_ports = {n: free_port(socket.SOCK_DGRAM) for n in names}
    nodes = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        for name in names:
            config = tomllib.loads((ROOT / "nodes" / f"{name}.toml").read_text())
            config["node"]["listen"] = f"127.0.0.1:{http_ports[name]}"
            config["gossip"]["bind"] = f"127.0.0.1:{gossip_ports[name]}"
            config["gossip"]["seeds"] = [f"127.0.0.1:{gossip_ports[n]}" for n in names if n != name]
            if edit is not None:
                edit(config)
            path = tmp / f"{name}.toml"
            path.write_text(tomli_w.dumps(config))
            log = tmp / f"{name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "quorum", "node", "--config", str(path)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=tmp,
                )
            models = tuple(b["model"] for b in config["backends"])
            nodes.append(
                NodeProcess(name, f"http://127.0.0.1:{http_ports[name]}", process, log, models)
            )
        deadline = time.monotonic() + 60  # a busy CI machine starts three Pythons slowly
        with httpx.Client(timeout=1.0) as http:
            while True:
                try:
                    members = http.get(nodes[0].url + "/cluster/members").json()["members"]
                    if sorted(m["name"] for m in members if m["state"] == "alive") == sorted(
                        names
                    ) and all(m["node_state"] == "ready" for m in members):
                        return nodes
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                dead = [n for n in nodes if n.process.poll() is not None]
                if dead or time.monotonic() > deadline:
                    logs = {n.name: n.log.read_text()[-2000:] for n in nodes}
                    if any("Address already in use" in logs[n.name] for n in dead):
                        raise _PortTaken(f"a port was taken before a node bound it: {logs}")
                    raise AssertionError(f"the cluster did not start: {logs}")
                time.sleep(0.1)
    except BaseException:
        stop_node_processes(nodes)
        raise


def stop_node_processes(nodes: list[NodeProcess]) -> None:
    """SIGTERM each node still running, SIGKILL any left after 10 s; by pid."""
    for node in nodes:
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for node in nodes:
        try:
            node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(timeout=5)
