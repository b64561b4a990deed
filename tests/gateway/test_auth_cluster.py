"""API keys and quotas on a real three-node cluster, with the stock OpenAI SDK: 401 without a
valid key, 403 for debug headers from a user key, 404 for a model outside the key's
allowlist, 429 with the quota headers once the cluster's count is spent, whichever nodes the
requests were spread over; admin routes for admins only."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import trio

from quorum.gateway.keys import ApiKey, ApiKeys, digest
from tests.helpers import MESSAGES, Cluster, node_config, start_cluster

NODES = ("node-a", "node-b", "node-c")
USER = "sk-quorum-user-key-for-tests-0000000000000000"
ADMIN = "sk-quorum-admin-key-for-tests-000000000000000"
TOKENS = "sk-quorum-token-key-for-tests-000000000000000"
SOLO = "sk-quorum-solo-key-for-tests-0000000000000000"
NOW = 6_000_000.0 + 5  # five seconds into a window: the quota clock stands still here

KEYS = ApiKeys(
    [
        ApiKey(
            name="team-a",
            sha256=digest(USER),
            role="user",
            models=["mock-chat"],
            requests_per_minute=6,
        ),
        ApiKey(name="ops", sha256=digest(ADMIN), role="admin"),
        ApiKey(name="tokens", sha256=digest(TOKENS), tokens_per_minute=30),
        ApiKey(name="solo", sha256=digest(SOLO), max_concurrent=1),
    ]
)


@pytest.fixture
async def cluster(nursery: trio.Nursery) -> AsyncIterator[Cluster]:
    configs = [node_config(name, auth=KEYS, debug_faults=False) for name in NODES]
    yield await start_cluster(nursery, configs, quota_clock=lambda: NOW)


def sdk(cluster: Cluster, node: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url(node) + "/v1", api_key=key, max_retries=0)


async def in_thread(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


def chat(client: openai.OpenAI, **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=extra.pop("model", "mock-chat"), messages=MESSAGES, max_tokens=4, **extra
    )


async def test_a_key_is_needed_on_every_api_route(cluster: Cluster) -> None:
    def run() -> None:
        for key in ("sk-quorum-wrong", USER[:-1], digest(USER)):
            with sdk(cluster, "node-a", key) as client:
                with pytest.raises(openai.AuthenticationError) as refused:
                    chat(client)
                assert refused.value.status_code == 401
                assert refused.value.body["code"] == "invalid_api_key"  # type: ignore[index]
                assert key not in refused.value.message
                with pytest.raises(openai.AuthenticationError):
                    client.models.list()

    await in_thread(run)
    async with httpx.AsyncClient(base_url=cluster.url("node-c")) as http:
        body = {"model": "mock-chat", "messages": MESSAGES}
        for path in ("/v1/chat/completions", "/v1/completions"):
            missing = await http.post(path, json=body)
            assert missing.status_code == 401
            assert missing.json()["error"]["code"] == "invalid_api_key"
            assert "Authorization: Bearer" in missing.json()["error"]["message"]
        assert (await http.get("/v1/models")).status_code == 401


async def test_a_user_key_gets_its_models_and_the_quota_headers(cluster: Cluster) -> None:
    def run() -> None:
        with sdk(cluster, "node-b", USER) as client:
            response = chat(client)
            assert response.parse().choices[0].message.content
            h = response.headers
            assert h["x-quota-allowed"] == "6" and h["x-quota-available"] == "5"
            assert h["x-quota-reset"] == "55"
            assert h["x-ratelimit-limit-requests"] == "6"
            assert h["x-ratelimit-remaining-requests"] == "5"
            assert h["x-ratelimit-reset-requests"] == "55s"
            assert float(h["x-quorum-latency"]) > 0
            assert h["server-timing"] == f"quorum;dur={h['x-quorum-latency']}"
            assert [m.id for m in client.models.list()] == ["mock-chat"]
            with pytest.raises(openai.NotFoundError) as hidden:
                chat(client, model="mock-coder")  # served, but not for this key
            with pytest.raises(openai.NotFoundError) as unknown:
                chat(client, model="no-such-model")
            assert hidden.value.body["code"] == "model_not_found"  # type: ignore[index]
            assert hidden.value.message.replace("mock-coder", "M") == unknown.value.message.replace(
                "no-such-model", "M"
            )

    await in_thread(run)


async def test_debug_headers_are_an_admins_only(cluster: Cluster) -> None:
    def run() -> None:
        with sdk(cluster, "node-a", USER) as client:
            for header in ({"x-quorum-fault": "status=500"}, {"x-quorum-pin": "node-b"}):
                with pytest.raises(openai.PermissionDeniedError) as refused:
                    chat(client, extra_headers=header)
                assert refused.value.body["code"] == "permission_denied"  # type: ignore[index]
        with sdk(cluster, "node-a", ADMIN) as client:
            pinned = chat(client, extra_headers={"x-quorum-pin": "node-c"})
            assert pinned.headers["x-quorum-node"] == "node-c"
            assert "x-quota-allowed" not in pinned.headers  # an admin key without quotas
            with pytest.raises(openai.InternalServerError):  # obeyed: the pinned node fails
                chat(
                    client,
                    extra_headers={"x-quorum-pin": "node-c", "x-quorum-fault": "status=500"},
                )

    await in_thread(run)


async def test_admin_routes_need_an_admin_key(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url("node-a")) as http:
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/status")).status_code == 200  # the static page
        for path in ("/metrics", "/cluster/members", "/cluster/events"):
            assert (await http.get(path)).status_code == 401
            user = await http.get(path, headers={"authorization": f"Bearer {USER}"})
            assert user.status_code == 403
            assert user.json()["error"]["code"] == "permission_denied"
        admin = {"authorization": f"Bearer {ADMIN}"}
        members = await http.get("/cluster/members", headers=admin)
        assert members.status_code == 200 and len(members.json()["members"]) == 3
        metrics = await http.get("/metrics", headers=admin)
        assert metrics.status_code == 200 and b"quorum_requests" in metrics.content
        drain = await http.post("/admin/drain", headers={"authorization": f"Bearer {USER}"})
        assert drain.status_code == 403


async def test_an_admin_key_drains_a_node_from_anywhere(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.url("node-c")) as http:
        drained = await http.post("/admin/drain", headers={"authorization": f"Bearer {ADMIN}"})
    assert drained.status_code == 202
    assert cluster["node-c"].draining


async def test_copied_internal_headers_are_refused(cluster: Cluster) -> None:
    body = {"model": "mock-chat", "messages": MESSAGES}
    forged = {
        "x-quorum-forwarded": "node-a",
        "x-quorum-caller": "ops",
        "x-quorum-signature": "v2 6000000 " + "0" * 64,
    }
    async with httpx.AsyncClient(base_url=cluster.url("node-b")) as http:
        answer = await http.post("/v1/chat/completions", json=body, headers=forged)
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_internal_headers"


async def test_a_quota_spread_over_three_nodes_holds_for_the_cluster(cluster: Cluster) -> None:
    """requests_per_minute = 6: two requests at each node succeed; once gossip has brought
    every node the others' counts, the 7th is refused at any node."""

    def two_each() -> list[str]:
        available = []
        for node in NODES:
            with sdk(cluster, node, USER) as client:
                for _ in range(2):
                    available.append(chat(client).headers["x-quota-available"])
        return available

    available = await in_thread(two_each)
    assert len(available) == 6
    with trio.fail_after(10):  # the counts spread by gossip (LOCAL preset: well under 1 s)
        while not all(n.gate.board.cluster("team-a")[0] == 6 for n in cluster.nodes.values()):  # type: ignore[union-attr]
            await trio.sleep(0.02)

    def seventh(node: str) -> openai.RateLimitError:
        with sdk(cluster, node, USER) as client:
            with pytest.raises(openai.RateLimitError) as refused:
                chat(client)
        return refused.value

    for node in NODES:
        refused = await in_thread(seventh, node)
        assert refused.status_code == 429
        assert refused.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
        assert refused.response.headers["x-quota-available"] == "0"
        assert refused.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.response.headers["retry-after"] == "55"
    # another key is not affected
    ok = await in_thread(lambda: chat(sdk(cluster, "node-a", ADMIN)).status_code)
    assert ok == 200


async def test_tokens_are_counted_from_usage_even_when_the_client_did_not_ask(
    cluster: Cluster,
) -> None:
    def stream() -> list[Any]:
        with sdk(cluster, "node-a", TOKENS) as client:
            return list(
                client.chat.completions.create(
                    model="mock-chat", messages=MESSAGES, stream=True, max_tokens=8
                )
            )

    chunks = await in_thread(stream)
    assert chunks and all(c.usage is None for c in chunks)  # the usage chunk was held back
    board = cluster["node-a"].gate.board  # type: ignore[union-attr]
    spent = board.cluster("tokens")[1]
    assert spent > 8  # the prompt and the completion
    while spent < 30:
        await in_thread(lambda: chat(sdk(cluster, "node-b", TOKENS)))
        with trio.fail_after(10):
            while cluster["node-a"].gate.board.cluster("tokens")[1] == spent:  # type: ignore[union-attr]
                await trio.sleep(0.02)
        spent = board.cluster("tokens")[1]

    def refused() -> openai.RateLimitError:
        with sdk(cluster, "node-a", TOKENS) as client, pytest.raises(openai.RateLimitError) as r:
            chat(client)
        return r.value

    error = await in_thread(refused)
    assert f"{spent} tokens this minute" in error.message
    assert error.response.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_max_concurrent_holds_until_the_open_request_ends(cluster: Cluster) -> None:
    body = {"model": "mock-chat", "messages": MESSAGES, "stream": True, "max_tokens": 40}
    auth = {"authorization": f"Bearer {SOLO}"}
    async with httpx.AsyncClient(base_url=cluster.url("node-a"), timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as first:
            assert first.status_code == 200
            assert first.headers["x-quota-available"] == "0"
            second = await http.post(
                "/v1/chat/completions", json={**body, "stream": False}, headers=auth
            )
            assert second.status_code == 429
            assert "1 requests open" in second.json()["error"]["message"]
            async for _ in first.aiter_bytes():
                pass
        third = await http.post(
            "/v1/chat/completions", json={**body, "stream": False}, headers=auth
        )
        assert third.status_code == 200, third.text
        assert json.loads(third.content)["usage"]["completion_tokens"] > 0
