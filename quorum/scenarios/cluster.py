"""Real node processes for scenarios: ``nodes/*.toml`` with this run's options, written into
a temp dir and started with ``quorum.launch`` (on free loopback ports, or each node in its own
Linux network namespace), every process ended by its own pid.

::

    cluster = ProcessCluster(workdir, ClusterOptions(preset="local"))
    try:
        await cluster.start_all()
        ...
    finally:
        await cluster.close()           # SIGTERM, then SIGKILL, by pid; namespaces removed

Network namespaces (``netns=True``): one namespace per node named ``qscn<pid>-<node>``
(``NETNS_PREFIX``), a bridge ``qscnbr<pid>`` in the root namespace holding 10.201.X.1/24, and
a veth pair per node (``qscnv<pid><i>`` on the bridge, ``eth0`` in the namespace with
10.201.X.<10+i>/24). X is the first of 1..250, counted from this pid, that no interface of
the machine uses yet (``free_subnet``), so that runs side by side do not share a subnet.
Traffic only goes to loopback and to these namespaces. Leftovers from a crashed run are found
by the prefix (``remove_leftover_namespaces``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quorum.launch import (
    Address,
    NodeCluster,
    default_nodes_dir,
    shipped_configs,
    write_nodes,
)

__all__ = [
    "NETNS_PREFIX",
    "SCENARIO_MODEL",
    "ClusterOptions",
    "NetnsUnavailable",
    "ProcessCluster",
    "free_subnet",
    "netns_available",
    "remove_leftover_namespaces",
]

NETNS_PREFIX = "qscn"
NETNS_NET = "10.201"  # 10.201.X.0/24 on a bridge this module creates; nothing else is addressed
SCENARIO_MODEL = "mock-scenario"


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be used here (not root, no ``ip``, or a command failed)."""


def netns_available() -> str | None:
    """None when this process can make network namespaces (root and iproute2's ``ip``
    installed), else why not. It does not try one: ``setup_netns`` says if that fails."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (apt-get install -y iproute2)"
    return None


def free_subnet(tag: int) -> str:
    """``10.201.X`` for the first X in 1..250, counted from ``tag``, that no interface holds
    (``ip -o -4 addr show``); X = 1 + tag % 250 when ``ip`` cannot be asked."""
    try:
        used = _run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
    except (OSError, subprocess.SubprocessError):
        used = ""
    for i in range(250):
        subnet = f"{NETNS_NET}.{1 + (tag + i) % 250}"
        if f" {subnet}." not in used:
            return subnet
    return f"{NETNS_NET}.{1 + tag % 250}"


# --- options --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterOptions:
    """How a scenario's cluster is configured.

    ``preset``: gossip timing preset, "local" or "lan". ``netns``: one network namespace per
    node. ``routing``: the ``[routing]`` table for every node. ``mock``: options applied to
    every mock backend of the shipped configs (e.g. ``warmup_s``). ``scenario_backend``: the
    ``[[backends]]`` table of ``mock-scenario``, added to every node (None: not added).
    ``tables``: more top-level tables for every node (e.g. ``{"auth": {...}}``), each
    replacing the shipped table of that name. ``nodes_dir``: where ``node-*.toml`` are read
    from.
    """

    preset: str = "local"
    netns: bool = False
    routing: Mapping[str, Any] = field(default_factory=dict)
    mock: Mapping[str, Any] = field(default_factory=dict)
    scenario_backend: Mapping[str, Any] | None = None
    tables: Mapping[str, Any] = field(default_factory=dict)
    nodes_dir: Path = field(default_factory=default_nodes_dir)
    names: Sequence[str] = ("node-a", "node-b", "node-c")


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


class ProcessCluster(NodeCluster):
    """The node processes of one scenario run (a ``quorum.launch.NodeCluster``).
    ``workdir``: configs and logs go here. ``addresses``: name -> ``Address``.
    ``netns_of(name)``: the node's namespace (None on loopback)."""

    def __init__(self, workdir: Path, options: ClusterOptions) -> None:
        self.workdir = workdir
        self.options = options
        self.namespaces: list[str] = []
        self.bridge: str | None = None
        self.veths: list[str] = []
        self._tag = str(os.getpid())
        self._netns: dict[str, str] = {}
        self.addresses: dict[str, Address] = {}
        self.subnet: str | None = None
        if options.netns:
            self.subnet = free_subnet(os.getpid())
        for i, name in enumerate(options.names):
            if self.subnet is None:
                self.addresses[name] = Address.loopback()
                continue
            # each namespace has its own ports: the shipped ones, listening on all addresses
            host = f"{self.subnet}.{10 + i}"
            self.addresses[name] = Address(host, 32768, 7946, bind="0.0.0.0")
            self._netns[name] = f"{NETNS_PREFIX}{self._tag}-{name}"
        configs = {name: self.config_for(name, data) for name, data in self._sources().items()}
        super().__init__(
            write_nodes(
                workdir,
                configs,
                addresses=self.addresses,
                preset=options.preset,
                prefixes={n: ["ip", "netns", "exec", ns] for n, ns in self._netns.items()},
            )
        )

    # -- configs ---------------------------------------------------------------------------

    def _sources(self) -> dict[str, dict[str, Any]]:
        return shipped_configs(self.options.nodes_dir, self.options.names)

    def config_for(self, name: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """``nodes/<name>.toml`` with this run's backends, routing and tables (addresses,
        seeds and the preset are ``quorum.launch.rewire``'s)."""
        opts = self.options
        out = dict(data)
        out["gossip"] = {"cluster": "quorum-scenario", **data.get("gossip", {})}
        backends = [
            {**b, **opts.mock} if b.get("kind", "mock") == "mock" else dict(b)
            for b in data.get("backends", [])
        ]
        if opts.scenario_backend is not None:
            backends.append({"model": SCENARIO_MODEL, "kind": "mock", **opts.scenario_backend})
        out["backends"] = backends
        if opts.routing:
            out["routing"] = dict(opts.routing)
        out["debug"] = {"faults": True}  # scenarios inject faults (x-quorum-fault)
        out.update(opts.tables)
        return out

    def netns_of(self, name: str) -> str | None:
        return self._netns.get(name)

    # -- namespaces ------------------------------------------------------------------------

    def setup_netns(self) -> None:
        """Create the bridge, the namespaces and the veth pairs; raises ``NetnsUnavailable``
        (having removed whatever it created) when that is not possible here."""
        if (why := netns_available()) is not None:
            raise NetnsUnavailable(why)
        assert self.subnet is not None, "setup_netns needs ClusterOptions(netns=True)"
        bridge = f"{NETNS_PREFIX}br{self._tag}"[:15]
        try:
            _run(["ip", "link", "add", bridge, "type", "bridge"])
            self.bridge = bridge
            _run(["ip", "addr", "add", f"{self.subnet}.1/24", "dev", bridge])
            _run(["ip", "link", "set", bridge, "up"])
            for i, (name, ns) in enumerate(self._netns.items()):
                host = self.addresses[name].host
                _run(["ip", "netns", "add", ns])
                self.namespaces.append(ns)
                host_end = f"{NETNS_PREFIX}v{self._tag}{i}"[:15]
                peer = f"{NETNS_PREFIX}p{self._tag}{i}"[:15]
                _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", peer])
                self.veths.append(host_end)
                _run(["ip", "link", "set", peer, "netns", ns])
                _run(["ip", "link", "set", host_end, "master", bridge])
                _run(["ip", "link", "set", host_end, "up"])
                inside = ["ip", "netns", "exec", ns, "ip"]
                _run([*inside, "link", "set", "lo", "up"])
                _run([*inside, "link", "set", peer, "name", "eth0"])
                _run([*inside, "addr", "add", f"{host}/24", "dev", "eth0"])
                _run([*inside, "link", "set", "eth0", "up"])
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

    # -- ending ----------------------------------------------------------------------------

    async def close(self, grace_s: float = 8.0) -> None:
        """End every process this cluster started (SIGCONT+SIGTERM, then SIGKILL, by pid),
        then remove the namespaces. Safe to call twice."""
        await super().close(grace_s)
        self.teardown_netns()
