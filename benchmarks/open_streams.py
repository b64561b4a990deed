"""How many concurrent open streams one node holds, and the memory each costs.

Starts one node process (loopback, a mock with slow tokens and enough slots), opens
``--streams`` streaming requests on raw sockets, waits until every one has received its first
event, and reads the node's resident memory (VmRSS) before and after. Then it closes them all
and checks the node is back to 0 in flight with every slot free (nothing leaked).

With ``--forward``, a second node that serves nothing takes the streams and relays them from
the first over the node-to-node channel: the figures are then per stream on the entry node
(relaying) and on the serving node (generating for a forward), and both must end at 0.

    python benchmarks/open_streams.py                 # 5,000 streams
    python benchmarks/open_streams.py --streams 500   # quicker
    python benchmarks/open_streams.py --forward       # 5,000 streams through an entry node
    python benchmarks/open_streams.py --floor         # the HTTP server alone, for comparison

``--floor`` measures what an open stream costs before Quorum does anything: the node's HTTP
server (``quorum.server``: hypercorn on trio, with the connection guard) serving an ASGI app
that answers each POST with one event and then only waits for the client to leave.

``--attribute`` says where that memory goes: the measured node (the entry node with
``--forward``) traces its allocations (``tracemalloc``, started by ``SIGUSR1`` once the node is
warm, read by ``SIGUSR2`` with every stream open; see ``tracemalloc_site/sitecustomize.py``), and
the script prints what is still alive per stream, by library and by the line of Quorum that
led to it. Tracing slows the node several times over, so use fewer streams (1,000 is plenty)
and take the RSS figures from a run without it.

    python benchmarks/open_streams.py --forward --streams 1000 --attribute
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import trio
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quorum.launch import NodeCluster, ServerProcess, free_port, write_nodes

console = Console()
TRACEMALLOC_SITE = Path(__file__).resolve().parent / "tracemalloc_site"


def rss_kb(node: ServerProcess) -> int:
    kb = node.rss_kb()
    if kb is None:
        raise RuntimeError("the node's VmRSS cannot be read")
    return kb


async def hold_stream(
    port: int,
    body: bytes,
    opened: list[int],
    all_open: trio.Event,
    release: trio.Event,
    total: int,
) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            b"content-type: application/json\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        received = b""
        while b"data: " not in received:
            data = await stream.receive_some(65536)
            if not data:
                raise RuntimeError("the node closed a stream before its first event")
            received += data
        opened[0] += 1
        if opened[0] == total:
            all_open.set()
        await release.wait()


async def floor_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The least an ASGI app can do for a streamed answer: one event, then wait for the
    client to leave. ``GET /health`` answers 200 (for ``ServerProcess.wait_ready``)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["method"] == "GET":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"text/event-stream")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


async def serve_floor(port: int) -> None:
    """``floor_app`` on ``quorum.server.serve`` at 127.0.0.1:``port``, as a node serves."""
    from hypercorn.config import Config

    from quorum.server import ConnectionGuard, serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.backlog = 4096  # as a node's: many connections arrive at once
    guard = ConnectionGuard(max_connections=20_000, send_timeout_s=30.0)
    await serve(floor_app, config, guard, shutdown_trigger=trio.sleep_forever)  # type: ignore[arg-type]


async def floor(args: argparse.Namespace) -> None:
    """Open ``args.streams`` streams on ``floor_app`` in a child process; print the memory
    each costs."""
    port = free_port()
    server = ServerProcess(
        "floor",
        f"http://127.0.0.1:{port}",
        [sys.executable, __file__, "--serve-floor", str(port)],
        health="/health",
    )
    try:
        await server.start()
        await server.wait_ready(30.0)
        body = b"{}"
        warm_open, warm_release = trio.Event(), trio.Event()
        opened = [0]
        async with trio.open_nursery() as nursery:  # warm the code paths once
            for _ in range(20):
                nursery.start_soon(hold_stream, port, body, opened, warm_open, warm_release, 20)
            with trio.fail_after(30):
                await warm_open.wait()
            warm_release.set()
        before = rss_kb(server)
        opened = [0]
        all_open, release = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(args.streams):
                nursery.start_soon(hold_stream, port, body, opened, all_open, release, args.streams)
            with trio.fail_after(args.timeout):
                await all_open.wait()
            after = rss_kb(server)
            release.set()
    finally:
        server.terminate()
        if await server.wait_exit(10.0) is None:
            await server.kill()
    table = Table(title=f"{args.streams} open streams on the HTTP server alone (quorum.server)")
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_row("RSS before / with them open", f"{before / 1024:.1f} / {after / 1024:.1f} MiB")
    table.add_row("memory per open stream", f"{(after - before) / args.streams:.1f} KB")
    console.print(table)


async def wait_routable(client: httpx.AsyncClient, base: str, timeout_s: float = 30.0) -> None:
    """Until the entry node at ``base`` has a member serving model ``m``."""
    with trio.fail_after(timeout_s):
        while True:
            models = (await client.get(base + "/v1/models")).json()
            if any(m.get("id") == "m" for m in models.get("data", [])):
                return
            await trio.sleep(0.2)


async def main(args: argparse.Namespace) -> None:
    config = {
        "node": {"name": "holder"},
        "backends": [
            {
                "model": "m", "kind": "mock", "ttft_ms": 0, "itl_ms": 5000,
                "slots": args.streams + 100, "queue": 0,
                "output_tokens": [args.output_tokens, args.output_tokens],
            }
        ],
    }  # fmt: skip
    configs: dict[str, dict[str, object]] = {"holder": config}
    if args.forward:
        configs["entry"] = {"node": {"name": "entry"}}
    with tempfile.TemporaryDirectory() as tmp:
        nodes = write_nodes(Path(tmp), configs, membership="static", log_level="warning")
        cluster = NodeCluster(nodes)
        holder = cluster.nodes["holder"]
        node = cluster.nodes["entry"] if args.forward else holder
        port = int(node.url.rsplit(":", 1)[1])
        attribution = Path(tmp) / "attribution.json"
        if args.attribute:
            node.env = attribute_env(node.name, attribution)
        try:
            await cluster.start_all()
            await cluster.wait_ready(30.0)
            base = node.url
            async with httpx.AsyncClient(timeout=10) as client:
                if args.forward:
                    await wait_routable(client, base)
                for _ in range(20):  # warm the code paths once
                    await client.post(
                        base + "/v1/chat/completions",
                        json={
                            "model": "m",
                            "max_tokens": 1,
                            "messages": [{"role": "user", "content": "hi"}],
                        },
                    )
                before = rss_kb(node)
                holder_before = rss_kb(holder)
                if args.attribute:
                    node.signal(signal.SIGUSR1)  # start tracing, now that the node is warm
                    await trio.sleep(0.5)
                body = json.dumps(
                    {
                        "model": "m",
                        "stream": True,
                        "messages": [{"role": "user", "content": "hold"}],
                    }
                ).encode()
                opened = [0]
                all_open = trio.Event()
                release = trio.Event()
                started = trio.current_time()
                async with trio.open_nursery() as nursery:
                    for _ in range(args.streams):
                        nursery.start_soon(
                            hold_stream, port, body, opened, all_open, release, args.streams
                        )
                    with trio.fail_after(args.timeout):
                        await all_open.wait()
                    open_s = trio.current_time() - started
                    after = rss_kb(node)
                    holder_after = rss_kb(holder)
                    if args.attribute:
                        rows = await read_attribution(node, attribution, args.timeout)
                    health = (await client.get(base + "/health")).json()
                    holder_health = (await client.get(holder.url + "/health")).json()
                    release.set()
                with trio.fail_after(30):
                    while True:
                        end = (await client.get(base + "/health")).json()
                        holder_end = (await client.get(holder.url + "/health")).json()
                        idle = [end["load"]["relaying"], holder_end["load"]["in_flight"]]
                        if end["load"]["in_flight"] == 0 and idle == [0, 0]:
                            break
                        await trio.sleep(0.1)
        finally:
            await cluster.close()
    per_stream = (after - before) * 1024 / args.streams
    holder_per_stream = (holder_after - holder_before) * 1024 / args.streams
    where = "relayed by an entry node from a serving node" if args.forward else "on one node"
    table = Table(
        title=f"{args.streams} concurrent open streams {where} "
        f"(mock planning {args.output_tokens} tokens each)"
    )
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("target")
    table.add_row("streams open at once", f"{opened[0]:,}", "≥ 5,000")
    if args.forward:
        table.add_row(
            "relayed by the entry / generating on the serving node, as they saw it",
            f"{health['load']['relaying']:,} / {holder_health['load']['in_flight']:,}",
            "",
        )
    else:
        table.add_row("in flight as the node saw it", f"{health['load']['in_flight']:,}", "")
    table.add_row("time to open them all", f"{open_s:.1f} s", "")
    if args.forward:
        table.add_row(
            "entry node RSS before / with them open",
            f"{before / 1024:.1f} / {after / 1024:.1f} MiB",
            "",
        )
        table.add_row(
            "entry node: memory per relayed stream", f"{per_stream / 1024:.1f} KB", "≤ 20 KB"
        )
        table.add_row(
            "serving node RSS before / with them open",
            f"{holder_before / 1024:.1f} / {holder_after / 1024:.1f} MiB",
            "",
        )
        table.add_row(
            "serving node: memory per forwarded stream",
            f"{holder_per_stream / 1024:.1f} KB",
            "≤ 20 KB",
        )
        table.add_row(
            "relayed by the entry / in flight and busy slots on the serving node, after closing",
            f"{end['load']['relaying']} / {holder_end['load']['in_flight']}, "
            f"{holder_end['backends']['m']['busy']}",
            "0 / 0, 0",
        )
    else:
        table.add_row(
            "node RSS before / with them open", f"{before / 1024:.1f} / {after / 1024:.1f} MiB", ""
        )
        table.add_row("memory per open stream", f"{per_stream / 1024:.1f} KB", "≤ 20 KB")
        table.add_row(
            "in flight / busy slots after closing them",
            f"{end['load']['in_flight']} / {end['backends']['m']['busy']}",
            "0 / 0",
        )
    console.print(table)
    if args.attribute:
        print_attribution(rows, args.streams, node.name)


def attribute_env(name: str, out: Path) -> dict[str, str]:
    """The environment under which node ``name`` loads ``tracemalloc_site`` and writes its
    attribution to ``out``."""
    path = os.pathsep.join(p for p in (str(TRACEMALLOC_SITE), os.environ.get("PYTHONPATH")) if p)
    return os.environ | {
        "PYTHONPATH": path,
        "QUORUM_ATTRIBUTE_OUT": str(out),
        "QUORUM_ATTRIBUTE_ONLY": f"{name}.toml",
    }


async def read_attribution(node: ServerProcess, out: Path, timeout_s: float) -> list[list[Any]]:
    """Ask ``node`` for its attribution (``SIGUSR2``) and read it: ``[owner, where, bytes]``
    rows. ``TooSlowError`` when the node writes none within ``timeout_s``."""
    node.signal(signal.SIGUSR2)
    path = trio.Path(out)
    with trio.fail_after(timeout_s):
        while True:  # another process writes it: nothing to wait on but the file itself
            if await path.exists():
                break
            await trio.sleep(0.5)
    rows: list[list[Any]] = json.loads(await path.read_text())
    return rows


def print_attribution(rows: list[list[Any]], streams: int, name: str, top: int = 25) -> None:
    """Two tables of what ``rows`` keep alive per stream (bytes ÷ ``streams``): by owning
    library, and by the line of Quorum that led to it."""
    owners: dict[str, int] = {}
    lines: dict[str, int] = {}
    for owner, where, size in rows:
        owners[owner] = owners.get(owner, 0) + size
        lines[where] = lines.get(where, 0) + size
    total = sum(owners.values())
    by_owner = Table(
        title=f"{name}: traced memory per open stream, {total / streams / 1024:.1f} KB in all, "
        "by the library that allocated it"
    )
    by_owner.add_column("library")
    by_owner.add_column("per stream", justify="right")
    for owner, size in sorted(owners.items(), key=lambda kv: -kv[1])[:top]:
        by_owner.add_row(owner, f"{size / streams / 1024:.2f} KB")
    console.print(by_owner)
    by_line = Table(title=f"{name}: by the innermost line of Quorum on the allocating stack")
    by_line.add_column("quorum/…")
    by_line.add_column("per stream", justify="right")
    for where, size in sorted(lines.items(), key=lambda kv: -kv[1])[:top]:
        by_line.add_row(where, f"{size / streams / 1024:.2f} KB")
    console.print(by_line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument(
        "--floor",
        action="store_true",
        help="the HTTP server alone (a trivial app on quorum.server), for comparison",
    )
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--forward",
        action="store_true",
        help="open the streams on an entry node that relays them from the serving node",
    )
    parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS")
    parser.add_argument(
        "--attribute",
        action="store_true",
        help="trace the node's allocations and print where the memory per stream goes",
    )
    parser.add_argument(
        "--output-tokens",
        type=int,
        default=1000,
        help="the mock plans this many tokens per stream up front (its own memory)",
    )
    arguments = parser.parse_args()
    if arguments.attribute and arguments.floor:
        parser.error("--attribute measures a node; --floor runs no node")
    if arguments.serve_floor:
        trio.run(serve_floor, arguments.serve_floor)
    else:
        trio.run(floor if arguments.floor else main, arguments)
