"""Resuming on an HTTP upstream when the delivered text ends in whitespace: the whitespace is
held back from the prefill and dropped again from the continuation (``HeldBack`` in
``quorum.backends.upstream``), so that the server tokenizes the prefill as the model generated
it. The real-server measurement is in ``test_llamacpp_server.py``; here the upstream is an
``httpx.MockTransport`` that records what it was sent and answers a scripted stream."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from quorum.backends.base import Generation, Resume
from quorum.backends.upstream import UpstreamBackend
from quorum.wire import parse_chat_request, parse_completion_request

MESSAGES = [{"role": "user", "content": "Tell me about rivers."}]


class Scripted:
    """An upstream that records each request body and streams ``chunks`` (data objects)."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self.chunks = chunks
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        data = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in self.chunks]
        stream = _Stream([*data, b"data: [DONE]\n\n"])
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)


class _Stream(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)


def delta(**fields: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": fields, "finish_reason": None}]}


def finish(reason: str = "stop") -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}


def text(piece: str, reason: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "text": piece, "finish_reason": reason}]}


def chat(events: int, content: str, **fields: Any) -> Generation:
    request = parse_chat_request({"model": "llama", "messages": MESSAGES, **fields})
    return Generation(request, "rid00001", 1, True, resume=Resume(events, {"content": content}))


async def run(upstream: Scripted, generation: Generation) -> list[dict[str, Any]]:
    backend = UpstreamBackend(
        "llama", url="http://127.0.0.1:9/v1", transport=httpx.MockTransport(upstream)
    )
    out = []
    async with backend.open(generation) as events:
        async for event in events:
            data = event.decode().removeprefix("data: ").strip()
            if data != "[DONE]":
                out.append(json.loads(data))
    await backend.aclose()
    return out


def contents(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]


async def test_trailing_whitespace_is_held_back_and_dropped_from_the_continuation() -> None:
    role = delta(role="assistant", content=None)
    upstream = Scripted(
        [role, delta(content="\n"), delta(content="\n"), delta(content="Step"), finish()]
    )
    chunks = await run(upstream, chat(9, "Step 1: rivers.\n\n"))
    assert upstream.bodies[0]["messages"][-1] == {"role": "assistant", "content": "Step 1: rivers."}
    assert contents(chunks) == ["Step", None]


async def test_held_whitespace_arriving_with_the_next_word_is_cut_from_it() -> None:
    upstream = Scripted([delta(content="\n\nStep"), finish()])
    chunks = await run(upstream, chat(9, "rivers.\n\n"))
    assert contents(chunks) == ["Step", None]


async def test_a_continuation_that_goes_another_way_keeps_what_does_not_match() -> None:
    # The model regenerates one newline, then a word: the client already has both newlines.
    upstream = Scripted([delta(content="\nStep"), delta(content=" 2"), finish()])
    chunks = await run(upstream, chat(9, "rivers.\n\n"))
    assert contents(chunks) == ["Step", " 2", None]


async def test_a_continuation_without_the_whitespace_is_passed_on_whole() -> None:
    upstream = Scripted([delta(content="Step"), delta(content="\n"), finish()])
    chunks = await run(upstream, chat(9, "rivers.\n"))
    assert contents(chunks) == ["Step", "\n", None]


async def test_text_without_trailing_whitespace_is_sent_and_continued_unchanged() -> None:
    upstream = Scripted([delta(content="\n"), delta(content="Step"), finish()])
    chunks = await run(upstream, chat(9, "rivers."))
    assert upstream.bodies[0]["messages"][-1]["content"] == "rivers."
    assert contents(chunks) == ["\n", "Step", None]


@pytest.mark.parametrize(("whitespace", "back"), [(" ", 1), ("\n", 1), ("\n\n", 2), ("\n\n\n", 2)])
async def test_the_budget_gets_back_the_tokens_of_the_held_whitespace(
    whitespace: str, back: int
) -> None:
    upstream = Scripted([finish("length")])
    # 9 events: the role chunk and 8 tokens, of which the whitespace is the last one or two
    await run(upstream, chat(9, "rivers." + whitespace, max_tokens=20))
    assert upstream.bodies[0]["max_tokens"] == 20 - 8 + back


async def test_a_completion_resume_holds_back_whitespace_and_keeps_its_first_token() -> None:
    request = parse_completion_request({"model": "llama", "prompt": "Rivers", "max_tokens": 20})
    generation = Generation(request, "rid00001", 1, True, resume=Resume(4, {"text": " flow.\n"}))
    upstream = Scripted([text("\nThey"), text(" carve"), text("", "length")])
    chunks = await run(upstream, generation)
    assert upstream.bodies[0]["prompt"] == "Rivers flow."
    assert upstream.bodies[0]["max_tokens"] == 20 - 4 + 1
    # The first chunk of a completion is text, not a role chunk: it is not dropped.
    assert [c["choices"][0]["text"] for c in chunks] == ["They", " carve", ""]


async def test_a_fresh_request_holds_nothing_back() -> None:
    upstream = Scripted([delta(role="assistant", content=""), delta(content="\n\n"), finish()])
    generation = dataclasses.replace(chat(1, ""), resume=None)
    chunks = await run(upstream, generation)
    assert contents(chunks) == ["", "\n\n", None]
