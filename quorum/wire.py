"""OpenAI wire types: request parsing and validation, chunk encoding, stream aggregation.

Requests are parsed once, at the node that receives them, into frozen dataclasses that keep
the original body (``raw``) so a forward sends exactly what the client sent. Validation
raises ``InvalidRequest`` with ``param`` set to the offending field (``messages[1].role``).

``parse_json_body`` is the first line of defence against hostile bodies, and everything it
lets through can be re-encoded as strict JSON and UTF-8 by any later layer (the upstream
client, the mock's digest, a resume body): the body must be UTF-8 (RFC 8259 section 8.1; a
leading byte order mark is ignored); ``NaN``, ``Infinity`` and numbers that overflow a float
are refused (RFC 8259 section 6 has no such numbers); so are integers over Python's
int-string limit (4,300 digits); arrays and objects nest at most ``MAX_JSON_DEPTH`` levels,
checked before decoding so that no body can drive the decoder into ``RecursionError``; and no
string, key or value, may hold a lone UTF-16 surrogate (``"\\ud800"``: valid JSON escape
syntax, but not Unicode, so no UTF-8 encoder accepts it). Each is a 400
``invalid_request_error`` that says what to fix.

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
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Final, Literal

from quorum.errors import InvalidRequest
from quorum.sse import encode

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_MODEL_CHARS",
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
    "json_type_name",
    "parse_chat_request",
    "parse_completion_request",
    "parse_json_body",
]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_STOP = 4
SYSTEM_FINGERPRINT = "fp_quorum"

MAX_JSON_DEPTH: Final = 64
"""The deepest nesting of arrays and objects a request body may have; the body object itself
is level 1. A chat body with tools whose JSON schemas nest 20 levels needs about 45. Deeper
bodies get a 400 before they are decoded."""

MAX_MODEL_CHARS: Final = 256
"""The longest model name accepted (Hugging Face repository ids are at most 96 characters)."""

INT64: Final = (-(2**63), 2**63 - 1)
"""``seed``'s range: OpenAI's spec gives it as int64, and upstream servers parse it so."""

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


_DECODER_SAFE_DEPTH: Final = 512
"""``json.loads`` recurses once per level (in C, counted against the interpreter's recursion
limit of 1,000 with the request's own frames): a body with at most this many openers is
decoded first and measured after; one with more is measured before it is decoded."""

# A JSON string token, unrolled-loop form (Friedl): no backtracking.
_STRING_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Brackets as parentheses, every other byte deleted (bytes.translate: C speed).
_TO_PARENS = bytes.maketrans(b"[]{}", b"()()")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = tuple(1 if b == 0x28 else -1 if b == 0x29 else 0 for b in range(256))  # "(" +1, ")" -1
_PEEL_PASSES = 4
# Only a body holding one of these escapes can decode to a string with a surrogate in it.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_HIGH_HEX = frozenset("89abcdefABCDEF")
_CONTAINERS = (dict, list)
_SURROGATE = re.compile("[\ud800-\udfff]")

_TOO_DEEP = (
    f"The request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; "
    "Quorum accepts at most that many. Flatten the deepest part (a JSON schema can use $defs "
    "and $ref instead of inlining)."
)


def parse_json_body(body: bytes) -> Json:
    """Decode a request body that must be a JSON object (UTF-8, finite numbers, at most
    ``MAX_JSON_DEPTH`` levels, no lone surrogates: see the module docstring).

    Raises ``InvalidRequest`` (400) saying what is wrong and, for a lone surrogate, with
    ``param`` naming where it is (``messages[0].content``).

    Cost beyond ``json.loads``: a UTF-8 decode and ``memchr`` scans for ``[``, ``{`` and
    ``\\``; a walk of the decoded tree's containers when the body has more than
    ``MAX_JSON_DEPTH`` openers, and of its strings when it has a surrogate escape; and, for a
    body of more than ``_DECODER_SAFE_DEPTH`` openers, a measure of its depth with the
    strings cut out before it is decoded.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid UTF-8 (byte {exc.start}: {exc.reason}). Send "
            "JSON encoded as UTF-8 with content-type: application/json."
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    openers = _count_upto(text, "[{", _DECODER_SAFE_DEPTH)  # a bound on the depth
    if openers > _DECODER_SAFE_DEPTH and _too_deep(text):  # measured before decoding
        raise InvalidRequest(_TOO_DEEP)
    try:
        data: Any = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON ({exc}). Send a JSON object with "
            "content-type: application/json."
        ) from None
    except ValueError as exc:  # an integer over Python's int-string limit (4,300 digits)
        raise InvalidRequest(
            f"The request body has a number Quorum cannot read: {exc.args[0].split(';')[0]}. "
            "Send integers of at most 4300 digits."
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not {json_type_name(data)}.")
    if MAX_JSON_DEPTH < openers <= _DECODER_SAFE_DEPTH:  # measured after: <= 512 containers
        _check_depth(data)
    if _may_hold_surrogate(text):
        _check_surrogates(data)
    return data


def _count_upto(text: str, chars: str, limit: int) -> int:
    """How many of ``chars`` ``text`` holds, counting no further than ``limit + 1``.
    ``str.find`` of one character is a ``memchr``: 30 times faster than ``str.count`` on a
    1 MB body, and the count stops early."""
    n = 0
    for char in chars:
        pos = text.find(char)
        while pos >= 0:
            n += 1
            if n > limit:
                return n
            pos = text.find(char, pos + 1)
    return n


def _may_hold_surrogate(text: str) -> bool:
    """Whether ``text`` may hold a ``\\ud800``-``\\udfff`` escape (True may be wrong,
    False is not): the first backslashes are looked at one by one (``find``), past 32 of
    them a regex search takes over."""
    pos = text.find("\\")
    for _ in range(32):
        if pos < 0:
            return False
        if text[pos + 1 : pos + 3] in ("ud", "uD") and text[pos + 3 : pos + 4] in _HIGH_HEX:
            return True
        pos = text.find("\\", pos + 2)  # past "\\\\" too: an escaped backslash
    return _SURROGATE_ESCAPE.search(text, pos) is not None


def _too_deep(text: str) -> bool:
    """Whether ``text`` nests arrays/objects more than ``MAX_JSON_DEPTH`` levels, brackets in
    strings ignored, without recursion. On the brackets alone, as parentheses: a run of more
    than ``MAX_JSON_DEPTH`` openers is too deep at once; otherwise matched pairs are peeled
    (``"()"`` removed: each pass lowers the depth by one) up to ``_PEEL_PASSES`` times, which
    settles any shallow body, and what is left is measured by a running sum. Unmatched
    openers (invalid JSON, into which the decoder would still descend) count as depth. Cost:
    O(length), about 0.1 microsecond a bracket at worst."""
    shape = _STRING_TOKEN.sub("", text).encode().translate(_TO_PARENS, _NOT_BRACKETS)
    limit = MAX_JSON_DEPTH
    if b"(" * (limit + 1) in shape:
        return True
    for _ in range(_PEEL_PASSES):
        peeled = shape.replace(b"()", b"")
        if len(peeled) == len(shape):  # no pair left: unmatched brackets only
            return shape.count(b"(") > limit
        shape, limit = peeled, limit - 1
    return max(accumulate(map(_STEP.__getitem__, shape)), default=0) > limit


def _check_depth(data: Json) -> None:
    """Raise ``InvalidRequest`` if ``data`` nests deeper than ``MAX_JSON_DEPTH``: one level of
    containers at a time, no recursion."""
    level: list[Any] = [data]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            value
            for node in level
            for value in (node.values() if type(node) is dict else node)
            if isinstance(value, _CONTAINERS)
        ]
        if not level:
            return
    raise InvalidRequest(_TOO_DEEP)


def _check_surrogates(data: Json) -> None:
    """Raise ``InvalidRequest`` naming the first string (key or value) of ``data`` that holds
    a lone surrogate. ``json`` joins escaped pairs into one code point, so any surrogate left
    in a decoded string is a lone one; an ASCII string (``isascii`` is O(1)) holds none."""
    # (node, its path): a path is (parent path, key or index), linked from the leaf.
    stack: list[tuple[Any, tuple[Any, ...] | None]] = [(data, None)]
    while stack:
        node, path = stack.pop()
        items = node.items() if type(node) is dict else enumerate(node)
        for key, value in items:
            if type(key) is str and not key.isascii() and _SURROGATE.search(key):
                _lone_surrogate((path, key))
            if type(value) is str:
                if not value.isascii() and _SURROGATE.search(value):
                    _lone_surrogate((path, key))
            elif type(value) is dict or type(value) is list:
                stack.append((value, (path, key)))


def _refuse_constant(name: str) -> Any:
    raise InvalidRequest(
        f"The request body contains {name}, which is not a JSON number (RFC 8259). Send a "
        "finite number, or leave the field out."
    )


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise InvalidRequest(
            f"The request body contains the number {text[:40]}, which is too large to be a "
            "finite double. Send a finite number."
        )
    return value


# One decoder for every body: ``json.loads`` with hooks would build a new one (and its C
# scanner) per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def _lone_surrogate(path: tuple[Any, ...]) -> None:
    keys: list[Any] = []
    link: tuple[Any, ...] | None = path
    while link is not None:
        link, key = link
        keys.append(key)
    where = ""
    for key in reversed(keys):
        where += f"[{key}]" if isinstance(key, int) else (f".{key}" if where else key)
    shown = where.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    raise InvalidRequest(
        f"'{shown}' holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair), "
        "which is not Unicode text. Escape characters outside the Basic Multilingual Plane as a "
        "surrogate pair (\\ud83d\\ude00) or send them as UTF-8.",
        param=shown,
    )


def json_type_name(value: Any) -> str:
    """What ``value`` is, in JSON's words, for messages: "null", "a boolean", "a number",
    "a string", "an array", "an object" (else the Python type's name)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _expect(value: Any, types: type | tuple[type, ...], param: str, what: str) -> None:
    ok = isinstance(value, types) and not (
        isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    )
    if not ok:
        raise InvalidRequest(f"'{param}' must be {what}, not {json_type_name(value)}.", param=param)


def _brief(value: Any) -> str:
    """``value`` for an error message: its repr, cut to 40 characters."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**40 else "a huge integer"
    return text if len(text) <= 40 else text[:37] + "..."


def _opt_int(body: Json, key: str, *, minimum: int, maximum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    _expect(value, int, key, "an integer")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise InvalidRequest(f"'{key}' must be {bound}; got {_brief(value)}.", param=key)
    return int(value)


def _opt_number(body: Json, key: str, low: float, high: float) -> None:
    value = body.get(key)
    if value is None:
        return
    _expect(value, (int, float), key, "a number")
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequest(
            f"'{key}' must be a finite number between {low} and {high}; got {_brief(value)}.",
            param=key,
        )


def _opt(body: Json, key: str, types: type | tuple[type, ...], what: str) -> Any:
    """``body[key]``, None if absent or null; raises ``InvalidRequest`` unless ``types``."""
    value = body.get(key)
    if value is not None:
        _expect(value, types, key, what)
    return value


def _model(body: Json) -> str:
    if "model" not in body:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    model = body["model"]
    _expect(model, str, "model", "a string")
    if not model:
        raise InvalidRequest("'model' must not be empty.", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(
            f"'model' is {len(model)} characters long; model names have at most {MAX_MODEL_CHARS}.",
            param="model",
        )
    return str(model)


def _seed(body: Json) -> int | None:
    seed = _opt(body, "seed", int, "an integer")
    if seed is not None and not INT64[0] <= seed <= INT64[1]:
        raise InvalidRequest(
            f"'seed' must be a 64-bit signed integer (between {INT64[0]} and {INT64[1]}); "
            f"got {_brief(seed)}.",
            param="seed",
        )
    return None if seed is None else int(seed)


def _echo(body: Json, *, chat: bool) -> None:
    echo = _opt(body, "echo", bool, "a boolean")
    if echo and chat:
        raise InvalidRequest(
            "'echo' is a /v1/completions parameter; /v1/chat/completions does not take it. "
            "Remove it.",
            param="echo",
        )
    if echo:
        raise InvalidRequest("'echo' is not supported: remove it.", param="echo")


def _logit_bias(body: Json) -> None:
    bias = _opt(body, "logit_bias", dict, "an object mapping token ids to numbers")
    for token, value in (bias or {}).items():
        where = f"logit_bias.{token}"
        _expect(value, (int, float), where, "a number")
        if not -100 <= value <= 100:
            raise InvalidRequest(
                f"'{where}' must be between -100 and 100; got {_brief(value)}.", param=where
            )


def _metadata(body: Json) -> None:
    metadata = _opt(body, "metadata", dict, "an object of strings")
    for key, value in (metadata or {}).items():
        _expect(value, str, f"metadata.{key}", "a string")


def _extra_fields(body: Json) -> None:
    """Optional fields Quorum does not act on but upstream servers read: their types."""
    _opt(body, "user", str, "a string")
    _opt(body, "top_k", int, "an integer (vLLM: -1 disables it)")
    _logit_bias(body)


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
            f"'{where}.role' is {_brief(role)}; it must be one of: {allowed}.",
            param=f"{where}.role",
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
            elif kind == "image_url":
                image = part.get("image_url")
                _expect(image, dict, f"{p}.image_url", "an object with a 'url'")
                _expect(image.get("url"), str, f"{p}.image_url.url", "a string")
    else:
        _expect(content, str, f"{where}.content", "a string or an array of content parts")
    if role == "tool":
        _expect(message.get("tool_call_id"), str, f"{where}.tool_call_id", "a string")
    if message.get("name") is not None:
        _expect(message["name"], str, f"{where}.name", "a string")
    calls = message.get("tool_calls")
    if calls is not None:
        _expect(calls, list, f"{where}.tool_calls", "an array of tool calls")
        for j, call in enumerate(calls):
            _tool_call(f"{where}.tool_calls[{j}]", call)
    return dict(message)


def _tool_call(where: str, call: Any) -> None:
    """An assistant message's earlier tool call: ``{"id", "type", "function": {"name",
    "arguments"}}`` (``arguments``: the JSON text the model produced, a string)."""
    _expect(call, dict, where, "an object")
    _expect(call.get("id"), str, f"{where}.id", "a string")
    if call.get("type", "function") != "function":
        raise InvalidRequest(f"'{where}.type' must be 'function'.", param=f"{where}.type")
    fn = call.get("function")
    _expect(fn, dict, f"{where}.function", "an object")
    _expect(fn.get("name"), str, f"{where}.function.name", "a string")
    _expect(fn.get("arguments"), str, f"{where}.function.arguments", "a string of JSON")


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
        for key, kind, what in (("description", str, "a string"), ("strict", bool, "a boolean")):
            if fn.get(key) is not None:
                _expect(fn[key], kind, f"{where}.function.{key}", what)
        out.append(Tool(name=name, parameters=params))
    return tuple(out)


def _tool_choice(body: Json, tools: tuple[Tool, ...]) -> str:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest(
                f"'tool_choice' is {_brief(choice)}; it must be 'none', 'auto', 'required' or "
                "an object naming a function.",
                param="tool_choice",
            )
        if choice == "required" and not tools:
            raise InvalidRequest(
                "'tool_choice' is 'required' but no 'tools' were given.", param="tool_choice"
            )
        return choice
    _expect(choice, dict, "tool_choice", "a string or an object")
    if choice.get("type", "function") != "function":
        raise InvalidRequest("'tool_choice.type' must be 'function'.", param="tool_choice.type")
    fn = choice.get("function")
    _expect(fn, dict, "tool_choice.function", "an object")
    name = fn.get("name")
    _expect(name, str, "tool_choice.function.name", "a string")
    if name not in {t.name for t in tools}:
        raise InvalidRequest(
            f"'tool_choice' names function {_brief(name)}, which is not in 'tools'.",
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
    for key, kind, what in (("description", str, "a string"), ("strict", bool, "a boolean")):
        if js.get(key) is not None:
            _expect(js[key], kind, f"response_format.json_schema.{key}", what)
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
    seed = _seed(body)
    _echo(body, chat=True)
    _extra_fields(body)
    _opt(body, "logprobs", bool, "a boolean")
    _opt_int(body, "top_logprobs", minimum=0, maximum=20)
    _opt(body, "parallel_tool_calls", bool, "a boolean")
    _opt(body, "store", bool, "a boolean")
    _opt(body, "reasoning_effort", str, "a string")
    _metadata(body)
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
    _echo(body, chat=False)
    stream, include_usage = _stream(body)
    _common_sampling(body)
    max_tokens = _opt_int(body, "max_tokens", minimum=0)
    seed = _seed(body)
    _extra_fields(body)
    _opt_int(body, "logprobs", minimum=0, maximum=5)
    _opt_int(body, "best_of", minimum=1)
    _opt(body, "suffix", str, "a string")
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
