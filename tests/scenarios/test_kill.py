"""kill -9 of the serving node mid-stream, on real node processes, for streams entering at
every node: the client's text equals an undisturbed run's with the same seed, and every
chunk validates against OpenAI's spec."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from quorum.scenarios.cluster import ClusterOptions, ProcessCluster
from quorum.sse import SSEParser
from tests.helpers import validate

pytestmark = pytest.mark.slow  # real node processes

NAMES = ("node-a", "node-b", "node-c")


async def stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], on_chunk: Any = None
) -> tuple[str, list[dict[str, Any]]]:
    """(serving node, parsed events without [DONE]); ``on_chunk(n)`` after the n-th chunk."""
    parser = SSEParser()
    events = []
    async with client.stream("POST", url, json=body) as response:
        node = response.headers["x-quorum-node"]
        n = 0
        async for chunk in response.aiter_raw():
            events.extend(parser.feed(chunk))
            n += 1
            if on_chunk is not None:
                await on_chunk(n)
    assert events[-1].is_done and [e.data for e in events].count("[DONE]") == 1
    return node, [json.loads(e.data) for e in events[:-1]]


def text(events: list[dict[str, Any]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for event in events:
        assert "error" not in event, event
        for choice in event["choices"]:
            for key, value in choice["delta"].items():
                if key != "role" and isinstance(value, str):
                    out[key] = out.get(key, "") + value
    return out


async def test_kill_9_of_the_serving_node_mid_stream_loses_nothing(
    tmp_path: Path,
) -> None:
    # nodes/*.toml on free loopback ports, gossip with the LOCAL preset
    cluster = ProcessCluster(tmp_path, ClusterOptions(preset="local", names=NAMES))
    base = cluster.urls
    try:
        await cluster.start_all()
        await cluster.wait_converged(30)
        async with httpx.AsyncClient(timeout=20) as client:
            for entry in NAMES:
                # a conversation whose (prefix-affine) node is not the entry
                for topic in range(50):
                    body = {
                        "model": "mock-chat",
                        "stream": True,
                        "seed": topic,
                        "messages": [
                            {"role": "system", "content": f"topic {topic}"},
                            {"role": "user", "content": "Count to five."},
                        ],
                        "stream_options": {"include_usage": True},
                    }
                    serving, reference = await stream(
                        client, base[entry] + "/v1/chat/completions", body
                    )
                    if serving != entry:
                        break
                assert serving != entry

                async def kill_after_five(n: int, victim: str = serving) -> None:
                    if n == 5:
                        cluster.signal(victim, signal.SIGKILL)

                got_node, events = await stream(
                    client, base[entry] + "/v1/chat/completions", body, kill_after_five
                )
                assert got_node == serving
                assert await cluster.wait_exit(serving, 10) == -signal.SIGKILL
                for event in events:
                    validate("CreateChatCompletionStreamResponse", event)
                assert text(events) == text(reference)
                assert len({e["id"] for e in events}) == 1
                assert [e["usage"] for e in events if e.get("usage")] == [
                    e["usage"] for e in reference if e.get("usage")
                ]
                await cluster.start(serving)
                await cluster.wait_converged(30)
    finally:
        await cluster.close()
