"""kill -9 of a node serving a real model mid-stream: the stream resumes on the other
llama.cpp node with the text so far kept once (no echoed prefill, no answer started again),
equal to an undisturbed greedy run; and the killed node's llama.cpp server does not outlive
it. Real node processes (``quorum.launch``), SmolLM2-135M in llama.cpp on one thread each."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from quorum.launch import NodeCluster, write_nodes
from quorum.sse import SSEParser
from tests.helpers import needs_llamacpp, validate

pytestmark = [pytest.mark.slow, needs_llamacpp]

KEY = "Hyc80cdrTNfE1LNR7LwwSS2w2AdVpjNshWh4EnRGfTU="
LLAMA = {"model": "smollm2", "kind": "llamacpp", "threads": 1, "parallel": 2, "ctx": 2048}


def configs() -> dict[str, dict[str, Any]]:
    """node-a enters (a mock only), node-b and node-c run the model."""
    gossip = {"cluster": "llamacpp-kill", "keys": [KEY]}
    return {
        "node-a": {"gossip": gossip, "backends": [{"model": "mock-chat", "kind": "mock"}]},
        "node-b": {"gossip": gossip, "backends": [LLAMA]},
        "node-c": {"gossip": gossip, "backends": [LLAMA]},
    }


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux ``/proc``; trio spawns from a worker thread, so
    every thread's list is read)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def gone(pid: int) -> bool:
    """The process has exited (absent, or a zombie waiting for whoever inherited it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def ready(client: httpx.AsyncClient, url: str, names: set[str], timeout_s: float) -> None:
    """Wait until the node at ``url`` sees every one of ``names`` alive and ready."""
    with trio.fail_after(timeout_s):
        while True:
            try:
                members = (await client.get(url + "/cluster/members")).json()["members"]
                if names <= {
                    m["name"]
                    for m in members
                    if m["state"] == "alive" and m["node_state"] == "ready"
                }:
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            await trio.sleep(0.1)


async def test_kill_9_of_the_serving_node_resumes_the_real_model_exactly(tmp_path: Path) -> None:
    cluster = NodeCluster(write_nodes(tmp_path, configs(), preset="local"))
    entry = cluster.url("node-a") + "/v1/chat/completions"
    body = {
        "model": "smollm2",
        "stream": True,
        "temperature": 0,
        "max_tokens": 160,
        "messages": [{"role": "user", "content": "Tell me, step by step, about bridges."}],
    }
    try:
        await cluster.start_all()
        await cluster.wait_ready(60)
        async with httpx.AsyncClient(timeout=30) as client:
            await ready(client, cluster.url("node-a"), {"node-a", "node-b", "node-c"}, 60)
            served, reference = await stream(client, entry, body)
            whole = text(reference)
            assert served in ("node-b", "node-c") and len(whole) > 300
            # each llama.cpp node's server process
            servers = {n: children(p.pid) for n, p in cluster.nodes.items() if p.pid is not None}
            assert [len(servers[n]) for n in ("node-a", "node-b", "node-c")] == [0, 1, 1]
            victim = cluster.nodes[served]
            parser, events, killed = SSEParser(), [], False
            async with client.stream("POST", entry, json=body) as response:
                assert response.headers["x-quorum-node"] == served
                async for chunk in response.aiter_raw():
                    for event in parser.feed(chunk):
                        events.append(event)
                        # strike after a newline: a prefill ending in whitespace is the hard case
                        if not killed and len(events) > 10 and delta(event).endswith("\n"):
                            victim.signal(signal.SIGKILL)
                            killed = True
            assert killed
            data = [json.loads(e.data) for e in events if not e.is_done]
            assert [e.data for e in events].count("[DONE]") == 1
            for event in data:
                validate("CreateChatCompletionStreamResponse", event)
            assert text(data) == whole  # kept once: nothing lost, nothing repeated
            assert len({e["id"] for e in data}) == 1
            assert [
                c["finish_reason"] for e in data for c in e["choices"] if c["finish_reason"]
            ] == [c["finish_reason"] for e in reference for c in e["choices"] if c["finish_reason"]]
            assert await cluster.wait_exit(served, 10) == -signal.SIGKILL
            with trio.fail_after(10):  # the killed node's server ends with it
                while not all(gone(pid) for pid in servers[served]):
                    await trio.sleep(0.05)
    finally:
        await cluster.close()
    with trio.fail_after(10):  # and the others' with them, stopped gracefully
        while not all(gone(pid) for pids in servers.values() for pid in pids):
            await trio.sleep(0.05)


async def stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[str, list[dict[str, Any]]]:
    parser = SSEParser()
    events = []
    async with client.stream("POST", url, json=body) as response:
        node = response.headers["x-quorum-node"]
        async for chunk in response.aiter_raw():
            events.extend(parser.feed(chunk))
    assert events[-1].is_done
    return node, [json.loads(e.data) for e in events[:-1]]


def delta(event: Any) -> str:
    """The content of one SSE event's chunk ("" for anything else)."""
    if event.is_done:
        return ""
    choices = json.loads(event.data).get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""


def text(events: list[dict[str, Any]]) -> str:
    out = ""
    for event in events:
        assert "error" not in event, event
        for choice in event["choices"]:
            out += choice["delta"].get("content") or ""
    return out
