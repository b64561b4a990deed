"""What every scenario shares: its options, the environment it runs in (a target, an HTTP
client, notes for the report), what it needs from the machine (``partition_method``,
``MissingTool``), waiting for the cluster to converge, and its result."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from quorum.gateway.keys import Role, digest, new_key
from quorum.launch import default_nodes_dir
from quorum.scenarios.cluster import (
    ClusterOptions,
    NetnsUnavailable,
    ProcessCluster,
    netns_available,
)
from quorum.scenarios.target import ComposeTarget, LocalTarget, Target

__all__ = [
    "Env",
    "MissingTool",
    "Options",
    "PartitionMethod",
    "ScenarioError",
    "ScenarioResult",
    "open_env",
    "partition_method",
    "wait_converged",
]


class ScenarioError(RuntimeError):
    """The scenario could not run as designed (the cluster did not start or converge)."""


class MissingTool(RuntimeError):
    """The scenario needs a program this machine lacks, found before anything started. The
    message is one line: what is missing and the command that installs it. ``quorum
    scenario`` prints it and exits with status 2."""


@dataclass(frozen=True)
class Options:
    """Command-line options of a scenario run. ``trials``: None for the scenario's default
    (smaller with ``quick``). ``quick``: few trials, LOCAL gossip preset, short durations.
    ``netns``: each node in its own network namespace. ``target``: "local" or "compose".
    ``clients``: concurrent clients (None: the scenario's default)."""

    trials: int | None = None
    quick: bool = False
    netns: bool = False
    target: str = "local"
    clients: int | None = None
    compose_file: Path | None = None
    seed: int = 0

    @property
    def preset(self) -> str:
        return "local" if self.quick else "lan"


@dataclass
class ScenarioResult:
    """A scenario's outcome: ``figures`` are (name, value, target) rows of the report."""

    name: str
    target: str
    preset: str
    trials: int = 0
    failures: int = 0
    figures: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    seconds: float = 0.0

    def figure(self, name: str, value: Any, target: str = "") -> None:
        if isinstance(value, float):
            value = f"{value:.3f}"
        self.figures.append((name, str(value), target))

    def check(self, what: str, ok: bool) -> bool:
        self.checks.append((what, ok))
        return ok

    @property
    def passed(self) -> bool:
        return self.failures == 0 and all(ok for _, ok in self.checks)


@dataclass
class Env:
    """A running scenario's world: ``target`` (the cluster), ``http`` (for /health and
    /cluster/members; it presents the env's admin key when the nodes have keys),
    ``options``, ``notes`` for the report, ``cluster`` when local. ``keys``: key name -> the
    API key the scenario asked for (``open_env(keys=...)``), empty when the nodes are open."""

    target: Target
    http: httpx.AsyncClient
    options: Options
    notes: list[str]
    cluster: ProcessCluster | None = None
    workdir: Path | None = None
    keep: bool = False  # keep the node logs (set when the scenario failed)
    keys: Mapping[str, str] = field(default_factory=dict)

    @property
    def quick(self) -> bool:
        return self.options.quick


async def wait_converged(
    env: Env, timeout_s: float, *, nodes: Sequence[str] | None = None, ready: bool = True
) -> float:
    """Wait until every node in ``nodes`` (default: those running) sees every one of them
    alive (and ready); seconds it took. Raises ``ScenarioError`` after ``timeout_s``."""
    start = trio.current_time()
    want = (
        list(nodes) if nodes is not None else [n for n in env.target.nodes if env.target.running(n)]
    )
    views: dict[str, Any] = {}
    deadline = start + timeout_s
    while trio.current_time() < deadline:
        good = True
        for observer in want:
            members = await env.target.members(observer, env.http)
            if members is None:
                views[observer] = "no answer"
                good = False
                continue
            seen = {m["name"]: m for m in members}
            views[observer] = {n: (m["state"], m["node_state"]) for n, m in seen.items()}
            for name in want:
                m = seen.get(name)
                if m is None or m["state"] != "alive" or (ready and m["node_state"] != "ready"):
                    good = False
        if good:
            return trio.current_time() - start
        await trio.sleep(0.1)
    raise ScenarioError(f"the cluster did not converge in {timeout_s} s: {views}")


# --- what a scenario needs from the machine ------------------------------------------------


def _has(program: str) -> bool:
    return shutil.which(program) is not None


def _is_root() -> bool:
    return os.geteuid() == 0


@dataclass(frozen=True)
class PartitionMethod:
    """How this run cuts a node off. ``netns``: the cluster must run in network namespaces
    (a partition sets the node's veth link down); otherwise the target's own way (iptables
    on loopback, ``docker network disconnect`` under compose). ``note``: the report's line
    saying which method, and why."""

    netns: bool
    note: str


IPTABLES_NOTE = (
    "partition method: iptables on loopback (the node's gossip UDP both ways and TCP "
    "push-pull between all nodes dropped); HTTP between nodes is not cut"
)
NETNS_NOTE = "partition method: network namespaces, the node's veth link set down"


def partition_method(options: Options) -> PartitionMethod:
    """Choose how ``options``' run will partition nodes, before anything starts:

    - ``--target compose``: ``docker network disconnect`` (needs ``docker``);
    - ``--netns``, root and ``ip`` present: network namespaces;
    - root and ``iptables`` present: iptables on loopback (as every run did before);
    - root and ``ip`` present: network namespaces, chosen because iptables is missing;
    - else ``MissingTool``, naming what to install (or that root is needed).
    """
    if options.target == "compose":
        if not _has("docker"):
            raise MissingTool(
                "--target compose needs docker with its compose plugin, which is not installed "
                "(apt-get install -y docker.io docker-compose-v2)"
            )
        return PartitionMethod(False, "partition method: docker network disconnect")
    netns_why = netns_available() if _is_root() else "network namespaces need root"
    if options.netns and netns_why is None:
        return PartitionMethod(True, NETNS_NOTE + " (--netns)")
    if not _is_root():
        raise MissingTool(
            "a partition needs root, for iptables (apt-get install -y iptables) or for network "
            "namespaces (apt-get install -y iproute2): run it as root"
        )
    if _has("iptables"):
        return PartitionMethod(False, IPTABLES_NOTE)
    if netns_why is None:
        return PartitionMethod(True, NETNS_NOTE + ", chosen because iptables is not installed")
    raise MissingTool(
        "a partition on loopback needs iptables (apt-get install -y iptables) or network "
        f"namespaces, which are unusable here: {netns_why}"
    )


# --- the environment ------------------------------------------------------------------------

ADMIN_KEY_NAME = "scenario-admin"
"""The env's own key, an admin's (``/cluster/members`` needs one under ``[auth]``)."""


def make_keys(
    keys: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, str], str, dict[str, Any]]:
    """Fresh API keys (``new_key``) for a run: ``keys`` maps a key's name to the rest of its
    ``[[auth.keys]]`` table (role, models, quotas). Returns (name -> key, the env's admin
    key, the ``[auth]`` table holding every key's digest, the admin key's as
    ``ADMIN_KEY_NAME``). Nothing secret is fixed in code: each run makes its own. Raises
    ``ValueError`` when a name is ``ADMIN_KEY_NAME``."""
    if ADMIN_KEY_NAME in keys:
        raise ValueError(f"{ADMIN_KEY_NAME!r} is the env's own key: choose another name")
    made = {name: new_key() for name in keys}
    admin = new_key()
    tables = [{"name": n, "sha256": digest(made[n]), **keys[n]} for n in keys]
    tables.append({"name": ADMIN_KEY_NAME, "sha256": digest(admin), "role": str(Role.ADMIN)})
    return made, admin, {"keys": tables}


@asynccontextmanager
async def open_env(
    options: Options,
    *,
    routing: Mapping[str, Any] | None = None,
    mock: Mapping[str, Any] | None = None,
    scenario_backend: Mapping[str, Any] | None = None,
    start: bool = True,
    partition: PartitionMethod | None = None,
    nodes_dir: Path | None = None,
    keys: Mapping[str, Mapping[str, Any]] | None = None,
) -> AsyncIterator[Env]:
    """The scenario's cluster, started (unless ``start`` is False) and converged; always
    torn down: processes ended by pid, namespaces and firewall rules removed.
    ``partition``: the scenario cuts nodes off, this way (``partition_method``); its note
    goes into the report. ``nodes_dir``: where the node configs are read (default
    ``nodes/``). ``keys``: API keys the nodes accept (``make_keys``; the nodes then need a
    key on every /v1 route), given to the scenario as ``env.keys``; a local cluster only.
    Raises ``MissingTool`` when namespaces fail to set up and the partition has no other way,
    ``ScenarioError`` for ``keys`` on a compose cluster."""
    notes: list[str] = []
    made: dict[str, str] = {}
    tables: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if keys:
        made, admin, tables["auth"] = make_keys(keys)
        headers["authorization"] = f"Bearer {admin}"
    async with httpx.AsyncClient(timeout=5.0, headers=headers) as http:
        if options.target == "compose":
            if keys:
                raise ScenarioError("API keys need node configs this run writes: --target local")
            compose_file = options.compose_file or Path("docker-compose.yml")
            compose = ComposeTarget(compose_file)
            target: Target = compose
            env = Env(target, http, options, notes)
            notes.append(
                f"compose project {compose.project!r} ({compose_file}); its own node configs "
                "apply (LAN preset, no scenario model or timeouts)"
            )
            if partition is not None:
                notes.append(partition.note)
            try:
                await wait_converged(env, 60.0)
                yield env
            finally:
                await target.close()
            return
        netns = options.netns or (partition is not None and partition.netns)
        workdir = Path(tempfile.mkdtemp(prefix="quorum-scenario-"))
        cluster_options = ClusterOptions(
            preset=options.preset,
            netns=netns,
            routing=dict(routing or {}),
            mock=dict(mock or {}),
            scenario_backend=scenario_backend,
            tables=tables,
            nodes_dir=nodes_dir or default_nodes_dir(),
        )
        cluster = ProcessCluster(workdir, cluster_options)
        if netns:
            try:
                cluster.setup_netns()
                notes.append(
                    f"netns: each node in its own network namespace on {cluster.subnet}.0/24, "
                    "faults on real links (veth)"
                )
            except NetnsUnavailable as exc:
                if partition is not None and not (_is_root() and _has("iptables")):
                    shutil.rmtree(workdir, ignore_errors=True)
                    raise MissingTool(
                        f"network namespaces are unusable here ({exc}) and iptables is not "
                        "installed (apt-get install -y iptables)"
                    ) from None
                notes.append(
                    f"network namespaces unavailable ({exc}): fell back to loopback with "
                    "gossip-level fault injection"
                )
                if partition is not None:
                    partition = PartitionMethod(False, IPTABLES_NOTE)
                cluster = ProcessCluster(
                    workdir, ClusterOptions(**{**cluster_options.__dict__, "netns": False})
                )
        if partition is not None:
            notes.append(partition.note)
        target = LocalTarget(cluster)
        env = Env(target, http, options, notes, cluster=cluster, workdir=workdir, keys=made)
        ok = False
        try:
            if start:
                await cluster.start_all()
                try:
                    await wait_converged(env, 40.0)
                except ScenarioError as exc:
                    tails = {n: cluster.log_tail(n, 5) for n in cluster.nodes}
                    raise ScenarioError(f"{exc}; logs: {tails}") from None
            yield env
            ok = True
        finally:
            await target.close()
            if ok and not env.keep:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                notes.append(f"node logs kept in {workdir}")
