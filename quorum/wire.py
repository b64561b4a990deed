"""OpenAI wire types: request parsing and validation, chunk encoding, stream aggregation.

Requests are parsed once, at the node that receives them, into frozen dataclasses that keep
the original body (``raw``) so a forward sends exactly what the client sent. Validation
raises ``InvalidRequest`` with ``param`` set to the offending field (``messages[1].role``).

Chunks are encoded by ``ChatChunkEncoder`` / ``CompletionChunkEncoder``: the constant part of
every chunk (id, object, created, model) is serialized once per stream, so one chunk costs one
``json.dumps`` of its delta. ``aggregate_chat`` / ``aggregate_completion`` fold a stream of
chunks into the non-streamed response object, so backends only ever produce streams.

Shapes follow OpenAI's published spec (``shared/openai/openapi.json``):
``CreateChatCompletionStreamResponse``, ``CreateChatCompletionResponse``,
``CreateCompletionResponse``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from quorum.errors import InvalidRequest
from quorum.sse import encode

__all__ = [
    "ChatChunkEncoder",
    "ChatRequest",
    "CompletionChunkEncoder",
    "CompletionRequest",
    "Request",
    "ResponseFormat",
    "Tool",
    "aggregate_chat",
    "aggregate_completion",
    "error_event",
    "parse_chat_request",
    "parse_completion_request",
    "parse_json_body",
]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_STOP = 4
SYSTEM_FINGERPRINT = "fp_quorum"

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Tool:
    """One function tool: ``name``, ``parameters`` (a JSON Schema object, ``{}`` if absent)."""

    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """``type``: "text" | "json_object" | "json_schema"; ``schema`` for json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    schema: Mapping[str, Any] | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated ``POST /v1/chat/completions`` body.

    ``messages`` are the client's message objects as sent. ``max_tokens`` is
    ``max_completion_tokens`` if given, else ``max_tokens``, else None (backend default).
    ``tool_choice`` is "none" | "auto" | "required" or the name of a forced function.
    ``raw`` is the body exactly as parsed, for forwarding.
    """

    model: str
    messages: tuple[Json, ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"
    response_format: ResponseFormat | None = None
    raw: Json = field(default_factory=dict, compare=False)

    kind = "chat"


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A validated ``POST /v1/completions`` body: one ``prompt`` (str), ``max_tokens``
    defaulting to 16 as in OpenAI's legacy API."""

    model: str
    prompt: str
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = 16
    stop: tuple[str, ...] = ()
    seed: int | None = None
    raw: Json = field(default_factory=dict, compare=False)

    kind = "completion"


Request = ChatRequest | CompletionRequest


# --- parsing -----------------------------------------------------------------------------


def parse_json_body(body: bytes) -> Json:
    """Decode a request body that must be a JSON object; raises ``InvalidRequest``."""
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON ({exc}). Send a JSON object with "
            "content-type: application/json."
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not {_type_name(data)}.")
    return dict(data)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _expect(value: Any, types: type | tuple[type, ...], param: str, what: str) -> None:
    ok = isinstance(value, types) and not (
        isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    )
    if not ok:
        raise InvalidRequest(f"'{param}' must be {what}, not {_type_name(value)}.", param=param)


def _opt_int(body: Json, key: str, *, minimum: int, maximum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    _expect(value, int, key, "an integer")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise InvalidRequest(f"'{key}' must be {bound}; got {value}.", param=key)
    return int(value)


def _opt_number(body: Json, key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is None:
        return
    _expect(value, (int, float), key, "a number")
    if not low <= value <= high:
        raise InvalidRequest(f"'{key}' must be between {low} and {high}; got {value}.", param=key)


def _model(body: Json) -> str:
    if "model" not in body:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    model = body["model"]
    _expect(model, str, "model", "a string")
    if not model:
        raise InvalidRequest("'model' must not be empty.", param="model")
    return str(model)


def _stream(body: Json) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is None:
        stream = False
    _expect(stream, bool, "stream", "a boolean")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        _expect(options, dict, "stream_options", "an object")
        if not stream:
            raise InvalidRequest(
                "'stream_options' is only allowed when 'stream' is true.", param="stream_options"
            )
        usage = options.get("include_usage", False)
        _expect(usage, bool, "stream_options.include_usage", "a boolean")
        include_usage = bool(usage)
    return bool(stream), include_usage


def _stop(body: Json) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    _expect(stop, list, "stop", "a string or an array of strings")
    if len(stop) > MAX_STOP:
        raise InvalidRequest(f"'stop' takes at most {MAX_STOP} sequences.", param="stop")
    for i, s in enumerate(stop):
        _expect(s, str, f"stop[{i}]", "a string")
    return tuple(s for s in stop if s)


def _n(body: Json) -> None:
    n = _opt_int(body, "n", minimum=1)
    if n is not None and n > 1:
        raise InvalidRequest(
            f"'n' = {n} is not supported: Quorum returns one choice per request. "
            "Send n = 1 (or omit it) and make several requests.",
            param="n",
        )


def _common_sampling(body: Json) -> None:
    _opt_number(body, "temperature", 0.0, 2.0)
    _opt_number(body, "top_p", 0.0, 1.0)
    _opt_number(body, "presence_penalty", -2.0, 2.0)
    _opt_number(body, "frequency_penalty", -2.0, 2.0)
    _n(body)


def _message(i: int, message: Any) -> Json:
    where = f"messages[{i}]"
    _expect(message, dict, where, "an object")
    if "role" not in message:
        raise InvalidRequest(f"Missing required parameter: '{where}.role'.", param=f"{where}.role")
    role = message["role"]
    _expect(role, str, f"{where}.role", "a string")
    if role not in ROLES:
        allowed = ", ".join(sorted(ROLES))
        raise InvalidRequest(
            f"'{where}.role' is '{role}'; it must be one of: {allowed}.", param=f"{where}.role"
        )
    content = message.get("content")
    if content is None:
        if role != "assistant":
            raise InvalidRequest(
                f"Missing required parameter: '{where}.content' (only assistant messages "
                "may omit it).",
                param=f"{where}.content",
            )
    elif isinstance(content, list):
        for j, part in enumerate(content):
            p = f"{where}.content[{j}]"
            _expect(part, dict, p, "an object")
            kind = part.get("type")
            _expect(kind, str, f"{p}.type", "a string")
            if kind == "text":
                _expect(part.get("text"), str, f"{p}.text", "a string")
    else:
        _expect(content, str, f"{where}.content", "a string or an array of content parts")
    if role == "tool":
        _expect(message.get("tool_call_id"), str, f"{where}.tool_call_id", "a string")
    return dict(message)


def _tools(body: Json) -> tuple[Tool, ...]:
    tools = body.get("tools")
    if tools is None:
        return ()
    _expect(tools, list, "tools", "an array")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        _expect(tool, dict, where, "an object")
        if tool.get("type", "function") != "function":
            raise InvalidRequest(f"'{where}.type' must be 'function'.", param=f"{where}.type")
        fn = tool.get("function")
        _expect(fn, dict, f"{where}.function", "an object")
        name = fn.get("name")
        _expect(name, str, f"{where}.function.name", "a string")
        if not name:
            raise InvalidRequest(
                f"'{where}.function.name' must not be empty.", param=f"{where}.function.name"
            )
        params = fn.get("parameters", {})
        if params is None:
            params = {}
        _expect(params, dict, f"{where}.function.parameters", "a JSON Schema object")
        out.append(Tool(name=name, parameters=params))
    return tuple(out)


def _tool_choice(body: Json, tools: tuple[Tool, ...]) -> str:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest(
                f"'tool_choice' is '{choice}'; it must be 'none', 'auto', 'required' or "
                "an object naming a function.",
                param="tool_choice",
            )
        if choice == "required" and not tools:
            raise InvalidRequest(
                "'tool_choice' is 'required' but no 'tools' were given.", param="tool_choice"
            )
        return choice
    _expect(choice, dict, "tool_choice", "a string or an object")
    fn = choice.get("function")
    _expect(fn, dict, "tool_choice.function", "an object")
    name = fn.get("name")
    _expect(name, str, "tool_choice.function.name", "a string")
    if name not in {t.name for t in tools}:
        raise InvalidRequest(
            f"'tool_choice' names function '{name}', which is not in 'tools'.",
            param="tool_choice.function.name",
        )
    return str(name)


def _response_format(body: Json) -> ResponseFormat | None:
    rf = body.get("response_format")
    if rf is None:
        return None
    _expect(rf, dict, "response_format", "an object")
    kind = rf.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise InvalidRequest(
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
            param="response_format.type",
        )
    if kind != "json_schema":
        return ResponseFormat(type=kind)
    js = rf.get("json_schema")
    _expect(js, dict, "response_format.json_schema", "an object")
    name = js.get("name")
    _expect(name, str, "response_format.json_schema.name", "a string")
    schema = js.get("schema", {})
    _expect(schema, dict, "response_format.json_schema.schema", "a JSON Schema object")
    return ResponseFormat(type="json_schema", schema=schema, name=name)


def parse_chat_request(body: Json) -> ChatRequest:
    """Validate a chat completions body; raises ``InvalidRequest`` naming the bad field."""
    model = _model(body)
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages")
    _expect(messages, list, "messages", "an array of message objects")
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    parsed = tuple(_message(i, m) for i, m in enumerate(messages))
    stream, include_usage = _stream(body)
    _common_sampling(body)
    max_tokens = _opt_int(body, "max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", minimum=1)
    seed = body.get("seed")
    if seed is not None:
        _expect(seed, int, "seed", "an integer")
    tools = _tools(body)
    return ChatRequest(
        model=model,
        messages=parsed,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        stop=_stop(body),
        seed=seed,
        tools=tools,
        tool_choice=_tool_choice(body, tools),
        response_format=_response_format(body),
        raw=body,
    )


def parse_completion_request(body: Json) -> CompletionRequest:
    """Validate a (legacy) completions body; raises ``InvalidRequest`` naming the bad field."""
    model = _model(body)
    if "prompt" not in body:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, list):
            if not prompt or all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                prompt = " ".join(str(t) for t in prompt)
            else:
                raise InvalidRequest(
                    "'prompt' as a batch of several prompts is not supported: send one prompt "
                    "(a string or an array of token ids) per request.",
                    param="prompt",
                )
    _expect(prompt, str, "prompt", "a string or an array of token ids")
    if body.get("echo"):
        raise InvalidRequest("'echo' is not supported.", param="echo")
    stream, include_usage = _stream(body)
    _common_sampling(body)
    max_tokens = _opt_int(body, "max_tokens", minimum=0)
    seed = body.get("seed")
    if seed is not None:
        _expect(seed, int, "seed", "an integer")
    return CompletionRequest(
        model=model,
        prompt=prompt,
        stream=stream,
        include_usage=include_usage,
        max_tokens=16 if "max_tokens" not in body else max_tokens,
        stop=_stop(body),
        seed=seed,
        raw=body,
    )


# --- encoding ----------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class ChatChunkEncoder:
    """Encodes ``chat.completion.chunk`` events for one stream (one ``id``, one ``created``).

    Every method returns one complete SSE event as bytes (``data: {...}\\n\\n``).
    """

    __slots__ = ("_head", "_tail")

    def __init__(self, id: str, model: str, created: int) -> None:
        head = _dumps(
            {
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )
        self._head = "data: " + head[:-1] + ',"choices":[{"index":0,"delta":'
        self._tail = "}]}\n\n"

    def delta(self, delta: Json, finish_reason: str | None = None) -> bytes:
        """A chunk carrying ``delta`` and ``finish_reason`` (None while streaming)."""
        fr = "null" if finish_reason is None else '"' + finish_reason + '"'
        return (
            self._head + _dumps(delta) + ',"logprobs":null,"finish_reason":' + fr + self._tail
        ).encode()

    def role(self) -> bytes:
        """The first chunk: ``{"role": "assistant", "content": ""}``."""
        return self.delta({"role": "assistant", "content": ""})

    def content(self, text: str) -> bytes:
        return self.delta({"content": text})

    def reasoning(self, field_name: str, text: str) -> bytes:
        """A reasoning delta under ``field_name`` (``reasoning_content`` or ``reasoning``)."""
        return self.delta({field_name: text})

    def tool_call_start(self, index: int, call_id: str, name: str) -> bytes:
        return self.delta(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ]
            }
        )

    def tool_call_arguments(self, index: int, fragment: str) -> bytes:
        return self.delta({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})

    def finish(self, finish_reason: str) -> bytes:
        return self.delta({}, finish_reason)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The ``include_usage`` chunk: empty ``choices`` and the ``usage`` object."""
        head = self._head[: self._head.index(',"choices"')]
        return (
            head
            + ',"choices":[],"usage":'
            + _dumps(_usage(prompt_tokens, completion_tokens))
            + "}\n\n"
        ).encode()


class CompletionChunkEncoder:
    """Encodes streamed ``text_completion`` events for one stream."""

    __slots__ = ("_head",)

    def __init__(self, id: str, model: str, created: int) -> None:
        head = _dumps(
            {
                "id": id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )
        self._head = "data: " + head[:-1]

    def text(self, text: str, finish_reason: str | None = None) -> bytes:
        fr = "null" if finish_reason is None else '"' + finish_reason + '"'
        return (
            self._head
            + ',"choices":[{"index":0,"text":'
            + _dumps(text)
            + ',"logprobs":null,"finish_reason":'
            + fr
            + "}]}\n\n"
        ).encode()

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return (
            self._head
            + ',"choices":[],"usage":'
            + _dumps(_usage(prompt_tokens, completion_tokens))
            + "}\n\n"
        ).encode()


def _usage(prompt_tokens: int, completion_tokens: int) -> Json:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_event(body: Json) -> bytes:
    """The final ``data: {"error": {...}}`` event of a stream that broke."""
    return encode(_dumps(body))


# --- aggregation -------------------------------------------------------------------------


def aggregate_chat(chunks: Iterable[Json]) -> Json:
    """Fold ``chat.completion.chunk`` objects into one ``chat.completion`` object.

    Content and every reasoning field are concatenated in order; tool-call fragments are
    joined by ``index``; the last non-null ``finish_reason`` and the ``usage`` chunk are kept.
    Unknown delta fields that carry strings (``reasoning_content``, ``reasoning``) are kept
    under their own names.
    """
    head: Json | None = None
    texts: dict[str, list[str]] = {}
    calls: dict[int, Json] = {}
    finish_reason: str | None = None
    usage: Json | None = None
    for chunk in chunks:
        if head is None:
            head = chunk
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
            delta = choice.get("delta") or {}
            for key, value in delta.items():
                if key == "tool_calls":
                    for tc in value or ():
                        call = calls.setdefault(
                            tc["index"],
                            {
                                "id": "",
                                "type": "function",
                                "function": {"name": "", "arguments": ""},
                            },
                        )
                        if tc.get("id"):
                            call["id"] = tc["id"]
                        fn = tc.get("function") or {}
                        if fn.get("name"):
                            call["function"]["name"] = fn["name"]
                        if fn.get("arguments"):
                            call["function"]["arguments"] += fn["arguments"]
                elif key != "role" and isinstance(value, str):
                    texts.setdefault(key, []).append(value)
    if head is None:
        raise ValueError("cannot aggregate an empty stream")
    content = "".join(texts.pop("content", []))
    message: Json = {
        "role": "assistant",
        "content": content if content or not calls else None,
        "refusal": None,
    }
    for key, parts in texts.items():
        if key != "refusal":
            message[key] = "".join(parts)
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    out: Json = {
        "id": head["id"],
        "object": "chat.completion",
        "created": head["created"],
        "model": head["model"],
        "system_fingerprint": head.get("system_fingerprint"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason or "stop",
            }
        ],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def aggregate_completion(chunks: Iterable[Json]) -> Json:
    """Fold streamed ``text_completion`` chunks into one ``text_completion`` object."""
    head: Json | None = None
    parts: list[str] = []
    finish_reason: str | None = None
    usage: Json | None = None
    for chunk in chunks:
        if head is None:
            head = chunk
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            parts.append(choice.get("text") or "")
            if choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
    if head is None:
        raise ValueError("cannot aggregate an empty stream")
    out: Json = {
        "id": head["id"],
        "object": "text_completion",
        "created": head["created"],
        "model": head["model"],
        "system_fingerprint": head.get("system_fingerprint"),
        "choices": [
            {
                "index": 0,
                "text": "".join(parts),
                "logprobs": None,
                "finish_reason": finish_reason or "stop",
            }
        ],
    }
    if usage is not None:
        out["usage"] = usage
    return out
