"""Resuming a broken stream on an HTTP upstream: the request an upstream is sent to continue
it, or the refusal when it cannot continue exactly.

No sockets: the upstream is an ``httpx.MockTransport`` that records what it was sent."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from quorum.backends.base import Generation, Resume
from quorum.backends.upstream import UpstreamBackend
from quorum.errors import BackendUnavailable
from quorum.wire import CompletionRequest, parse_chat_request, parse_completion_request

MESSAGES = [{"role": "user", "content": "Count to ten."}]


def chat(**fields: Any) -> Generation:
    request = parse_chat_request({"model": "llama", "messages": MESSAGES, **fields})
    return Generation(request, "rid00001", 1, True)


def completion(**fields: Any) -> Generation:
    request = parse_completion_request({"model": "llama", **fields})
    return Generation(request, "rid00001", 1, True)


def resumed(generation: Generation, events: int, tool_calls: int = 0, **text: str) -> Generation:
    return dataclasses.replace(generation, resume=Resume(events, text, tool_calls=tool_calls))


class Recorder:
    """An upstream that records each request and answers a two-event stream."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content))
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Stream())


class _Stream(httpx.AsyncByteStream):
    """A body that streams (``content=`` bytes would arrive already read); an iterator, not
    an async generator, so that leaving it early leaves nothing to finalize."""

    def __init__(self) -> None:
        self.chunks = [
            b'data: {"choices":[{"index":0,"delta":{"content":" three"}}]}\n\n',
            b"data: [DONE]\n\n",
        ]

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)


def backend(recorder: Recorder | None = None) -> UpstreamBackend:
    transport = httpx.MockTransport(recorder or Recorder())
    return UpstreamBackend("llama", url="http://127.0.0.1:9/v1", transport=transport)


# --- what an upstream cannot continue exactly ----------------------------------------------


async def test_a_resume_after_tool_call_deltas_is_refused_before_anything_is_sent() -> None:
    recorder = Recorder()
    upstream = backend(recorder)
    generation = resumed(chat(tools=[_TOOL]), 4, tool_calls=2, content="")
    with pytest.raises(BackendUnavailable, match="cannot continue a partial tool call") as info:
        async with upstream.open(generation):
            pass
    assert info.value.status == 502
    assert recorder.bodies == []
    assert upstream.load().busy == 0
    await upstream.aclose()


async def test_a_fresh_request_and_a_resume_without_tool_calls_are_sent() -> None:
    recorder = Recorder()
    upstream = backend(recorder)
    for generation in (chat(), resumed(chat(), 3, content="One, two,")):
        async with upstream.open(generation) as events:
            assert [e async for e in events][-1] == b"data: [DONE]\n\n"
    assert len(recorder.bodies) == 2
    await upstream.aclose()


_TOOL = {
    "type": "function",
    "function": {"name": "count", "parameters": {"type": "object", "properties": {}}},
}


# --- continuing chat -----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_partial_reasoning_is_passed_under_the_field_name_it_streamed_as(field: str) -> None:
    body = backend()._body(resumed(chat(), 5, **{field: "Ten numbers, so"}))
    assert body["messages"][-1] == {"role": "assistant", "content": "", field: "Ten numbers, so"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
def test_the_token_budget_the_client_set_is_reduced_by_what_was_delivered(key: str) -> None:
    # 6 events delivered: the role chunk and 5 tokens
    body = backend()._body(resumed(chat(**{key: 20}), 6, content="One, two, three, four, five"))
    assert body[key] == 15


def test_a_budget_the_client_did_not_set_stays_unset() -> None:
    body = backend()._body(resumed(chat(), 6, content="One, two, three, four, five"))
    assert "max_tokens" not in body and "max_completion_tokens" not in body


def test_a_resume_whose_budget_is_used_up_is_refused() -> None:
    with pytest.raises(BackendUnavailable, match="'max_tokens' is 5") as info:
        backend()._body(resumed(chat(max_tokens=5), 6, content="One, two, three, four, five"))
    assert info.value.status == 502


def test_a_client_continuing_its_own_assistant_message_gets_it_extended() -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "One,"}]
    request = parse_chat_request(
        {"model": "llama", "messages": messages, "continue_final_message": True}
    )
    generation = Generation(request, "rid00001", 1, True, resume=Resume(3, {"content": " two,"}))
    body = backend()._body(generation)
    assert body["messages"] == [*MESSAGES, {"role": "assistant", "content": "One, two,"}]


async def test_a_resume_whose_text_json_cannot_carry_is_refused_not_a_400() -> None:
    recorder = Recorder()
    upstream = backend(recorder)
    generation = resumed(chat(), 3, content="One, \ud800")
    with pytest.raises(BackendUnavailable, match="lone UTF-16 surrogate"):
        async with upstream.open(generation):
            pass
    assert recorder.bodies == []
    await upstream.aclose()


# --- continuing a (legacy) completion ------------------------------------------------------


def test_a_completion_resume_strips_echo_and_appends_to_the_prompt() -> None:
    body = backend()._body(resumed(completion(prompt="Once upon", echo=False), 2, text=" a time"))
    assert body["prompt"] == "Once upon a time"
    assert "echo" not in body


def test_a_completion_prompt_of_one_string_in_a_list_stays_a_list() -> None:
    body = backend()._body(resumed(completion(prompt=["Once upon"], max_tokens=16), 2, text=" a"))
    assert body["prompt"] == ["Once upon a"]
    assert body["max_tokens"] == 14  # a completion stream has no role chunk


@pytest.mark.parametrize("prompt", [[101, 2023, 318], [[101, 2023]], ["Once", "Twice"]])
def test_a_completion_prompt_that_is_not_text_is_refused_never_stringified(prompt: Any) -> None:
    raw = {"model": "llama", "prompt": prompt}
    request = CompletionRequest(model="llama", prompt="", raw=raw)
    generation = Generation(request, "rid00001", 1, True, resume=Resume(2, {"text": " a"}))
    with pytest.raises(BackendUnavailable, match="prompt is not text"):
        backend()._body(generation)
