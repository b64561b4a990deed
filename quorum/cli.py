"""The ``quorum`` command.

::

    quorum node --config nodes/node-a.toml    run one node in this process
    quorum up [CONFIG ...]                    run a local cluster, one process per node
                                              (default: every nodes/*.toml)
    quorum up --example llamacpp              the same from nodes/examples/llamacpp/*.toml
    quorum members [URL]                      the cluster as one node sees it
    quorum status [URL] [--once]              the same, live: members, traffic, events
    quorum keys new NAME [--role admin]       a new API key, and its [[auth.keys]] table
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import tomli_w
import trio
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from quorum.config import ConfigError, NodeConfig
from quorum.gateway.keys import ApiKey, Role, auth_headers, digest, new_key
from quorum.launch import NodeCluster, NodeProcess, NodeStartError, default_nodes_dir

__all__ = ["main"]

console = Console(highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``quorum`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="quorum", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_node = sub.add_parser("node", help="run one node")
    p_node.add_argument("--config", required=True, type=Path, help="the node's TOML file")
    p_node.add_argument("--log-level", default="info")

    p_up = sub.add_parser("up", help="run a local cluster, one process per node")
    p_up.add_argument("configs", nargs="*", type=Path, help="node configs (default: nodes/*.toml)")
    p_up.add_argument("--startup-timeout", type=float, default=30.0, metavar="SECONDS")
    p_up.add_argument(
        "--example",
        metavar="NAME",
        help="the configs of nodes/examples/NAME/ (llamacpp: two nodes run a real model)",
    )

    p_drain = sub.add_parser(
        "drain", help="drain a node: it stops taking requests, finishes its streams and exits"
    )
    p_drain.add_argument("node", help="node name (looked up through --via) or its URL")
    p_drain.add_argument("--via", default="http://127.0.0.1:32768", help="any node's URL")
    p_drain.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS")

    p_members = sub.add_parser("members", help="list the cluster's members")
    p_members.add_argument("url", nargs="?", default="http://127.0.0.1:32768")

    p_status = sub.add_parser("status", help="watch the cluster live, as one node sees it")
    p_status.add_argument("url", nargs="?", default="http://127.0.0.1:32768")
    p_status.add_argument("--once", action="store_true", help="print one frame and exit")

    p_keys = sub.add_parser("keys", help="API keys")
    keys_sub = p_keys.add_subparsers(dest="keys_command", required=True)
    p_new = keys_sub.add_parser(
        "new", help="print a new API key once, and the [[auth.keys]] table to paste"
    )
    p_new.add_argument("name", help="the key's name: in logs and metrics, never secret")
    p_new.add_argument("--role", choices=[r.value for r in Role], default=Role.USER.value)
    p_new.add_argument("--models", metavar="M1,M2", help="allowlist (default: every model)")
    p_new.add_argument("--rpm", type=int, metavar="N", help="requests per minute, cluster-wide")
    p_new.add_argument("--tpm", type=int, metavar="N", help="tokens per minute, cluster-wide")
    p_new.add_argument("--max-concurrent", type=int, metavar="N", help="requests at once")

    from quorum import bench

    bench.add_arguments(sub.add_parser("bench", help="load-test an OpenAI-compatible endpoint"))

    from quorum import scenarios

    scenarios.add_arguments(
        sub.add_parser("scenario", help="failure scenarios on a real cluster (--list)")
    )

    args = parser.parse_args(argv)
    if args.command == "node":
        return _node(args.config, args.log_level)
    if args.command == "up":
        if args.example is not None:
            if args.configs:
                console.print("[red]quorum up: give configs or --example, not both")
                return 2
            examples = default_nodes_dir() / "examples"
            configs = sorted((examples / args.example).glob("*.toml"))
            if "/" in args.example or not configs:
                known = sorted(p.name for p in examples.iterdir() if p.is_dir())
                console.print(
                    f"[red]quorum up: no example {args.example!r}; there are: {', '.join(known)}"
                )
                return 2
            return trio.run(_up, configs, args.startup_timeout)
        configs = args.configs or sorted(Path("nodes").glob("*.toml"))
        if not configs:
            console.print("[red]no node configs: pass paths or run where nodes/*.toml exist")
            return 2
        return trio.run(_up, configs, args.startup_timeout)
    if args.command == "members":
        return _members(args.url)
    if args.command == "status":
        return _status(args.url, args.once)
    if args.command == "drain":
        return _drain(args.node, args.via, args.timeout)
    if args.command == "keys":
        return _keys_new(args)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "scenario":
        return scenarios.main(args)
    return 2


# --- quorum node --------------------------------------------------------------------------


def _node(path: Path, level: str, drain_s: float = 30.0) -> int:
    from quorum.node import Node  # the server stack is only imported for a node

    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    try:
        config = NodeConfig.from_toml(path)
        node = Node(config)
    except ConfigError as exc:
        print(f"quorum node: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

                async def run_node(*, task_status: trio.TaskStatus[str]) -> None:
                    await node.run(task_status=task_status)
                    nursery.cancel_scope.cancel()  # stopped (drained, or by a signal)

                await nursery.start(run_node)
                print(f"quorum node {config.name} ready on {node.url}", flush=True)
                log = logging.getLogger("quorum")
                async for signum in signals:
                    if node.draining:
                        log.info("%s: second signal, stopping now", config.name)
                        nursery.cancel_scope.cancel()
                        break
                    log.info("%s: %s, draining", config.name, signal.Signals(signum).name)
                    nursery.start_soon(node.drain, drain_s)

    try:
        trio.run(run)
    except (OSError, BaseExceptionGroup) as exc:
        error = _first(exc, OSError)
        if error is None:
            raise
        print(
            f"quorum node {config.name}: cannot listen on {config.host}:{config.port}: "
            f"{error.strerror or error}",
            file=sys.stderr,
        )
        return 1
    return 0


def _first(exc: BaseException, kind: type[OSError]) -> OSError | None:
    """The first ``kind`` inside ``exc``, looking through exception groups."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _first(inner, kind)) is not None:
                return found
    return None


# --- quorum up ----------------------------------------------------------------------------


@dataclass
class _Output:
    """A node's output as ``quorum up`` shows it: every line prefixed with the node's name,
    the last 30 kept for a failure report; ``exited`` once the process has ended."""

    node: NodeProcess
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=30))
    exited: trio.Event = field(default_factory=trio.Event)


async def _pump(out: _Output) -> None:
    process = out.node.process
    assert process is not None and process.stdout is not None
    buffer = b""
    async for data in process.stdout:
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            out.tail.append(line)
            console.out(f"{out.node.name} | {line}", highlight=False)
    await process.wait()
    out.exited.set()


async def _up(paths: list[Path], startup_timeout: float) -> int:
    nodes = []
    for path in paths:
        try:
            config = NodeConfig.from_toml(path)
        except ConfigError as exc:
            console.print(f"[red]quorum up: {exc}")
            return 2
        nodes.append(NodeProcess.of(config.name, path, f"http://{config.host}:{config.port}"))
    cluster = NodeCluster(nodes)
    outputs = [_Output(node) for node in nodes]
    status = 0
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            try:
                for out in outputs:
                    await out.node.start(pipe=True)
                    nursery.start_soon(_pump, out)
                try:
                    await cluster.wait_ready(startup_timeout)
                except NodeStartError as exc:
                    with trio.move_on_after(2.0):  # the output of those that exited, to the end
                        for out in outputs:
                            if out.node.name in exc.failures and not out.node.running:
                                await out.exited.wait()
                    for out in outputs:
                        why = exc.failures.get(out.node.name)
                        if why is None:
                            continue
                        console.print(
                            f"[red]node {out.node.name} ({out.node.config_path}) failed "
                            f"to start: {why}"
                        )
                        for line in list(out.tail)[-10:]:
                            console.print(f"    {line}", markup=False)
                    console.print("[red]stopping the other nodes")
                    status = 1
                else:
                    async with httpx.AsyncClient() as client:
                        await trio.sleep(1.2)  # one membership refresh, so every node knows all
                        await _print_cluster(client, nodes[0].url)
                    console.print("Ctrl-C stops the cluster.")
                    async with trio.open_nursery() as watch:
                        for out in outputs:
                            watch.start_soon(_watch_exit, out.exited, watch.cancel_scope)
                        watch.start_soon(_first_signal, signals, watch.cancel_scope)
                    for out in outputs:
                        if out.exited.is_set():
                            code = out.node.process.returncode if out.node.process else None
                            console.print(f"[red]node {out.node.name} exited (status {code})")
                            status = 1
            finally:
                await cluster.close(grace_s=10.0)
                with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                    for out in outputs:  # their last lines, up to the end of each pipe
                        if out.node.process is not None:
                            await out.exited.wait()
        nursery.cancel_scope.cancel()
    console.print("cluster stopped")
    return status


async def _watch_exit(exited: trio.Event, scope: trio.CancelScope) -> None:
    await exited.wait()
    scope.cancel()


async def _first_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in signals:
        break
    scope.cancel()


async def _print_cluster(client: httpx.AsyncClient, url: str) -> None:
    """The members as the node at ``url`` sees them, then a curl line to try: a streamed
    request entering there for a model that another node serves (else one of its own)."""
    table = Table(title="Quorum cluster")
    table.add_column("node")
    table.add_column("OpenAI base URL")
    table.add_column("models")
    try:
        data = (
            await client.get(url + "/cluster/members", headers=auth_headers(), timeout=2.0)
        ).json()
        members, me = data["members"], data["self"]
    except (httpx.HTTPError, ValueError, KeyError):
        members, me = [], None
    members = sorted(members, key=lambda m: m["name"])
    for m in members:
        table.add_row(m["name"], m["url"] + "/v1", ", ".join(m["models"]))
    console.print(table)
    own: list[str] = next((m["models"] for m in members if m["name"] == me), [])
    models = [x for m in members if m["name"] != me for x in m["models"] if x not in own] + own
    if models:
        body = json.dumps(
            {
                "model": models[0],
                "stream": True,
                "messages": [{"role": "user", "content": "Count to five."}],
            },
            separators=(",", ":"),
        )
        console.print("Try it:", markup=False)
        console.print(
            f"  curl -N {url}/v1/chat/completions -H 'content-type: application/json' \\\n"
            f"    -d '{body}'",
            markup=False,
            soft_wrap=True,
        )


# --- quorum members -----------------------------------------------------------------------


def _members(url: str) -> int:
    from quorum.status.terminal import members_table

    try:
        response = httpx.get(
            url.rstrip("/") + "/cluster/members", headers=auth_headers(), timeout=5.0
        )
        if response.status_code in (401, 403):
            message = response.json()["error"]["message"]
            console.print(
                f"[red]quorum members: {url} refused ({response.status_code}): {message} "
                "Set QUORUM_API_KEY to an admin key."
            )
            return 1
        data = response.json()
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        console.print(f"[red]quorum members: {url} did not answer: {exc}")
        return 1
    console.print(members_table(data["members"], data["self"], console))
    return 0


def _status(url: str, once: bool) -> int:
    from quorum.status.terminal import watch

    try:
        return watch(url, once=once, console=console)
    except KeyboardInterrupt:
        return 0


# --- quorum keys new ---------------------------------------------------------------------


_KEY_OPTIONS = {
    "name": "NAME",
    "models": "--models",
    "requests_per_minute": "--rpm",
    "tokens_per_minute": "--tpm",
    "max_concurrent": "--max-concurrent",
}


def _keys_new(args: argparse.Namespace) -> int:
    """Print a new key on its own line, then its ``[[auth.keys]]`` table (stdout); a note
    that the key is shown only this once goes to stderr. A bad option: one line, status 2."""
    key = new_key()
    table: dict[str, object] = {"name": args.name, "sha256": digest(key), "role": args.role}
    if args.models is not None:
        table["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    for option, field_name in (
        ("rpm", "requests_per_minute"),
        ("tpm", "tokens_per_minute"),
        ("max_concurrent", "max_concurrent"),
    ):
        if getattr(args, option) is not None:
            table[field_name] = getattr(args, option)
    try:
        checked = ApiKey.model_validate(table)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = _KEY_OPTIONS.get(str(error["loc"][0]), str(error["loc"][0]))
        message = error["msg"].removeprefix("Value error, ")
        if message.startswith("Input should be "):
            message = "expected " + message.removeprefix("Input should be ")
        if where == "--models":
            message = "name at least one model (or leave --models out: every model)"
        print(f"quorum keys new: {where}: {message}", file=sys.stderr)
        return 2
    print(key, flush=True)
    print(
        f"quorum keys new: the key of {checked.name!r} is shown only this once; "
        "the node keeps only its sha256 (paste the table below into [auth]).",
        file=sys.stderr,
        flush=True,
    )
    print()
    print(tomli_w.dumps({"auth": {"keys": [table]}}), end="")
    return 0


# --- quorum drain -------------------------------------------------------------------------


def _drain(node: str, via: str, timeout_s: float) -> int:
    """POST /admin/drain to the node, then wait until it has left (or stopped answering)."""
    url = node.rstrip("/")
    if not url.startswith("http"):
        try:
            data = httpx.get(
                via.rstrip("/") + "/cluster/members", headers=auth_headers(), timeout=5.0
            ).json()
        except (httpx.HTTPError, ValueError) as exc:
            console.print(f"[red]quorum drain: {via} did not answer: {exc}")
            return 1
        urls = {m["name"]: m["url"] for m in data["members"]}
        if node not in urls:
            console.print(
                f"[red]quorum drain: no member named {node!r} (members: {', '.join(sorted(urls))})"
            )
            return 1
        url = urls[node]
    from quorum.node import drain_token_path

    token_file = drain_token_path(url)
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        console.print(
            f"[red]quorum drain: cannot read {node}'s drain token at {token_file} "
            f"({exc.strerror}): run it on the node's machine, as the node's user"
        )
        return 1
    try:
        response = httpx.post(
            url + "/admin/drain", headers={"authorization": f"Bearer {token}"}, timeout=5.0
        )
    except httpx.HTTPError as exc:
        console.print(f"[red]quorum drain: {url} did not answer: {exc}")
        return 1
    if response.status_code != 202:
        console.print(f"[red]quorum drain: {url} answered {response.status_code}: {response.text}")
        return 1
    console.print(f"draining {node}: {response.json()['in_flight']} requests in flight")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            health = httpx.get(url + "/health", timeout=2.0).json()
        except (httpx.HTTPError, ValueError):
            console.print(f"{node} has finished its requests and left the cluster")
            return 0
        console.print(f"  {health['load']['in_flight']} in flight", highlight=False)
        time.sleep(0.5)
    console.print(f"[red]quorum drain: {node} still answers after {timeout_s} s")
    return 1
