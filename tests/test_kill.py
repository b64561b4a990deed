"""kill -9 of the serving node mid-stream, on real node processes, for streams entering at
every node: the client's text equals an undisturbed run's with the same seed, and every
chunk validates against OpenAI's spec."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from quorum.sse import SSEParser
from tests.conftest import ROOT
from tests.openai_spec import validate
from tests.test_cli import free_port, write_configs

NAMES = ("node-a", "node-b", "node-c")


async def start(path: Path) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "quorum", "node", "--config", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


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
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    http_ports = {n: free_port() for n in NAMES}
    paths = dict(zip(NAMES, write_configs(tmp_path, http_ports), strict=True))
    gossip_ports = {n: free_port() for n in NAMES}
    for name, path in paths.items():
        body = re.sub(r'bind = ".*"', f'bind = "127.0.0.1:{gossip_ports[name]}"', path.read_text())
        seeds = [f"127.0.0.1:{p}" for n, p in gossip_ports.items() if n != name]
        body = re.sub(r"seeds = \[.*\]", "seeds = " + json.dumps(seeds), body)
        path.write_text(body.replace('preset = "lan"', 'preset = "local"'))
    procs = {name: await start(path) for name, path in paths.items()}
    base = {n: f"http://127.0.0.1:{p}" for n, p in http_ports.items()}

    async def all_alive(client: httpx.AsyncClient) -> None:
        with trio.fail_after(30):
            while True:
                try:
                    views = [
                        (await client.get(base[n] + "/cluster/members")).json()["members"]
                        for n in NAMES
                    ]
                    if all(len(v) == 3 and all(m["state"] == "alive" for m in v) for v in views):
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.1)

    try:
        async with httpx.AsyncClient(timeout=20) as client:
            await all_alive(client)
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
                        procs[victim].send_signal(signal.SIGKILL)

                got_node, events = await stream(
                    client,
                    base[entry] + "/v1/chat/completions",
                    {**body, "messages": body["messages"]},
                    kill_after_five,
                )
                assert got_node == serving
                await procs[serving].wait()
                assert procs[serving].returncode == -signal.SIGKILL
                for event in events:
                    validate("CreateChatCompletionStreamResponse", event)
                assert text(events) == text(reference)
                assert len({e["id"] for e in events}) == 1
                assert [e["usage"] for e in events if e.get("usage")] == [
                    e["usage"] for e in reference if e.get("usage")
                ]
                procs[serving] = await start(paths[serving])
                await all_alive(client)
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
        for proc in procs.values():
            await proc.wait()
