"""Failover before the first token, resume after it, saturation, single-flight and drain,
on in-process nodes over real sockets, with faults injected into the mock backend."""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Any

import httpx
import openai
import pytest
import trio

from quorum.config import NodeConfig
from tests.helpers import (
    FAST,
    MESSAGES,
    WEATHER_TOOL,
    Cluster,
    start_cluster,
    stream_events,
    validate,
)

NODES = ("n1", "n2", "n3")


def config(name: str, *, routing: dict[str, Any] | None = None, **backend: Any) -> NodeConfig:
    """A node serving ``r1`` (a reasoning model, on every node) and ``solo`` (only on n3)."""
    backends = [
        {
            "model": "r1",
            "kind": "mock",
            "reasoning_field": "reasoning_content",
            "ttft_ms": 5,
            "itl_ms": 2,
            **backend,
        },
    ]
    if name == "n3":
        backends.append({"model": "solo", "kind": "mock", **FAST, **backend})
    table: dict[str, Any] = {
        "node": {"name": name, "listen": "127.0.0.1:0"},
        "gossip": {"bind": "127.0.0.1:0", "preset": "local", "keys": []},
        "backends": backends,
        "debug": {"faults": True},
    }
    if routing:
        table["routing"] = routing
    return NodeConfig.from_mapping(table)


@pytest.fixture
async def trio_cluster(nursery: trio.Nursery) -> Cluster:
    return await start_cluster(nursery, [config(n) for n in NODES])


def fold(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What a client reassembles: texts per field, tool-call arguments, and the shape facts."""
    texts: dict[str, str] = {}
    arguments = ""
    roles = finishes = 0
    for event in events:
        for choice in event["choices"]:
            delta = choice["delta"]
            roles += "role" in delta
            finishes += choice["finish_reason"] is not None
            for key, value in delta.items():
                if key != "role" and isinstance(value, str):
                    texts[key] = texts.get(key, "") + value
            for call in delta.get("tool_calls") or ():
                arguments += call["function"].get("arguments", "")
    return {
        "ids": {e["id"] for e in events},
        "texts": texts,
        "arguments": arguments,
        "roles": roles,
        "finishes": finishes,
        "usage": [e["usage"] for e in events if e.get("usage")],
    }


BODIES = [
    {
        "model": "r1",
        "messages": MESSAGES,
        "stream": True,
        "seed": 5,
        "stream_options": {"include_usage": True},
    },
    {"model": "r1", "messages": MESSAGES, "stream": True, "seed": 9, "tools": [WEATHER_TOOL]},
]


@pytest.mark.parametrize("entry", NODES)
@pytest.mark.parametrize("body", BODIES, ids=["content", "tool-call"])
@pytest.mark.parametrize("fault", ["fail_after=0", "fail_after=4", "fail_after=25"])
async def test_a_stream_broken_mid_way_resumes_exactly_on_another_node(
    trio_cluster: Cluster, http: httpx.AsyncClient, entry: str, body: dict, fault: str
) -> None:
    url = trio_cluster.url(entry) + "/v1/chat/completions"
    quiet = {"x-quorum-single-flight": "off"}
    _, reference, _ = await stream_events(http, url, body, headers=quiet)
    response, events, _ = await stream_events(
        http, url, body, headers={**quiet, "x-quorum-fault": fault}
    )
    for event in events:
        validate("CreateChatCompletionStreamResponse", event)
    got, want = fold(events), fold(reference)
    assert len(got["ids"]) == 1
    assert got["roles"] == 1 and got["finishes"] == 1
    assert got["texts"] == want["texts"] and got["arguments"] == want["arguments"]
    assert got["usage"] == want["usage"]
    breakers = trio_cluster[entry].dispatcher.breakers
    if fault == "fail_after=0":  # broke before the first token: replaced, not resumed
        assert response.headers["x-quorum-attempts"] == "2"
        failed = [n for n in NODES if breakers.get(n).consecutive_failures]
        assert len(failed) == 1 and failed[0] != response.headers["x-quorum-node"]
    else:  # broke after it: the node that served the first token is marked, then resumed
        assert response.headers["x-quorum-attempts"] == "1"
        assert breakers.get(response.headers["x-quorum-node"]).consecutive_failures == 1


async def test_a_stalled_stream_resumes_after_the_inter_token_timeout(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    routing = {"inter_token_timeout_s": 0.3}
    cluster = await start_cluster(nursery, [config(n, routing=routing) for n in NODES])
    url = cluster.url("n1") + "/v1/chat/completions"
    body = BODIES[0]
    _, reference, _ = await stream_events(http, url, body)
    started = trio.current_time()
    _, events, _ = await stream_events(http, url, body, headers={"x-quorum-fault": "stall_after=6"})
    assert fold(events)["texts"] == fold(reference)["texts"]
    assert trio.current_time() - started >= 0.3
    for node in cluster.nodes.values():  # the stalled generation was cancelled, slot freed
        assert node.backends["r1"].load().busy == 0


async def test_a_node_that_fails_before_the_first_token_is_replaced_invisibly(
    trio_cluster: Cluster, http: httpx.AsyncClient
) -> None:
    url = trio_cluster.url("n1") + "/v1/chat/completions"
    for fault in ("status=500", "status=503", "fail_after=0"):
        response, events, raw = await stream_events(
            http, url, BODIES[0], headers={"x-quorum-fault": fault}
        )
        assert response.headers["x-quorum-attempts"] == "2", fault
        assert b'"error"' not in raw
        assert fold(events)["roles"] == 1
    whole = await http.post(
        url, json={"model": "r1", "messages": MESSAGES}, headers={"x-quorum-fault": "status=500"}
    )
    assert whole.status_code == 200 and whole.headers["x-quorum-attempts"] == "2"


async def test_an_unresumable_stream_ends_with_an_error_event_and_the_sdk_raises(
    trio_cluster: Cluster, http: httpx.AsyncClient
) -> None:
    url = trio_cluster.url("n1") + "/v1/chat/completions"
    body = {"model": "solo", "messages": MESSAGES, "stream": True}
    _, events, raw = await stream_events(
        http, url, body, headers={"x-quorum-fault": "fail_after=3"}
    )
    assert "error" in events[-1]
    validate("ErrorResponse", events[-1])
    assert not any(c["finish_reason"] for e in events[:-1] for c in e["choices"])
    assert raw.endswith(b"data: [DONE]\n\n")

    def consume() -> str:
        client = openai.OpenAI(
            base_url=trio_cluster.url("n1") + "/v1",
            api_key="-",
            max_retries=0,
            default_headers={"x-quorum-fault": "fail_after=3"},
        )
        with client:
            text = ""
            for chunk in client.chat.completions.create(
                model="solo", messages=MESSAGES, stream=True
            ):
                text += "".join(c.delta.content or "" for c in chunk.choices)
            return text

    with pytest.raises(openai.APIError):
        await trio.to_thread.run_sync(consume)


async def test_before_any_byte_every_failure_is_a_502(
    trio_cluster: Cluster, http: httpx.AsyncClient
) -> None:
    response = await http.post(
        trio_cluster.url("n1") + "/v1/chat/completions",
        json={"model": "solo", "messages": MESSAGES, "stream": True},
        headers={"x-quorum-fault": "status=500"},
    )
    assert response.status_code == 502
    validate("ErrorResponse", response.json())


async def test_saturation_is_429_with_retry_after(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    cluster = await start_cluster(nursery, [config("n3", slots=1, queue=0)])
    url = cluster.url("n3") + "/v1/chat/completions"
    body = {"model": "solo", "messages": MESSAGES, "stream": True}
    async with httpx.AsyncClient(timeout=10) as other:
        async with other.stream(
            "POST", url, json=body, headers={"x-quorum-fault": "stall_after=2"}
        ) as held:
            assert held.status_code == 200
            refused = await http.post(url, json=body)
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            error = refused.json()
            validate("ErrorResponse", error)
            assert error["error"]["type"] == "rate_limit_exceeded"
            assert error["error"]["code"] == "rate_limit_exceeded"
    with trio.fail_after(2):  # the held stream's slot comes back: no leak
        while cluster["n3"].backends["solo"].load().busy:
            await trio.sleep(0.01)
    assert (await http.post(url, json={**body, "stream": False})).status_code == 200


async def test_identical_deterministic_requests_share_one_generation(
    trio_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = trio_cluster.url("n1") + "/v1/chat/completions"
    body = {"model": "solo", "messages": MESSAGES, "stream": True, "seed": 3}
    backend = trio_cluster["n3"].backends["solo"]
    generations = 0
    results: list[tuple[httpx.Response, bytes]] = []
    backend_open = backend.open

    def counting_open(generation: Any) -> Any:
        nonlocal generations
        generations += 1
        return backend_open(generation)

    monkeypatch.setattr(backend, "open", counting_open)

    async def one(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            results.append((response, b"".join([c async for c in response.aiter_raw()])))

    for headers, expected_generations in (({}, 1), ({"x-quorum-single-flight": "off"}, 5)):
        results.clear()
        generations = 0
        async with httpx.AsyncClient(timeout=10) as client, trio.open_nursery() as clients:
            for _ in range(5):
                clients.start_soon(one, client, headers)
        assert generations == expected_generations
        bodies = {raw for _, raw in results}
        assert len(results) == 5
        for _, raw in results:
            assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"[DONE]") == 1
        if expected_generations == 1:
            assert len(bodies) == 1  # every client got the whole, identical stream
            assert {r.headers["x-quorum-shared"] for r, _ in results} == {"5"}


async def test_disconnect_from_a_shared_generation_cancels_it_when_the_last_client_leaves(
    trio_cluster: Cluster,
) -> None:
    url = trio_cluster.url("n3") + "/v1/chat/completions"
    body = {"model": "solo", "messages": MESSAGES, "stream": True, "seed": 4, "max_tokens": 4000}
    backend = trio_cluster["n3"].backends["solo"]
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream(
            "POST", url, json=body, headers={"x-quorum-fault": "stall_after=2"}
        ) as response:
            async with aclosing(response.aiter_raw()) as chunks:
                async for _ in chunks:
                    break
            assert backend.load().busy == 1
    with trio.fail_after(2):
        while backend.load().busy:
            await trio.sleep(0.005)
    assert not trio_cluster["n3"].dispatcher.single_flight.flights


async def test_drain_finishes_streams_refuses_new_work_and_leaves(
    trio_cluster: Cluster, http: httpx.AsyncClient
) -> None:
    n2 = trio_cluster["n2"]
    url = n2.url + "/v1/chat/completions"
    body = {"model": "r1", "messages": MESSAGES, "stream": True, "max_tokens": 200}
    events: list[Any] = []

    async def stream_through_n2() -> None:
        _, got, _ = await stream_events(http, url, body, headers={"x-quorum-pin": "n2"})
        events.extend(got)

    async with trio.open_nursery() as group:
        group.start_soon(stream_through_n2)
        with trio.fail_after(5):
            while not n2.backends["r1"].load().busy:
                await trio.sleep(0.005)
        group.start_soon(n2.drain)
        with trio.fail_after(5):
            while not n2.draining:
                await trio.sleep(0.005)
        refused = await http.post(url, json={"model": "r1", "messages": MESSAGES})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert "draining" in refused.json()["error"]["message"]
        # the other nodes route around it and keep serving
        ok = await http.post(
            trio_cluster.url("n1") + "/v1/chat/completions",
            json={"model": "r1", "messages": MESSAGES},
        )
        assert ok.status_code == 200 and ok.headers["x-quorum-node"] != "n2"
    assert fold(events)["finishes"] == 1  # the stream under way finished normally
    assert "error" not in json.dumps(events)
    with trio.fail_after(10):
        while {m.name: m.state for m in trio_cluster["n1"].membership.members()}.get("n2") not in (
            "left",
            None,
        ):
            await trio.sleep(0.05)


async def test_a_backends_weight_reaches_every_node_through_gossip(
    nursery: trio.Nursery,
) -> None:
    cluster = await start_cluster(nursery, [config("n1", weight=3.0), config("n2")])
    with trio.fail_after(5):
        while True:
            view = {m.name: m for m in cluster["n2"].membership.members()}
            if view["n1"].weight("r1") == 3.0:
                break
            await trio.sleep(0.02)
    assert view["n2"].weight("r1") == 1.0
    assert cluster["n1"].health()["weights"] == {"r1": 3.0}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} " if want else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_requests_failovers_resumes_and_gossip(
    trio_cluster: Cluster, http: httpx.AsyncClient
) -> None:
    url = trio_cluster.url("n1") + "/v1/chat/completions"
    await stream_events(http, url, BODIES[0], headers={"x-quorum-fault": "fail_after=4"})
    await stream_events(http, url, BODIES[0], headers={"x-quorum-fault": "status=500"})
    await http.post(url, json={"model": "nope", "messages": MESSAGES})
    response = await http.get(trio_cluster.url("n1") + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    path = "/v1/chat/completions"
    assert metric(text, "quorum_requests_total", endpoint=path, model="r1", status="200") == 2
    # a model nobody serves is counted, but never becomes a label of its own
    assert metric(text, "quorum_requests_total", endpoint=path, model="other", status="404") == 1
    assert 'model="nope"' not in text
    assert metric(text, "quorum_resumes_total", outcome="resumed") == 1
    assert sum(metric(text, "quorum_attempt_failures_total", node=n) for n in NODES) == 1
    assert metric(text, "quorum_ttft_seconds_count", model="r1") == 2
    assert metric(text, "quorum_members", state="alive") == 3
    assert metric(text, "quorum_gossip_packets_total", outcome="accepted") > 0
    assert metric(text, "quorum_in_flight", role="serving") == 0
    assert metric(text, "quorum_in_flight", role="relaying") == 0
