"""Node processes: the one way Quorum starts ``python -m quorum node``. ``quorum up``, ``quorum
bench --node-config``, the scenarios, the benchmarks and the tests all go through it.

::

    configs = shipped_configs(default_nodes_dir(), ["node-a", "node-b", "node-c"])
    cluster = NodeCluster(write_nodes(workdir, configs, preset="local"))  # free ports
    try:
        await cluster.start_all()
        await cluster.wait_ready(30.0)      # every node answers GET /health with its name
        await cluster.wait_converged(30.0)  # ... and lists every node alive
        ...
    finally:
        await cluster.close()               # SIGCONT + SIGTERM, then SIGKILL, by pid

What it owns:

- **configs**: plain mappings written as TOML with ``tomli_w`` (``write_config``);
  ``rewire`` points a node's config at its ``Address`` and at the others (gossip seeds, or
  static ``[cluster] peers``).
- **ports**: ``free_port`` (free for TCP and UDP alike, since gossip binds both);
  ``Address.loopback()`` takes two.
- **readiness**: ``ServerProcess.wait_ready`` polls ``GET <url>/health`` until it answers 200
  (for a node: naming that node), and says why not (exited, with its status, or no answer in
  time) with the tail of its log.
- **ending**: every signal goes to the process's own pid (``signal``, ``kill``, ``stop``);
  nothing is ever looked up or ended by name.
- **logs**: stdout and stderr appended to ``log_path`` with a ``--- start N ---`` line per
  start (or a pipe the caller reads, as ``quorum up`` does, or nowhere).

``ServerProcess`` is any child that serves HTTP (``compare_hop`` runs nginx with it);
``NodeProcess`` is a Quorum node. ``NodeCluster`` holds several and ends them together.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import tomli_w
import trio

from quorum.gateway.keys import auth_headers

__all__ = [
    "Address",
    "Membership",
    "NodeCluster",
    "NodeProcess",
    "NodeStartError",
    "ServerProcess",
    "default_nodes_dir",
    "free_port",
    "peak_rss_kb",
    "proc_status_kb",
    "rewire",
    "shipped_configs",
    "write_config",
    "write_nodes",
]

Membership = Literal["gossip", "static"]  # how nodes find each other: SWIM, or [cluster] peers


# --- ports, configs -------------------------------------------------------------------------


_GIVEN: set[int] = set()  # ports this process handed out: never handed out twice


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now for TCP and for UDP (gossip binds both), and not handed
    out before by this process (the kernel may offer a just-closed port again). Raises
    ``RuntimeError`` when 50 tries found none. Another process may take it before it is
    used; bind port 0 where the program allows it."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            if port in _GIVEN:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
            _GIVEN.add(port)
            return port
    raise RuntimeError("no free port pair found in 50 tries")


def default_nodes_dir() -> Path:
    """``nodes/`` of the checkout this package runs from (an editable install)."""
    return Path(__file__).resolve().parents[1] / "nodes"


def shipped_configs(nodes_dir: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``<nodes_dir>/<name>.toml`` of each name, parsed (``tomllib``), in the given order."""
    return {name: tomllib.loads((nodes_dir / f"{name}.toml").read_text()) for name in names}


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` (tables of scalars and lists, arrays of tables) to ``path`` as TOML
    with ``tomli_w``; returns ``path``. Raises ``TypeError`` for a value TOML cannot hold."""
    path.write_text(tomli_w.dumps(dict(data)))
    return path


@dataclass(frozen=True)
class Address:
    """Where one node listens and is reached. ``host``: the address the others reach it
    at; ``http_port``, ``gossip_port``; ``bind``: the HTTP listen address when it is not
    ``host`` (``"0.0.0.0"`` inside a network namespace)."""

    host: str
    http_port: int
    gossip_port: int
    bind: str | None = None

    @classmethod
    def loopback(cls, host: str = "127.0.0.1") -> Address:
        """Two free ports on ``host``."""
        return cls(host, free_port(host), free_port(host))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def listen(self) -> str:
        return f"{self.bind or self.host}:{self.http_port}"

    @property
    def gossip(self) -> str:
        return f"{self.host}:{self.gossip_port}"


def rewire(
    data: Mapping[str, Any],
    name: str,
    addresses: Mapping[str, Address],
    *,
    membership: Membership = "gossip",
    preset: str | None = None,
) -> dict[str, Any]:
    """A copy of the node config ``data`` for node ``name`` at ``addresses[name]``: ``[node]``
    name, listen and url; with ``membership="gossip"`` a ``[gossip]`` table binding its
    gossip address, seeded with every other node's (``preset`` replaces the timing preset
    when given) and no ``[cluster]``; with ``"static"``, ``[cluster] peers`` = the other
    nodes' URLs and no ``[gossip]``. Other tables are kept as they are."""
    me = addresses[name]
    others = [a for n, a in addresses.items() if n != name]
    out = {key: value for key, value in data.items() if key not in ("cluster", "gossip")}
    out["node"] = {**data.get("node", {}), "name": name, "listen": me.listen, "url": me.url}
    if membership == "gossip":
        gossip = {**data.get("gossip", {}), "bind": me.gossip, "seeds": [a.gossip for a in others]}
        if preset is not None:
            gossip["preset"] = preset
        out["gossip"] = gossip
    else:
        out["cluster"] = {**data.get("cluster", {}), "peers": [a.url for a in others]}
    return out


# --- /proc ----------------------------------------------------------------------------------


def proc_status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` figure of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``, ...); None when the
    process is gone or the platform has no /proc."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_kb(pid: int) -> int | None:
    """Peak resident set size of process ``pid`` in KiB (``VmHWM``); None when unknown."""
    return proc_status_kb(pid, "VmHWM")


# --- one process ----------------------------------------------------------------------------


class NodeStartError(RuntimeError):
    """Processes that did not become ready. ``failures``: name -> why ("exited with status
    1", "did not answer /health in 30 s"); ``tails``: name -> the last lines of its log."""

    def __init__(self, failures: Mapping[str, str], tails: Mapping[str, str]) -> None:
        self.failures = dict(failures)
        self.tails = dict(tails)
        parts = []
        for name, why in self.failures.items():
            tail = self.tails.get(name, "").replace("\n", "\n    ")
            parts.append(f"{name} {why}" + (f":\n    {tail}" if tail else ""))
        super().__init__("; ".join(parts))


@dataclass(eq=False)
class ServerProcess:
    """A child process that serves HTTP at ``url``, ended by its own pid.

    ``argv``: its command. ``log_path``: where its output is appended (None: discarded,
    unless ``start(pipe=True)``). ``prefix``: argv run in front of the command, which must
    exec it in place so that the pid stays the server's (``ip netns exec NS``). ``cwd``,
    ``env``: of the child (default: this process's). ``health``: the path whose 200 means
    ready.
    """

    name: str
    url: str
    argv: Sequence[str]
    log_path: Path | None = None
    prefix: Sequence[str] = ()
    cwd: Path | None = None
    env: Mapping[str, str] | None = None
    health: str = "/health"
    process: trio.Process | None = field(default=None, repr=False)
    starts: int = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        return [*self.prefix, *self.argv]

    # -- start and readiness -------------------------------------------------------------

    async def start(self, *, pipe: bool = False) -> trio.Process:
        """Spawn it without waiting for it to serve. Its output goes to ``log_path``
        (appended), or to ``process.stdout`` when ``pipe`` (the caller must read it), or
        nowhere. Raises ``RuntimeError`` when it is already running, ``OSError`` when the
        command cannot be run."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        env = dict(self.env) if self.env is not None else None
        if pipe or self.log_path is None:
            out: int = subprocess.PIPE if pipe else subprocess.DEVNULL
            self.process = await trio.lowlevel.open_process(
                self.command(), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.cwd, env=env,
            )  # fmt: skip
            return self.process
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.process = await trio.lowlevel.open_process(
                self.command(), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.cwd, env=env,
            )  # fmt: skip
        return self.process

    def _is_ready(self, response: httpx.Response) -> bool:
        return response.status_code == 200

    async def _poll_ready(self, client: httpx.AsyncClient, deadline: float) -> str | None:
        """None once ready; else why not by ``deadline`` (trio time)."""
        while trio.current_time() < deadline:
            if self.process is None:
                return "was not started"
            if (code := self.process.poll()) is not None:
                return f"exited with status {code}"
            try:
                response = await client.get(self.url.rstrip("/") + self.health, timeout=1.0)
                if self._is_ready(response):
                    return None
            except (httpx.HTTPError, ValueError):
                pass
            await trio.sleep(0.05)
        return f"did not answer {self.health} in time"

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until ``GET url + health`` answers as ready. Raises ``NodeStartError`` (with
        the log's tail) when the process exits first or ``timeout_s`` passes; it is left
        running in the second case (``stop`` it)."""
        async with httpx.AsyncClient() as client:
            why = await self._poll_ready(client, trio.current_time() + timeout_s)
        if why is not None:
            raise NodeStartError({self.name: why}, {self.name: self.log_tail(10)})

    # -- signals and ending --------------------------------------------------------------

    def signal(self, signum: int) -> None:
        """Send ``signum`` to its own pid (nothing when it is not running)."""
        if self.running and self.process is not None:
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """SIGCONT (a stopped process must run to exit) then SIGTERM, by pid."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)

    async def kill(self) -> None:
        """SIGKILL by pid, and reap it."""
        if self.running and self.process is not None:
            self.process.kill()
            await self.process.wait()

    async def wait_exit(self, timeout_s: float) -> int | None:
        """Its exit status (negative: the signal), or None if still running after
        ``timeout_s`` or never started."""
        if self.process is None:
            return None
        with trio.move_on_after(timeout_s):
            return await self.process.wait()
        return None

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """``terminate``, then ``kill`` after ``grace_s``; its exit status (None: never
        started). Shielded from cancellation: it always reaps what it started."""
        if self.process is None:
            return None
        with trio.CancelScope(shield=True):
            self.terminate()
            if await self.wait_exit(grace_s) is None:
                await self.kill()
        return self.process.returncode

    # -- what it left --------------------------------------------------------------------

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of its log ("" without one)."""
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def rss_kb(self) -> int | None:
        """Resident memory now in KiB (``VmRSS``); None when not running."""
        return proc_status_kb(self.process.pid, "VmRSS") if self.process is not None else None

    def peak_rss_kb(self) -> int | None:
        """Peak resident memory in KiB (``VmHWM``; read it before ``stop``)."""
        return peak_rss_kb(self.process.pid) if self.process is not None else None


@dataclass(eq=False)
class NodeProcess(ServerProcess):
    """``python -m quorum node --config CONFIG_PATH``: ready when ``GET /health`` answers 200
    with ``"node": name``. Build it with ``NodeProcess.of(config_path, url, ...)``."""

    config_path: Path = field(default=Path("node.toml"))
    log_level: str | None = None

    @classmethod
    def of(
        cls,
        name: str,
        config_path: Path,
        url: str,
        *,
        log_path: Path | None = None,
        log_level: str | None = None,
        prefix: Sequence[str] = (),
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> NodeProcess:
        """The node ``name`` whose config is ``config_path``, reached at ``url``."""
        argv = [sys.executable, "-m", "quorum", "node", "--config", str(config_path)]
        if log_level is not None:
            argv += ["--log-level", log_level]
        return cls(
            name=name, url=url, argv=argv, log_path=log_path, prefix=prefix, cwd=cwd, env=env,
            config_path=config_path, log_level=log_level,
        )  # fmt: skip

    def _is_ready(self, response: httpx.Response) -> bool:
        if response.status_code != 200:
            return False
        health = response.json()
        return isinstance(health, dict) and health.get("node") == self.name


# --- several --------------------------------------------------------------------------------


class NodeCluster:
    """Several ``ServerProcess``es by name, started and ended together.

    ``nodes``: name -> process. Build it from config mappings with
    ``NodeCluster(write_nodes(workdir, configs))`` (free loopback ports unless ``addresses``
    are given), or from processes you made.
    """

    def __init__(self, nodes: Iterable[ServerProcess]) -> None:
        self.nodes: dict[str, ServerProcess] = {n.name: n for n in nodes}

    @property
    def urls(self) -> dict[str, str]:
        return {name: node.url for name, node in self.nodes.items()}

    def url(self, name: str) -> str:
        return self.nodes[name].url

    async def start(self, name: str) -> ServerProcess:
        """Start ``name`` (not waiting for it to serve)."""
        node = self.nodes[name]
        await node.start()
        return node

    async def start_all(self) -> None:
        for name in self.nodes:
            await self.start(name)

    async def wait_ready(self, timeout_s: float = 30.0, names: Iterable[str] | None = None) -> None:
        """Wait, for all of ``names`` (default: every node) at once, until each is ready.
        Raises ``NodeStartError`` naming every one that exited or did not answer by then."""
        deadline = trio.current_time() + timeout_s
        failures: dict[str, str] = {}
        wanted = list(self.nodes) if names is None else list(names)

        async def one(name: str, client: httpx.AsyncClient) -> None:
            why = await self.nodes[name]._poll_ready(client, deadline)
            if why is not None:
                failures[name] = why

        async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
            for name in wanted:
                nursery.start_soon(one, name, client)
        if failures:
            tails = {name: self.nodes[name].log_tail(10) for name in failures}
            raise NodeStartError({n: failures[n] for n in wanted if n in failures}, tails)

    async def wait_converged(self, timeout_s: float = 30.0) -> None:
        """Wait until every node's ``GET /cluster/members`` lists exactly this cluster's
        nodes, each alive. Raises ``trio.TooSlowError`` after ``timeout_s``. Nodes under
        ``[auth]`` show their members to an admin key only: ``$QUORUM_API_KEY`` is sent, and
        without it (401/403) there is nothing to wait for here (``wait_ready`` has seen
        every node answer)."""
        want = set(self.nodes)

        def alive(members: Any) -> bool:
            return {m["name"] for m in members} == want and all(
                m["state"] == "alive" for m in members
            )

        async with httpx.AsyncClient(timeout=2.0, headers=auth_headers()) as client:
            with trio.fail_after(timeout_s):
                while True:
                    try:
                        views = []
                        for node in self.nodes.values():
                            answer = await client.get(node.url + "/cluster/members")
                            if answer.status_code in (401, 403):
                                return
                            views.append(answer.json()["members"])
                        if all(alive(view) for view in views):
                            return
                    except (httpx.HTTPError, ValueError, KeyError, TypeError):
                        pass
                    await trio.sleep(0.1)

    def signal(self, name: str, signum: int) -> None:
        self.nodes[name].signal(signum)

    async def kill(self, name: str) -> None:
        await self.nodes[name].kill()

    async def wait_exit(self, name: str, timeout_s: float) -> int | None:
        return await self.nodes[name].wait_exit(timeout_s)

    def log_tail(self, name: str, lines: int = 15) -> str:
        return self.nodes[name].log_tail(lines)

    async def close(self, grace_s: float = 8.0) -> None:
        """End every process (``terminate`` all, wait up to ``grace_s`` for all, ``kill``
        the rest), by pid. Shielded; safe to call twice."""
        with trio.CancelScope(shield=True):
            for node in self.nodes.values():
                node.terminate()
            with trio.move_on_after(grace_s):
                for node in self.nodes.values():
                    if node.process is not None:
                        await node.process.wait()
            for node in self.nodes.values():
                await node.kill()


def write_nodes(
    workdir: Path,
    configs: Mapping[str, Mapping[str, Any]],
    *,
    addresses: Mapping[str, Address] | None = None,
    membership: Membership = "gossip",
    preset: str | None = None,
    prefixes: Mapping[str, Sequence[str]] | None = None,
    log_level: str | None = None,
) -> list[NodeProcess]:
    """One node per entry of ``configs`` (name -> config mapping), ``rewire``d to its
    address (free loopback ports for names ``addresses`` lacks) and to the others, written
    to ``<workdir>/<name>.toml``, logging to ``<workdir>/<name>.log``, run with
    ``prefixes[name]`` in front. Nothing is started."""
    addresses = dict(addresses or {})
    for name in configs:
        addresses.setdefault(name, Address.loopback())
    nodes = []
    for name, data in configs.items():
        path = write_config(
            workdir / f"{name}.toml",
            rewire(data, name, addresses, membership=membership, preset=preset),
        )
        nodes.append(
            NodeProcess.of(
                name, path, addresses[name].url, log_path=workdir / f"{name}.log",
                log_level=log_level, prefix=(prefixes or {}).get(name, ()),
            )
        )  # fmt: skip
    return nodes
