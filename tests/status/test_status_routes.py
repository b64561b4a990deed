"""The status routes on real sockets (in-process nodes, hypercorn on 127.0.0.1 port 0): the
page, the live feed, its access hook, and what a client that leaves or floods costs."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import pytest
import trio
from quart_trio import QuartTrio

from quorum.errors import Unauthorized
from quorum.metrics import Metrics
from quorum.routing.membership import Member
from quorum.sse import SSEParser
from quorum.status import StatusFeed, add_status_routes
from tests.conftest import Cluster

CHAT = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def feed_of(cluster: Cluster, name: str) -> StatusFeed:
    feed = cluster[name].app.app.extensions["quorum.status"]
    assert isinstance(feed, StatusFeed)
    return feed


async def follow(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    parser = SSEParser()
    async for chunk in response.aiter_bytes():
        for event in parser.feed(chunk):
            yield event.event or "", json.loads(event.data)


async def test_page_is_served_at_root_and_status_and_fetches_nothing_elsewhere(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    for path in ("/", "/status"):
        response = await http.get(cluster.url("node-a") + path)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert "script-src 'sha256-" in csp
    page = response.text
    assert "cluster/events" in page
    # no script, style, image or font from anywhere: the cluster may have no internet
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert not re.search(r"@import|url\(", page)
    assert re.findall(r"https?://[^\s\"'`]+", page) == ["http://www.w3.org/2000/svg"]


async def test_feed_shows_members_requests_and_a_member_that_leaves_live(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    url = cluster.url("node-a")
    async with http.stream("GET", url + "/cluster/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        events = follow(response)
        kind, snap = await events.__anext__()
        assert kind == "snapshot" and snap["self"] == "node-a"
        assert {m["name"]: m["state"] for m in snap["members"]} == {
            "node-a": "alive",
            "node-b": "alive",
            "node-c": "alive",
        }
        for _ in range(3):
            answer = await http.post(url + "/v1/chat/completions", json=CHAT)
            assert answer.status_code == 200
        cluster["node-c"].stop()  # a graceful stop: node-c says it left
        seen: dict[str, Any] = {}
        with trio.fail_after(10):
            async for kind, data in events:
                if kind == "summary" and "mock-chat" in data["models"]:
                    seen["summary"] = data["models"]["mock-chat"]
                if kind == "log" and data.get("name") == "node-c":
                    seen["log"] = data
                if kind == "members" and any(
                    m["name"] == "node-c" and m["state"] == "left" for m in data["members"]
                ):
                    seen["members"] = True
                if len(seen) == 3:
                    break
        await events.aclose()
    assert seen["summary"]["requests"] == 3
    assert seen["summary"]["ttft_p50_ms"] is not None
    assert (seen["log"]["was_state"], seen["log"]["state"]) == ("alive", "left")


async def test_a_client_that_leaves_frees_its_subscription(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    feed = feed_of(cluster, "node-a")
    async with http.stream("GET", cluster.url("node-a") + "/cluster/events") as response:
        await response.aiter_bytes().__anext__()
        assert len(feed.subscribers) == 1
    with trio.fail_after(5):
        while feed.subscribers:
            await trio.sleep(0.01)


async def test_feed_over_its_subscriber_cap_answers_503(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    feed = feed_of(cluster, "node-b")
    feed.max_subscribers = 1
    url = cluster.url("node-b") + "/cluster/events"
    # bounded: a regression that admits the second stream would otherwise read it forever
    with trio.fail_after(10):
        async with http.stream("GET", url) as first:
            # the iterator is kept: a dropped one is finalized, which closes the first stream
            chunks = first.aiter_bytes()
            await chunks.__anext__()
            assert len(feed.subscribers) == 1
            refused = await http.get(url)
            assert len(feed.subscribers) == 1
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert refused.json()["error"]["code"] == "too_many_status_streams"


def status_app(authorize: Any) -> QuartTrio:
    app = QuartTrio("t")
    members = [Member("a", "http://a:1", "alive", "ready", ("m",))]
    add_status_routes(app, StatusFeed("a", lambda: members, Metrics()), authorize=authorize)

    @app.errorhandler(Unauthorized)
    async def refused(exc: Unauthorized) -> Any:
        return exc.body(), exc.status

    return app


async def test_the_access_hook_guards_the_feed_and_not_the_static_page() -> None:
    asked: list[Mapping[str, str]] = []

    def admins_only(headers: Mapping[str, str]) -> None:
        asked.append(headers)
        if headers.get("authorization") != "Bearer admin-key":
            raise Unauthorized("The status feed needs an admin key.", code="invalid_api_key")

    transport = httpx.ASGITransport(app=status_app(admins_only))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        refused = await client.get("/cluster/events", headers={"Authorization": "Bearer nope"})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert asked[-1]["authorization"] == "Bearer nope"  # lower-cased names
        page = await client.get("/")
        assert page.status_code == 200 and "sessionStorage" in page.text


@pytest.mark.parametrize("path", ["/", "/status", "/cluster/events"])
async def test_status_routes_refuse_other_methods_in_the_openai_envelope(
    cluster: Cluster, http: httpx.AsyncClient, path: str
) -> None:
    response = await http.post(cluster.url("node-a") + path, content=b"{}")
    assert response.status_code == 405
    assert "error" in response.json()


async def test_an_open_feed_does_not_hold_up_a_stopping_node(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    node = cluster["node-c"]
    feed = feed_of(cluster, "node-c")
    async with http.stream("GET", node.url + "/cluster/events") as response:
        chunks = response.aiter_bytes()
        await chunks.__anext__()
        node.stop()
        # hypercorn's graceful shutdown would wait 5 s for a stream that never ends
        with trio.fail_after(3):
            async for _ in chunks:
                pass
    assert feed.closed and not feed.subscribers
    assert not feed_of(cluster, "node-a").closed  # only the stopping node's feed


async def test_feed_of_a_stopping_node_answers_503(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    feed_of(cluster, "node-b").close()
    refused = await http.get(cluster.url("node-b") + "/cluster/events")
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "node_stopping"
