"""Where faults are injected: a ``Target`` names the nodes, their URLs, and how to kill,
stall, partition, heal, restart and drain each one.

- ``LocalTarget``: node processes this run started (``ProcessCluster``), on loopback or each
  in its own network namespace. Signals go to the node's own pid. A partition is a veth
  set down in namespace mode (a real link), and on loopback, where links cannot be cut, a
  gossip-level cut with iptables (``LoopbackFirewall``).
- ``ComposeTarget``: the docker-compose cluster of ``docker-compose.yml`` (nodes published
  on 127.0.0.1:32768-32770), acted on with ``docker kill``, ``docker pause``/``unpause``,
  ``docker network disconnect``/``connect`` and ``docker compose restart``. Every command
  goes through one ``Runner`` so that tests can check the exact commands built.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from quorum.scenarios.cluster import SCENARIO_MODEL, ProcessCluster, remove_leftover_namespaces

__all__ = [
    "ComposeTarget",
    "LocalTarget",
    "LoopbackFirewall",
    "Runner",
    "Target",
    "TargetError",
    "subprocess_runner",
]

# (argv) -> (exit status, stdout + stderr)
Runner = Callable[[Sequence[str]], Awaitable[tuple[int, str]]]

FETCH_MEMBERS = (
    "import sys,urllib.request as u;"
    "sys.stdout.write(u.urlopen(sys.argv[1],timeout=2).read().decode())"
)


class TargetError(RuntimeError):
    """A fault could not be injected (the command failed); the message says which."""


async def subprocess_runner(argv: Sequence[str]) -> tuple[int, str]:
    """Run ``argv`` to completion (at most 120 s); its status and combined output."""
    with trio.fail_after(120):
        result = await trio.run_process(
            list(argv), capture_stdout=True, stderr=subprocess.STDOUT, check=False
        )
    return result.returncode, result.stdout.decode("utf-8", "replace")


class Target:
    """The cluster a scenario acts on. ``kind``: "local", "netns" or "compose".
    ``nodes``: node names. ``model``: a model every node serves (resumable anywhere).
    ``notes``: caveats the report prints (e.g. how a partition was made)."""

    kind = "abstract"
    model = "mock-chat"
    can_configure = False  # whether scenario configs (small slots, warmup, timeouts) apply

    def __init__(self, nodes: Sequence[str], runner: Runner = subprocess_runner) -> None:
        self.nodes = list(nodes)
        self.runner = runner
        self.notes: list[str] = []
        self.partitioned: set[str] = set()

    def url(self, node: str) -> str:
        raise NotImplementedError

    def inside(self, node: str) -> list[str]:
        """The argv prefix that runs a command next to ``node`` (its namespace or container)."""
        return []

    def python(self, node: str) -> str:
        return sys.executable

    def local_url(self, node: str) -> str:
        """``node``'s URL as seen from ``inside(node)``."""
        return self.url(node)

    async def run(self, argv: Sequence[str], *, check: bool = True) -> str:
        code, out = await self.runner(argv)
        if check and code != 0:
            raise TargetError(f"{' '.join(argv)} exited with {code}: {out.strip()[-400:]}")
        return out

    # -- faults (each acts on one node) ----------------------------------------------------

    async def kill(self, node: str) -> None:
        """SIGKILL: no goodbye, connections reset."""
        raise NotImplementedError

    async def stop(self, node: str) -> None:
        """Freeze the node (SIGSTOP / docker pause): it neither answers nor dies."""
        raise NotImplementedError

    async def cont(self, node: str) -> None:
        raise NotImplementedError

    async def terminate(self, node: str) -> None:
        """SIGTERM: the node drains and exits."""
        raise NotImplementedError

    async def partition(self, node: str) -> None:
        """Cut ``node`` off from the other nodes."""
        raise NotImplementedError

    async def heal(self, node: str) -> None:
        raise NotImplementedError

    async def restart(self, node: str) -> None:
        """Start ``node`` again (after it exited or was killed); does not wait for it."""
        raise NotImplementedError

    async def wait_exit(self, node: str, timeout_s: float) -> bool:
        """True once ``node`` has exited, False if it still runs after ``timeout_s``."""
        raise NotImplementedError

    def running(self, node: str) -> bool:
        return True

    async def drain(self, node: str, timeout_s: float = 60.0) -> str:
        """``quorum drain`` run next to the node (``/admin/drain`` is loopback-only); returns
        its output once the node has left."""
        argv = [
            *self.inside(node),
            self.python(node),
            "-m",
            "quorum",
            "drain",
            self.local_url(node),
            "--timeout",
            str(timeout_s),
        ]
        return await self.run(argv)

    async def members(self, node: str, client: httpx.AsyncClient) -> list[dict[str, Any]] | None:
        """``node``'s view of the cluster (``/cluster/members``), None if it did not answer.
        A partitioned node is asked from inside its namespace or container."""
        try:
            if node in self.partitioned and self.inside(node):
                argv = [
                    *self.inside(node),
                    self.python(node),
                    "-c",
                    FETCH_MEMBERS,
                    self.local_url(node) + "/cluster/members",
                ]
                code, out = await self.runner(argv)
                if code != 0:
                    return None
                data = json.loads(out)
            else:
                response = await client.get(self.url(node) + "/cluster/members", timeout=2.0)
                data = response.json()
            members: list[dict[str, Any]] = data["members"]
            return members
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    async def close(self) -> None:
        """Undo what this target changed (heal partitions, end processes)."""


# --- local processes ------------------------------------------------------------------------


class LoopbackFirewall:
    """A gossip-level partition on loopback with iptables, in a chain of this run's own
    (``QSCN<pid>``, jumped to from INPUT): the isolated node's UDP is dropped both ways and
    TCP push-pull to every node's gossip port is dropped. On loopback every connection comes
    from 127.0.0.1, so a push-pull *from* the isolated node cannot be told from one between
    the others: all push-pull is cut while a partition lasts (UDP probes and gossip between
    the other nodes go on). HTTP is not cut."""

    def __init__(self, runner: Runner, tag: str | None = None) -> None:
        self.runner = runner
        self.chain = f"QSCN{tag or os.getpid()}"
        self.installed = False

    async def _ipt(self, *args: str, check: bool = True) -> None:
        code, out = await self.runner(["iptables", "-w", "5", *args])
        if check and code != 0:
            raise TargetError(f"iptables {' '.join(args)}: {out.strip()}")

    async def install(self) -> None:
        if self.installed:
            return
        await self._ipt("-N", self.chain)
        self.installed = True
        await self._ipt("-I", "INPUT", "-j", self.chain)

    async def cut(self, isolated_port: int, gossip_ports: Sequence[int]) -> None:
        await self.install()
        for direction in ("--dport", "--sport"):
            await self._ipt(
                "-A", self.chain, "-i", "lo", "-p", "udp", direction, str(isolated_port),
                "-j", "DROP",
            )  # fmt: skip
        for port in gossip_ports:
            await self._ipt(
                "-A", self.chain, "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"
            )

    async def heal(self) -> None:
        if self.installed:
            await self._ipt("-F", self.chain)

    async def remove(self) -> None:
        if self.installed:
            await self._ipt("-D", "INPUT", "-j", self.chain, check=False)
            await self._ipt("-F", self.chain, check=False)
            await self._ipt("-X", self.chain, check=False)
            self.installed = False


class LocalTarget(Target):
    """Nodes this run started as processes (``ProcessCluster``), ended by their pids."""

    model = SCENARIO_MODEL
    can_configure = True

    def __init__(self, cluster: ProcessCluster, runner: Runner = subprocess_runner) -> None:
        super().__init__(list(cluster.nodes), runner)
        self.cluster = cluster
        self.kind = "netns" if cluster.options.netns else "local"
        self.firewall = LoopbackFirewall(runner)
        self.firewall_error: str | None = None

    def url(self, node: str) -> str:
        return self.cluster.nodes[node].url

    def inside(self, node: str) -> list[str]:
        ns = self.cluster.netns_of(node)
        return ["ip", "netns", "exec", ns] if ns else []

    def local_url(self, node: str) -> str:
        if self.cluster.netns_of(node) is None:
            return self.url(node)
        return f"http://127.0.0.1:{self.cluster.addresses[node].http_port}"

    def running(self, node: str) -> bool:
        return self.cluster.nodes[node].running

    async def kill(self, node: str) -> None:
        await self.cluster.kill(node)

    async def stop(self, node: str) -> None:
        self.cluster.signal(node, signal.SIGSTOP)

    async def cont(self, node: str) -> None:
        self.cluster.signal(node, signal.SIGCONT)

    async def terminate(self, node: str) -> None:
        self.cluster.signal(node, signal.SIGTERM)

    async def restart(self, node: str) -> None:
        if self.cluster.nodes[node].running:
            await self.terminate(node)
            if not await self.wait_exit(node, 20.0):
                await self.cluster.kill(node)
        await self.cluster.start(node)

    async def wait_exit(self, node: str, timeout_s: float) -> bool:
        return await self.cluster.wait_exit(node, timeout_s) is not None

    async def partition(self, node: str) -> None:
        if self.kind == "netns":
            await self.run(["ip", "link", "set", self.cluster.veth_of(node), "down"])
        else:
            ports = [a.gossip_port for a in self.cluster.addresses.values()]
            await self.firewall.cut(self.cluster.addresses[node].gossip_port, ports)
        self.partitioned.add(node)

    async def heal(self, node: str) -> None:
        if self.kind == "netns":
            await self.run(["ip", "link", "set", self.cluster.veth_of(node), "up"])
        else:
            await self.firewall.heal()
        self.partitioned.discard(node)

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.firewall.remove()
            finally:
                await self.cluster.close()


# --- docker compose -------------------------------------------------------------------------


def compose_project_name(compose_file: Path) -> str:
    """Compose's default project name: the file's directory name, lower-cased, keeping only
    ``[a-z0-9_-]``."""
    return re.sub(r"[^a-z0-9_-]", "", compose_file.resolve().parent.name.lower())


class ComposeTarget(Target):
    """The cluster of ``docker-compose.yml``, already up (``docker compose up -d``).

    ``compose_file``: the file. ``project``: compose project name (default: as compose
    derives it). ``network``: the compose network's short name ("quorum"). ``ports``: the
    host port of each service's API. Containers are ``<project>-<service>-1``, the network
    ``<project>_<network>``, as compose v2 names them.
    """

    kind = "compose"
    model = "mock-chat"

    def __init__(
        self,
        compose_file: Path,
        *,
        project: str | None = None,
        network: str = "quorum",
        ports: dict[str, int] | None = None,
        runner: Runner = subprocess_runner,
    ) -> None:
        ports = ports or {"node-a": 32768, "node-b": 32769, "node-c": 32770}
        super().__init__(list(ports), runner)
        self.compose_file = compose_file
        self.project = project or compose_project_name(compose_file)
        self.network = f"{self.project}_{network}"
        self.ports = ports

    def container(self, node: str) -> str:
        return f"{self.project}-{node}-1"

    def compose(self, *args: str) -> list[str]:
        return ["docker", "compose", "-f", str(self.compose_file), "-p", self.project, *args]

    def url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.ports[node]}"

    def inside(self, node: str) -> list[str]:
        return ["docker", "exec", self.container(node)]

    def python(self, node: str) -> str:
        return "python"

    def local_url(self, node: str) -> str:
        return "http://127.0.0.1:32768"  # every container listens on 32768

    async def kill(self, node: str) -> None:
        await self.run(["docker", "kill", "--signal", "KILL", self.container(node)])

    async def stop(self, node: str) -> None:
        await self.run(["docker", "pause", self.container(node)])

    async def cont(self, node: str) -> None:
        await self.run(["docker", "unpause", self.container(node)])

    async def terminate(self, node: str) -> None:
        await self.run(["docker", "kill", "--signal", "TERM", self.container(node)])

    async def partition(self, node: str) -> None:
        await self.run(["docker", "network", "disconnect", self.network, self.container(node)])
        self.partitioned.add(node)

    async def heal(self, node: str) -> None:
        # The service name must resolve again: reconnect with it as an alias.
        await self.run(
            ["docker", "network", "connect", "--alias", node, self.network, self.container(node)]
        )
        self.partitioned.discard(node)

    async def restart(self, node: str) -> None:
        await self.run(self.compose("restart", node))

    async def wait_exit(self, node: str, timeout_s: float) -> bool:
        argv = ["docker", "wait", self.container(node)]
        with trio.move_on_after(timeout_s):
            await self.run(argv, check=False)
            return True
        return False

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            for node in list(self.partitioned):
                await self.heal(node)


def cleanup_leftovers() -> list[str]:
    """Remove namespaces, links and iptables chains left by crashed scenario runs."""
    removed = remove_leftover_namespaces()
    try:
        rules = subprocess.run(
            ["iptables", "-S"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return removed
    for chain in sorted(set(re.findall(r"-N (QSCN\d+)", rules))):
        for args in (["-D", "INPUT", "-j", chain], ["-F", chain], ["-X", chain]):
            subprocess.run(["iptables", "-w", "5", *args], capture_output=True, check=False)
        removed.append(chain)
    return removed
