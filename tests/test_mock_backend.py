"""The mock backend: determinism, reasoning, tools, JSON, limits, timing, slots, warming, faults.

Everything timed runs on trio's virtual clock (``autojump_clock``); the rest uses a backend with
no latency at all. Every chunk is checked against OpenAI's published spec.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Mapping
from typing import Any

import jsonschema
import pytest
import trio
import trio.testing

from quorum.backends.base import BackendLoad, Fault, Generation
from quorum.backends.mock import MockBackend, count_prompt_tokens
from quorum.backends.schema_values import generate_json
from quorum.errors import BackendBroken, BackendSaturated, BackendUnavailable
from quorum.sse import DONE, SSEParser
from quorum.wire import (
    ChatRequest,
    CompletionRequest,
    Request,
    aggregate_chat,
    aggregate_completion,
    parse_chat_request,
    parse_completion_request,
)
from tests.openai_spec import validate

MODEL = "mock-model"
CREATED = 1_700_000_000
QUESTION = [{"role": "user", "content": "Tell me about rivers, please."}]

Json = dict[str, Any]


# --- helpers ------------------------------------------------------------------------------


def instant(**kwargs: Any) -> MockBackend:
    """A backend with no latency: every test that does not measure time uses one."""
    return MockBackend(MODEL, **{"ttft_ms": 0.0, "itl_ms": 0.0, **kwargs})


def chat(**body: Any) -> ChatRequest:
    return parse_chat_request({"model": MODEL, "messages": QUESTION, **body})


def completion(**body: Any) -> CompletionRequest:
    return parse_completion_request({"model": MODEL, "prompt": "Once upon a time", **body})


def generation(
    request: Request, *, include_usage: bool = True, fault: Fault | None = None, rid: str = "r1"
) -> Generation:
    return Generation(request, rid, CREATED, include_usage, fault)


def split(items: list[bytes]) -> list[bytes]:
    """The events of a stream's items; each item must hold whole events only."""
    events = []
    for item in items:
        parser = SSEParser()
        parsed = parser.feed(item)
        assert parsed and parser.pending == 0, "an item holds whole events only"
        events.extend(e.raw for e in parsed)
    return events


async def collect(backend: MockBackend, request: Request, **kwargs: Any) -> list[bytes]:
    async with backend.open(generation(request, **kwargs)) as events:
        return split([event async for event in events])


def decode(events: list[bytes]) -> list[Json]:
    """The JSON chunks of a complete stream; checks framing and the final ``[DONE]``."""
    parsed = SSEParser().feed(b"".join(events))
    assert len(parsed) == len(events), "one SSE event per item"
    assert events[-1] == DONE and parsed[-1].is_done
    assert not any(e.is_done for e in parsed[:-1])
    chunks: list[Json] = [json.loads(e.data) for e in parsed[:-1]]
    return chunks


def token_kinds(chunks: Iterable[Json], field: str = "reasoning_content") -> list[str]:
    """One entry per emitted token: "reasoning", "content" or "arguments"."""
    kinds = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice.get("delta", {})
            if field in delta:
                kinds.append("reasoning")
            elif "role" not in delta and delta.get("content"):
                kinds.append("content")
            elif choice.get("text"):
                kinds.append("content")
            for call in delta.get("tool_calls", ()):
                if call["function"].get("arguments"):
                    kinds.append("arguments")
    return kinds


def usage_of(chunks: list[Json]) -> Json:
    usage: list[Json] = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) == 1
    assert chunks[-1].get("usage") == usage[0], "the usage chunk comes last"
    return usage[0]


def tool(name: str, parameters: Json) -> Json:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def checker(schema: Mapping[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


SCHEMAS: dict[str, Json] = {
    "weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 2, "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict_nested": {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "when": {"type": "string", "format": "date"},
            "priority": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "done": {"type": "boolean"},
            "note": {"type": ["string", "null"]},
            "nothing": {"type": "null"},
            "owner": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 30},
                    "email": {"type": "string", "format": "email"},
                },
                "required": ["name", "email"],
                "additionalProperties": False,
            },
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 3},
                "minItems": 2,
                "maxItems": 4,
                "uniqueItems": True,
            },
        },
        "required": ["title", "when", "priority", "done", "note", "nothing", "owner", "tags"],
        "additionalProperties": False,
    },
    "combinators": {
        "type": "object",
        "properties": {
            "kind": {"const": "search"},
            "query": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "integer"}]},
            "limit": {
                "oneOf": [{"type": "integer", "multipleOf": 5, "minimum": 5}, {"type": "null"}]
            },
            "range": {
                "allOf": [
                    {
                        "type": "object",
                        "properties": {"lo": {"type": "integer"}},
                        "required": ["lo"],
                    },
                    {"properties": {"hi": {"type": "integer", "maximum": -3}}, "required": ["hi"]},
                ]
            },
            "filters": {"type": "array", "items": {"$ref": "#/$defs/filter"}, "minItems": 1},
            "score": {"type": "number", "multipleOf": 0.25, "minimum": -1, "maximum": 1},
        },
        "required": ["kind", "query", "limit", "range", "filters", "score"],
        "$defs": {
            "filter": {
                "type": "object",
                "properties": {
                    "field": {"enum": ["name", "date", 3, None]},
                    "not": {"type": "boolean"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/filter"}},
                },
                "required": ["field", "children"],
            }
        },
        "x-unknown-keyword": {"ignored": True},
    },
    "free_object": {"type": "object", "additionalProperties": {"type": "integer"}},
    "no_parameters": {},
}


# --- determinism --------------------------------------------------------------------------


async def test_same_request_gives_identical_bytes_twice_and_across_instances() -> None:
    request = chat(seed=7)
    a, b = instant(reasoning_field="reasoning"), instant(reasoning_field="reasoning")
    first = await collect(a, request)
    assert await collect(a, request) == first
    assert await collect(b, request) == first


async def test_timing_and_slots_do_not_change_the_output() -> None:
    request = chat(seed=3)
    fast = await collect(instant(), request)
    other = await collect(MockBackend(MODEL, ttft_ms=0, itl_ms=0, slots=1, queue=0), request)
    assert other == fast


async def test_different_seed_gives_different_text() -> None:
    backend = instant()
    texts = set()
    for seed in (0, 1, 2):
        chunks = decode(await collect(backend, chat(seed=seed)))
        texts.add(aggregate_chat(chunks)["choices"][0]["message"]["content"])
    assert len(texts) == 3


def test_absent_seed_is_seed_zero() -> None:
    backend = instant()
    assert backend.plan(chat()) == backend.plan(chat(seed=0))
    assert backend.plan(chat()) != backend.plan(chat(seed=1))


def test_different_messages_or_model_give_different_text() -> None:
    request = chat()
    other = parse_chat_request({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert instant().plan(request) != instant().plan(other)
    assert MockBackend("other-model").plan(request) != instant().plan(request)


def test_output_reads_like_words_from_the_vocabulary() -> None:
    plan = instant(output_tokens=(40, 40)).plan(chat())
    assert len(plan.pieces) == 40
    assert plan.content[0].isupper()
    assert plan.content.endswith(".")
    for piece in plan.pieces[1:]:
        assert piece in (".", ",") or (piece.startswith(" ") and piece[1:].isalpha())


def test_max_tokens_and_stop_cut_the_same_sequence() -> None:
    backend = instant(reasoning_field="reasoning_content", reasoning_tokens=(5, 5))
    full = backend.plan(chat())
    for limit in (1, 5, 9, 20):
        assert backend.plan(chat(max_tokens=limit)).pieces == full.pieces[:limit]


# --- reasoning ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_deltas_precede_content_under_the_configured_field(field: str) -> None:
    backend = instant(reasoning_field=field, reasoning_tokens=(8, 12), output_tokens=(5, 9))
    chunks = decode(await collect(backend, chat()))
    kinds = token_kinds(chunks, field)
    assert 8 <= kinds.count("reasoning") <= 12
    assert 5 <= kinds.count("content") <= 9
    assert kinds == sorted(kinds, key=["reasoning", "content"].index)
    other = "reasoning" if field == "reasoning_content" else "reasoning_content"
    assert not any(other in c["choices"][0]["delta"] for c in chunks if c["choices"])
    message = aggregate_chat(chunks)["choices"][0]["message"]
    assert message[field] == backend.plan(chat()).reasoning


async def test_model_without_reasoning_field_emits_no_reasoning() -> None:
    chunks = decode(await collect(instant(), chat()))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert all(set(d) <= {"role", "content"} for d in deltas)


# --- tools --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
async def test_tool_call_fragments_join_into_json_valid_for_the_parameters(
    name: str, seed: int
) -> None:
    schema = SCHEMAS[name]
    request = chat(tools=[tool(name, schema)], tool_choice="required", seed=seed)
    chunks = decode(await collect(instant(), request))
    calls = [
        c["choices"][0]["delta"]["tool_calls"]
        for c in chunks
        if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    ]
    start = calls[0][0]
    assert start["id"].startswith("call_") and start["function"] == {"name": name, "arguments": ""}
    fragments = [call[0]["function"]["arguments"] for call in calls[1:]]
    assert all(call[0]["index"] == 0 and "id" not in call[0] for call in calls[1:])
    arguments = json.loads("".join(fragments))
    checker(schema or {"type": "object"}).validate(arguments)
    assert all(1 <= len(f) <= 5 for f in fragments)
    if name != "no_parameters":
        assert len(fragments) > 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert usage_of(chunks)["completion_tokens"] == len(fragments)
    message = aggregate_chat(chunks)["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"][0]["function"]["arguments"] == "".join(fragments)


async def test_tool_call_id_and_choice_of_tool_are_deterministic() -> None:
    tools = [tool("a", SCHEMAS["weather"]), tool("b", SCHEMAS["free_object"])]
    first = await collect(instant(), chat(tools=tools))
    assert await collect(instant(), chat(tools=tools)) == first
    picked = {instant().plan(chat(tools=tools, seed=s)).tool[1] for s in range(12)}  # type: ignore[index]
    assert picked == {"a", "b"}


async def test_named_tool_choice_calls_that_tool() -> None:
    tools = [tool("a", SCHEMAS["weather"]), tool("b", SCHEMAS["free_object"])]
    for seed in range(5):
        request = chat(
            tools=tools, seed=seed, tool_choice={"type": "function", "function": {"name": "b"}}
        )
        message = aggregate_chat(decode(await collect(instant(), request)))["choices"][0]["message"]
        assert message["tool_calls"][0]["function"]["name"] == "b"


async def test_auto_tool_choice_answers_in_content_after_a_tool_result() -> None:
    messages = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "a", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 4}'},
    ]
    request = parse_chat_request(
        {"model": MODEL, "messages": messages, "tools": [tool("a", SCHEMAS["weather"])]}
    )
    chunks = decode(await collect(instant(), request))
    assert set(token_kinds(chunks)) == {"content"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    required = parse_chat_request({**request.raw, "tool_choice": "required"})
    assert instant().plan(required).tool is not None


async def test_tool_choice_none_answers_in_content() -> None:
    request = chat(tools=[tool("a", SCHEMAS["weather"])], tool_choice="none")
    chunks = decode(await collect(instant(), request))
    assert set(token_kinds(chunks)) == {"content"}


async def test_reasoning_model_reasons_before_calling_a_tool() -> None:
    backend = instant(reasoning_field="reasoning_content", reasoning_tokens=(6, 6))
    chunks = decode(await collect(backend, chat(tools=[tool("a", SCHEMAS["weather"])])))
    kinds = token_kinds(chunks)
    assert kinds[:6] == ["reasoning"] * 6 and set(kinds[6:]) == {"arguments"}
    first_call = next(
        i for i, c in enumerate(chunks) if c["choices"] and "tool_calls" in c["choices"][0]["delta"]
    )
    last_reasoning = max(
        i
        for i, c in enumerate(chunks)
        if c["choices"] and "reasoning_content" in c["choices"][0]["delta"]
    )
    assert last_reasoning < first_call


# --- response_format ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["weather", "strict_nested", "combinators", "free_object"])
async def test_json_schema_content_validates_against_the_schema(name: str) -> None:
    schema = SCHEMAS[name]
    rf = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    backend = instant(reasoning_field="reasoning", reasoning_tokens=(3, 3))
    for seed in range(4):
        chunks = decode(await collect(backend, chat(response_format=rf, seed=seed)))
        content = aggregate_chat(chunks)["choices"][0]["message"]["content"]
        checker(schema).validate(json.loads(content))
        assert token_kinds(chunks, "reasoning").count("content") > 3


async def test_json_object_content_parses_to_an_object() -> None:
    for seed in range(5):
        request = chat(response_format={"type": "json_object"}, seed=seed)
        chunks = decode(await collect(instant(), request))
        content = aggregate_chat(chunks)["choices"][0]["message"]["content"]
        assert isinstance(json.loads(content), dict)
        assert token_kinds(chunks).count("content") > 1


# --- the JSON generator, directly ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_generated_json_validates_for_many_seeds(name: str) -> None:
    schema = SCHEMAS[name]
    validator = checker(schema)
    for seed in range(150):
        validator.validate(generate_json(schema, random.Random(seed)))


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 5},
        {"type": "number", "minimum": 2.5, "maximum": 2.5},
        {"type": "integer", "minimum": 1000},
        {"type": "integer", "maximum": -1000},
        {"type": "string", "minLength": 50, "maxLength": 50},
        {"type": "string", "format": "date-time"},
        {"type": "string", "format": "uuid"},
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
        {"type": "array", "items": {"type": "boolean"}, "maxItems": 0},
        {"type": ["integer", "boolean"]},
        {"enum": [[1, 2], {"a": 1}]},
        {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}]},
        {"type": "object", "minProperties": 2, "properties": {"a": {"type": "integer"}}},
        {"type": "object", "properties": {"n": {"$ref": "#"}}},  # recursive, optional
    ],
)
def test_generated_json_handles_edge_keywords(schema: Json) -> None:
    validator = checker(schema)
    for seed in range(40):
        validator.validate(generate_json(schema, random.Random(seed)))


def test_generated_json_is_deterministic_for_a_seeded_rng() -> None:
    schema = SCHEMAS["combinators"]
    assert generate_json(schema, random.Random(5)) == generate_json(schema, random.Random(5))


# --- max_tokens, stop, usage --------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 4, 7, 30])
async def test_max_tokens_finishes_with_length_after_exactly_max_tokens(limit: int) -> None:
    backend = instant(
        reasoning_field="reasoning_content", reasoning_tokens=(4, 4), output_tokens=(40, 40)
    )
    chunks = decode(await collect(backend, chat(max_completion_tokens=limit)))
    kinds = token_kinds(chunks)
    assert len(kinds) == limit == usage_of(chunks)["completion_tokens"]
    assert kinds.count("reasoning") == min(limit, 4)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


async def test_max_tokens_cuts_tool_arguments() -> None:
    backend = instant()
    request = chat(tools=[tool("a", SCHEMAS["strict_nested"])], max_tokens=6)
    chunks = decode(await collect(backend, request))
    call = aggregate_chat(chunks)["choices"][0]["message"]["tool_calls"][0]
    full = backend.plan(chat(tools=[tool("a", SCHEMAS["strict_nested"])])).arguments
    assert full.startswith(call["function"]["arguments"]) and call["function"]["arguments"] != full
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert usage_of(chunks)["completion_tokens"] == 6


async def test_max_tokens_within_reasoning_never_starts_the_tool_call() -> None:
    backend = instant(reasoning_field="reasoning", reasoning_tokens=(10, 10))
    chunks = decode(await collect(backend, chat(tools=[tool("a", {})], max_tokens=5)))
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks if c["choices"])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


async def test_natural_end_finishes_with_stop() -> None:
    chunks = decode(await collect(instant(output_tokens=(3, 3)), chat(max_tokens=3)))
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


async def test_stop_cuts_before_the_stop_string() -> None:
    backend = instant(output_tokens=(40, 40))
    natural = backend.plan(chat()).pieces
    stop = natural[10][2:] + natural[11][:3]  # spans a token boundary
    text = "".join(natural)
    expected = text[: text.find(stop)]
    chunks = decode(await collect(backend, chat(stop=["never-there", stop])))
    content = aggregate_chat(chunks)["choices"][0]["message"]["content"]
    assert content == expected and stop not in content
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert usage_of(chunks)["completion_tokens"] == token_kinds(chunks).count("content") == 11


async def test_stop_that_never_occurs_changes_nothing() -> None:
    backend = instant()
    assert await collect(backend, chat(stop="zzz")) == await collect(backend, chat())


async def test_usage_adds_up_and_matches_what_was_emitted() -> None:
    backend = instant(reasoning_field="reasoning_content")
    request = parse_chat_request(
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hello, world!"}]},
            ],
        }
    )
    chunks = decode(await collect(backend, request))
    usage = usage_of(chunks)
    assert usage["prompt_tokens"] == (3 + 3) + (4 + 3) == count_prompt_tokens(request)
    assert usage["completion_tokens"] == len(token_kinds(chunks))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert chunks[-1]["choices"] == []


async def test_no_usage_chunk_without_include_usage() -> None:
    chunks = decode(await collect(instant(), chat(), include_usage=False))
    assert not any("usage" in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chunks_carry_the_generation_id_created_and_model() -> None:
    chunks = decode(await collect(instant(), chat(), rid="abc123"))
    assert {c["id"] for c in chunks} == {"chatcmpl-abc123"}
    assert {c["created"] for c in chunks} == {CREATED}
    assert {c["model"] for c in chunks} == {MODEL}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


# --- completions --------------------------------------------------------------------------


async def test_completion_streams_text_chunks_with_cmpl_id() -> None:
    backend = instant(output_tokens=(10, 10))
    events = await collect(backend, completion(max_tokens=50), rid="xyz")
    assert (
        await collect(instant(output_tokens=(10, 10)), completion(max_tokens=50), rid="xyz")
        == events
    )
    chunks = decode(events)
    assert {c["id"] for c in chunks} == {"cmpl-xyz"}
    assert all(c["object"] == "text_completion" for c in chunks)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert (
        len(texts) == 11
        and texts[-1] == ""
        and all(t.startswith(" ") or t in ".," for t in texts[:10])
    )
    response = aggregate_completion(chunks)
    assert response["choices"][0]["finish_reason"] == "stop"
    assert response["usage"] == {"prompt_tokens": 4, "completion_tokens": 10, "total_tokens": 14}
    validate("CreateCompletionResponse", response)


async def test_completion_default_max_tokens_is_16_and_finishes_with_length() -> None:
    chunks = decode(await collect(instant(), completion()))
    response = aggregate_completion(chunks)
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 16


async def test_completion_max_tokens_zero_is_empty_text_with_length() -> None:
    chunks = decode(await collect(instant(), completion(max_tokens=0)))
    response = aggregate_completion(chunks)
    assert response["choices"][0]["text"] == ""
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 0
    validate("CreateCompletionResponse", response)


async def test_completion_stop_cuts_before_the_stop_string() -> None:
    backend = instant(output_tokens=(20, 20))
    text = backend.plan(completion(max_tokens=None)).content
    stop = text[30:34]
    response = aggregate_completion(
        decode(await collect(backend, completion(stop=stop, max_tokens=100)))
    )
    assert response["choices"][0]["text"] == text[: text.find(stop)]
    assert response["choices"][0]["finish_reason"] == "stop"


# --- OpenAI's spec ------------------------------------------------------------------------


SPEC_CASES: dict[str, tuple[Json, Json]] = {
    "plain": ({}, {}),
    "reasoning_content": ({"reasoning_field": "reasoning_content"}, {}),
    "reasoning": ({"reasoning_field": "reasoning"}, {"max_tokens": 20}),
    "tool_call": (
        {"reasoning_field": "reasoning"},
        {"tools": [tool("a", SCHEMAS["combinators"])], "tool_choice": "required"},
    ),
    "json_schema": (
        {},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": SCHEMAS["strict_nested"]},
            }
        },
    ),
    "json_object": ({}, {"response_format": {"type": "json_object"}}),
    "length": ({}, {"max_tokens": 3}),
    "stop": ({}, {"stop": ["e"]}),
}


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
@pytest.mark.parametrize("include_usage", [True, False])
async def test_every_chat_chunk_and_the_aggregate_validate_against_openai_spec(
    case: str, include_usage: bool
) -> None:
    config, body = SPEC_CASES[case]
    chunks = decode(await collect(instant(**config), chat(**body), include_usage=include_usage))
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    validate("CreateChatCompletionResponse", aggregate_chat(chunks))


def test_spec_validation_rejects_a_bad_chunk() -> None:
    chunk: Json = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "done"}],
    }
    with pytest.raises(jsonschema.ValidationError):
        validate("CreateChatCompletionStreamResponse", chunk)
    chunk["choices"][0]["finish_reason"] = None
    validate("CreateChatCompletionStreamResponse", chunk)


# --- timing -------------------------------------------------------------------------------


async def test_role_at_once_first_token_after_ttft_then_itl_apart(autojump_clock: Any) -> None:
    backend = MockBackend(MODEL, ttft_ms=250, itl_ms=20, output_tokens=(12, 12))
    start = trio.current_time()
    times = []
    async with backend.open(generation(chat())) as events:
        async for item in events:  # every event of an item was produced at the same time
            times.extend([trio.current_time() - start] * len(split([item])))
    assert times[0] == 0  # the role chunk
    tokens = times[1:13]
    assert tokens[0] == pytest.approx(0.250)
    for before, after in itertools.pairwise(tokens):
        assert after - before == pytest.approx(0.020)
    assert times[13:] == [tokens[-1]] * 3  # finish, usage, DONE without delay


async def test_ttft_counts_from_slot_acquisition_not_from_queueing(autojump_clock: Any) -> None:
    backend = MockBackend(MODEL, ttft_ms=100, itl_ms=10, output_tokens=(5, 5), slots=1)
    first_token: list[float] = []

    async def client() -> None:
        async with backend.open(generation(chat())) as events:
            await events.__anext__()
            await events.__anext__()
            first_token.append(trio.current_time())
            async for _ in events:
                pass

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        nursery.start_soon(client)
    # first: 0.1 (ttft) + 4 * 0.01 to the end; second waits for that, then its own ttft
    assert [t - start for t in first_token] == pytest.approx([0.1, 0.14 + 0.1])


async def test_zero_itl_still_checkpoints_so_the_consumer_can_be_cancelled() -> None:
    backend = instant(output_tokens=(5000, 5000))
    received = 0

    async def consume() -> None:
        nonlocal received
        async with backend.open(generation(chat())) as events:
            async for _ in events:
                received += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        for _ in range(20):
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    assert 0 < received < 5000
    assert backend.load().busy == 0


# --- slots and queue ----------------------------------------------------------------------


async def test_slots_plus_queue_open_then_one_more_is_saturated_and_load_is_exact() -> None:
    backend = instant(slots=2, queue=3)
    entered: list[int] = []
    releases = [trio.Event() for _ in range(5)]

    async def hold(i: int) -> None:
        async with backend.open(generation(chat(), rid=str(i))) as events:
            entered.append(i)
            await events.__anext__()
            await releases[i].wait()

    assert backend.load() == BackendLoad(slots=2, busy=0, queued=0)
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(hold, i)
            await trio.testing.wait_all_tasks_blocked()
        assert backend.load() == BackendLoad(slots=2, busy=2, queued=3)
        assert entered == [0, 1]

        with pytest.raises(BackendSaturated) as saturated:
            async with backend.open(generation(chat())):
                pytest.fail("must not enter")
        assert saturated.value.retry_after > 0
        assert backend.load() == BackendLoad(slots=2, busy=2, queued=3)

        releases[1].set()
        await trio.testing.wait_all_tasks_blocked()
        assert entered == [0, 1, 2]  # FIFO
        assert backend.load() == BackendLoad(slots=2, busy=2, queued=2)
        for i in (0, 2, 3, 4):
            releases[i].set()
            await trio.testing.wait_all_tasks_blocked()
    assert entered == [0, 1, 2, 3, 4]
    assert backend.load() == BackendLoad(slots=2, busy=0, queued=0)


async def test_queue_zero_saturates_as_soon_as_slots_are_busy() -> None:
    backend = instant(slots=1, queue=0)
    async with backend.open(generation(chat())):
        with pytest.raises(BackendSaturated):
            async with backend.open(generation(chat())):
                pass
    async with backend.open(generation(chat())):
        assert backend.load().busy == 1


async def test_cancelling_a_consumer_mid_stream_frees_the_slot(autojump_clock: Any) -> None:
    backend = MockBackend(MODEL, ttft_ms=50, itl_ms=10, output_tokens=(100, 100), slots=1)
    received = 0
    with trio.move_on_after(0.2) as scope:
        async with backend.open(generation(chat())) as events:
            async for _ in events:
                received += 1
                assert backend.load().busy == 1
    assert scope.cancelled_caught
    assert 10 < received < 100
    assert backend.load() == BackendLoad(slots=1, busy=0, queued=0)
    assert len(decode(await collect(backend, chat()))) > 100  # the slot really is free


async def test_an_exception_inside_the_context_frees_the_slot() -> None:
    backend = instant(slots=1)
    with pytest.raises(RuntimeError):
        async with backend.open(generation(chat())) as events:
            await events.__anext__()
            raise RuntimeError("client went away")
    assert backend.load().busy == 0
    with pytest.raises(trio.ClosedResourceError):
        await events.__anext__()


async def test_a_cancelled_queued_waiter_leaves_the_queue() -> None:
    backend = instant(slots=1, queue=2)
    release = trio.Event()

    async def hold() -> None:
        async with backend.open(generation(chat())):
            await release.wait()

    async def wait_in_queue(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            async with backend.open(generation(chat())):
                pytest.fail("a cancelled waiter must never get the slot")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await trio.testing.wait_all_tasks_blocked()
        waiter = await nursery.start(wait_in_queue)
        await trio.testing.wait_all_tasks_blocked()
        assert backend.load() == BackendLoad(slots=1, busy=1, queued=1)
        waiter.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert backend.load() == BackendLoad(slots=1, busy=1, queued=0)
        release.set()
    assert backend.load() == BackendLoad(slots=1, busy=0, queued=0)


# --- warming ------------------------------------------------------------------------------


async def test_warming_refuses_with_503_then_becomes_ready(autojump_clock: Any) -> None:
    backend = instant(warmup_s=5.0)
    assert backend.state == "warming"
    with pytest.raises(BackendUnavailable) as refused:
        async with backend.open(generation(chat())):
            pass
    assert refused.value.status == 503
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        await trio.sleep(4.9)
        assert backend.state == "warming"
        await trio.sleep(0.2)
        assert backend.state == "ready"  # type: ignore[comparison-overlap]
    assert decode(await collect(backend, chat()))


async def test_zero_warmup_is_ready_before_run() -> None:
    backend = instant()
    assert backend.state == "ready"
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
    assert backend.state == "ready"


# --- faults -------------------------------------------------------------------------------


async def test_fault_status_refuses_before_anything() -> None:
    backend = instant(slots=1, queue=0)
    with pytest.raises(BackendUnavailable) as refused:
        async with backend.open(generation(chat(), fault=Fault(status=500))):
            pytest.fail("must not enter")
    assert refused.value.status == 500
    assert backend.load() == BackendLoad(slots=1, busy=0, queued=0)


async def test_generation_fault_overrides_the_backend_fault() -> None:
    backend = instant(fault=Fault(status=502))
    with pytest.raises(BackendUnavailable):
        await collect(backend, chat())
    assert decode(await collect(backend, chat(), fault=Fault()))


@pytest.mark.parametrize("after", [0, 3, 12])
async def test_fail_after_breaks_after_n_tokens_without_finish_or_done(after: int) -> None:
    backend = instant(output_tokens=(12, 12))
    received: list[bytes] = []
    with pytest.raises(BackendBroken):
        async with backend.open(generation(chat(), fault=Fault(fail_after=after))) as events:
            async for event in events:
                received.append(event)
    assert backend.load().busy == 0
    chunks = [json.loads(e.data) for e in SSEParser().feed(b"".join(received))]
    assert len(token_kinds(chunks)) == after
    assert DONE not in received
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    full = decode(await collect(backend, chat()))
    assert chunks == full[: after + 1]  # the same tokens as an unbroken stream, up to the break


async def test_fail_after_beyond_the_output_never_strikes() -> None:
    backend = instant(output_tokens=(5, 5))
    assert decode(await collect(backend, chat(), fault=Fault(fail_after=6)))


async def test_stall_after_holds_the_slot_until_cancelled(autojump_clock: Any) -> None:
    backend = MockBackend(MODEL, ttft_ms=10, itl_ms=10, slots=1, fault=Fault(stall_after=2))
    received: list[bytes] = []

    async def consume() -> None:
        async with backend.open(generation(chat())) as events:
            async for event in events:
                received.append(event)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        await trio.sleep(600)
        assert len(received) == 3  # role + 2 tokens, then nothing for ten minutes
        assert backend.load().busy == 1
        nursery.cancel_scope.cancel()
    assert backend.load().busy == 0


# --- configuration ------------------------------------------------------------------------


def test_from_config_reads_a_backends_table() -> None:
    backend = MockBackend.from_config(
        "m",
        {
            "kind": "mock",
            "model": "m",
            "ttft_ms": 10,
            "itl_ms": 2.5,
            "slots": 4,
            "queue": 8,
            "reasoning_field": "reasoning",
            "output_tokens": [5, 10],
            "reasoning_tokens": [1, 2],
            "warmup_s": 1,
            "weight": 2,
            "fault": "fail_after=5",
        },
    )
    assert (backend.model, backend.ttft_ms, backend.itl_ms) == ("m", 10.0, 2.5)
    assert backend.load() == BackendLoad(slots=4, busy=0, queued=0)
    assert (backend.queue, backend.reasoning_field, backend.weight) == (8, "reasoning", 2.0)
    assert (backend.output_tokens, backend.reasoning_tokens) == ((5, 10), (1, 2))
    assert backend.fault == Fault(fail_after=5)
    assert backend.state == "warming"
    assert MockBackend.from_config("m", {"fault": {"stall_after": 3}}).fault == Fault(stall_after=3)
    assert MockBackend.from_config("m", {}).state == "ready"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"ttft": 5}, "unknown key 'ttft'"),
        ({"slots": "4"}, "'slots': expected a valid integer, got '4'"),
        ({"slots": 2.0}, "'slots': expected a valid integer, got 2.0"),
        ({"ttft_ms": True}, "'ttft_ms': expected a valid number, got True"),
        ({"ttft_ms": float("nan")}, "'ttft_ms': expected a finite number"),
        ({"output_tokens": [5]}, "'output_tokens.1': Field required"),
        ({"output_tokens": ["5", 6]}, "'output_tokens.0': expected a valid integer"),
        ({"fault": 5}, "'fault': expected a string like 'fail_after=5' or a table"),
        ({"fault": "explode=1"}, "unknown fault"),
        ({"reasoning_field": 1}, "'reasoning_field': expected a valid string"),
        ({"slots": 0}, "'slots': expected greater than or equal to 1, got 0"),
        ({"queue": -1}, "'queue': expected greater than or equal to 0, got -1"),
        ({"ttft_ms": -1}, "'ttft_ms': expected greater than or equal to 0"),
        ({"weight": 0}, "'weight': expected greater than 0"),
        ({"output_tokens": [10, 5]}, "low <= high"),
        ({"reasoning_field": "content"}, "'reasoning_field': expected a field name"),
        ({"kind": "upstream"}, "'kind' must be 'mock'"),
        ({"model": "other"}, "model = 'other'"),
    ],
)
def test_from_config_rejects_bad_tables_with_a_clear_message(table: Json, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as error:
        MockBackend.from_config("m", table)
    assert "'m'" in str(error.value)
