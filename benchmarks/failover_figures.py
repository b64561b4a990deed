"""Failover figures on real node processes (loopback only), printed, not asserted.

1. Resume delay after kill -9: streams are in flight through a surviving entry node when the
   node serving them is killed; the delay is the longest gap between two chunks a client saw
   across the kill. Each kill hits ``--streams`` streams at once; the node is restarted and
   the cluster waits until it is alive everywhere before the next trial.
2. Prefix affinity under mixed load: ``--clients`` concurrent clients send multi-turn
   conversations drawn (Zipf-like) from ``--conversations`` conversations, entering at random
   nodes; the figure is the share of requests served by their conversation's most used node.

    python benchmarks/failover_figures.py            # 30 kills x 8 streams, 2,000 requests
    python benchmarks/failover_figures.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import trio
from rich.console import Console
from rich.table import Table

from quorum.scenarios.cluster import ClusterOptions, ProcessCluster
from quorum.stats import percentile

NAMES = ("node-a", "node-b", "node-c")
console = Console()


async def one_stream(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    started: trio.Event,
    gaps: list[float],
    failures: list[str],
) -> None:
    last = None
    worst = 0.0
    seen = 0
    async with client.stream("POST", url, json=body) as response:
        async for chunk in response.aiter_raw():
            now = trio.current_time()
            if last is not None:
                worst = max(worst, now - last)
            last = now
            seen += 1
            if seen == 3:
                started.set()
            if b'"error"' in chunk:
                failures.append(chunk.decode()[:200])
    gaps.append(worst)


async def resume_delays(
    client: httpx.AsyncClient, cluster: ProcessCluster, trials: int, streams: int
) -> tuple[list[float], list[str]]:
    base = cluster.urls
    gaps: list[float] = []
    failures: list[str] = []
    rng = random.Random(7)
    for trial in range(trials):
        entry = NAMES[trial % 3]
        victim = rng.choice([n for n in NAMES if n != entry])
        # Conversations whose prefix-affine node is the victim, found by asking once
        # (non-streamed, one token). A pin would forbid the failover being measured.
        bodies: list[dict[str, Any]] = []
        topic = trial * 1000
        while len(bodies) < streams:
            topic += 1
            body = {
                "model": "mock-chat",
                "seed": topic,
                "max_tokens": 400,
                "messages": [
                    {"role": "system", "content": f"t{topic}"},
                    {"role": "user", "content": "Go."},
                ],
            }
            probe = await client.post(
                base[entry] + "/v1/chat/completions", json={**body, "max_tokens": 1}
            )
            if probe.headers.get("x-quorum-node") == victim:
                bodies.append({**body, "stream": True})
        events = [trio.Event() for _ in bodies]
        async with trio.open_nursery() as group:
            for body, started in zip(bodies, events, strict=True):
                group.start_soon(
                    one_stream,
                    client,
                    base[entry] + "/v1/chat/completions",
                    body,
                    started,
                    gaps,
                    failures,
                )
            for started in events:
                await started.wait()
            await cluster.kill(victim)  # SIGKILL by pid, reaped
        await cluster.start(victim)
        await cluster.wait_converged(60)
    return gaps, failures


async def affinity_share(
    client: httpx.AsyncClient,
    base: dict[str, str],
    requests: int,
    clients: int,
    conversations: int,
) -> tuple[float, int]:
    rng = random.Random(11)
    weights = [1 / (i + 1) for i in range(conversations)]
    served: dict[int, Counter[str]] = defaultdict(Counter)
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            conv = rng.choices(range(conversations), weights)[0]
            turns = rng.randint(0, 3)
            messages = [
                {"role": "system", "content": f"conversation {conv}"},
                {"role": "user", "content": "Hello."},
            ]
            for t in range(turns):
                messages += [
                    {"role": "assistant", "content": f"reply {t}"},
                    {"role": "user", "content": f"turn {t}"},
                ]
            entry = rng.choice(NAMES)
            response = await client.post(
                base[entry] + "/v1/chat/completions",
                json={"model": "mock-chat", "messages": messages, "max_tokens": 16},
            )
            if response.status_code == 200:
                served[conv][response.headers["x-quorum-node"]] += 1

    async with trio.open_nursery() as group:
        for _ in range(clients):
            group.start_soon(worker)
    total = sum(sum(c.values()) for c in served.values())
    on_home = sum(c.most_common(1)[0][1] for c in served.values())
    return on_home / max(1, total), total


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # nodes/*.toml on free loopback ports, gossip with the LAN preset (the shipped one)
        cluster = ProcessCluster(Path(tmp), ClusterOptions(preset="lan", names=NAMES))
        try:
            await cluster.start_all()
            base = cluster.urls
            async with httpx.AsyncClient(
                timeout=60, limits=httpx.Limits(max_connections=512, max_keepalive_connections=512)
            ) as client:
                await cluster.wait_converged(60)
                share, total = await affinity_share(
                    client, base, args.requests, args.clients, args.conversations
                )
                gaps, failures = await resume_delays(client, cluster, args.trials, args.streams)
        finally:
            await cluster.close()
    table = Table(title="Quorum failover figures (3 real nodes on loopback, LAN gossip)")
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("target")
    table.add_row(
        f"resume delay after kill -9, p50 ({len(gaps)} streams, {args.trials} kills)",
        f"{percentile(gaps, 50) * 1000:.0f} ms",
        "",
    )
    table.add_row(
        "resume delay after kill -9, p99", f"{percentile(gaps, 99) * 1000:.0f} ms", "≤ 1000 ms"
    )
    table.add_row("streams ending in an error event", str(len(failures)), "0")
    table.add_row(
        f"requests on their conversation's node ({total} requests, "
        f"{args.clients} clients, {args.conversations} conversations)",
        f"{share:.1%}",
        "",
    )
    console.print(table)
    for failure in failures[:3]:
        console.print(f"[red]{failure}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--conversations", type=int, default=60)
    parser.add_argument("--quick", action="store_true")
    ns = parser.parse_args()
    if ns.quick:
        ns.trials, ns.streams, ns.requests = 3, 4, 200
    trio.run(main, ns)
