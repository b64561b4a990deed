"""/c1 conversations on a real in-process cluster (quorum.c1): started on one node, continued
on the others (SQLite: forwarded to the node that keeps it; PostgreSQL: any node, even with the
creating node gone), the history in GET, usage growing each turn, nothing stored of an
unfinished turn, and each API key seeing only its own conversations."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from quorum.c1 import TurnRecorder
from quorum.config import ConversationSettings
from quorum.conversations import new_id, owner_of
from quorum.gateway.keys import ApiKey, ApiKeys, digest
from quorum.gateway.policy import Policies, Policy
from tests.helpers import Cluster, node_config, start_cluster, stream_events

NODES = ("node-a", "node-b", "node-c")
ALICE = "sk-quorum-alice-key-for-tests-0000000000000000"
BOB = "sk-quorum-bob-key-for-tests-00000000000000000"
KEYS = ApiKeys([ApiKey(name="alice", sha256=digest(ALICE)), ApiKey(name="bob", sha256=digest(BOB))])


def sqlite(tmp_path: Path, name: str) -> ConversationSettings:
    return ConversationSettings("sqlite", path=tmp_path / f"{name}.sqlite3")


@pytest.fixture
async def cluster(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Cluster]:
    configs = [node_config(n, conversations=sqlite(tmp_path, n)) for n in NODES]
    c = await start_cluster(nursery, configs)
    yield c
    for node in c.nodes.values():
        node.stop()


def turn(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "mock-chat", "messages": [{"role": "user", "content": text}], **extra}


async def chat(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], conversation: str | None = None
) -> tuple[httpx.Response, dict[str, Any]]:
    headers = {"x-conversation-id": conversation} if conversation else {}
    if body.get("stream"):
        response, events, _ = await stream_events(http, url + "/c1/chat", body, headers)
        usage = next((e["usage"] for e in events if e.get("usage")), None)
        text = "".join(
            c["delta"].get("content") or "" for e in events for c in e.get("choices", [])
        )
        return response, {"usage": usage, "text": text, "events": events}
    response = await http.post(url + "/c1/chat", json=body, headers=headers)
    return response, response.json()


async def test_a_conversation_started_on_one_node_continues_on_every_other(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    first, answer = await chat(http, cluster.url("node-a"), turn("Hello there.", max_tokens=5))
    assert first.status_code == 200, first.text
    conversation = first.headers["x-conversation-id"]
    assert conversation.startswith("conv_") and owner_of(conversation) == "node-a"
    assert len(conversation.split(".")[0]) == len("conv_") + 24
    prompts = [answer["usage"]["prompt_tokens"]]
    said = [answer["choices"][0]["message"]["content"]]
    for i, node in enumerate(("node-b", "node-c", "node-b")):
        body = turn(f"Turn {i}: go on.", max_tokens=5, stream=True)
        body["stream_options"] = {"include_usage": True}
        response, streamed = await chat(http, cluster.url(node), body, conversation)
        assert response.status_code == 200
        assert response.headers["x-conversation-id"] == conversation
        prompts.append(streamed["usage"]["prompt_tokens"])
        said.append(streamed["text"])
    assert prompts == sorted(prompts) and len(set(prompts)) == len(prompts), prompts
    for node in NODES:
        got = await http.get(cluster.url(node) + f"/c1/conversations/{conversation}")
        assert got.status_code == 200
        stored = got.json()
        assert stored["id"] == conversation and isinstance(stored["created"], int)
        messages = stored["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 4
        assert messages[0]["content"] == "Hello there."
        assert messages[2]["content"] == "Turn 0: go on."
        assert [m["content"] for m in messages[1::2]] == said
    # what node-a keeps is on node-a alone: node-b and node-c have no copy
    assert await cluster["node-b"].conversations.store.get(conversation, None) is None  # type: ignore[union-attr]


async def test_the_stored_history_is_what_the_backend_is_asked_for(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    first, _ = await chat(http, cluster.url("node-b"), turn("One.", max_tokens=3))
    conversation = first.headers["x-conversation-id"]
    second, answer = await chat(
        http, cluster.url("node-b"), turn("Two.", max_tokens=3, seed=7), conversation
    )
    assert second.status_code == 200, second.text
    stored = (await http.get(cluster.url("node-b") + f"/c1/conversations/{conversation}")).json()
    # the same request on /v1 with the whole history by hand gives the same answer
    whole = {"model": "mock-chat", "messages": stored["messages"][:3], "max_tokens": 3, "seed": 7}
    direct = (await http.post(cluster.url("node-c") + "/v1/chat/completions", json=whole)).json()
    assert direct["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]
    assert direct["usage"]["prompt_tokens"] == answer["usage"]["prompt_tokens"]


async def test_unknown_malformed_and_deleted_ids_are_404(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    a = cluster.url("node-a")
    for bad in (new_id("node-a"), new_id("node-c"), "conv_nope", "x" * 5000):
        response, body = await chat(http, a, turn("Hi."), bad)
        assert response.status_code == 404, (bad[:40], response.text)
        assert body["error"]["code"] == "conversation_not_found"
        assert bad not in response.text
        got = await http.get(a + f"/c1/conversations/{bad}")
        assert got.status_code == 404
    made, _ = await chat(http, a, turn("Hi.", max_tokens=2))
    conversation = made.headers["x-conversation-id"]
    deleted = await http.delete(cluster.url("node-c") + f"/c1/conversations/{conversation}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    for node in NODES:
        assert (
            await http.get(cluster.url(node) + f"/c1/conversations/{conversation}")
        ).status_code == 404
    again = await http.delete(a + f"/c1/conversations/{conversation}")
    assert again.status_code == 404


async def test_an_abandoned_or_broken_stream_stores_nothing_of_its_turn(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    a = cluster.url("node-a")
    made, _ = await chat(http, a, turn("Keep this.", max_tokens=2))
    conversation = made.headers["x-conversation-id"]
    headers = {"x-conversation-id": conversation}
    # the client leaves after the first chunk (node-b forwards to node-a, which serves it)
    body = turn("Leave early.", max_tokens=5000, stream=True)
    async with http.stream(
        "POST", cluster.url("node-b") + "/c1/chat", json=body, headers=headers
    ) as r:
        assert r.status_code == 200
        async for _ in r.aiter_raw():
            break
    # a stream that breaks where no node can continue it (pinned): an error event, no turn
    broken = turn("Break.", max_tokens=50, stream=True)
    _, events, raw = await stream_events(
        http,
        a + "/c1/chat",
        broken,
        {**headers, "x-quorum-fault": "fail_after=3", "x-quorum-pin": "node-a"},
    )
    assert events[-1].get("error"), raw[-300:]
    with trio.fail_after(5):
        while not all(n.dispatcher.busy == 0 for n in cluster.nodes.values()):
            await trio.sleep(0.01)
    stored = (await http.get(a + f"/c1/conversations/{conversation}")).json()
    assert [m["content"] for m in stored["messages"][::2]] == ["Keep this."]


async def test_a_turn_that_would_pass_the_store_bounds_is_refused_before_any_token(
    nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    settings = dataclasses.replace(sqlite(tmp_path, "node-a"), max_messages=4)
    c = await start_cluster(nursery, [node_config("node-a", conversations=settings)])
    a = c.url("node-a")
    made, _ = await chat(http, a, turn("One.", max_tokens=2))
    conversation = made.headers["x-conversation-id"]
    ok, _ = await chat(http, a, turn("Two.", max_tokens=2), conversation)
    assert ok.status_code == 200
    served = c["node-a"].dispatcher.metrics.requests.labels("/c1/chat", "-", "200")._value.get()
    refused, body = await chat(http, a, turn("Three.", max_tokens=2), conversation)
    assert refused.status_code == 400 and body["error"]["code"] == "conversation_too_long"
    huge = turn("x" * 2_000_000)
    too_big, body = await chat(http, a, huge, conversation)
    assert too_big.status_code == 413 and body["error"]["code"] == "message_too_large"
    assert c["node-a"].dispatcher.serving == 0
    assert served == 2
    c["node-a"].stop()


async def test_conversations_belong_to_the_key_that_made_them(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    configs = [node_config(n, auth=KEYS, conversations=sqlite(tmp_path, n)) for n in NODES[:2]]
    c = await start_cluster(nursery, configs)

    def sdk(node: str, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=c.url(node) + "/c1", api_key=key, max_retries=0)

    def run() -> None:
        with sdk("node-a", ALICE) as alice:
            # the stock SDK with base URL .../c1: chat.completions posts to /c1/chat/completions
            made = alice.chat.completions.with_raw_response.create(
                model="mock-chat", messages=[{"role": "user", "content": "Mine."}], max_tokens=2
            )
            conversation = made.headers["x-conversation-id"]
            going_on = alice.chat.completions.with_raw_response.create(
                model="mock-chat",
                messages=[{"role": "user", "content": "More."}],
                max_tokens=2,
                extra_headers={"x-conversation-id": conversation},
            )
            assert going_on.headers["x-conversation-id"] == conversation
            assert going_on.parse().usage.prompt_tokens > made.parse().usage.prompt_tokens  # type: ignore[union-attr]
        for node in NODES[:2]:
            with sdk(node, BOB) as bob:
                with pytest.raises(openai.NotFoundError) as refused:
                    bob.post(  # /c1/chat, the short name, by path
                        "/chat",
                        body=turn("Yours?"),
                        cast_to=httpx.Response,
                        options={"headers": {"x-conversation-id": conversation}},
                    )
                assert refused.value.body["code"] == "conversation_not_found"  # type: ignore[index]
                with pytest.raises(openai.NotFoundError):
                    bob.get(f"/conversations/{conversation}", cast_to=httpx.Response)
            with sdk(node, ALICE) as alice:
                got = alice.get(f"/conversations/{conversation}", cast_to=httpx.Response)
                roles = [m["role"] for m in got.json()["messages"]]
                assert roles == ["user", "assistant", "user", "assistant"]
        with httpx.Client() as anonymous:
            assert anonymous.post(c.url("node-b") + "/c1/chat", json=turn("?")).status_code == 401
            forged = anonymous.get(
                c.url("node-b") + f"/c1/conversations/{conversation}",
                headers={"x-quorum-forwarded": "node-a", "x-quorum-caller": "alice"},
            )
            assert forged.status_code == 401
            assert forged.json()["error"]["code"] == "invalid_internal_headers"

    await trio.to_thread.run_sync(run)
    for node in c.nodes.values():
        node.stop()


async def test_a_node_without_conversations_says_how_to_turn_them_on(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    c = await start_cluster(nursery, [node_config("node-a", conversations=None)])
    response, body = await chat(http, c.url("node-a"), turn("Hi."))
    assert response.status_code == 404
    assert body["error"]["code"] == "conversations_off"
    assert "[conversations]" in body["error"]["message"]
    c["node-a"].stop()


async def test_with_postgresql_any_node_continues_after_the_creating_node_is_gone(
    nursery: trio.Nursery, postgres_dsn: str, http: httpx.AsyncClient
) -> None:
    shared = ConversationSettings("postgres", dsn=postgres_dsn)
    configs = [node_config(n, conversations=shared) for n in NODES]
    c = await start_cluster(nursery, configs)
    made, _ = await chat(http, c.url("node-a"), turn("Start at a.", max_tokens=3))
    conversation = made.headers["x-conversation-id"]
    # node-a goes away abruptly: its tasks are cancelled, it says goodbye to nobody
    c["node-a"]._nursery.cancel_scope.cancel()  # type: ignore[union-attr]
    with trio.fail_after(10):
        while await _alive(http, c.url("node-a")):
            await trio.sleep(0.05)
    prompts = []
    for node in ("node-b", "node-c"):
        response, answer = await chat(
            http, c.url(node), turn(f"On {node}.", max_tokens=3), conversation
        )
        assert response.status_code == 200, response.text
        prompts.append(answer["usage"]["prompt_tokens"])
    assert prompts[0] < prompts[1]
    stored = (await http.get(c.url("node-c") + f"/c1/conversations/{conversation}")).json()
    assert [m["content"] for m in stored["messages"][::2]] == [
        "Start at a.",
        "On node-b.",
        "On node-c.",
    ]
    for name in ("node-b", "node-c"):
        c[name].stop()


async def _alive(http: httpx.AsyncClient, url: str) -> bool:
    try:
        await http.get(url + "/health", timeout=0.5)
    except httpx.HTTPError:
        return False
    return True


def test_the_recorder_puts_the_assistants_message_together_from_deltas() -> None:
    recorder = TurnRecorder()
    chunks: list[Any] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "Think"}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "ing."}}]},
        {
            "choices": [
                {"index": 0, "delta": {"content": "Hel"}},
                {"index": 1, "delta": {"content": "x"}},
            ]
        },
        {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": '{"ci'},
                            }
                        ]
                    },
                }
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": 1}'}}]},
                }
            ]
        },
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    for chunk in chunks[:-1]:
        recorder.add(chunk)
    assert not recorder.finished
    recorder.add(chunks[-1])
    assert recorder.finished
    assert recorder.message() == {
        "role": "assistant",
        "content": "Hello",
        "reasoning_content": "Thinking.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": 1}'},
            }
        ],
    }
    for garbage in ("[1]", {"error": {"message": "x"}}):
        broken = TurnRecorder()
        broken.add(chunks[-1])
        broken.add(json.loads(garbage) if isinstance(garbage, str) else garbage)
        assert not broken.finished


async def test_policies_apply_to_conversations_as_they_do_to_v1(
    nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    policies = Policies(
        Policy.model_validate(p)
        for p in (
            {"name": "no-e", "regex": "[eE]", "max_match_chars": 1, "on": "output"},
            {"name": "no-ip", "detect": "ipv4", "on": "input"},
            {"name": "mails", "detect": "email", "on": "input", "action": "redact"},
        )
    )
    c = await start_cluster(
        nursery, [node_config("node-a", conversations=sqlite(tmp_path, "a"), policies=policies)]
    )
    a = c.url("node-a")
    first, _ = await chat(http, a, turn("Write to bob@example.com, please.", max_tokens=3))
    assert first.status_code == 200, first.text
    conversation = first.headers["x-conversation-id"]
    blocked, error = await chat(http, a, turn("Ping 10.1.2.3 for me."), conversation)
    assert blocked.status_code == 400 and error["error"]["code"] == "content_policy_violation"
    # the mock's answers are English-like words: the first "e" ends the stream
    body = turn("Count to five.", max_tokens=12, stream=True)
    filtered, streamed = await chat(http, a, body, conversation)
    assert filtered.status_code == 200
    finishes = [ch["finish_reason"] for e in streamed["events"] for ch in e.get("choices", [])]
    assert "content_filter" in finishes and "e" not in streamed["text"].lower()
    stored = (await http.get(a + f"/c1/conversations/{conversation}")).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert "bob@example.com" not in stored[0]["content"]
    assert stored[0]["content"] == "Write to [REDACTED:email], please."
    assert stored[2]["content"] == "Count to five."  # the blocked turn left no trace
    assert stored[3]["content"] == streamed["text"]  # what the client saw, not the backend
    for node in c.nodes.values():
        node.stop()


async def test_a_key_over_max_conversations_is_told_to_delete_one(
    nursery: trio.Nursery, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    settings = dataclasses.replace(sqlite(tmp_path, "a"), max_conversations=1)
    c = await start_cluster(nursery, [node_config("node-a", conversations=settings)])
    a = c.url("node-a")
    # a request that fails leaves no conversation behind to count against the key
    for bad in ({"model": "no-such-model"}, {"x-quorum-fault": "status=500"}):
        body = turn("Zero.", max_tokens=2, **{k: v for k, v in bad.items() if k == "model"})
        failed = await http.post(
            a + "/c1/chat", json=body, headers={k: v for k, v in bad.items() if k != "model"}
        )
        assert failed.status_code >= 400 and "x-conversation-id" not in failed.headers
    first, _ = await chat(http, a, turn("One.", max_tokens=2))
    conversation = first.headers["x-conversation-id"]
    registry = c["node-a"].dispatcher.metrics.registry
    generated = registry.get_sample_value("quorum_ttft_seconds_count", {"model": "mock-chat"})
    for stream in (False, True):
        refused = await http.post(a + "/c1/chat", json=turn("Two.", max_tokens=2, stream=stream))
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "too_many_conversations" and "DELETE" in error["message"]
        assert "x-conversation-id" not in refused.headers
    # refused before any token was generated for it
    assert (
        registry.get_sample_value("quorum_ttft_seconds_count", {"model": "mock-chat"}) == generated
    )
    going_on, _ = await chat(http, a, turn("Still one.", max_tokens=2), conversation)
    assert going_on.status_code == 200  # the one it keeps goes on
    assert (await http.delete(a + f"/c1/conversations/{conversation}")).status_code == 200
    again, _ = await chat(http, a, turn("Two.", max_tokens=2))
    assert again.status_code == 200 and again.headers["x-conversation-id"] != conversation
    for node in c.nodes.values():
        node.stop()
