"""A three-node cluster on real sockets: the OpenAI SDK against every node, forwarding, the
relay's byte-exactness, errors, and slots freed when a client goes away."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from contextlib import aclosing
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import trio

from quorum.config import NodeConfig, RoutingConfig
from tests.helpers import (
    MESSAGES,
    WEATHER_TOOL,
    Cluster,
    node_config,
    start_cluster,
    stream_events,
    validate,
)

NODES = ("node-a", "node-b", "node-c")
SERVED_BY = {
    "mock-chat": {"node-a", "node-b", "node-c"},
    "mock-reasoner": {"node-a"},
    "mock-thinker": {"node-b"},
    "mock-coder": {"node-c"},
}
REASONING_FIELD = {"mock-reasoner": "reasoning_content", "mock-thinker": "reasoning"}
# --- the OpenAI SDK against every node ----------------------------------------------------


def sdk(cluster: Cluster, node: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url(node) + "/v1", api_key="any", max_retries=0)


def _stream_every_model(client: openai.OpenAI, entry: str) -> None:
    for model, nodes in SERVED_BY.items():
        response = client.chat.completions.with_raw_response.create(
            model=model,
            messages=MESSAGES,
            stream=True,
            seed=7,
            stream_options={"include_usage": True},
        )
        served_by = response.headers["x-quorum-node"]
        assert served_by in nodes
        ids, content, reasoning, finish, usage = set(), [], [], [], None
        for chunk in response.parse():
            ids.add(chunk.id)
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                content.append(choice.delta.content or "")
                extra = choice.delta.model_extra or {}
                reasoning.append(extra.get(REASONING_FIELD.get(model, "-"), "") or "")
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
        assert len(ids) == 1
        assert "".join(content).strip()
        assert finish in (["stop"], ["length"])
        assert usage is not None and usage.completion_tokens > 0
        assert bool("".join(reasoning)) == (model in REASONING_FIELD)


def _complete_every_model(client: openai.OpenAI) -> None:
    for model in SERVED_BY:
        completion = client.chat.completions.create(model=model, messages=MESSAGES, seed=7)
        assert completion.object == "chat.completion"
        assert completion.choices[0].message.content
        assert completion.usage is not None
        assert completion.usage.total_tokens == (
            completion.usage.prompt_tokens + completion.usage.completion_tokens
        )
        text = client.completions.create(model=model, prompt="Once upon", max_tokens=8)
        assert text.object == "text_completion" and text.choices[0].text
        assert text.usage is not None and 0 < text.usage.completion_tokens <= 8


async def in_thread(fn: Any, *args: Any) -> Any:
    """Run blocking SDK code off the trio thread (the nodes run on this one)."""
    return await trio.to_thread.run_sync(fn, *args)


@pytest.mark.parametrize("entry", NODES)
async def test_sdk_streams_every_model_from_every_node(cluster: Cluster, entry: str) -> None:
    with sdk(cluster, entry) as client:
        await in_thread(_stream_every_model, client, entry)


@pytest.mark.parametrize("entry", NODES)
async def test_sdk_non_streamed_every_model_from_every_node(cluster: Cluster, entry: str) -> None:
    with sdk(cluster, entry) as client:
        await in_thread(_complete_every_model, client)


def _stream_text(client: openai.OpenAI, **kwargs: Any) -> str:
    parts = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        parts.extend(c.delta.content or "" for c in chunk.choices)
    return "".join(parts)


async def test_no_request_stays_counted_in_flight_once_answered(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    """Every kind of answer (streamed or not, local or forwarded, error or not) gives its
    in-flight count back: drain waits for it, and gossip publishes it as load."""
    for entry in NODES:
        url = cluster.url(entry) + "/v1/chat/completions"
        for model in SERVED_BY:
            body = {"model": model, "messages": MESSAGES}
            assert (await http.post(url, json=body)).status_code == 200
            await stream_events(http, url, {**body, "stream": True})
        assert (
            await http.post(url, json={"model": "nope", "messages": MESSAGES})
        ).status_code == 404
        await http.post(
            cluster.url(entry) + "/v1/completions",
            json={"model": "mock-chat", "prompt": "x", "max_tokens": 3},
        )
    with trio.fail_after(2):
        while any(cluster[n].dispatcher.busy for n in NODES):
            await trio.sleep(0.01)
    for name in NODES:
        assert all(b.load().busy == 0 for b in cluster[name].backends.values())


async def test_streamed_and_non_streamed_answers_agree(cluster: Cluster) -> None:
    """Folding the stream gives the same message as the non-streamed answer."""
    with sdk(cluster, "node-a") as client:
        args = {"model": "mock-coder", "messages": MESSAGES, "seed": 3}
        whole = await in_thread(lambda: client.chat.completions.create(**args))
        streamed = await in_thread(lambda: _stream_text(client, **args))
    assert streamed == whole.choices[0].message.content


# --- what crosses the hop -----------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(REASONING_FIELD))
async def test_reasoning_deltas_keep_the_serving_backends_field_name(
    cluster: Cluster, http: httpx.AsyncClient, model: str
) -> None:
    field = REASONING_FIELD[model]
    other = "reasoning" if field == "reasoning_content" else "reasoning_content"
    entry = "node-c"  # serves neither reasoning model: always forwarded
    _, events, _ = await stream_events(
        http,
        cluster.url(entry) + "/v1/chat/completions",
        {"model": model, "messages": MESSAGES, "stream": True},
    )
    kinds = []
    for event in events:
        validate("CreateChatCompletionStreamResponse", event)
        delta = event["choices"][0]["delta"]
        assert other not in delta
        if delta.get(field):
            kinds.append("reasoning")
        if delta.get("content"):
            kinds.append("content")
    assert kinds and kinds[0] == "reasoning" and "content" in kinds
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # all reasoning comes first


def _tool_calls(client: openai.OpenAI) -> tuple[dict[int, dict[str, Any]], int, str | None]:
    calls: dict[int, dict[str, Any]] = {}
    fragments = 0
    finish = None
    for chunk in client.chat.completions.create(
        model="mock-coder",
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER_TOOL],
        stream=True,
    ):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or ():
                call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function and tc.function.name:
                    call["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
                    fragments += 1
    return calls, fragments, finish


@pytest.mark.parametrize("entry", NODES)
async def test_tool_call_fragments_concatenate_to_valid_json(cluster: Cluster, entry: str) -> None:
    with sdk(cluster, entry) as client:
        calls, fragments, finish = await in_thread(_tool_calls, client)
    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    assert fragments > 1  # arguments arrive in several pieces
    arguments = json.loads(calls[0]["arguments"])
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])


async def test_a_shared_prefix_goes_to_the_same_node_from_every_entry(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    """Prefix affinity: the conversation's node is the same whichever node it enters at,
    so a real backend's prompt cache is reused."""
    for topic in ("apples", "ships", "rivers", "clocks"):
        served = set()
        for turn in range(2):
            for entry in NODES:
                messages = [
                    {"role": "system", "content": f"You talk about {topic}."},
                    {"role": "user", "content": "Begin."},
                    *[{"role": "assistant", "content": "..."}, {"role": "user", "content": "More."}]
                    * turn,
                ]
                response = await http.post(
                    cluster.url(entry) + "/v1/chat/completions",
                    json={"model": "mock-chat", "messages": messages},
                )
                served.add(response.headers["x-quorum-node"])
        assert len(served) == 1, (topic, served)


async def test_same_seed_gives_the_same_text_on_every_node(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    texts = set()
    for node in NODES:
        response = await http.post(
            cluster.url("node-a") + "/v1/chat/completions",
            json={"model": "mock-chat", "messages": MESSAGES, "seed": 11},
            headers={"x-quorum-pin": node},
        )
        assert response.status_code == 200
        assert response.headers["x-quorum-node"] == node
        texts.add(response.json()["choices"][0]["message"]["content"])
    assert len(texts) == 1


async def test_forwarded_stream_bytes_equal_the_serving_nodes_bytes(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    """Compared at the relay: what node-a's hop received from node-c is, byte for byte,
    what node-a sent to the client."""
    received = bytearray()
    cluster = await start_cluster(nursery, [node_config(n) for n in NODES], tap=received.extend)
    for body in (
        {
            "model": "mock-coder",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {"model": "mock-coder", "messages": MESSAGES, "stream": True, "tools": [WEATHER_TOOL]},
        {"model": "mock-coder", "prompt": "a b c", "stream": True, "max_tokens": 20},
    ):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        received.clear()
        response, events, client_bytes = await stream_events(
            http, cluster.url("node-a") + path, body
        )
        assert response.headers["x-quorum-node"] == "node-c"
        assert client_bytes == bytes(received)
        assert len(events) > 3
    for node in cluster.nodes.values():
        node.stop()


async def test_stream_headers(cluster: Cluster, http: httpx.AsyncClient) -> None:
    response, _, _ = await stream_events(
        http,
        cluster.url("node-a") + "/v1/chat/completions",
        {"model": "mock-coder", "messages": MESSAGES, "stream": True},
        headers={"x-request-id": "test-request-0001"},
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-request-id"] == "test-request-0001"
    assert response.headers["x-quorum-node"] == "node-c"


async def test_every_response_validates_against_openai_spec(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    base = cluster.url("node-b")
    models = (await http.get(base + "/v1/models")).json()
    validate("ListModelsResponse", models)
    assert {m["id"] for m in models["data"]} == set(SERVED_BY)
    for model in SERVED_BY:
        chat = await http.post(
            base + "/v1/chat/completions", json={"model": model, "messages": MESSAGES}
        )
        validate("CreateChatCompletionResponse", chat.json())
        tools = await http.post(
            base + "/v1/chat/completions",
            json={"model": model, "messages": MESSAGES, "tools": [WEATHER_TOOL]},
        )
        validate("CreateChatCompletionResponse", tools.json())
        assert tools.json()["choices"][0]["finish_reason"] == "tool_calls"
        text = await http.post(base + "/v1/completions", json={"model": model, "prompt": "hi"})
        validate("CreateCompletionResponse", text.json())
        _, events, _ = await stream_events(
            http,
            base + "/v1/chat/completions",
            {
                "model": model,
                "messages": MESSAGES,
                "stream": True,
                "tools": [WEATHER_TOOL],
                "stream_options": {"include_usage": True},
            },
        )
        for event in events:
            validate("CreateChatCompletionStreamResponse", event)


# --- routing aids and errors --------------------------------------------------------------


async def test_pin_selects_a_node_and_rejects_unknown_or_unable_nodes(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    url = cluster.url("node-a") + "/v1/chat/completions"
    body = {"model": "mock-chat", "messages": MESSAGES}
    ok = await http.post(url, json=body, headers={"x-quorum-pin": "node-b"})
    assert ok.status_code == 200 and ok.headers["x-quorum-node"] == "node-b"
    unknown = await http.post(url, json=body, headers={"x-quorum-pin": "node-z"})
    assert unknown.status_code == 400
    assert "node-z" in unknown.json()["error"]["message"]
    unable = await http.post(
        url, json={"model": "mock-coder", "messages": MESSAGES}, headers={"x-quorum-pin": "node-b"}
    )
    assert unable.status_code == 400  # the client's mistake: the pinned node lacks the model
    assert "does not serve" in unable.json()["error"]["message"]
    assert unable.json()["error"]["param"] == "x-quorum-pin"
    for response in (unknown, unable):
        validate("ErrorResponse", response.json())


async def test_a_forwarded_request_is_never_forwarded_again(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    body = json.dumps({"model": "mock-coder", "messages": MESSAGES}).encode()
    headers = {"x-quorum-forwarded": "node-b"}
    signer = cluster["node-b"].dispatcher.signer
    headers["x-quorum-signature"] = signer.sign("POST", "/v1/chat/completions", body, headers)
    response = await http.post(
        cluster.url("node-a") + "/v1/chat/completions", content=body, headers=headers
    )
    assert response.status_code == 503
    validate("ErrorResponse", response.json())


BAD_INPUTS = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"messages": MESSAGES}).encode(), 400, "model"),
    (json.dumps({"model": 5, "messages": MESSAGES}).encode(), 400, "model"),
    (json.dumps({"model": "mock-chat"}).encode(), 400, "messages"),
    (json.dumps({"model": "mock-chat", "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"model": "mock-chat", "messages": []}).encode(), 400, "messages"),
    (
        json.dumps({"model": "mock-chat", "messages": [{"content": "x"}]}).encode(),
        400,
        "messages[0].role",
    ),
    (
        json.dumps({"model": "mock-chat", "messages": [{"role": "user", "content": 3}]}).encode(),
        400,
        "messages[0].content",
    ),
    (
        json.dumps({"model": "mock-chat", "messages": MESSAGES, "stream": "yes"}).encode(),
        400,
        "stream",
    ),
    (
        json.dumps({"model": "mock-chat", "messages": MESSAGES, "max_tokens": -1}).encode(),
        400,
        "max_tokens",
    ),
    (json.dumps({"model": "mock-chat", "messages": MESSAGES, "n": 2}).encode(), 400, "n"),
    (
        json.dumps({"model": "mock-chat", "messages": MESSAGES, "temperature": 9}).encode(),
        400,
        "temperature",
    ),
    (json.dumps({"model": "no-such-model", "messages": MESSAGES}).encode(), 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_INPUTS)
async def test_bad_input_gets_a_clear_error_and_the_node_keeps_serving(
    cluster: Cluster, http: httpx.AsyncClient, body: bytes, status: int, param: str | None
) -> None:
    url = cluster.url("node-a") + "/v1/chat/completions"
    response = await http.post(url, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()
    validate("ErrorResponse", error)
    assert error["error"]["param"] == param
    assert len(error["error"]["message"]) > 10
    if status == 404:
        assert error["error"]["code"] == "model_not_found"
    ok = await http.post(url, json={"model": "mock-coder", "messages": MESSAGES})
    assert ok.status_code == 200


async def test_oversized_body_is_413(nursery: trio.Nursery, http: httpx.AsyncClient) -> None:
    cluster = await start_cluster(nursery, [node_config("node-a", max_body_bytes=4096)])
    url = cluster.url("node-a") + "/v1/chat/completions"
    big = {"model": "mock-chat", "messages": [{"role": "user", "content": "x" * 10_000}]}
    response = await http.post(url, json=big)
    assert response.status_code == 413
    validate("ErrorResponse", response.json())
    assert "4096" in response.json()["error"]["message"]
    assert (await http.post(url, json={"model": "mock-chat", "messages": MESSAGES})).is_success
    cluster["node-a"].stop()


async def test_unknown_endpoint_and_method_are_openai_errors(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    missing = await http.get(cluster.url("node-a") + "/v1/embeddings")
    assert missing.status_code == 404
    validate("ErrorResponse", missing.json())
    wrong = await http.get(cluster.url("node-a") + "/v1/chat/completions")
    assert wrong.status_code == 405
    validate("ErrorResponse", wrong.json())
    assert wrong.headers["allow"] == "POST"


def warming(config: NodeConfig, warmup_s: float) -> NodeConfig:
    return dataclasses.replace(
        config,
        backends=tuple(
            dataclasses.replace(b, options={**b.options, "warmup_s": warmup_s})
            for b in config.backends
        ),
    )


async def test_no_node_able_to_serve_is_503_after_the_cold_start_hold(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    a = dataclasses.replace(node_config("node-a"), routing=RoutingConfig(cold_start_wait_s=0.3))
    cluster = await start_cluster(nursery, [a, warming(node_config("node-c"), 600)], ready=False)
    assert {m.name: m.node_state for m in cluster["node-a"].membership.members()}[
        "node-c"
    ] == "warming"
    started = trio.current_time()
    response = await http.post(
        cluster.url("node-a") + "/v1/chat/completions",
        json={"model": "mock-coder", "messages": MESSAGES},
    )
    assert response.status_code == 503
    assert trio.current_time() - started >= 0.3  # held first
    validate("ErrorResponse", response.json())
    assert "mock-coder" in response.json()["error"]["message"]
    for node in cluster.nodes.values():
        node.stop()


async def test_cold_boot_holds_the_request_until_a_node_is_ready(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    cluster = await start_cluster(
        nursery, [node_config("node-a"), warming(node_config("node-c"), 1.0)], ready=False
    )
    response = await http.post(
        cluster.url("node-a") + "/v1/chat/completions",
        json={"model": "mock-coder", "messages": MESSAGES},
    )
    assert response.status_code == 200
    assert response.headers["x-quorum-node"] == "node-c"
    for node in cluster.nodes.values():
        node.stop()


# --- a client that goes away ----------------------------------------------------------------


@pytest.mark.parametrize("entry", ["node-c", "node-a"])
async def test_client_disconnect_frees_the_slot(cluster: Cluster, entry: str) -> None:
    """Across the hop too: closing the client's stream cancels the work on node-c."""
    serving = cluster["node-c"].backends["mock-coder"]
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream(
            "POST",
            cluster.url(entry) + "/v1/chat/completions",
            json={"model": "mock-coder", "messages": MESSAGES, "stream": True, "max_tokens": 5000},
            headers={"x-quorum-fault": "stall_after=3"},
        ) as response:
            assert response.status_code == 200
            async with aclosing(response.aiter_raw()) as chunks:
                async for _ in chunks:
                    break
            assert serving.load().busy == 1
    with trio.fail_after(2):
        while serving.load().busy or cluster["node-a"].dispatcher.busy:
            await trio.sleep(0.005)
    assert serving.load().queued == 0
    assert cluster["node-a"].dispatcher.busy == 0


async def test_cluster_members_shows_state_incarnation_and_load(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    with trio.move_on_after(5):  # load travels by gossip: wait for node-c's figures
        while True:
            data = (await http.get(cluster.url("node-b") + "/cluster/members")).json()
            by_name = {m["name"]: m for m in data["members"]}
            if by_name["node-c"]["load"]["free_slots"]:
                break
            await trio.sleep(0.05)
    assert by_name["node-c"]["load"]["free_slots"], (by_name, cluster["node-c"].health())
    assert data["self"] == "node-b"
    by_name = {m["name"]: m for m in data["members"]}
    assert set(by_name) == set(NODES)
    for name, m in by_name.items():
        assert m["state"] == "alive" and m["node_state"] == "ready"
        assert m["url"] == cluster.url(name)
        assert isinstance(m["incarnation"], int)
        assert set(m["load"]) == {"in_flight", "free_slots", "queue_depth"}
    assert set(by_name["node-c"]["models"]) == {"mock-chat", "mock-coder"}
    assert by_name["node-c"]["load"]["free_slots"] == 24  # 16 + 8 slots, all free


@pytest.mark.slow  # runs `quorum members` as a process
async def test_quorum_members_prints_the_table(cluster: Cluster) -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "quorum", "members", cluster.url("node-a")],
        capture_stdout=True,
        capture_stderr=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    out = result.stdout.decode()
    assert "members as seen by node-a" in out
    for name in NODES:
        assert name in out
    assert out.count("alive") == 3
