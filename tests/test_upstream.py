"""The HTTP upstream backend, against a real OpenAI-compatible server: another Quorum node
serving the mock (it speaks the same API as vLLM, llama.cpp server and Ollama)."""

from __future__ import annotations

import httpx
import trio

from quorum.config import NodeConfig
from quorum.node import Node
from tests.conftest import FAST, start_cluster
from tests.openai_spec import validate
from tests.test_cluster import MESSAGES, stream_events


async def start(nursery: trio.Nursery, table: dict) -> Node:
    node = Node(NodeConfig.from_mapping(table))
    await nursery.start(node.run)
    return node


async def mock_server(nursery: trio.Nursery) -> Node:
    """A node serving the mock as ``mock-llama``: the stand-in for vLLM or Ollama."""
    return await start(
        nursery,
        {
            "node": {"name": "vllm", "listen": "127.0.0.1:0"},
            "backends": [{"model": "mock-llama", "kind": "mock", **FAST}],
            "debug": {"faults": True},
        },
    )


async def gateway(nursery: trio.Nursery, upstream_url: str) -> Node:
    """A node whose only backend is an upstream at ``upstream_url``; waits until ready."""
    node = await start(
        nursery,
        {
            "node": {"name": "gateway", "listen": "127.0.0.1:0"},
            "debug": {"faults": True},
            "backends": [
                {
                    "model": "llama",
                    "kind": "upstream",
                    "url": upstream_url,
                    "upstream_model": "mock-llama",
                    "health_interval_s": 0.05,
                }
            ],
        },
    )
    with trio.fail_after(5):
        while node.node_state != "ready":
            await trio.sleep(0.01)
    return node


async def test_upstream_streams_and_folds_and_renames_the_model(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    server = await mock_server(nursery)
    node = await gateway(nursery, server.url + "/v1")
    url = node.url + "/v1/chat/completions"
    response, events, _ = await stream_events(
        http, url, {"model": "llama", "messages": MESSAGES, "stream": True, "seed": 4}
    )
    assert response.headers["x-quorum-node"] == "gateway"
    for event in events:
        validate("CreateChatCompletionStreamResponse", event)
    streamed = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]
    )
    whole = await http.post(url, json={"model": "llama", "messages": MESSAGES, "seed": 4})
    validate("CreateChatCompletionResponse", whole.json())
    assert whole.json()["choices"][0]["message"]["content"] == streamed
    assert whole.json()["usage"]["completion_tokens"] > 0  # usage asked of the upstream
    direct = await http.post(
        server.url + "/v1/chat/completions",
        json={"model": "mock-llama", "messages": MESSAGES, "seed": 4},
    )
    assert direct.json()["choices"][0]["message"]["content"] == streamed
    assert node.backends["llama"].load().busy == 0
    node.stop()
    server.stop()


async def test_upstream_errors_map_to_openai_errors(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    server = await mock_server(nursery)
    node = await gateway(nursery, server.url + "/v1")
    url = node.url + "/v1/chat/completions"
    # the upstream refuses before any byte: 502 with the upstream's reason
    refused = await http.post(
        url, json={"model": "llama", "messages": MESSAGES}, headers={"x-quorum-fault": "status=500"}
    )
    assert refused.status_code == 502
    validate("ErrorResponse", refused.json())
    # the upstream breaks mid-stream: one error event, then [DONE], no finish_reason
    _, events, _ = await stream_events(
        http,
        url,
        {"model": "llama", "messages": MESSAGES, "stream": True},
        headers={"x-quorum-fault": "fail_after=3"},
    )
    assert "error" in events[-1]
    validate("ErrorResponse", events[-1])
    assert not any(c.get("finish_reason") for e in events[:-1] for c in e["choices"])
    node.stop()
    server.stop()


async def test_unreachable_upstream_keeps_the_backend_warming(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    node = await start(
        nursery,
        {
            "node": {"name": "gateway", "listen": "127.0.0.1:0"},
            "debug": {"faults": True},
            "backends": [{"model": "llama", "kind": "upstream", "url": "http://127.0.0.1:9/v1"}],
            "routing": {"cold_start_wait_s": 0.2},
        },
    )
    assert node.node_state == "warming"
    response = await http.post(
        node.url + "/v1/chat/completions", json={"model": "llama", "messages": MESSAGES}
    )
    assert response.status_code == 503
    validate("ErrorResponse", response.json())
    node.stop()


def test_a_resumed_upstream_request_continues_the_partial_answer() -> None:
    from quorum.backends.base import Generation, Resume
    from quorum.backends.upstream import UpstreamBackend
    from quorum.wire import parse_chat_request, parse_completion_request

    backend = UpstreamBackend("llama", url="http://127.0.0.1:9/v1", upstream_model="Qwen/Q")
    chat = parse_chat_request({"model": "llama", "messages": MESSAGES, "stream": True})
    resume = Resume(events=4, text={"content": "One, two,", "reasoning_content": "count"})
    body = backend._body(Generation(chat, "rid00001", 1, False, resume=resume))
    assert body["model"] == "Qwen/Q" and body["stream"] is True
    partial = {"role": "assistant", "content": "One, two,", "reasoning_content": "count"}
    assert body["messages"] == [*MESSAGES, partial]  # the reasoning is continued, not restarted
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert "quorum_resume" not in body
    text = parse_completion_request({"model": "llama", "prompt": "Once upon"})
    body = backend._body(Generation(text, "rid00001", 1, True, resume=Resume(2, {"text": " a"})))
    assert body["prompt"] == "Once upon a"
    assert body["stream_options"] == {"include_usage": True}


async def test_a_stream_broken_at_the_upstream_is_resumed_through_another_gateway(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    """Two nodes front the same upstream; the first one's upstream stream breaks mid-way.
    The client still gets one well-formed stream: one id, one role, one finish, no error."""
    server = await mock_server(nursery)
    tables = [
        {
            "node": {"name": name, "listen": "127.0.0.1:0"},
            "gossip": {"bind": "127.0.0.1:0", "preset": "local", "keys": []},
            "debug": {"faults": True},
            "backends": [
                {
                    "model": "llama",
                    "kind": "upstream",
                    "url": server.url + "/v1",
                    "upstream_model": "mock-llama",
                    "health_interval_s": 0.05,
                }
            ],
        }
        for name in ("g1", "g2")
    ]
    cluster = await start_cluster(nursery, [NodeConfig.from_mapping(t) for t in tables])
    _, events, raw = await stream_events(
        http,
        cluster.url("g1") + "/v1/chat/completions",
        {"model": "llama", "messages": MESSAGES, "stream": True},
        headers={"x-quorum-fault": "fail_after=3"},
    )
    assert b'"error"' not in raw
    for event in events:
        validate("CreateChatCompletionStreamResponse", event)
    assert len({e["id"] for e in events}) == 1
    deltas = [c["delta"] for e in events for c in e["choices"]]
    assert sum("role" in d for d in deltas) == 1
    assert sum(c["finish_reason"] is not None for e in events for c in e["choices"]) == 1
    assert len("".join(d.get("content") or "" for d in deltas).split()) > 3


HOSTILE_BODIES = {  # each without its closing brace
    "top_k": '{"model": "llama", "messages": [{"role": "user", "content": "hi"}], "top_k": NaN',
    "messages[0].content": '{"model":"llama","messages": [{"role": "user", "content": "\\ud800"}]',
}


async def hostile_bodies_get_400(http: httpx.AsyncClient, url: str, stream: bool) -> None:
    for param, body in HOSTILE_BODIES.items():
        body += ', "stream": true}' if stream else "}"
        response = await http.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (body, response.text)
        validate("ErrorResponse", response.json())
        # the parser names the field where it can; NaN is refused as a literal, before
        # any field is known
        assert response.json()["error"]["param"] in (param, None)
        assert param in response.text or "NaN" in response.text


async def test_a_streamed_body_json_cannot_carry_is_a_400_and_the_gateway_keeps_serving(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    """``NaN`` parses (Python's json accepts it) but no upstream can be sent it; a lone
    surrogate parses too but is not UTF-8. Either is the client's 400."""
    server = await mock_server(nursery)
    node = await gateway(nursery, server.url + "/v1")
    url = node.url + "/v1/chat/completions"
    await hostile_bodies_get_400(http, url, stream=True)
    fine = await http.post(url, json={"model": "llama", "messages": MESSAGES})
    assert fine.status_code == 200
    assert node.backends["llama"].load().busy == 0
    node.stop()
    server.stop()


async def test_a_non_streamed_body_json_cannot_carry_is_a_400(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    server = await mock_server(nursery)
    node = await gateway(nursery, server.url + "/v1")
    try:
        await hostile_bodies_get_400(http, node.url + "/v1/chat/completions", stream=False)
    finally:
        node.stop()
        server.stop()
