"""A grammar of hostile OpenAI requests, as hypothesis strategies.

The skeleton is the OpenAI request shape (``POST /v1/chat/completions`` and
``/v1/completions``: model, messages with every role and content as a string or parts, tools
with JSON-schema parameters, tool_choice, response_format, stop, max_tokens, seed,
temperature, stream, stream_options, n, logprobs, ...). ``hostile_cases`` draws a mostly valid
body from it, then mutates it: NaN and Infinity, lone surrogates (values and keys), huge
integers, deep nesting, cyclic and huge JSON schemas, wrong types in every field, unknown
fields, ``quorum_resume`` in the body, forged internal headers, and bodies that are not JSON at
all. Roughly a third of the cases stay valid, with and without the single-flight path
(``seed`` / ``temperature: 0``), streamed or not, so that the valid path is exercised under
the same load.

A case is plain data (``Case``): what to send and how to read the answer. Values JSON cannot
spell from Python (an integer of 5,000 digits, ``1e999``, 100,000 nested brackets) are ``Raw``
JSON text spliced in by ``encode_body``.

Sources: the field list is OpenAI's ``CreateChatCompletionRequest`` and
``CreateCompletionRequest`` (``shared/openai/openapi.json``); the schema cases are the ones
the issue "Hostile input never hurts a node" found, and their neighbours.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

__all__ = ["Case", "Raw", "encode_body", "hostile_cases"]

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass(frozen=True)
class Raw:
    """JSON text to splice in as is (``Raw("NaN")``, ``Raw("9" * 5000)``)."""

    text: str


@dataclass
class Case:
    """One hostile request.

    ``target``: node name to send to. ``method``, ``path``, ``headers`` (name, value bytes),
    ``body`` (bytes as sent). ``read``: "all" (read the whole answer), "head" (close once the
    status line arrived) or "first" (close after the first body chunk). ``twice``: send two
    identical copies at once (the single-flight path shares one generation between them).
    ``notes``: the mutations applied, for reports.
    """

    target: str
    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    read: str = "all"
    twice: bool = False
    notes: list[str] = field(default_factory=list)

    def curl(self, url: str) -> str:
        """A shell command that sends this case to ``url``: long or binary values are
        written by ``python3 -c`` with their repeated runs folded (``b"[" * 100000``)."""
        head = " ".join(f"-H {_shell_value(k + b': ' + v)}" for k, v in self.headers)
        command = f"curl -sS -X {self.method} {url}{self.path} {head}".rstrip()
        if self.method != "POST":
            return command
        if _printable(self.body) and len(self.body) <= 400:
            return f"{command} --data-binary {_quote(self.body.decode())}"
        program = f"import sys; sys.stdout.buffer.write({_folded(self.body)})"
        return f"python3 -c {_quote(program)} | {command} --data-binary @-"


def _printable(data: bytes) -> bool:
    return data.isascii() and all(32 <= b < 127 for b in data)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


_RUN = re.compile(rb"(.{1,8}?)\1{7,}", re.DOTALL)


def _folded(data: bytes) -> str:
    """A Python expression for ``data`` with runs of a repeated unit folded."""
    parts: list[str] = []
    pos = 0
    for run in _RUN.finditer(data):
        if run.start() > pos:
            parts.append(repr(data[pos : run.start()]))
        unit = run.group(1)
        parts.append(f"{unit!r} * {len(run.group(0)) // len(unit)}")
        pos = run.end()
    if pos < len(data) or not parts:
        parts.append(repr(data[pos:]))
    return " + ".join(parts)


def _shell_value(data: bytes) -> str:
    if _printable(data) and len(data) <= 200:
        return _quote(data.decode())
    program = f"import sys; sys.stdout.buffer.write({_folded(data)})"
    return f'"$(python3 -c {_quote(program)})"'


def encode_body(value: Any) -> bytes:
    """``value`` as JSON bytes, ``Raw`` parts spliced in as their text. Lone surrogates in
    strings come out as ``\\udXXX`` escapes (``ensure_ascii``), NaN and infinities as
    ``NaN`` / ``Infinity`` (``allow_nan``), as a careless client would send them."""
    raws: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value))
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw, 1)
    return text.encode()


# --- hostile values ---------------------------------------------------------------------------

HUGE_INT = Raw("9" * 5000)  # over Python's 4,300-digit int-string limit
WRONG_TYPES: tuple[Any, ...] = (None, True, False, 0, -1, 2.5, "x", "", [], {}, [1], {"a": 1})


def _nest(depth: int, kind: str) -> Raw:
    if kind == "array":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


HOSTILE_VALUES: list[Any] = [
    float("nan"),
    float("inf"),
    float("-inf"),
    Raw("1e999"),
    Raw("-1e999"),
    HUGE_INT,
    Raw("-" + "9" * 5000),
    10**30,
    -(2**63) - 1,
    2**64,
    "\ud800",
    "\udfff",
    "a\udc00b",
    "\udbff\ud800",
    "x" * 100_000,
    "\u0000\u200b\ufeff",
    *WRONG_TYPES,
    *(_nest(d, k) for d in (63, 64, 65, 200, 1000, 5000, 100_000) for k in ("array", "object")),
]


def _header_bytes(value: str) -> bytes:
    """A header value as a client's bytes: Latin-1 where it can be (one byte per character,
    what a server decoding headers as ISO-8859-1 sees as the same text), else UTF-8."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")


def _chance(percent: int) -> st.SearchStrategy[bool]:
    """True with about ``percent`` % probability. Hypothesis leans towards the first option
    of a ``sampled_from`` (its "simplest"), so that one is False: the lean goes to the
    benign side."""
    return st.sampled_from([False] * (100 - percent) + [True] * percent)


def _weighted(weights: dict[str, int]) -> st.SearchStrategy[str]:
    """One of ``weights``' keys, each about in proportion to its weight (the first key also
    takes hypothesis's lean)."""
    return st.sampled_from([key for key, weight in weights.items() for _ in range(weight)])


# --- JSON schemas -----------------------------------------------------------------------------

_leaf_schemas = st.sampled_from(
    [
        {"type": "string"},
        {"type": "integer", "minimum": 0, "maximum": 10},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "string", "enum": ["a", "b"]},
        {"type": "string", "format": "date-time"},
        {"type": ["string", "null"]},
        {"const": 3},
    ]
)

valid_schemas = st.recursive(
    _leaf_schemas,
    lambda inner: st.one_of(
        st.builds(
            lambda props, req: {
                "type": "object",
                "properties": props,
                "required": [k for k in props if req],
                "additionalProperties": False,
            },
            st.dictionaries(st.sampled_from(["a", "b", "c", "city", "n"]), inner, max_size=4),
            st.booleans(),
        ),
        st.builds(lambda items: {"type": "array", "items": items, "maxItems": 4}, inner),
        st.builds(lambda opts: {"anyOf": opts}, st.lists(inner, min_size=1, max_size=3)),
    ),
    max_leaves=8,
)

CYCLIC_SCHEMAS: list[dict[str, Any]] = [
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"allOf": [{"$ref": "#"}]},
    {"type": "object", "allOf": [{"$ref": "#"}], "properties": {"a": {"type": "string"}}},
    {
        "$defs": {"x": {"allOf": [{"$ref": "#/$defs/y"}]}, "y": {"allOf": [{"$ref": "#/$defs/x"}]}},
        "allOf": [{"$ref": "#/$defs/x"}],
    },
    {"anyOf": [{"$ref": "#"}], "oneOf": [{"$ref": "#"}]},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
]

HUGE_SCHEMAS: list[dict[str, Any]] = [
    {"type": "array", "minItems": 300_000},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 2},
    {
        "type": "object",
        "properties": {f"p{i}": {"$ref": "#"} for i in range(40)},
        "required": [f"p{i}" for i in range(40)],
    },
    {"type": "string", "minLength": 10_000_000},
    {"type": "object", "minProperties": 1_000_000},
    {"type": "array", "maxItems": 10**30, "minItems": 10**12},
    {"type": "array", "uniqueItems": True, "items": {"enum": [1]}, "minItems": 50},
    {"type": "integer", "minimum": 10**300, "maximum": 10**300 + 5},
    {"type": "number", "multipleOf": 1e-300, "minimum": 0, "maximum": 1e300},
    {"type": "number", "minimum": 1e308, "maximum": -1e308},
    {"type": "integer", "minimum": 5, "maximum": 1, "multipleOf": 7},
]

ODD_SCHEMAS: list[Any] = [
    {"enum": []},
    {"type": []},
    {"type": "bogus"},
    {"properties": []},
    {"required": "x"},
    {"items": 5},
    {"$ref": 5},
    {"$ref": "#/nope/~2"},
    {"$ref": "http://127.0.0.1:1/schema.json"},
    {"prefixItems": {"a": 1}},
    {"multipleOf": 0, "type": "integer"},
    {"multipleOf": -1, "type": "number"},
    {"minItems": -5, "type": "array"},
    {"minLength": "long", "type": "string"},
    {"type": "string", "format": "uuid", "maxLength": -1},
    {"type": "object", "additionalProperties": {"$ref": "#"}, "minProperties": 3},
    True,
    False,
    [],
    "schema",
]

# Picked by kind first (cyclic ones most: they are what a naive generator recurses on).
HOSTILE_SCHEMAS: dict[str, list[Any]] = {
    "cyclic": CYCLIC_SCHEMAS,
    "huge": HUGE_SCHEMAS,
    "odd": ODD_SCHEMAS,
}
SCHEMA_KIND_WEIGHTS = {"cyclic": 45, "huge": 30, "odd": 25}

# --- the request skeleton -------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=40)
_names = st.sampled_from(["get_weather", "lookup", "f", "g_2"])


@st.composite
def _message(draw: st.DrawFn) -> dict[str, Any]:
    role = draw(st.sampled_from(ROLES))
    msg: dict[str, Any] = {"role": role}
    if draw(st.booleans()):
        msg["content"] = draw(_text)
    else:
        parts = draw(
            st.lists(
                st.one_of(
                    st.builds(lambda t: {"type": "text", "text": t}, _text),
                    st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}),
                ),
                max_size=3,
            )
        )
        msg["content"] = parts
    if role == "assistant" and draw(st.booleans()):
        msg["tool_calls"] = [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": draw(_names), "arguments": '{"a": 1}'},
            }
        ]
        if draw(st.booleans()):
            msg["content"] = None
    if role == "tool":
        msg["tool_call_id"] = "call_1"
    if role == "function":
        msg["name"] = draw(_names)
    elif draw(_chance(20)):
        msg["name"] = draw(_names)
    return msg


@st.composite
def chat_bodies(draw: st.DrawFn, models: tuple[str, ...]) -> dict[str, Any]:
    """A valid-looking chat body (a few fields may be out of range)."""
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(models)),
        "messages": draw(st.lists(_message(), min_size=1, max_size=4)),
    }
    if draw(_chance(33)):
        tools = [
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": "a tool",
                    "parameters": draw(
                        st.builds(
                            lambda props: {"type": "object", "properties": props},
                            st.dictionaries(
                                st.sampled_from(["a", "b", "q"]), valid_schemas, max_size=3
                            ),
                        )
                    ),
                },
            }
            for name in draw(st.lists(_names, min_size=1, max_size=3, unique=True))
        ]
        body["tools"] = tools
        body["tool_choice"] = draw(
            st.sampled_from(
                [
                    "none",
                    "auto",
                    "required",
                    {"type": "function", "function": {"name": tools[0]["function"]["name"]}},
                ]
            )
        )
        if draw(st.booleans()):
            body["parallel_tool_calls"] = draw(st.booleans())
    elif draw(_chance(33)):
        body["response_format"] = draw(
            st.one_of(
                st.just({"type": "text"}),
                st.just({"type": "json_object"}),
                st.builds(
                    lambda s, strict: {
                        "type": "json_schema",
                        "json_schema": {"name": "out", "schema": s, "strict": strict},
                    },
                    st.one_of(valid_schemas, valid_schemas.map(lambda s: {"$defs": {}, **s})),
                    st.booleans(),
                ),
            )
        )
    optional: dict[str, Any] = {
        "stop": st.one_of(_text, st.lists(_text, max_size=4)),
        "max_tokens": st.integers(1, 64),
        "max_completion_tokens": st.integers(1, 64),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "n": st.just(1),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 20),
        "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2),
        "user": _text,
        "logit_bias": st.dictionaries(st.sampled_from(["1", "50256"]), st.integers(-100, 100)),
        "reasoning_effort": st.sampled_from(["low", "medium", "high"]),
        "store": st.booleans(),
        "metadata": st.dictionaries(st.sampled_from(["k", "trace"]), _text, max_size=2),
    }
    for key, strategy in optional.items():
        if draw(_chance(16)):
            body[key] = draw(strategy)
    return body


@st.composite
def completion_bodies(draw: st.DrawFn, models: tuple[str, ...]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": draw(st.sampled_from(models)),
        "prompt": draw(
            st.one_of(
                _text,
                st.lists(_text, min_size=1, max_size=2),
                st.lists(st.integers(0, 50000), max_size=6),
                st.lists(st.lists(st.integers(0, 50000), max_size=4), min_size=1, max_size=2),
            )
        ),
    }
    optional: dict[str, Any] = {
        "max_tokens": st.integers(0, 64),
        "stop": st.one_of(_text, st.lists(_text, max_size=4)),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "n": st.just(1),
        "best_of": st.just(1),
        "logprobs": st.integers(0, 5),
        "echo": st.just(False),
        "suffix": _text,
        "user": _text,
        "presence_penalty": st.floats(-2, 2),
    }
    for key, strategy in optional.items():
        if draw(_chance(16)):
            body[key] = draw(strategy)
    return body


# --- mutations ------------------------------------------------------------------------------

CHAT_PATHS = (
    "model",
    "messages",
    "messages.0",
    "messages.0.role",
    "messages.0.content",
    "messages.0.content.0",
    "messages.0.content.0.text",
    "messages.0.content.0.type",
    "messages.0.name",
    "messages.0.tool_calls",
    "messages.0.tool_calls.0",
    "messages.0.tool_calls.0.function",
    "messages.0.tool_calls.0.function.arguments",
    "messages.0.tool_call_id",
    "tools",
    "tools.0",
    "tools.0.type",
    "tools.0.function",
    "tools.0.function.name",
    "tools.0.function.parameters",
    "tools.0.function.description",
    "tools.0.function.strict",
    "tool_choice",
    "tool_choice.function",
    "tool_choice.function.name",
    "response_format",
    "response_format.type",
    "response_format.json_schema",
    "response_format.json_schema.name",
    "response_format.json_schema.schema",
    "response_format.json_schema.strict",
    "stop",
    "stop.0",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logit_bias.1",
    "user",
    "stream",
    "stream_options",
    "stream_options.include_usage",
    "parallel_tool_calls",
    "echo",
    "functions",
    "function_call",
    "metadata",
    "store",
    "reasoning_effort",
    "quorum_resume",
    "quorum_resume.events",
    "quorum_resume.text",
)
COMPLETION_PATHS = (
    "model",
    "prompt",
    "prompt.0",
    "max_tokens",
    "stop",
    "stop.0",
    "seed",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "best_of",
    "logprobs",
    "echo",
    "suffix",
    "user",
    "stream",
    "stream_options",
    "stream_options.include_usage",
    "presence_penalty",
    "logit_bias",
    "quorum_resume",
)


def set_path(body: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at a dotted ``path`` (numbers index lists), creating what is missing."""
    keys = path.split(".")
    node: Any = body
    for key, nxt in itertools.pairwise(keys):
        if not isinstance(node, dict | list):
            return  # a scalar or raw JSON text stands where the path goes on: nothing to set
        if isinstance(node, list):
            if not node:
                node.append({} if not nxt.isdigit() else [])
            node = node[0]
            continue
        child = node.get(key)
        if not isinstance(child, dict | list):
            child = [] if nxt.isdigit() else {}
            node[key] = child
        node = child
    last = keys[-1]
    if isinstance(node, list):
        if node:
            node[0] = value
        else:
            node.append(value)
    elif isinstance(node, dict):
        node[last] = value


BAD_BODIES: list[bytes] = [
    b"",
    b"null",
    b"[]",
    b'"model"',
    b"12",
    b"{",
    b'{"model": "mock-chat", "messages": [',
    b"\xff\xfe\x00{",
    b'{"model": "\xc3\x28"}',
    b'{"model": "mock-chat", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
    b"\xef\xbb\xbf" + b'{"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}',
    '{"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]}'.encode("utf-16"),
    b"[" * 100_000,
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000,
    b'{"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "seed": '
    + b"1" * 5000
    + b"}",
    b'{"model": "mock-chat", "model": 5, "messages": []}',
    b'{"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}]} trailing',
    b'{"\\ud800": 1, "model": "mock-chat", "messages": [{"role": "user", "content": "x"}]}',
]

# ``quorum_resume`` is for nodes only: a client's must be refused, whatever it holds.
RESUMES: list[Any] = [
    {"events": 2, "text": {"content": "Hello"}},
    {"events": 10**9, "text": {}},
    {"events": -1},
    {"events": 1, "text": {"content": 5}},
    "resume",
]

INTERNAL_HEADERS: dict[str, list[str]] = {
    "x-quorum-forwarded": ["hostile-a", "hostile-b", "evil", ""],
    "x-quorum-pin": ["hostile-a", "hostile-b", "nobody", ""],
    "x-quorum-fault": [
        "fail_after=2",
        "stall_after=1",
        "status=500",
        "status=429",
        "status=404",
        "status=99999",
        "fail_after=" + "9" * 5000,
        "bogus",
        "fail_after=-1",
        "status=0",
    ],
    "x-quorum-created": ["9" * 5000, "\u00b2", "-5", "abc", "1700000000", "0" * 100, "9" * 30],
    "x-request-id": [
        "\u00e9" * 8,
        "a" * 8,
        "x" * 64,
        "x" * 65,
        "ab",
        "ok-id_123",
        "\u00fcn\u00efc\u00f6d\u00e9-request",
        "\u00b2" * 10,
        "\u015d" * 12,
        "\u0663" * 10,
    ],
    "x-quorum-single-flight": ["off", "on", "0"],
    "content-type": ["text/plain", "application/json; charset=utf-16"],
    "authorization": ["Bearer junk", "Bearer " + "k" * 5000],
}


# Where a hostile value does most harm: what reaches the mock's digest, the hop, the
# upstream encoder and the metrics labels.
HOT_PATHS = {
    "chat": (
        "model",
        "messages.0.content",
        "messages.0.content.0.text",
        "messages.0.name",
        "stop.0",
        "seed",
        "temperature",
        "top_k",
        "max_tokens",
        "tools.0.function.parameters",
        "response_format.json_schema.schema",
        "logit_bias.1",
    ),
    "completion": ("model", "prompt", "prompt.0", "stop.0", "seed", "temperature", "top_k"),
}

# How many mutations a case gets (0: a valid request), and how often each kind is picked.
MUTATION_COUNTS = (1, 0, 0, 0, 1, 1, 1, 1, 2, 3)
OPERATIONS = {
    "schema": 30,
    "value": 30,
    "unknown": 8,
    "delete": 6,
    "key": 6,
    "resume": 8,
    "bytes": 6,
    "odd-request": 6,
}
HEADER_PERCENT = 6  # each internal header is forged in this share of cases

C1_PERCENT = 15  # chat cases sent to /c1/chat instead (the shipped nodes keep conversations)
# malformed x-conversation-id values (a well-formed one naming a target is drawn as well)
CONVERSATION_IDS = (
    "",
    "conv_",
    "conv_short.bm9kZS1h",
    f"conv_{'A' * 24}.%%%",
    f"conv_{'A' * 24}.{'x' * 300}",
    "../../etc/passwd",
    "\u00e9t\u00e9",
    "conv_" + "A" * 24 + ".bm9kZS1h; x-quorum-forwarded=node-a",
)


@st.composite
def hostile_cases(draw: st.DrawFn, models: tuple[str, ...], targets: tuple[str, ...]) -> Case:
    """One case: a request body from the skeleton, 0-3 mutations, forged headers, flags.

    Every choice is a hypothesis draw; where a choice is weighted, hypothesis's lean towards
    a strategy's first option is put on the benign side (see ``_chance``).
    """
    kind = draw(st.sampled_from(["chat", "completion"]))
    model_names = (
        *models,
        *models,
        *models,
        draw(st.sampled_from(["no-such-model", "", "m" * 300])),
    )
    body = draw(chat_bodies(model_names) if kind == "chat" else completion_bodies(model_names))
    notes: list[str] = []
    mode = draw(st.sampled_from(["seed", "none", "temperature0", "both"]))
    if mode in ("seed", "both"):
        body["seed"] = draw(st.integers(-(2**63), 2**63 - 1))
    if mode in ("temperature0", "both"):
        body["temperature"] = 0
    notes.append(f"deterministic={mode}")
    stream = draw(st.booleans())
    body["stream"] = stream
    if stream and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    paths = CHAT_PATHS if kind == "chat" else COMPLETION_PATHS
    raw_body: bytes | None = None
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    c1 = kind == "chat" and draw(_chance(C1_PERCENT))
    if c1:
        path = "/c1/chat"
        notes.append("c1")
    method = "POST"
    for _ in range(draw(st.sampled_from(MUTATION_COUNTS))):
        op = draw(_weighted(OPERATIONS))
        if op == "value":
            at = draw(st.sampled_from(HOT_PATHS[kind] if draw(st.booleans()) else paths))
            set_path(body, at, copy.deepcopy(draw(st.sampled_from(HOSTILE_VALUES))))
            notes.append(f"value@{at}")
        elif op == "schema" and kind == "chat":
            family = draw(_weighted(SCHEMA_KIND_WEIGHTS))
            schema = copy.deepcopy(draw(st.sampled_from(HOSTILE_SCHEMAS[family])))
            if draw(st.booleans()):
                tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
                body["tools"] = [tool]
                body["tool_choice"] = draw(st.sampled_from(["required", "auto"]))
                body.pop("response_format", None)
                notes.append("schema@tools")
            else:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "out", "schema": schema},
                }
                body.pop("tools", None)
                body.pop("tool_choice", None)
                notes.append("schema@response_format")
        elif op == "unknown":
            key = draw(st.sampled_from(["x_extra", "guided_json", "\u00e9t\u00e9", "__proto__"]))
            body[key] = copy.deepcopy(draw(st.sampled_from(["fine", *HOSTILE_VALUES])))
            notes.append(f"unknown:{key}")
        elif op == "delete" and body:
            key = draw(st.sampled_from(sorted(body)))
            del body[key]
            notes.append(f"delete:{key}")
        elif op == "key":
            body[draw(st.sampled_from(["\ud800", "a\udfffb", "\udbff"]))] = 1
            notes.append("surrogate-key")
        elif op == "resume":
            body["quorum_resume"] = copy.deepcopy(draw(st.sampled_from(RESUMES)))
            notes.append("quorum_resume")
        elif op == "bytes":
            raw_body = draw(st.sampled_from(BAD_BODIES))
            notes.append("bad-bytes")
        elif op == "odd-request":
            if draw(_chance(70)):
                path = "/v1/completions" if kind == "chat" else "/v1/chat/completions"
                notes.append("wrong-endpoint")
            else:
                method = "GET"
                notes.append("GET")
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
    for name, values in INTERNAL_HEADERS.items():
        if draw(_chance(HEADER_PERCENT)):
            value = draw(st.sampled_from(values))
            headers = [h for h in headers if h[0] != name.encode()]
            headers.append((name.encode(), _header_bytes(value)))
            notes.append(f"header:{name}")
    if c1 and draw(st.booleans()):
        if draw(st.booleans()):  # well formed, kept by that node, and unknown there: 404
            owner = draw(st.sampled_from(targets)).encode()
            value = f"conv_{'A' * 24}." + base64.urlsafe_b64encode(owner).rstrip(b"=").decode()
        else:
            value = draw(st.sampled_from(CONVERSATION_IDS))
        headers.append((b"x-conversation-id", _header_bytes(value)))
        notes.append("header:x-conversation-id")
    return Case(
        target=draw(st.sampled_from(targets)),
        method=method,
        path=path,
        headers=headers,
        body=raw_body if raw_body is not None else encode_body(body),
        read=draw(st.sampled_from(["all"] * 8 + ["head", "first"])),
        twice=draw(_chance(10)),
        notes=notes,
    )
