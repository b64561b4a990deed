"""How fast a client going away frees the backend slot on the serving node, across a hop.

Three in-process nodes on loopback (the shipped configs, fast mock timings); a stream for
``mock-coder`` (served by node-c only) enters at node-a and stalls after a few tokens; the
client closes it; the figure is the time until node-c's slot is free again.

    python benchmarks/cancel_latency.py [--trials 50]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import aclosing
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from quorum.stats import percentile
from tests.helpers import node_config, start_cluster


async def main(trials: int) -> None:
    async with trio.open_nursery() as nursery:
        cluster = await start_cluster(
            nursery, [node_config(n) for n in ("node-a", "node-b", "node-c")]
        )
        backend = cluster["node-c"].backends["mock-coder"]
        delays = []
        async with httpx.AsyncClient(timeout=10) as client:
            for i in range(trials):
                body = {
                    "model": "mock-coder",
                    "stream": True,
                    "max_tokens": 5000,
                    "messages": [{"role": "user", "content": f"trial {i}"}],
                }
                async with client.stream(
                    "POST",
                    cluster.url("node-a") + "/v1/chat/completions",
                    json=body,
                    headers={"x-quorum-fault": "stall_after=3"},
                ) as response:
                    async with aclosing(response.aiter_raw()) as chunks:
                        async for _ in chunks:
                            break
                closed = trio.current_time()
                with trio.fail_after(5):
                    while backend.load().busy:  # noqa: ASYNC110 - polled, as a client would
                        await trio.sleep(0.0005)
                delays.append(trio.current_time() - closed)
        print(
            f"client gone -> slot free on node-c across the hop, {trials} trials: "
            f"p50 {percentile(delays, 50) * 1000:.1f} ms, "
            f"p99 {percentile(delays, 99) * 1000:.1f} ms, "
            f"max {max(delays) * 1000:.1f} ms (target: within 100 ms)"
        )
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    trio.run(main, parser.parse_args().trials)
