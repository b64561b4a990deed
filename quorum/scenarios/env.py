"""What every scenario shares: its options, the environment it runs in (a target, an HTTP
client, notes for the report), waiting for the cluster to converge, and its result."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from quorum.scenarios.cluster import ClusterOptions, NetnsUnavailable, ProcessCluster
from quorum.scenarios.target import ComposeTarget, LocalTarget, Target

__all__ = [
    "Env",
    "Options",
    "ScenarioError",
    "ScenarioResult",
    "open_env",
    "wait_converged",
]


class ScenarioError(RuntimeError):
    """The scenario could not run as designed (the cluster did not start or converge)."""


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
    /cluster/members), ``options``, ``notes`` for the report, ``cluster`` when local."""

    target: Target
    http: httpx.AsyncClient
    options: Options
    notes: list[str]
    cluster: ProcessCluster | None = None
    workdir: Path | None = None
    keep: bool = False  # keep the node logs (set when the scenario failed)

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


@asynccontextmanager
async def open_env(
    options: Options,
    *,
    routing: Mapping[str, Any] | None = None,
    mock: Mapping[str, Any] | None = None,
    scenario_backend: Mapping[str, Any] | None = None,
    start: bool = True,
) -> AsyncIterator[Env]:
    """The scenario's cluster, started (unless ``start`` is False) and converged; always
    torn down: processes ended by pid, namespaces and firewall rules removed."""
    notes: list[str] = []
    async with httpx.AsyncClient(timeout=5.0) as http:
        if options.target == "compose":
            compose_file = options.compose_file or Path("docker-compose.yml")
            compose = ComposeTarget(compose_file)
            target: Target = compose
            env = Env(target, http, options, notes)
            notes.append(
                f"compose project {compose.project!r} ({compose_file}); its own node configs "
                "apply (LAN preset, no scenario model or timeouts)"
            )
            try:
                await wait_converged(env, 60.0)
                yield env
            finally:
                await target.close()
            return
        workdir = Path(tempfile.mkdtemp(prefix="quorum-scenario-"))
        cluster_options = ClusterOptions(
            preset=options.preset,
            netns=options.netns,
            routing=dict(routing or {}),
            mock=dict(mock or {}),
            scenario_backend=scenario_backend,
        )
        cluster = ProcessCluster(workdir, cluster_options)
        if options.netns:
            try:
                cluster.setup_netns()
                notes.append(
                    "netns: each node in its own network namespace on 10.201.0.0/24, "
                    "faults on real links (veth)"
                )
            except NetnsUnavailable as exc:
                notes.append(
                    f"--netns unavailable ({exc}): fell back to loopback with gossip-level "
                    "fault injection"
                )
                cluster = ProcessCluster(
                    workdir, ClusterOptions(**{**cluster_options.__dict__, "netns": False})
                )
        target = LocalTarget(cluster)
        env = Env(target, http, options, notes, cluster=cluster, workdir=workdir)
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
