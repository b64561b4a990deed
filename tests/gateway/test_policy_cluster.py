"""Governance rules on a real two-node cluster: node-a has ``[[policies]]``, node-b has none.
The entry node applies them (a forwarded request is never screened again): an output block
ends the stream with one content_filter finish and one [DONE], the match never reaching the
client even when it spans two deltas, and the serving node's generation is cancelled; output
redaction; input block (both endpoints) and redaction; whole answers; the counter."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import trio

from quorum.gateway.policy import Policies, Policy
from tests.helpers import Cluster, node_config, start_cluster, stream_events

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# What the mock (deterministic) answers, 12 tokens:
COUNT = [{"role": "user", "content": "Count to five."}]
# -> "Place also new case place into number, record next most checks"
STORY = [{"role": "user", "content": "Tell me a story."}]
# -> "Garden on problem place exactly uses, then other uses. Node"
# completions, "Count to five." -> " Some request better detail means sends runs. Level ..."

POLICIES = Policies(
    Policy.model_validate(p)
    for p in (
        {"name": "no-case-place", "regex": "case place", "max_match_chars": 10, "on": "output"},
        {"name": "no-detail", "regex": "better detail", "max_match_chars": 13, "on": "output"},
        {
            "name": "mask-verb",
            "regex": "uses",
            "max_match_chars": 4,
            "on": "output",
            "action": "redact",
        },
        {"name": "no-ip", "detect": "ipv4", "on": "input"},
        {"name": "mails", "detect": "email", "on": "input", "action": "redact"},
    )
)


@pytest.fixture
async def cluster(nursery: trio.Nursery) -> AsyncIterator[Cluster]:
    received = bytearray()
    c = await start_cluster(
        nursery,
        [node_config("node-a", policies=POLICIES), node_config("node-b")],
        tap=received.extend,
    )
    c.received = received  # type: ignore[attr-defined]
    yield c
    for node in c.nodes.values():
        node.stop()


def chat(messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {"model": "mock-chat", "messages": messages, "max_tokens": 12, **extra}


def content(events: list[dict[str, Any]]) -> list[str]:
    """The content deltas, one string per chunk that had content."""
    return [
        c["delta"]["content"] for e in events for c in e["choices"] if c["delta"].get("content")
    ]


def finish_reasons(events: list[dict[str, Any]]) -> list[str]:
    return [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]


async def test_an_output_block_split_over_two_deltas_never_reaches_the_client(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    body = chat(COUNT, stream=True, stream_options={"include_usage": True})
    _, plain, _ = await stream_events(http, cluster.url("node-b") + CHAT, body)
    deltas = content(plain)
    assert "case place" in "".join(deltas)
    assert not any("case place" in d for d in deltas)  # the match spans two deltas
    for pin in ("node-a", "node-b"):  # served locally, then forwarded: node-a filters
        response, events, raw = await stream_events(
            http, cluster.url("node-a") + CHAT, body, headers={"x-quorum-pin": pin}
        )
        assert response.headers["x-quorum-node"] == pin
        assert "".join(content(events)) == "Place also new "
        assert b"case" not in raw and b" place" not in raw
        assert finish_reasons(events) == ["content_filter"]
        assert events[-2]["choices"][0]["delta"] == {}
        usage = events[-1]["usage"]  # estimated: the serving node's never came
        assert (
            events[-1]["choices"] == []
            and usage["prompt_tokens"] == plain[-1]["usage"]["prompt_tokens"]
        )
        assert 0 < usage["completion_tokens"] < 12
        assert len({e["id"] for e in events}) == 1


async def test_a_blocked_stream_cancels_the_generation_on_the_serving_node(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    # stall_after: the mock stops after 8 tokens and keeps its slot until cancelled; the
    # match is complete at token 5, so only a cancellation frees node-b's slot.
    # The client's answer ends at once: the source is closed, not drained (a drain would
    # wait its 1 s for the stalled rest before the response could end).
    body = chat(COUNT, stream=True)
    with trio.fail_after(0.9):
        _, events, _ = await stream_events(
            http,
            cluster.url("node-a") + CHAT,
            body,
            headers={"x-quorum-pin": "node-b", "x-quorum-fault": "stall_after=8"},
        )
    assert finish_reasons(events) == ["content_filter"]
    with trio.fail_after(0.5):
        while cluster["node-b"].dispatcher.serving or cluster["node-a"].dispatcher.relaying:
            await trio.sleep(0.01)
    resumes = cluster["node-a"].dispatcher.metrics.resumes
    assert [resumes.labels(o)._value.get() for o in ("resumed", "failed")] == [0, 0]


async def test_output_redaction_replaces_the_match_in_the_stream(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    _, events, raw = await stream_events(
        http, cluster.url("node-a") + CHAT, chat(STORY, stream=True)
    )
    assert "".join(content(events)) == (
        "Garden on problem place exactly [REDACTED:mask-verb], then other "
        "[REDACTED:mask-verb]. Node"
    )
    assert b"uses" not in raw
    assert finish_reasons(events) == ["length"]


async def test_completions_streams_are_filtered_too(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    body = {"model": "mock-chat", "prompt": "Count to five.", "max_tokens": 12, "stream": True}
    _, events, raw = await stream_events(http, cluster.url("node-a") + COMPLETIONS, body)
    assert "".join(c["text"] for e in events for c in e["choices"]) == " Some request "
    assert b"better" not in raw
    assert finish_reasons(events) == ["content_filter"]


async def test_non_streamed_answers_are_blocked_and_redacted(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    for pin in ("node-a", "node-b"):
        headers = {"x-quorum-pin": pin}
        blocked = await http.post(cluster.url("node-a") + CHAT, json=chat(COUNT), headers=headers)
        choice = blocked.json()["choices"][0]
        assert choice["message"]["content"] == "Place also new "
        assert choice["finish_reason"] == "content_filter"
        redacted = await http.post(cluster.url("node-a") + CHAT, json=chat(STORY), headers=headers)
        assert "uses" not in redacted.text
        assert (
            redacted.json()["choices"][0]["message"]["content"].count("[REDACTED:mask-verb]") == 2
        )
        text = await http.post(
            cluster.url("node-a") + COMPLETIONS,
            json={"model": "mock-chat", "prompt": "Count to five.", "max_tokens": 12},
            headers=headers,
        )
        assert text.json()["choices"][0]["text"] == " Some request "
        assert text.json()["choices"][0]["finish_reason"] == "content_filter"


async def test_an_input_block_is_a_400_on_both_endpoints(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    for path, body in (
        (CHAT, chat([{"role": "user", "content": "ping 10.1.2.3 please"}])),
        (COMPLETIONS, {"model": "mock-chat", "prompt": "ping 10.1.2.3", "stream": True}),
    ):
        refused = await http.post(cluster.url("node-a") + path, json=body)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "content_policy_violation" and "no-ip" in error["message"]
        assert "10.1.2.3" not in refused.text
        # a request node-b forwards to node-a is node-b's client's: never screened at a
        assert (
            await http.post(
                cluster.url("node-b") + path, json=body, headers={"x-quorum-pin": "node-a"}
            )
        ).status_code == 200


async def test_input_redaction_reaches_the_backend_redacted(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    # The mock's answer is a function of the messages: node-a's answer to the address is
    # node-b's (no policies) answer to the redacted text, and not its answer to the address.
    mail = [{"role": "user", "content": "mail me at bob@example.com"}]
    masked = [{"role": "user", "content": "mail me at [REDACTED:email]"}]

    async def answer(node: str, messages: list[dict[str, str]], pin: str) -> str:
        response = await http.post(
            cluster.url(node) + CHAT, json=chat(messages), headers={"x-quorum-pin": pin}
        )
        assert response.status_code == 200
        return str(response.json()["choices"][0]["message"]["content"])

    for pin in ("node-a", "node-b"):
        assert await answer("node-a", mail, pin) == await answer("node-b", masked, pin)
    assert await answer("node-b", mail, "node-b") != await answer("node-b", masked, "node-b")


async def test_without_policies_the_stream_is_the_serving_nodes_bytes(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    assert cluster["node-b"].dispatcher.enforcer is None
    received: bytearray = cluster.received  # type: ignore[attr-defined]
    received.clear()
    body = chat(COUNT, stream=True, stream_options={"include_usage": True})
    response, _, raw = await stream_events(
        http, cluster.url("node-b") + CHAT, body, headers={"x-quorum-pin": "node-a"}
    )
    assert response.headers["x-quorum-node"] == "node-a"
    assert raw == bytes(received) and b"case place" not in raw and b" place" in raw


async def test_policy_actions_are_counted_by_name(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    url = cluster.url("node-a")
    await stream_events(http, url + CHAT, chat(COUNT, stream=True))
    await http.post(url + CHAT, json=chat(STORY))
    await http.post(url + CHAT, json=chat([{"role": "user", "content": "1.2.3.4"}]))
    await http.post(url + CHAT, json=chat([{"role": "user", "content": "a@b.com, c@d.org"}]))
    metrics = (await http.get(url + "/metrics")).text
    counts = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^quorum_policy_actions_total\{(.*)\} (\S+)$", metrics, re.M)
    }
    assert counts == {
        'action="block",on="output",policy="no-case-place"': 1.0,
        'action="redact",on="output",policy="mask-verb"': 2.0,
        'action="block",on="input",policy="no-ip"': 1.0,
        'action="redact",on="input",policy="mails"': 2.0,
    }
    assert (
        "quorum_policy_actions_total{"
        not in (await http.get(cluster.url("node-b") + "/metrics")).text
    )


async def test_the_openai_sdk_sees_content_filter(cluster: Cluster) -> None:
    def run() -> tuple[str, list[str]]:
        client = openai.OpenAI(base_url=cluster.url("node-a") + "/v1", api_key="x", max_retries=0)
        with client:
            text, reasons = "", []
            for chunk in client.chat.completions.create(
                model="mock-chat",
                messages=COUNT,
                max_tokens=12,
                stream=True,  # type: ignore[arg-type]
            ):
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    if choice.finish_reason:
                        reasons.append(choice.finish_reason)
            return text, reasons

    assert await trio.to_thread.run_sync(run) == ("Place also new ", ["content_filter"])


async def test_identical_deterministic_requests_share_the_filtered_stream(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    body = chat(COUNT, stream=True, temperature=0)
    results: list[tuple[str, str]] = []

    async def one() -> None:
        response, events, _ = await stream_events(http, cluster.url("node-a") + CHAT, body)
        results.append((response.headers.get("x-quorum-shared", ""), "".join(content(events))))

    async with trio.open_nursery() as n:
        n.start_soon(one)
        n.start_soon(one)
    assert [text for _, text in results] == ["Place also new "] * 2
    assert max(shared for shared, _ in results) == "2"  # one generation, both clients


async def test_a_match_across_a_resume_is_still_blocked(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    # The first node breaks after "... new case" (held back: it may begin the match); the
    # resume, sent what the serving node produced (not what the client got), continues
    # with " place" on the other node, and the guard just goes on.
    _, events, raw = await stream_events(
        http,
        cluster.url("node-a") + CHAT,
        chat(COUNT, stream=True),
        headers={"x-quorum-fault": "fail_after=4"},
    )
    assert cluster["node-a"].dispatcher.metrics.resumes.labels("resumed")._value.get() == 1
    assert "".join(content(events)) == "Place also new "
    assert b"case" not in raw
    assert finish_reasons(events) == ["content_filter"]
