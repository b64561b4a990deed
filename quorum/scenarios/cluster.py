"""Real node processes for scenarios: configs written from ``nodes/*.toml`` into a temp dir,
``python -m quorum node`` per node (on free loopback ports, or each in its own Linux network
namespace), every process ended by its own pid.

::

    cluster = ProcessCluster(workdir, ClusterOptions(preset="local"))
    try:
        await cluster.start_all()
        ...
    finally:
        await cluster.close()           # SIGTERM, then SIGKILL, by pid; namespaces removed

Network namespaces (``netns=True``): one namespace per node named ``qscn<pid>-<node>``
(``NETNS_PREFIX``), a bridge ``qscnbr<pid>`` in the root namespace holding 10.201.0.1/24,
and a veth pair per node (``qscnv<pid><i>`` on the bridge, ``eth0`` in the namespace with
10.201.0.<10+i>/24). Traffic only goes to loopback and to these namespaces. Leftovers from
a crashed run are found by the prefix (``remove_leftover_namespaces``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

__all__ = [
    "NETNS_PREFIX",
    "NETNS_SUBNET",
    "ClusterOptions",
    "NetnsUnavailable",
    "NodeProcess",
    "ProcessCluster",
    "default_nodes_dir",
    "free_port",
    "remove_leftover_namespaces",
    "to_toml",
]

NETNS_PREFIX = "qscn"
NETNS_SUBNET = "10.201.0"  # /24 on a bridge this module creates; nothing else is addressed
SCENARIO_MODEL = "mock-scenario"


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be used here (not root, or ``ip netns add`` failed)."""


def default_nodes_dir() -> Path:
    """``nodes/`` of the repository this package was installed from (editable install)."""
    return Path(__file__).resolve().parents[2] / "nodes"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, which is also free for UDP (gossip binds both)."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair found in 50 tries")


# --- TOML out -----------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """The node-config subset of TOML: tables of scalars and lists, arrays of such tables."""
    lines: list[str] = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines.append(f"[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
            lines.append("")
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            for table in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
                lines.append("")
        else:
            raise TypeError(f"top-level {key!r} must be a table or an array of tables")
    return "\n".join(lines)


# --- options and node processes -----------------------------------------------------------


@dataclass(frozen=True)
class ClusterOptions:
    """How a scenario's cluster is configured.

    ``preset``: gossip timing preset, "local" or "lan". ``netns``: one network namespace per
    node. ``routing``: the ``[routing]`` table for every node. ``mock``: options applied to
    every mock backend of the shipped configs (e.g. ``warmup_s``). ``scenario_backend``: the
    ``[[backends]]`` table of ``mock-scenario``, added to every node (None: not added).
    ``nodes_dir``: where ``node-*.toml`` are read from.
    """

    preset: str = "local"
    netns: bool = False
    routing: Mapping[str, Any] = field(default_factory=dict)
    mock: Mapping[str, Any] = field(default_factory=dict)
    scenario_backend: Mapping[str, Any] | None = None
    nodes_dir: Path = field(default_factory=default_nodes_dir)
    names: Sequence[str] = ("node-a", "node-b", "node-c")


@dataclass
class NodeProcess:
    """One node: its address, ports, config file, namespace and current process."""

    name: str
    host: str  # the address others reach it at: 127.0.0.1, or its namespace's 10.201.0.x
    http_port: int
    gossip_port: int
    config_path: Path
    log_path: Path
    netns: str | None = None
    process: trio.Process | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=check)


def remove_leftover_namespaces(prefix: str = NETNS_PREFIX) -> list[str]:
    """Delete namespaces and bridges named with ``prefix`` (from a run that crashed)."""
    removed = []
    listing = _run(["ip", "netns", "list"], check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(prefix):
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    for line in links.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            link = parts[1].strip().split("@")[0]
            if link.startswith(prefix):
                if _run(["ip", "link", "del", link], check=False).returncode == 0:
                    removed.append(link)
    return removed


class ProcessCluster:
    """Node processes of one scenario run. ``workdir``: configs and logs go here."""

    def __init__(self, workdir: Path, options: ClusterOptions) -> None:
        self.workdir = workdir
        self.options = options
        self.nodes: dict[str, NodeProcess] = {}
        self.namespaces: list[str] = []
        self.bridge: str | None = None
        self.veths: list[str] = []
        self._tag = str(os.getpid())
        self._layout()

    # -- layout and configs ----------------------------------------------------------------

    def _layout(self) -> None:
        opts = self.options
        for i, name in enumerate(opts.names):
            if opts.netns:
                host = f"{NETNS_SUBNET}.{10 + i}"
                http_port, gossip_port = 32768, 7946  # each namespace has its own ports
                netns = f"{NETNS_PREFIX}{self._tag}-{name}"
            else:
                host, http_port, gossip_port, netns = "127.0.0.1", free_port(), free_port(), None
            self.nodes[name] = NodeProcess(
                name=name,
                host=host,
                http_port=http_port,
                gossip_port=gossip_port,
                config_path=self.workdir / f"{name}.toml",
                log_path=self.workdir / f"{name}.log",
                netns=netns,
            )
        for node in self.nodes.values():
            node.config_path.write_text(to_toml(self.config_for(node)))

    def config_for(self, node: NodeProcess) -> dict[str, Any]:
        """``nodes/<name>.toml`` with this run's addresses, gossip preset and options."""
        opts = self.options
        source = opts.nodes_dir / f"{node.name}.toml"
        data = tomllib.loads(source.read_text())
        listen = f"0.0.0.0:{node.http_port}" if node.netns else f"{node.host}:{node.http_port}"
        data["node"] = {**data["node"], "name": node.name, "listen": listen, "url": node.url}
        data.pop("cluster", None)
        gossip = dict(data.get("gossip", {}))
        gossip.update(
            bind=f"{node.host}:{node.gossip_port}",
            seeds=[f"{o.host}:{o.gossip_port}" for o in self.nodes.values() if o is not node],
            preset=opts.preset,
        )
        gossip.setdefault("cluster", "quorum-scenario")
        data["gossip"] = gossip
        backends = [
            {**b, **opts.mock} if b.get("kind", "mock") == "mock" else dict(b)
            for b in data.get("backends", [])
        ]
        if opts.scenario_backend is not None:
            backends.append({"model": SCENARIO_MODEL, "kind": "mock", **opts.scenario_backend})
        data["backends"] = backends
        if opts.routing:
            data["routing"] = dict(opts.routing)
        data["debug"] = {"faults": True}  # scenarios inject faults (x-quorum-fault)
        return data

    @property
    def urls(self) -> dict[str, str]:
        return {n.name: n.url for n in self.nodes.values()}

    # -- namespaces ------------------------------------------------------------------------

    def setup_netns(self) -> None:
        """Create the bridge, the namespaces and the veth pairs; raises ``NetnsUnavailable``
        (having removed whatever it created) when that is not possible here."""
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        bridge = f"{NETNS_PREFIX}br{self._tag}"[:15]
        try:
            _run(["ip", "link", "add", bridge, "type", "bridge"])
            self.bridge = bridge
            _run(["ip", "addr", "add", f"{NETNS_SUBNET}.1/24", "dev", bridge])
            _run(["ip", "link", "set", bridge, "up"])
            for i, node in enumerate(self.nodes.values()):
                assert node.netns is not None
                _run(["ip", "netns", "add", node.netns])
                self.namespaces.append(node.netns)
                host_end = f"{NETNS_PREFIX}v{self._tag}{i}"[:15]
                peer = f"{NETNS_PREFIX}p{self._tag}{i}"[:15]
                _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", peer])
                self.veths.append(host_end)
                _run(["ip", "link", "set", peer, "netns", node.netns])
                _run(["ip", "link", "set", host_end, "master", bridge])
                _run(["ip", "link", "set", host_end, "up"])
                ns = ["ip", "netns", "exec", node.netns, "ip"]
                _run([*ns, "link", "set", "lo", "up"])
                _run([*ns, "link", "set", peer, "name", "eth0"])
                _run([*ns, "addr", "add", f"{node.host}/24", "dev", "eth0"])
                _run([*ns, "link", "set", "eth0", "up"])
        except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            self.teardown_netns()
            raise NetnsUnavailable(f"could not set up namespaces: {detail.strip()}") from None

    def veth_of(self, name: str) -> str:
        return self.veths[list(self.nodes).index(name)]

    def teardown_netns(self) -> None:
        for ns in self.namespaces:
            _run(["ip", "netns", "del", ns], check=False)
        for veth in self.veths:
            _run(["ip", "link", "del", veth], check=False)  # gone with its peer, usually
        if self.bridge is not None:
            _run(["ip", "link", "del", self.bridge], check=False)
        self.namespaces, self.veths, self.bridge = [], [], None

    # -- processes -------------------------------------------------------------------------

    def argv(self, node: NodeProcess) -> list[str]:
        command = [sys.executable, "-m", "quorum", "node", "--config", str(node.config_path)]
        if node.netns is not None:
            # `ip netns exec` execs the command in place: the pid stays the node's own.
            return ["ip", "netns", "exec", node.netns, *command]
        return command

    async def start(self, name: str) -> NodeProcess:
        """Start ``name`` (not waiting for it to listen); its output goes to its log."""
        node = self.nodes[name]
        if node.running:
            raise RuntimeError(f"{name} is already running (pid {node.pid})")
        node.starts += 1
        with node.log_path.open("ab") as log:
            log.write(f"--- start {node.starts} ---\n".encode())
            log.flush()
            node.process = await trio.lowlevel.open_process(
                self.argv(node), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return node

    async def start_all(self) -> None:
        for name in self.nodes:
            await self.start(name)

    def signal(self, name: str, signum: int) -> None:
        """Send ``signum`` to the node's own pid (nothing if it is not running)."""
        node = self.nodes[name]
        if node.running and node.pid is not None:
            os.kill(node.pid, signum)

    async def wait_exit(self, name: str, timeout_s: float) -> int | None:
        """The exit status, or None if still running after ``timeout_s``."""
        node = self.nodes[name]
        if node.process is None:
            return None
        with trio.move_on_after(timeout_s):
            return await node.process.wait()
        return None

    async def kill(self, name: str) -> None:
        """SIGKILL by pid, and reap it."""
        node = self.nodes[name]
        if node.running and node.process is not None:
            os.kill(node.process.pid, signal.SIGCONT)  # a stopped process dies just the same
            node.process.kill()
            await node.process.wait()

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.nodes[name].log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    async def close(self, grace_s: float = 8.0) -> None:
        """End every process this cluster started (SIGCONT+SIGTERM, then SIGKILL, by pid),
        then remove the namespaces. Safe to call twice."""
        with trio.CancelScope(shield=True):
            for node in self.nodes.values():
                if node.running and node.pid is not None:
                    try:
                        os.kill(node.pid, signal.SIGCONT)
                        os.kill(node.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            with trio.move_on_after(grace_s):
                for node in self.nodes.values():
                    if node.process is not None:
                        await node.process.wait()
            for node in self.nodes.values():
                if node.running and node.process is not None:
                    node.process.kill()
                    await node.process.wait()
            self.teardown_netns()
