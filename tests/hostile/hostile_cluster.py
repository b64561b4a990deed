"""The hostile-client suite's cluster: its layout, its node configs, and what the tests read
from its processes (``/health``, ``VmRSS``, logs). ``conftest.hostile_cluster`` starts it.

``hostile-a`` is the entry node; ``hostile-b`` serves one model ``hostile-a`` does not
(``HOP_MODEL``), so a request for it always crosses the hop. The mocks are fast (1 ms to the
first token, no inter-token delay) and small (``SLOTS`` slots, ``QUEUE`` queue places), so a
leaked slot shows at once on ``/health``.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from quorum.launch import free_port, proc_status_kb

ROOT = Path(__file__).resolve().parents[2]

NAMES = ("hostile-a", "hostile-b")
SHARED_MODEL = "mock-chat"  # served by both nodes
HOP_MODEL = "mock-b"  # served by hostile-b only: the entry node always forwards it
LONG_MODEL = "mock-long"  # hostile-a only: streams long enough to fill socket buffers
HOP_LONG_MODEL = "mock-long-b"  # hostile-b only: the same, across the hop
SLOTS = 2
LONG_TOKENS = 40_000  # about 9 MB of events: more than any socket buffer holds
QUEUE = 4
START_DEADLINE_S = 30.0
NODE_DEADLINE_S = 10.0  # the nodes' body_timeout_s and send_timeout_s (test_hostile's deadlines)
STOP_DEADLINE_S = 10.0

# Short routing deadlines, so a hostile case that stalls a backend costs seconds, not minutes.
ROUTING = {
    "ttft_timeout_s": 3.0,
    "inter_token_timeout_s": 2.0,
    "cold_start_wait_s": 1.0,
    "connect_timeout_s": 1.0,
}
FAST_MOCK = {"ttft_ms": 1, "itl_ms": 0, "slots": SLOTS, "queue": QUEUE, "output_tokens": [4, 24]}


@dataclass
class NodeProcess:
    """One node process: ``name``, ``url`` (HTTP API), ``popen``, ``log_path``."""

    name: str
    url: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_kib(self) -> int:
        """Resident set size in KiB, from ``/proc/PID/status`` (``VmRSS``)."""
        rss = proc_status_kb(self.pid, "VmRSS")
        if rss is None:
            raise RuntimeError(f"no VmRSS for pid {self.pid}")
        return rss

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class HostileCluster:
    """The running nodes by name; ``workdir`` holds their configs and logs; ``figures`` is
    what the suite measured (written to ``workdir / "hostile-figures.json"``)."""

    nodes: dict[str, NodeProcess]
    workdir: Path
    start: Callable[[str], NodeProcess]
    figures: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0

    def restart(self, name: str, deadline_s: float = START_DEADLINE_S) -> None:
        """Start node ``name`` again (after it died) and wait until the cluster is whole."""
        stop(self.nodes[name])
        self.nodes[name] = self.start(name)
        self.restarts += 1
        self.wait_converged(deadline_s)

    def wait_converged(self, deadline_s: float) -> None:
        """Wait until each node sees every node alive and ready; raises ``RuntimeError``
        with the nodes' logs if that does not happen within ``deadline_s``."""
        deadline = time.monotonic() + deadline_s
        while not converged([n.url for n in self.nodes.values()]):
            if self.dead() or time.monotonic() > deadline:
                tails = {n.name: n.log_tail() for n in self.nodes.values()}
                raise RuntimeError(f"the hostile cluster did not come up: {tails}")
            time.sleep(0.1)

    @property
    def entry(self) -> NodeProcess:
        return self.nodes["hostile-a"]

    def dead(self) -> list[str]:
        """Names of node processes that have exited."""
        return [n.name for n in self.nodes.values() if not n.alive]

    def taken(self) -> dict[str, Any]:
        """What is still held on each node (non-zero figures only): ``in_flight``, and each
        backend's ``busy`` slots and ``queued`` requests, from ``GET /health``."""
        out: dict[str, Any] = {}
        for node in self.nodes.values():
            health = httpx.get(node.url + "/health", timeout=5).json()
            held = {"in_flight": health["load"]["in_flight"]}
            for model, b in health["backends"].items():
                held[f"{model}.busy"] = b["busy"]
                held[f"{model}.queued"] = b["queued"]
            held = {k: v for k, v in held.items() if v}
            if held:
                out[node.name] = held
        return out

    def wait_idle(self, deadline_s: float) -> dict[str, Any]:
        """Poll ``taken`` until nothing is held or ``deadline_s`` passed; returns the last
        ``taken`` (empty: every slot free)."""
        deadline = time.monotonic() + deadline_s
        while True:
            held = self.taken()
            if not held or time.monotonic() > deadline:
                return held
            time.sleep(0.05)


def node_table(name: str, http: int, gossip: int, seeds: list[str], key: str) -> dict[str, Any]:
    long = {**FAST_MOCK, "kind": "mock", "output_tokens": [LONG_TOKENS, LONG_TOKENS]}
    backends = [{"model": SHARED_MODEL, "kind": "mock", **FAST_MOCK}]
    if name == "hostile-a":
        backends.append({"model": LONG_MODEL, **long})
    else:
        backends.append(
            {
                "model": HOP_MODEL,
                "kind": "mock",
                **FAST_MOCK,
                "reasoning_field": "reasoning",
                "reasoning_tokens": [2, 8],
            }
        )
        backends.append({"model": HOP_LONG_MODEL, **long})
    return {
        "node": {
            "name": name,
            "listen": f"127.0.0.1:{http}",
            "body_timeout_s": NODE_DEADLINE_S,
            "send_timeout_s": NODE_DEADLINE_S,
        },
        "gossip": {
            "bind": f"127.0.0.1:{gossip}",
            "seeds": seeds,
            "cluster": "hostile",
            "preset": "local",
            "keys": [key],
        },
        "routing": ROUTING,
        "backends": backends,
        # /c1 too (the grammar sends some chat cases there): a SQLite file beside the config
        "conversations": {"store": "sqlite", "path": "conversations"},
    }


def fresh_port(taken: set[int]) -> int:
    for _ in range(20):
        port = free_port()
        if port not in taken:
            taken.add(port)
            return port
    raise RuntimeError("no fresh port in 20 tries")


def converged(urls: list[str]) -> bool:
    try:
        for url in urls:
            members = httpx.get(url + "/cluster/members", timeout=2).json()["members"]
            if len(members) != len(urls) or any(
                m["state"] != "alive" or m["node_state"] != "ready" for m in members
            ):
                return False
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return True


def stop(node: NodeProcess) -> None:
    if node.alive:
        node.popen.send_signal(signal.SIGTERM)
        try:
            node.popen.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            node.popen.kill()
            node.popen.wait(STOP_DEADLINE_S)
