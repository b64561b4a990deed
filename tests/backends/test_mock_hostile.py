"""The mock backend against hostile requests: refused in ``open()`` before a slot is taken,
never a crash, a hang or an encoding error; resume bounded by the plan.

Requests are built as ``ChatRequest`` objects directly, so these tests hold whatever the wire
parser refuses ahead of the mock (lone surrogates, for one, are meant to stop there too).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jsonschema
import pytest
import trio

from quorum.backends.base import Fault, Generation, Resume
from quorum.backends.mock import MockBackend, MockEvent
from quorum.errors import BackendBroken, InvalidRequest
from quorum.sse import DONE, SSEParser
from quorum.wire import (
    ChatRequest,
    CompletionRequest,
    Request,
    ResponseFormat,
    Tool,
    aggregate_chat,
)

MODEL = "mock-model"
QUESTION = ({"role": "user", "content": "Tell me about rivers, please."},)
SELF_REQUIRED = {"type": "object", "properties": {"b": {"$ref": "#"}}, "required": ["b"]}
THREE_SELF_REQUIRED = {
    "type": "object",
    "properties": {"a": {"$ref": "#"}, "b": {"$ref": "#"}, "c": {"$ref": "#"}},
    "required": ["a", "b", "c"],
}
Json = dict[str, Any]


def instant(**kwargs: Any) -> MockBackend:
    return MockBackend(MODEL, **{"ttft_ms": 0.0, "itl_ms": 0.0, **kwargs})


def chat(**fields: Any) -> ChatRequest:
    return ChatRequest(model=MODEL, messages=fields.pop("messages", QUESTION), **fields)


def schema_format(schema: Json) -> ResponseFormat:
    return ResponseFormat(type="json_schema", schema=schema, name="answer")


def generation(request: Request, *, resume: int | None = None, usage: bool = True) -> Generation:
    return Generation(
        request, "r1", 1_700_000_000, usage, None, None if resume is None else Resume(resume)
    )


async def stream(backend: MockBackend, gen: Generation) -> list[bytes]:
    """The stream's events, one per item (batches split)."""
    async with backend.open(gen) as events:
        out = []
        async for item in events:
            out.extend(e.raw for e in SSEParser().feed(item))
        return out


def content_of(events: list[bytes]) -> str:
    chunks = [json.loads(e[6:]) for e in events if e != DONE]
    return str(aggregate_chat(chunks)["choices"][0]["message"]["content"])


async def refused(backend: MockBackend, gen: Generation) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        await stream(backend, gen)
    load = backend.load()
    assert (load.busy, load.queued) == (0, 0), "refused before taking a slot"
    return caught.value


# --- schemas: refused in open() with the field named ---------------------------------------


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (SELF_REQUIRED, "no finite value"),
        (THREE_SELF_REQUIRED, "no finite value"),
        ({"type": "array", "minItems": 300_000}, "minItems"),
        ({"allOf": [{"$ref": "#"}]}, "itself"),
        ({"type": "object", "properties": {"x": {"$ref": "#/$defs/gone"}}}, "points to nothing"),
    ],
)
async def test_response_format_without_a_value_is_a_400_naming_response_format(
    schema: Json, message: str
) -> None:
    backend = instant()
    error = await refused(backend, generation(chat(response_format=schema_format(schema))))
    assert error.status == 400 and error.type == "invalid_request_error"
    assert error.param == "response_format"
    assert message in error.message


async def test_a_tools_parameters_without_a_value_is_a_400_naming_that_tool() -> None:
    tools = (
        Tool("fine", {"type": "object", "properties": {"a": {"type": "integer"}}}),
        Tool("loop", {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
    )
    backend = instant()
    error = await refused(backend, generation(chat(tools=tools, tool_choice="loop")))
    assert error.param == "tools[1].function.parameters"
    assert "itself" in error.message
    # The other tool still works.
    events = await stream(backend, generation(chat(tools=tools, tool_choice="fine")))
    assert events[-1] == DONE


async def test_planning_failure_of_any_kind_is_a_400_before_a_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = instant()

    def broken(request: Request) -> Any:
        raise KeyError("surprise")

    monkeypatch.setattr(backend, "plan", broken)
    error = await refused(backend, generation(chat()))
    assert "KeyError" in error.message


async def test_recursive_response_format_with_a_way_out_streams_valid_json() -> None:
    schema = {
        "type": "object",
        "properties": {
            "value": {"type": "integer"},
            "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
        },
        "required": ["value", "next"],
        "additionalProperties": False,
    }
    backend = instant()
    for seed in range(10):
        request = chat(response_format=schema_format(schema), seed=seed)
        jsonschema.validate(
            json.loads(content_of(await stream(backend, generation(request)))), schema
        )


# --- resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("events", [10**12, 10**6])
async def test_resume_point_past_the_end_is_refused_not_looped_on(events: int) -> None:
    backend = instant()
    error = await refused(backend, generation(chat(), resume=events))
    assert error.param == "quorum_resume.events"
    assert "before [DONE]" in error.message


async def test_resume_at_the_last_event_before_done_sends_only_done() -> None:
    backend = instant()
    request = chat(seed=3)
    full = await stream(backend, generation(request))
    assert await stream(backend, generation(request, resume=len(full) - 1)) == [DONE]
    await refused(backend, generation(request, resume=len(full)))


@pytest.mark.parametrize(
    "request_",
    [
        chat(seed=1),
        chat(
            seed=2, tools=(Tool("t", {"type": "object", "properties": {"a": {"type": "string"}}}),)
        ),
        chat(seed=3, max_tokens=7),
        CompletionRequest(model=MODEL, prompt="Once upon a time", max_tokens=12),
    ],
)
@pytest.mark.parametrize("usage", [True, False])
async def test_resume_at_every_point_continues_the_same_stream(
    request_: Request, usage: bool
) -> None:
    backend = instant(reasoning_field="reasoning_content", reasoning_tokens=(3, 3))
    full = await stream(backend, generation(request_, usage=usage))
    for k in range(len(full)):
        rest = await stream(backend, generation(request_, resume=k, usage=usage))
        assert full[:k] + rest == full


async def test_resumed_stream_paces_its_first_token_at_ttft(autojump_clock: Any) -> None:
    backend = MockBackend(MODEL, ttft_ms=100, itl_ms=10)
    request = chat(seed=4)
    start = trio.current_time()
    times = []
    async with backend.open(generation(request, resume=5)) as events:
        async for _ in events:
            times.append(trio.current_time() - start)
    assert times[0] == pytest.approx(0.1)
    assert times[1] - times[0] == pytest.approx(0.01)


def test_events_are_listed_in_stream_order_and_counted() -> None:
    backend = instant(reasoning_field="reasoning", reasoning_tokens=(2, 2))
    tools = (Tool("t", {"type": "object", "properties": {"a": {"type": "integer"}}}),)
    plan = backend.plan(chat(tools=tools, tool_choice="t"))
    events = list(plan.events(chat=True, include_usage=True))
    kinds = [kind for kind, _ in events]
    n = len(plan.pieces)
    assert kinds[:4] == [
        MockEvent.ROLE,
        MockEvent.REASONING,
        MockEvent.REASONING,
        MockEvent.TOOL_START,
    ]
    assert kinds[4:-3] == [MockEvent.ARGUMENTS] * (n - 2)
    assert kinds[-3:] == [MockEvent.FINISH, MockEvent.USAGE, MockEvent.DONE]
    assert events[3] == (MockEvent.TOOL_START, 2) and events[-3] == (MockEvent.FINISH, n)
    assert plan.event_count(chat=True, include_usage=True) == len(events)
    assert plan.event_count(chat=False, include_usage=False) == len(
        list(plan.events(chat=False, include_usage=False))
    )


async def test_fault_after_a_resume_point_still_strikes_at_its_token() -> None:
    backend = instant()
    request = chat(seed=5)
    full = await stream(backend, generation(request))
    gen = Generation(request, "r1", 1_700_000_000, True, Fault(fail_after=6), Resume(3))
    got: list[bytes] = []
    with pytest.raises(BackendBroken, match="broke after 6 tokens"):
        async with backend.open(gen) as events:
            async for item in events:
                got.extend(e.raw for e in SSEParser().feed(item))
    assert got == full[3:7], "tokens 2..5 (events 3..6), then the break before token 6"


# --- encoding never fails ------------------------------------------------------------------


async def test_lone_surrogates_in_messages_and_schema_stream_as_valid_utf8() -> None:
    schema = {
        "type": "object",
        "properties": {"k\ud800": {"enum": ["v\udfff", "w\udbff"]}, "plain": {"const": "é"}},
        "required": ["k\ud800", "plain"],
    }
    messages = ({"role": "user", "content": "broken \ud83d text"},)
    request = chat(messages=messages, response_format=schema_format(schema), seed=1)
    events = await stream(instant(), generation(request))
    for event in events:
        event.decode("utf-8")  # strict: every byte the mock sends is UTF-8
    value = json.loads(content_of(events))
    assert value["k\ud800"] in ("v\udfff", "w\udbff") and value["plain"] == "é"
    jsonschema.validate(value, schema)


async def test_lone_surrogate_in_a_tool_name_is_a_400_naming_it() -> None:
    tools = (Tool("ok", {}), Tool("bad\udc00", {}))
    error = await refused(instant(), generation(chat(tools=tools, tool_choice="ok")))
    assert error.param == "tools[1].function.name"


# --- determinism ---------------------------------------------------------------------------


def test_ordinary_requests_keep_the_token_sequence_of_earlier_versions() -> None:
    """Every node must give the same tokens for the same request, old and new versions alike
    during a rolling restart; these digests were taken before the generator moved."""
    backend = instant(reasoning_field="reasoning_content")
    weather = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 2},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        },
        "required": ["city", "days"],
    }
    requests = [
        chat(seed=11),
        chat(seed=12, tools=(Tool("weather", weather), Tool("none", {})), tool_choice="required"),
        chat(seed=13, response_format=schema_format(weather)),
        chat(seed=14, response_format=ResponseFormat(type="json_object")),
    ]
    digests = [
        hashlib.sha256("\x00".join(backend.plan(r).pieces).encode()).hexdigest()[:16]
        for r in requests
    ]
    assert digests == GOLDEN


GOLDEN = ["daf26a57c8aa3853", "e39cf1fa1b4b4807", "462df326f60473ac", "5ca2d2cd2893d1d6"]
