"""The entry node's per-event bookkeeping reads with msgspec what it read with ``json.loads``.

``StreamRelay._account`` and ``kind`` once parsed every event with ``json.loads`` and looked
at dicts; they now decode it into ``Chunk`` structs, falling back to ``json.loads`` for
anything msgspec refuses. The old functions are kept here, verbatim but for their names, as
the reference: for generated chunks, well formed and hostile, both must give the same kind,
the same result, the same state (events, text per delta field, tool-call deltas, tokens,
[DONE]) and the same exception.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from quorum.routing.relay import StreamRelay, kind, usage_tokens
from quorum.sse import SSEProtocolError

# --- the reference: relay.py's reading before msgspec ------------------------------------------


def old_decode(data: str | bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError:
        raise SSEProtocolError("an event is not JSON") from None
    if not isinstance(obj, dict):
        raise SSEProtocolError(f"an event is JSON {type(obj).__name__}, not an object")
    return obj


def old_choices(obj: dict[str, Any]) -> list[dict[str, Any]]:
    choices = obj.get("choices")
    if choices is None:
        return []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise SSEProtocolError("an event's choices are not a list of objects")
    return choices


def old_kind(data: str | bytes) -> str:
    if data == "[DONE]" or data == b"[DONE]":
        return "token"
    obj = old_decode(data)
    if "error" in obj:
        return "error"
    if obj.get("usage"):
        return "token"
    for choice in old_choices(obj):
        if choice.get("finish_reason") or choice.get("text"):
            return "token"
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise SSEProtocolError("an event's delta is not an object")
        if any(k != "role" and v for k, v in delta.items()):
            return "token"
    return "role"


class OldBookkeeping:
    """``StreamRelay._account`` before msgspec, with the state it kept."""

    def __init__(self, hide_usage: bool) -> None:
        self.job = SimpleNamespace(hide_usage=hide_usage)
        self.done = False
        self.events_sent = 0
        self.text: dict[str, list[str]] = {}
        self.tool_calls = 0
        self.tokens: int | None = None

    def _account(self, raw: bytes, data: str | bytes) -> bool | None:
        if data == "[DONE]" or data == b"[DONE]":
            self.done = True
            return True
        obj = old_decode(data)
        if "error" in obj:
            return False
        if obj.get("usage") is not None:
            self.tokens = usage_tokens(obj["usage"])
            if self.job.hide_usage and not old_choices(obj):
                return None
        self.events_sent += 1
        for choice in old_choices(obj):
            delta = choice.get("delta")
            if delta is None:
                text = choice.get("text")
                if isinstance(text, str) and text:
                    self.text.setdefault("text", []).append(text)
                continue
            if not isinstance(delta, dict):
                raise SSEProtocolError("an event's delta is not an object")
            for key, value in delta.items():
                if key != "role" and isinstance(value, str) and value:
                    self.text.setdefault(key, []).append(value)
            if delta.get("tool_calls"):
                self.tool_calls += 1
        return True


# --- comparing ---------------------------------------------------------------------------------


def new_bookkeeping(hide_usage: bool) -> StreamRelay:
    """A ``StreamRelay`` with only what ``_account`` reads and writes."""
    relay = StreamRelay.__new__(StreamRelay)
    relay.job = SimpleNamespace(hide_usage=hide_usage)  # type: ignore[assignment]
    relay.done, relay.events_sent, relay.tool_calls, relay.tokens = False, 0, 0, None
    relay.text = {}
    return relay


def outcome(call: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "returned", call(*args)
    except Exception as exc:
        return type(exc).__name__, str(exc)


def state(keeper: Any) -> tuple[Any, ...]:
    return keeper.done, keeper.events_sent, keeper.text, keeper.tool_calls, keeper.tokens


def assert_same_reading(events: list[str | bytes]) -> None:
    """``kind`` of each event, and a stream of them accounted with and without hide_usage,
    the same as the reference after every event."""
    for data in events:
        assert outcome(kind, data) == outcome(old_kind, data), data
    for hide_usage in (False, True):
        old, new = OldBookkeeping(hide_usage), new_bookkeeping(hide_usage)
        for data in events:
            assert outcome(new._account, b"", data) == outcome(old._account, b"", data), data
            assert state(new) == state(old), data


# --- generating events -------------------------------------------------------------------------
# JSON is written here by hand, so that objects can repeat a key, keys can be \u-escaped, and
# numbers can be literals json.dumps never writes (1e400, -0, 1E+2). An object is a list of
# (key, value) pairs; a literal is a Raw.


class Raw(str):
    """A JSON text written as is."""


class Obj(list[tuple[str, Any]]):
    """A JSON object as its pairs, in order, repeats allowed."""


class Escaped(str):
    """A key to write with its first letter \\u-escaped."""


def dump(value: Any, ascii_only: bool) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        pairs = (dump_key(k, ascii_only) + ":" + dump(v, ascii_only) for k, v in value)
        return "{" + ",".join(pairs) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)  # str, int, float (NaN too), bool, None


def dump_key(key: str, ascii_only: bool) -> str:
    if isinstance(key, Escaped):
        return f'"\\u{ord(key[0]):04x}' + json.dumps(key[1:], ensure_ascii=ascii_only)[1:]
    return json.dumps(key, ensure_ascii=ascii_only)


def mostly(
    usual: st.SearchStrategy[Any], unusual: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """``usual`` nine times in ten, else ``unusual``."""
    return st.integers(0, 9).flatmap(lambda n: usual if n else unusual)


texts = mostly(
    st.text(max_size=12),
    st.sampled_from(
        ["", " the", " naïve 日本語 🙂", "\\", '"', "\n\t\x00", "\ud800", "\udfff x", "\u2028"]
    ),
)
numbers = mostly(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(
            [
                Raw(n)
                for n in ("1e400", "-1e400", "-0", "0.0", "1E+2", "1e-400", "9" * 400, "9" * 5000)
            ]
        ),
    ),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(st.tuples(texts, inner), max_size=3).map(Obj),
    ),
    max_leaves=8,
)


def or_junk(usual: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return mostly(usual, junk)


@st.composite
def objects(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]]) -> Obj:
    """An object with some of ``fields`` (each key sometimes \\u-escaped, sometimes given
    twice), maybe other keys with junk, in any order."""
    pairs: list[tuple[str, Any]] = []
    for key, values in fields.items():
        if draw(st.integers(0, 3)):  # three times in four
            name = Escaped(key) if draw(st.integers(0, 15)) == 0 else key
            pairs.append((name, draw(values)))
            if draw(st.integers(0, 15)) == 0:
                pairs.append((key, draw(st.one_of(values, junk))))
    pairs += draw(st.lists(st.tuples(texts, junk), max_size=2))
    return Obj(draw(st.permutations(pairs)))


function = objects({"name": texts, "arguments": texts})
tool_call = objects({"index": numbers, "id": texts, "type": texts, "function": or_junk(function)})
delta = objects(
    {
        "role": or_junk(st.sampled_from(["assistant", ""])),
        "content": or_junk(texts),
        "reasoning_content": or_junk(texts),
        "reasoning": or_junk(texts),
        "refusal": or_junk(st.none()),
        "tool_calls": or_junk(st.lists(or_junk(tool_call), max_size=2)),
    }
)
choice = objects(
    {
        "index": numbers,
        "delta": st.one_of(or_junk(delta), st.none()),
        "text": or_junk(texts),
        "finish_reason": or_junk(st.sampled_from([None, "stop", "length", "tool_calls", ""])),
        "logprobs": or_junk(st.none()),
    }
)
usage = objects({"prompt_tokens": numbers, "completion_tokens": numbers, "total_tokens": numbers})
chunk_fields = {
    "id": texts,
    "object": texts,
    "created": numbers,
    "model": texts,
    "choices": or_junk(st.lists(or_junk(choice), max_size=3)),
    "usage": st.one_of(st.none(), or_junk(usage)),
}
chunks = mostly(objects(chunk_fields), objects(chunk_fields | {"error": junk}))


@st.composite
def events(draw: st.DrawFn) -> str | bytes:
    """One event's data: a JSON text as a str (from a peer) or bytes (from a local backend),
    sometimes cut short, given a stray byte, a BOM, or another encoding."""
    text = dump(draw(st.one_of(chunks, chunks, junk)), ascii_only=draw(st.booleans()))
    text = " " * draw(st.integers(0, 1)) + text
    if draw(st.booleans()):
        return text
    data = text.encode("utf-8", "surrogatepass")
    change = draw(st.sampled_from(["none"] * 6 + ["cut", "byte", "bom", "utf-16"]))
    if change == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif change == "byte":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at:]
    elif change == "bom":
        data = b"\xef\xbb\xbf" + data
    elif change == "utf-16":
        data = text.encode("utf-16-le", "surrogatepass")
    return data


# --- the tests -----------------------------------------------------------------------------------

MOCK_STREAM = [
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":"f",'
    b'"choices":[{"index":0,"delta":' + delta + b',"logprobs":null,"finish_reason":' + fr + b"}]}"
    for delta, fr in [
        (b'{"role":"assistant","content":""}', b"null"),
        (b'{"reasoning_content":" hm"}', b"null"),
        (b'{"content":" caf\xc3\xa9 \\"x\\""}', b"null"),
        (b'{"tool_calls":[{"index":0,"function":{"arguments":"{\\"a"}}]}', b"null"),
        (b"{}", b'"stop"'),
    ]
] + [
    b'{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}',
    b"[DONE]",
]


def test_a_mock_stream_is_read_as_before_from_bytes_and_from_str() -> None:
    assert_same_reading(MOCK_STREAM)
    assert_same_reading([e.decode() for e in MOCK_STREAM])
    relay = new_bookkeeping(hide_usage=True)
    assert [relay._account(b"", e) for e in MOCK_STREAM] == [True] * 5 + [None, True]
    assert relay.resume_point().as_json() == {
        "events": 5,
        "tool_calls": 1,
        "text": {"content": ' café "x"', "reasoning_content": " hm"},
    }
    assert (relay.tokens, relay.done) == (8, True)
    assert [kind(e) for e in MOCK_STREAM] == ["role"] + ["token"] * 6


@pytest.mark.parametrize(
    "data",
    [
        # msgspec refuses, json.loads reads: the slow path must read them as before
        '{"id":"\\ud800","choices":[{"delta":{"content":"a\\udfff"}}]}',
        b'{"id":"\xed\xa0\x80","choices":[{"delta":{"content":"a"}}]}',  # an encoded surrogate
        b'\xef\xbb\xbf{"choices":[{"delta":{"content":"a"}}]}',
        '{"choices":[{"delta":{"content":"a"}}]}'.encode("utf-16-le"),
        '{"choices":[{"delta":{"content":"a"}}]}'.encode("utf-32"),
        '{"created":NaN,"choices":[{"delta":{"content":"a"}}]}',
        '{"usage":{"total_tokens":1e400},"choices":[]}',
        '{"usage":{"total_tokens":' + "9" * 400 + "}}",
        # json.loads refuses where msgspec would skip: not UTF-8 in a field nobody reads
        b'{"id":"\xff","choices":[]}',
        b'{"id":"\xc0\x80","choices":[]}',
        b'{"model":"\xf4\x90\x80\x80"}',
        '{"usage":{"total_tokens":' + "9" * 5000 + "}}",
        '{"id":' + "9" * 5000 + ',"choices":[{"delta":{"content":"a"}}]}',  # a field it skips
        '{"id":' + "9" * 4300 + ',"choices":[]}',
        # keys spelled with escapes, and repeated (the last one counts)
        '{"ch\\u006fices":5}',
        '{"\\u0065rror":null}',
        '{"choices":5,"choices":[{"text":"t"}]}',
        '{"choices":[{"text":"t"}],"choices":5}',
        '{"choices":[{"delta":{"content":"a","content":"b"}}]}',
        # the order in which each reader looks: an error event, a usage chunk, falsy deltas
        '{"error":{"message":"x"},"choices":5}',
        '{"usage":{"total_tokens":3},"choices":5}',
        '{"usage":{},"choices":5}',
        '{"choices":[{"delta":0}]}',
        '{"choices":[{"delta":[]}]}',
        '{"choices":[{"finish_reason":"stop","delta":3}]}',
        '{"choices":[{"delta":{"content":"a"}},{"delta":3}]}',
        '{"choices":[{"delta":{"tool_calls":[]}}]}',
        '{"choices":[{"text":5}]}',
        '{"usage":{"prompt_tokens":true,"completion_tokens":1}}',
        # not a chunk object at all
        "[1, 2]",
        '"text"',
        "5",
        "null",
        "",
        "{",
        '{"choices":[{"delta":{"content":"a"}}]} x',
        "\x00{}",
    ],
)
def test_an_unusual_event_is_read_as_before(data: str | bytes) -> None:
    assert_same_reading([data])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(events(), min_size=1, max_size=6))
@example([b'{"choices":[{"delta":{"content":"x"}}]}', b"[DONE]"])
def test_generated_events_are_read_as_before(stream: list[str | bytes]) -> None:
    assert_same_reading(stream)


@pytest.mark.parametrize("where", ["id", "usage", "choices"])
@pytest.mark.parametrize("depth", [2000, 5000])  # shorter, and longer, than the fast path reads
def test_an_event_nested_too_deep_breaks_the_stream(where: str, depth: int) -> None:
    data = '{"' + where + '":' + "[" * depth + "]" * depth + "}"
    with pytest.raises(SSEProtocolError, match="too deep"):
        kind(data)
    with pytest.raises(SSEProtocolError, match="too deep"):
        new_bookkeeping(hide_usage=False)._account(b"", data.encode())
