"""The issue's own words for PostgreSQL: a conversation started on node-a goes on at node-b
and node-c after node-a is killed with -9. Real `quorum node` processes from the shipped
configs (tests/processes.py), pointed at a real PostgreSQL server (tests/postgres.py)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.processes import start_node_processes, stop_node_processes

pytestmark = pytest.mark.slow


def test_with_postgresql_a_conversation_outlives_the_node_that_made_it(
    tmp_path: Path, postgres_dsn: str
) -> None:
    def shared_store(config: dict[str, Any]) -> None:
        config["conversations"] = {"store": "postgres", "dsn": postgres_dsn}

    nodes = start_node_processes(tmp_path, edit=shared_store)
    try:
        url = {n.name: n.url for n in nodes}
        with httpx.Client(timeout=10) as http:

            def turn(node: str, text: str, conversation: str | None = None) -> httpx.Response:
                messages = [{"role": "user", "content": text}]
                body = {"model": "mock-chat", "max_tokens": 3, "messages": messages}
                headers = {"x-conversation-id": conversation} if conversation else {}
                response = http.post(url[node] + "/c1/chat", json=body, headers=headers)
                assert response.status_code == 200, response.text
                return response

            made = turn("node-a", "Start at a.")
            conversation = made.headers["x-conversation-id"]
            prompts = [made.json()["usage"]["prompt_tokens"]]
            node_a = nodes[0].process
            node_a.send_signal(signal.SIGKILL)
            node_a.wait(timeout=10)
            for node in ("node-b", "node-c"):
                answer = turn(node, f"On {node}.", conversation)
                assert answer.headers["x-conversation-id"] == conversation
                prompts.append(answer.json()["usage"]["prompt_tokens"])
            assert prompts == sorted(prompts) and len(set(prompts)) == 3  # grows each turn
            got = http.get(url["node-c"] + f"/c1/conversations/{conversation}")
            assert got.status_code == 200
            messages = got.json()["messages"]
            assert [m["role"] for m in messages] == ["user", "assistant"] * 3
            assert [m["content"] for m in messages[::2]] == [
                "Start at a.",
                "On node-b.",
                "On node-c.",
            ]
    finally:
        stop_node_processes(nodes)
