"""The in-process mock backend: deterministic text, reasoning, tool calls and JSON, on a clock.

Tests, scenarios and benchmarks run on it, so it behaves like a real server where it matters:

- **Deterministic.** The output is a function of the model name, the messages (or prompt),
  the tools, ``response_format`` and ``seed`` (absent = 0): a canonical JSON of those, hashed
  with SHA-256, seeds a private ``random.Random``. Every node, every run, gives the same token
  sequence, so a stream resumed on another node continues exactly. ``max_tokens`` and ``stop``
  only cut that sequence; they never change it.
- **Planned, then streamed.** ``MockBackend.plan`` decides every token piece up front
  (reasoning, then content or tool-call argument fragments), applies ``stop`` and
  ``max_tokens``, and the stream only encodes and paces the pieces: per token, one encoder call
  and one sleep.
- **Timed.** The role chunk goes out as soon as a slot is acquired, the first token
  ``ttft_ms`` later, then one token every ``itl_ms``. Deadlines are absolute (measured from the
  slot's acquisition), like a server that keeps generating while its client reads slowly.
- **Bounded.** ``slots`` generations run at once, up to ``queue`` more wait in FIFO order,
  beyond that ``open()`` raises ``BackendSaturated``.
- **Faulty on demand.** ``Fault(status=...)`` refuses before any byte, ``fail_after=N`` breaks
  the stream after N tokens, ``stall_after=N`` stops emitting and holds the slot.

Usage::

    backend = MockBackend("mock-r1", reasoning_field="reasoning_content", ttft_ms=80)
    async with backend.open(generation) as events:
        async for event in events:          # bytes: one SSE event each, ending with DONE
            ...
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeGuard, TypeVar

import trio

from quorum.backends.base import Backend, BackendLoad, BackendState, Fault, Generation
from quorum.errors import BackendBroken, BackendSaturated, BackendUnavailable
from quorum.sse import DONE
from quorum.wire import (
    ChatChunkEncoder,
    ChatRequest,
    CompletionChunkEncoder,
    CompletionRequest,
    Request,
    Tool,
)

__all__ = ["MockBackend", "MockPlan", "count_prompt_tokens", "generate_json"]


# --- vocabulary ---------------------------------------------------------------------------

WORDS: Final = tuple(
    """
    the a model answer cluster node request token stream reply system question data result
    value simple clear quick careful small large first second next last every some many few
    each and or but so because while when then if also still just is are was will can should
    might does has makes takes gives runs sends reads keeps finds shows needs uses builds
    checks moves holds starts stops returns follows explains means to of in on for with from
    by at over under through between after before about into across this that these those it
    we you they one two three more most less other same new old good better fast slow steady
    quiet bright plain river mountain garden window morning evening light road city story
    idea reason step path part way time place point case number list table letter word line
    page book note plan problem solution example detail summary method pattern signal
    balance change choice effect level measure order record source probably clearly simply
    really often usually almost exactly together already again here there now today perhaps
    indeed
    """.split()
)

# The pieces themselves, built once and shared by every plan: [capitalized][leading space].
_WORD_PIECES: Final = tuple(
    tuple(
        tuple((" " if space else "") + (w.capitalize() if cap else w) for w in WORDS)
        for space in (False, True)
    )
    for cap in (False, True)
)
_SENTENCE_WORDS: Final = (6, 16)
_PROMPT_TOKEN = re.compile(r"\w+|[^\w\s]")
_PER_MESSAGE_TOKENS: Final = 3
_FRAGMENT_CHARS: Final = (2, 5)
_STANDARD_DELTA_FIELDS: Final = frozenset(
    {"role", "content", "refusal", "tool_calls", "function_call"}
)


def _canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    ).encode()


def _rng(digest: bytes, label: bytes) -> random.Random:
    """A private generator for one part of the output (reasoning, answer), from the digest."""
    return random.Random(int.from_bytes(hashlib.sha256(digest + label).digest()))


def _text_pieces(rng: random.Random, n: int, *, leading_space: bool) -> list[str]:
    """``n`` token pieces of English-ish text: ``" word"``, ``","``, ``"."``; capitalized
    sentences of 6-16 words, ending with a full stop when ``n`` allows."""
    pieces: list[str] = []
    randrange, randint, rand = rng.randrange, rng.randint, rng.random
    n_words = len(WORDS)
    capital = True
    space = leading_space
    sentence_left = randint(*_SENTENCE_WORDS)
    since_comma = 0
    while len(pieces) < n:
        remaining = n - len(pieces)
        if pieces and (sentence_left <= 0 or remaining == 1) and pieces[-1] not in ".,":
            pieces.append(".")
            capital = True
            sentence_left = randint(*_SENTENCE_WORDS)
            since_comma = 0
            continue
        if since_comma >= 4 and sentence_left > 2 and remaining > 2 and rand() < 0.15:
            pieces.append(",")
            since_comma = 0
            continue
        pieces.append(_WORD_PIECES[capital][space][randrange(n_words)])
        capital = False
        space = True
        sentence_left -= 1
        since_comma += 1
    return pieces


def _fragments(rng: random.Random, text: str) -> list[str]:
    """Split ``text`` into fragments of 2-5 characters (one token each)."""
    out: list[str] = []
    i, n = 0, len(text)
    lo, hi = _FRAGMENT_CHARS
    while i < n:
        step = rng.randint(lo, hi)
        out.append(text[i : i + step])
        i += step
    return out


# --- JSON values for a schema -------------------------------------------------------------

_N = TypeVar("_N", int, float)
_MAX_DEPTH: Final = 24
_SHALLOW: Final = 4  # below this depth, optional parts are left out to keep values small


def generate_json(schema: Mapping[str, Any] | bool, rng: random.Random) -> Any:
    """A JSON value (Python ``dict``/``list``/``str``/``int``/``float``/``bool``/``None``)
    valid for the JSON Schema ``schema``, drawn from ``rng`` (deterministic for a seeded one).

    Understands ``type`` (a name or a list), ``properties``/``required``/
    ``additionalProperties``/``minProperties``, ``items``/``prefixItems``/``minItems``/
    ``maxItems``/``uniqueItems``, ``minLength``/``maxLength``/``format`` (date, date-time,
    time, email, uri, uuid), ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``/
    ``multipleOf``, ``enum``, ``const``, ``anyOf``/``oneOf``/``allOf`` and local ``$ref``
    (``#/$defs/...``). Other keywords (``pattern``, ``not``, ``if``) are ignored, so a
    schema relying on them may get a value that does not validate. A schema with no type keyword
    at all gives a short string.
    """
    return _JsonGenerator(rng, schema).value(schema, 0)


class _JsonGenerator:
    __slots__ = ("_rng", "_root")

    def __init__(self, rng: random.Random, root: Mapping[str, Any] | bool) -> None:
        self._rng = rng
        self._root = root

    def value(self, schema: Mapping[str, Any] | bool, depth: int) -> Any:
        if schema is True or schema is False or not isinstance(schema, Mapping):
            return self._word() if schema is not False else None
        if depth > _MAX_DEPTH:
            return None
        if "$ref" in schema:
            target = self._resolve(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            merged = _merge(target, rest) if rest else target
            return self.value(merged, depth + 1)
        if "const" in schema:
            return _copy(schema["const"])
        if schema.get("enum"):
            return _copy(self._rng.choice(list(schema["enum"])))
        if "allOf" in schema:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for sub in schema["allOf"]:
                if isinstance(sub, Mapping):
                    merged = _merge(merged, self._deref(sub))
            return self.value(merged, depth)
        for key in ("anyOf", "oneOf"):
            if schema.get(key):
                options = [s for s in schema[key] if s is not False]
                if not options:
                    return None
                branch = self._pick_branch(options, depth)
                rest = {k: v for k, v in schema.items() if k != key}
                if isinstance(branch, Mapping):
                    return self.value(_merge(rest, self._deref(branch)), depth)
                return self.value(rest or branch, depth)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = self._pick_type([t for t in kind if isinstance(t, str)], depth)
        if kind is None:
            kind = _infer_type(schema)
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return self._string(schema)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self._rng.random() < 0.5
        if kind == "null":
            return None
        return self._word()

    # -- helpers ----------------------------------------------------------------------------

    def _resolve(self, ref: Any) -> Mapping[str, Any]:
        if not isinstance(ref, str) or not ref.startswith("#"):
            return {}
        node: Any = self._root
        for raw in ref[1:].split("/"):
            if not raw:
                continue
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return {}
        return node if isinstance(node, Mapping) else {}

    def _deref(self, schema: Mapping[str, Any]) -> Mapping[str, Any]:
        seen = 0
        while "$ref" in schema and seen < 8:
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            target = self._resolve(schema["$ref"])
            schema = _merge(target, rest) if rest else target
            seen += 1
        return schema

    def _pick_branch(self, options: list[Any], depth: int) -> Any:
        if depth >= _SHALLOW:
            # Deep inside a (possibly recursive) schema: prefer a branch that ends the value.
            for option in options:
                o = self._deref(option) if isinstance(option, Mapping) else option
                if isinstance(o, Mapping) and _infer_type(o) not in ("object", "array"):
                    return option
        return self._rng.choice(options)

    def _pick_type(self, kinds: list[str], depth: int) -> str | None:
        if not kinds:
            return None
        if depth >= _SHALLOW and "null" in kinds:
            return "null"
        concrete = [k for k in kinds if k != "null"]
        if concrete and self._rng.random() < 0.85:
            return self._rng.choice(concrete)
        return self._rng.choice(kinds)

    def _word(self) -> str:
        return self._rng.choice(WORDS)

    def _object(self, schema: Mapping[str, Any], depth: int) -> dict[str, Any]:
        rng = self._rng
        props = schema.get("properties")
        props = props if isinstance(props, Mapping) else {}
        required = [r for r in schema.get("required") or () if isinstance(r, str)]
        required_set = set(required)
        extra = schema.get("additionalProperties", True)
        may_add = (
            extra is not False
            and "patternProperties" not in schema
            and "propertyNames" not in schema
            and schema.get("unevaluatedProperties", True) is not False
        )
        max_props = schema.get("maxProperties")
        min_props = schema.get("minProperties") or 0
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if name in required_set or (depth < _SHALLOW and rng.random() < 0.6):
                out[name] = self.value(sub, depth + 1)
        for name in required:
            if name not in out:
                out[name] = self.value(extra if isinstance(extra, Mapping) else {}, depth + 1)
        # Optional properties to reach minProperties, then free keys if allowed.
        for name, sub in props.items():
            if len(out) >= min_props:
                break
            if name not in out:
                out[name] = self.value(sub, depth + 1)
        want = min_props
        if not props and may_add and depth < _SHALLOW - 1:
            want = max(want, rng.randint(1, 3))
        if isinstance(max_props, int):
            want = min(want, max_props)
        if may_add:
            sub_schema: Mapping[str, Any] | bool = extra if isinstance(extra, Mapping) else {}
            tries = 0
            while len(out) < want and tries < 64:
                tries += 1
                key = rng.choice(WORDS) if tries < 32 else f"{rng.choice(WORDS)}_{tries}"
                if key not in out and key not in props:
                    out[key] = self.value(sub_schema, depth + 1) if sub_schema else self._scalar()
        return out

    def _scalar(self) -> Any:
        pick = self._rng.randrange(4)
        if pick == 0:
            return self._rng.randint(0, 100)
        if pick == 1:
            return self._rng.random() < 0.5
        return " ".join(self._rng.choice(WORDS) for _ in range(self._rng.randint(1, 3)))

    def _array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        rng = self._rng
        prefix = schema.get("prefixItems")
        prefix = list(prefix) if isinstance(prefix, list) else []
        items = schema.get("items", {})
        lo = _int_or(schema.get("minItems"), 0)
        hi = _int_or(schema.get("maxItems"), max(lo, 3))
        if items is False:
            hi = min(hi, max(lo, len(prefix)))
        hi = max(lo, hi)
        if depth >= _SHALLOW:
            n = lo
        else:
            n = rng.randint(max(lo, min(1, hi)), min(hi, lo + 3))
        unique = schema.get("uniqueItems") is True
        out: list[Any] = []
        seen: set[bytes] = set()
        for i in range(n):
            sub = prefix[i] if i < len(prefix) else items
            value = self.value(sub, depth + 1)
            if unique:
                key = _canonical(value)
                tries = 0
                while key in seen and tries < 8:
                    value = self.value(sub, depth + 1)
                    key = _canonical(value)
                    tries += 1
                if key in seen:
                    if len(out) >= lo:
                        break
                    continue
                seen.add(key)
            out.append(value)
        return out

    def _string(self, schema: Mapping[str, Any]) -> str:
        rng = self._rng
        fmt = schema.get("format")
        if fmt == "date":
            year, month, day = rng.randint(2000, 2030), rng.randint(1, 12), rng.randint(1, 28)
            text = f"{year:04d}-{month:02d}-{day:02d}"
        elif fmt == "date-time":
            text = (
                f"{rng.randint(2000, 2030):04d}-{rng.randint(1, 12):02d}-"
                f"{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                f"{rng.randint(0, 59):02d}Z"
            )
        elif fmt == "time":
            text = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"
        elif fmt == "email":
            text = f"{rng.choice(WORDS)}.{rng.choice(WORDS)}@example.com"
        elif fmt in ("uri", "url", "iri"):
            text = f"https://example.com/{rng.choice(WORDS)}/{rng.choice(WORDS)}"
        elif fmt == "uuid":
            h = f"{rng.getrandbits(128):032x}"
            text = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:32]}"
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        lo = _int_or(schema.get("minLength"), 0)
        hi = _int_or(schema.get("maxLength"), -1)
        while len(text) < lo:
            text += " " + rng.choice(WORDS)
        if 0 <= hi < len(text):
            text = text[:hi].rstrip() if len(text[:hi].rstrip()) >= lo else text[:hi]
        return text

    def _bounds(self, schema: Mapping[str, Any]) -> tuple[float | None, bool, float | None, bool]:
        lo, lo_open, hi, hi_open = None, False, None, False
        minimum, maximum = schema.get("minimum"), schema.get("maximum")
        ex_lo, ex_hi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if _is_number(minimum):
            lo = float(minimum)
            lo_open = ex_lo is True  # draft 4: exclusiveMinimum is a flag
        if _is_number(ex_lo) and (lo is None or ex_lo >= lo):
            lo, lo_open = float(ex_lo), True
        if _is_number(maximum):
            hi = float(maximum)
            hi_open = ex_hi is True
        if _is_number(ex_hi) and (hi is None or ex_hi <= hi):
            hi, hi_open = float(ex_hi), True
        return lo, lo_open, hi, hi_open

    def _integer(self, schema: Mapping[str, Any]) -> int:
        lo_f, lo_open, hi_f, hi_open = self._bounds(schema)
        lo = None if lo_f is None else (math.floor(lo_f) + 1 if lo_open else math.ceil(lo_f))
        hi = None if hi_f is None else (math.ceil(hi_f) - 1 if hi_open else math.floor(hi_f))
        lo, hi = _window(lo, hi, 0, 100)
        step = schema.get("multipleOf")
        if _is_number(step) and step > 0 and float(step).is_integer():
            m = int(step)
            k_lo, k_hi = -(-lo // m), hi // m
            if k_lo <= k_hi:
                return self._rng.randint(k_lo, k_hi) * m
        return self._rng.randint(lo, hi) if lo <= hi else lo

    def _number(self, schema: Mapping[str, Any]) -> float | int:
        lo, lo_open, hi, hi_open = self._bounds(schema)
        step = schema.get("multipleOf")
        a, b = _window(lo, hi, 0.0, 100.0)
        if _is_number(step) and step > 0:
            k_lo = math.floor(a / step) + 1 if lo_open else math.ceil(a / step)
            k_hi = math.ceil(b / step) - 1 if hi_open else math.floor(b / step)
            for _ in range(8 if k_lo <= k_hi else 0):
                k = self._rng.randint(k_lo, k_hi)
                if isinstance(step, int):
                    return k * step
                v = round(k * step, 12)
                if (v / step).is_integer():  # float division, as validators check it
                    return v
            return 0 if a <= 0 <= b else a
        x = round(a + (b - a) * self._rng.random(), 2)
        if x < a or x > b or (lo_open and x <= a) or (hi_open and x >= b):
            x = (a + b) / 2
        return x


def _window(lo: _N | None, hi: _N | None, default_lo: _N, default_hi: _N) -> tuple[_N, _N]:
    """Finite bounds for a number: the schema's, else a window of 100 beside the one given."""
    if lo is None:
        if hi is None:
            return default_lo, default_hi
        return hi - (default_hi - default_lo), hi
    if hi is None:
        return lo, lo + (default_hi - default_lo)
    return lo, hi


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_or(value: Any, default: int) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


def _copy(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.loads(json.dumps(value))
    return value


def _infer_type(schema: Mapping[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, str):
        return kind
    if any(
        k in schema
        for k in (
            "properties",
            "required",
            "additionalProperties",
            "minProperties",
            "maxProperties",
            "patternProperties",
        )
    ):
        return "object"
    if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
        return "array"
    if any(k in schema for k in ("minLength", "maxLength", "format", "pattern")):
        return "string"
    if any(
        k in schema
        for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
    ):
        return "number"
    return None


_MAX_KEYS: Final = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
_MIN_KEYS: Final = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Both schemas' constraints in one (for ``allOf`` and branch siblings), best effort."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
            continue
        old = out[key]
        if key == "properties" and isinstance(old, Mapping) and isinstance(value, Mapping):
            props = dict(old)
            for name, sub in value.items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            out[key] = props
        elif key == "required" and isinstance(old, list) and isinstance(value, list):
            out[key] = list(dict.fromkeys([*old, *value]))
        elif key in _MIN_KEYS and _is_number(old) and _is_number(value):
            out[key] = max(old, value)
        elif key in _MAX_KEYS and _is_number(old) and _is_number(value):
            out[key] = min(old, value)
        elif key == "type":
            olds = set(old) if isinstance(old, list) else {old}
            news = set(value) if isinstance(value, list) else {value}
            if "number" in olds and "integer" in news:
                olds.add("integer")
            if "number" in news and "integer" in olds:
                news.add("integer")
            both = [t for t in (value if isinstance(value, list) else [value]) if t in olds]
            out[key] = both[0] if len(both) == 1 else (both or value)
        elif key == "enum" and isinstance(old, list) and isinstance(value, list):
            common = [v for v in value if v in old]
            out[key] = common or value
        elif key == "additionalProperties" and (old is False or value is False):
            out[key] = False
        else:
            out[key] = value
    return out


# --- prompt size --------------------------------------------------------------------------


def count_prompt_tokens(request: Request) -> int:
    """The prompt's size in tokens, as the mock counts it: matches of ``\\w+|[^\\w\\s]`` over
    the prompt, or over every message's text (string content, text parts, tool-call names and
    arguments) plus 3 per message. Deterministic; roughly what a real tokenizer gives."""
    if isinstance(request, CompletionRequest):
        return len(_PROMPT_TOKEN.findall(request.prompt))
    total = 0
    findall = _PROMPT_TOKEN.findall
    for message in request.messages:
        total += _PER_MESSAGE_TOKENS
        content = message.get("content")
        if isinstance(content, str):
            total += len(findall(content))
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    total += len(findall(part["text"]))
        for call in message.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(fn, Mapping):
                total += len(findall(str(fn.get("name", ""))))
                total += len(findall(str(fn.get("arguments", ""))))
    return total


# --- the plan -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MockPlan:
    """Everything one generation will emit, decided before the first byte.

    ``pieces``: the token pieces in order — the first ``reasoning_count`` are reasoning, the
    rest are content, or tool-call argument fragments when ``tool`` is set (``(call_id,
    name)``). ``finish_reason``: "stop" | "length" | "tool_calls". ``max_tokens`` and
    ``stop`` have already been applied; ``len(pieces)`` is the completion token count.
    """

    pieces: tuple[str, ...]
    reasoning_count: int
    tool: tuple[str, str] | None
    finish_reason: str

    @property
    def reasoning(self) -> str:
        """The reasoning text."""
        return "".join(self.pieces[: self.reasoning_count])

    @property
    def content(self) -> str:
        """The content text ("" for a tool call)."""
        return "" if self.tool else "".join(self.pieces[self.reasoning_count :])

    @property
    def arguments(self) -> str:
        """The tool call's argument text ("" without a tool call)."""
        return "".join(self.pieces[self.reasoning_count :]) if self.tool else ""


def _apply_stop(pieces: list[str], stop: Sequence[str]) -> list[str] | None:
    """The pieces cut before the first occurrence of any of ``stop``, or None if none occurs."""
    if not stop or not pieces:
        return None
    text = "".join(pieces)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not cuts:
        return None
    cut = min(cuts)
    out: list[str] = []
    pos = 0
    for piece in pieces:
        end = pos + len(piece)
        if end <= cut:
            out.append(piece)
            pos = end
            continue
        if cut > pos:
            out.append(piece[: cut - pos])
        break
    return out


# --- the backend --------------------------------------------------------------------------


class MockBackend(Backend):
    """A deterministic in-process backend serving ``model``.

    ``ttft_ms``: float, milliseconds from acquiring a slot to the first reasoning or content
    token. ``itl_ms``: float, milliseconds between consecutive tokens (0: no sleep, but still a
    checkpoint per token). ``slots``: generations running at once (>= 1). ``queue``: how many
    more may wait, FIFO, for a slot (>= 0); beyond that ``open()`` raises ``BackendSaturated``.
    ``reasoning_field``: the delta field reasoning is streamed under — "reasoning_content"
    (vLLM, DeepSeek) or "reasoning" (Ollama, OpenRouter); None for a model that does not reason.
    ``output_tokens``: (low, high), inclusive range of a plain answer's natural length in
    tokens. ``reasoning_tokens``: the same for reasoning. ``warmup_s``: seconds of "warming"
    after ``run()`` starts (0: ready at once, even without ``run()``). ``weight``: routing
    weight. ``fault``: the fault every generation gets unless its own ``Generation.fault`` is
    set. Raises ``ValueError`` on a bad value.

    Faults: ``status`` refuses in ``open()`` with ``BackendUnavailable(status=...)``.
    ``fail_after=N``: once N tokens (reasoning, content or argument fragments) are out, at the
    time token N+1 was due, the iterator raises ``BackendBroken`` — no finish chunk, no
    ``[DONE]``. N equal to the stream's token count breaks just before the finish chunk; a
    larger N never strikes. ``stall_after=N``: after N tokens nothing more is emitted and the
    slot stays taken until the consumer is cancelled.
    """

    kind = "mock"

    def __init__(
        self,
        model: str,
        *,
        ttft_ms: float = 50.0,
        itl_ms: float = 10.0,
        slots: int = 8,
        queue: int = 64,
        reasoning_field: str | None = None,
        output_tokens: tuple[int, int] = (24, 64),
        reasoning_tokens: tuple[int, int] = (16, 48),
        warmup_s: float = 0.0,
        weight: float = 1.0,
        fault: Fault | None = None,
    ) -> None:
        where = f"mock backend {model!r}"
        if not isinstance(model, str) or not model:
            raise ValueError("mock backend: 'model' must be a non-empty string")
        for name, value in (("ttft_ms", ttft_ms), ("itl_ms", itl_ms), ("warmup_s", warmup_s)):
            if not _is_number(value) or value < 0:
                raise ValueError(f"{where}: {name!r} must be a finite number >= 0, not {value!r}")
        if not _is_number(weight) or weight <= 0:
            raise ValueError(f"{where}: 'weight' must be a finite number > 0, not {weight!r}")
        if not _is_int(slots) or slots < 1:
            raise ValueError(f"{where}: 'slots' must be an integer >= 1, not {slots!r}")
        if not _is_int(queue) or queue < 0:
            raise ValueError(f"{where}: 'queue' must be an integer >= 0, not {queue!r}")
        _check_range(where, "output_tokens", output_tokens, minimum=1)
        _check_range(where, "reasoning_tokens", reasoning_tokens, minimum=0)
        if reasoning_field is not None and (
            not isinstance(reasoning_field, str)
            or not reasoning_field.isidentifier()
            or reasoning_field in _STANDARD_DELTA_FIELDS
        ):
            raise ValueError(
                f"{where}: 'reasoning_field' must be a field name such as 'reasoning_content' "
                f"or 'reasoning' (not a standard delta field), not {reasoning_field!r}"
            )
        if fault is not None and not isinstance(fault, Fault):
            raise ValueError(f"{where}: 'fault' must be a Fault, not {fault!r}")
        self.model = model
        self.weight = float(weight)
        self.ttft_ms = float(ttft_ms)
        self.itl_ms = float(itl_ms)
        self.slots = int(slots)
        self.queue = int(queue)
        self.reasoning_field = reasoning_field
        self.output_tokens = (int(output_tokens[0]), int(output_tokens[1]))
        self.reasoning_tokens = (int(reasoning_tokens[0]), int(reasoning_tokens[1]))
        self.warmup_s = float(warmup_s)
        self.fault = fault
        self._ready = self.warmup_s == 0
        self._slot_sem = trio.Semaphore(self.slots, max_value=self.slots)

    @classmethod
    def from_config(cls, model: str, table: Mapping[str, Any]) -> MockBackend:
        """Build from a TOML ``[[backends]]`` table: the constructor's keyword names as keys,
        ranges as two-integer lists (``output_tokens = [24, 64]``), ``fault`` as a string
        (``"fail_after=5"``) or a table. ``model``, and ``kind``/``type`` = "mock", are
        allowed and checked. Raises ``ValueError`` naming the key for an unknown key, a wrong
        type or a bad value."""
        where = f"mock backend {model!r}"
        kwargs: dict[str, Any] = {}
        for key, value in table.items():
            if key == "model":
                if value != model:
                    raise ValueError(f"{where}: table says model = {value!r}")
                continue
            if key in ("kind", "type"):
                if value != "mock":
                    raise ValueError(f"{where}: {key!r} must be 'mock', not {value!r}")
                continue
            parse = _CONFIG_KEYS.get(key)
            if parse is None:
                known = ", ".join(sorted(_CONFIG_KEYS))
                raise ValueError(f"{where}: unknown key {key!r}; the keys are: {known}")
            kwargs[key] = parse(where, key, value)
        return cls(model, **kwargs)

    def __repr__(self) -> str:
        return (
            f"MockBackend({self.model!r}, ttft_ms={self.ttft_ms}, itl_ms={self.itl_ms}, "
            f"slots={self.slots}, queue={self.queue}, reasoning_field={self.reasoning_field!r})"
        )

    # -- Backend interface ------------------------------------------------------------------

    @property
    def state(self) -> BackendState:
        """Either "warming" (until ``warmup_s`` has passed since ``run()`` started) or "ready"."""
        return "ready" if self._ready else "warming"

    def load(self) -> BackendLoad:
        """Exact figures: ``slots``, slots taken (``busy``), generations waiting (``queued``)."""
        return BackendLoad(
            slots=self.slots,
            busy=self.slots - self._slot_sem.value,
            queued=self._slot_sem.statistics().tasks_waiting,
        )

    def open(self, generation: Generation) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Start ``generation``: entering waits for a slot (FIFO behind the queue) and yields
        the event iterator; leaving frees the slot.

        Raises, on entering and before anything starts: ``BackendUnavailable`` for a fault
        ``status`` (with that status) or while warming (503); ``BackendSaturated`` when every
        slot is busy and the queue is full, with ``retry_after`` in seconds.
        """
        return _Session(self, generation)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Warm up: report started, stay "warming" for ``warmup_s`` seconds, become "ready"."""
        task_status.started()
        if not self._ready:
            await trio.sleep(self.warmup_s)
            self._ready = True

    # -- planning ---------------------------------------------------------------------------

    def digest(self, request: Request) -> bytes:
        """SHA-256 of the canonical JSON of what the output depends on: this model, the
        messages (or prompt), tools, response_format and seed (absent = 0)."""
        if isinstance(request, CompletionRequest):
            key: dict[str, Any] = {
                "model": self.model,
                "prompt": request.prompt,
                "seed": request.seed or 0,
            }
        else:
            rf = request.response_format
            key = {
                "model": self.model,
                "messages": list(request.messages),
                "tools": [[t.name, t.parameters] for t in request.tools],
                "response_format": None if rf is None else [rf.type, rf.name, rf.schema],
                "seed": request.seed or 0,
            }
        return hashlib.sha256(_canonical(key)).digest()

    def plan(self, request: Request) -> MockPlan:
        """Every piece ``request`` will stream, with ``stop`` and ``max_tokens`` applied.

        Pure and deterministic (see the module docstring). Chat: reasoning first (reasoning
        models), then a tool call (``tools`` given and ``tool_choice`` not "none"; "auto"
        answers in content instead when the last message is a tool result), or JSON content
        (``response_format`` json_object / json_schema), or text. Completions: text only.
        ``stop`` cuts the content only (never reasoning or tool arguments); ``max_tokens``
        counts reasoning, content and argument fragments alike.
        """
        digest = self.digest(request)
        reasoning: list[str] = []
        tool: tuple[str, str] | None = None
        rng = _rng(digest, b"answer")
        if isinstance(request, CompletionRequest):
            body = _text_pieces(rng, rng.randint(*self.output_tokens), leading_space=True)
            natural = "stop"
        else:
            if self.reasoning_field is not None:
                r_rng = _rng(digest, b"reasoning")
                reasoning = _text_pieces(
                    r_rng, r_rng.randint(*self.reasoning_tokens), leading_space=False
                )
            called = _tool_to_call(request, rng)
            rf = request.response_format
            if called is not None:
                params = dict(called.parameters)
                if not params:
                    params = {"type": "object", "properties": {}, "additionalProperties": False}
                elif "type" not in params and _infer_type(params) is None:
                    params["type"] = "object"
                args = json.dumps(generate_json(params, rng), ensure_ascii=False)
                body = _fragments(rng, args)
                tool = ("call_" + digest.hex()[:24], called.name)
                natural = "tool_calls"
            elif rf is not None and rf.type in ("json_object", "json_schema"):
                schema: Mapping[str, Any] = (
                    rf.schema if rf.type == "json_schema" and rf.schema else {"type": "object"}
                )
                if (
                    "type" not in schema
                    and _infer_type(schema) is None
                    and not any(
                        k in schema for k in ("$ref", "anyOf", "oneOf", "allOf", "enum", "const")
                    )
                ):
                    schema = {**schema, "type": "object"}
                text = json.dumps(generate_json(schema, rng), ensure_ascii=False)
                body = _fragments(rng, text)
                natural = "stop"
            else:
                body = _text_pieces(rng, rng.randint(*self.output_tokens), leading_space=False)
                natural = "stop"
        finish = natural
        if tool is None:
            cut = _apply_stop(body, request.stop)
            if cut is not None:
                body, finish = cut, "stop"
        pieces = reasoning + body
        limit = request.max_tokens
        if limit is not None and len(pieces) > limit:
            pieces = pieces[:limit]
            finish = "length"
        reasoning_count = min(len(reasoning), len(pieces))
        if tool is not None and len(pieces) == reasoning_count:
            tool = None  # cut during reasoning: the call never started
        return MockPlan(tuple(pieces), reasoning_count, tool, finish)

    def _retry_after(self) -> float:
        """Seconds until a slot is likely free: the queue ahead, run ``slots`` at a time."""
        tokens = sum(self.output_tokens) / 2
        if self.reasoning_field is not None:
            tokens += sum(self.reasoning_tokens) / 2
        duration = (self.ttft_ms + self.itl_ms * tokens) / 1000
        rounds = (self._slot_sem.statistics().tasks_waiting + self.slots) // self.slots
        return round(max(0.1, duration * rounds), 3)


def _tool_to_call(request: ChatRequest, rng: random.Random) -> Tool | None:
    tools = request.tools
    choice = request.tool_choice
    if not tools or choice == "none":
        return None
    if choice == "auto":
        last = request.messages[-1] if request.messages else {}
        if last.get("role") == "tool":
            return None
        return tools[rng.randrange(len(tools))]
    if choice == "required":
        return tools[rng.randrange(len(tools))]
    for tool in tools:
        if tool.name == choice:
            return tool
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(where: str, name: str, value: Any, *, minimum: int) -> None:
    if (
        not isinstance(value, tuple | list)
        or len(value) != 2
        or not all(_is_int(v) for v in value)
        or not minimum <= value[0] <= value[1]
    ):
        raise ValueError(
            f"{where}: {name!r} must be two integers [low, high] with {minimum} <= low <= high, "
            f"not {value!r}"
        )


# --- config parsing -----------------------------------------------------------------------


def _cfg_number(where: str, key: str, value: Any) -> float:
    if not _is_number(value):
        raise ValueError(f"{where}: {key!r} must be a number, not {value!r}")
    return float(value)


def _cfg_int(where: str, key: str, value: Any) -> int:
    if not _is_int(value):
        raise ValueError(f"{where}: {key!r} must be an integer, not {value!r}")
    return int(value)


def _cfg_range(where: str, key: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2 or not all(map(_is_int, value)):
        raise ValueError(
            f"{where}: {key!r} must be a list of two integers [low, high], not {value!r}"
        )
    return (int(value[0]), int(value[1]))


def _cfg_field(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, not {value!r}")
    return value


def _cfg_fault(where: str, key: str, value: Any) -> Fault:
    if isinstance(value, str):
        try:
            return Fault.parse(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {key!r}: {exc}") from None
    if isinstance(value, Mapping):
        unknown = set(value) - {"fail_after", "stall_after", "status"}
        if unknown or not all(_is_int(v) for v in value.values()):
            raise ValueError(
                f"{where}: {key!r} takes integer fail_after, stall_after, status; got {value!r}"
            )
        return Fault(**value)
    raise ValueError(
        f"{where}: {key!r} must be a string like 'fail_after=5' or a table, not {value!r}"
    )


_CONFIG_KEYS: Final = {
    "ttft_ms": _cfg_number,
    "itl_ms": _cfg_number,
    "slots": _cfg_int,
    "queue": _cfg_int,
    "reasoning_field": _cfg_field,
    "output_tokens": _cfg_range,
    "reasoning_tokens": _cfg_range,
    "warmup_s": _cfg_number,
    "weight": _cfg_number,
    "fault": _cfg_fault,
}


# --- one generation -----------------------------------------------------------------------


class _Session(AbstractAsyncContextManager[AsyncIterator[bytes]]):
    """``MockBackend.open``'s context manager: takes a slot on enter, frees it on exit."""

    __slots__ = ("_backend", "_generation", "_stream")

    def __init__(self, backend: MockBackend, generation: Generation) -> None:
        self._backend = backend
        self._generation = generation
        self._stream: _Stream | None = None

    async def __aenter__(self) -> AsyncIterator[bytes]:
        backend, generation = self._backend, self._generation
        fault = generation.fault if generation.fault is not None else backend.fault
        if fault is not None and fault.status is not None:
            raise BackendUnavailable(
                f"mock backend {backend.model!r}: injected fault, status {fault.status}",
                status=fault.status,
            )
        if not backend._ready:
            raise BackendUnavailable(f"mock backend {backend.model!r} is warming up", status=503)
        slots = backend._slot_sem
        if slots.value == 0 and slots.statistics().tasks_waiting >= backend.queue:
            raise BackendSaturated(
                f"mock backend {backend.model!r}: all {backend.slots} slots busy and "
                f"{backend.queue} queued",
                retry_after=backend._retry_after(),
            )
        plan = backend.plan(generation.request)
        await slots.acquire()  # FIFO; a cancelled waiter leaves the queue
        self._stream = _Stream(backend, generation, plan, fault, trio.current_time())
        return self._stream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
            self._backend._slot_sem.release()


_ROLE, _TOKENS, _FINISH, _USAGE, _DONE, _END = range(6)
_BATCH = 32  # events written together at most


class _Stream(AsyncIterator[bytes]):
    """The events of one generation, paced on trio's clock. One ``__anext__`` per event."""

    __slots__ = (
        "_chat",
        "_closed",
        "_fail",
        "_fault_at",
        "_field",
        "_i",
        "_include_usage",
        "_itl",
        "_n",
        "_phase",
        "_pieces",
        "_plan",
        "_reasoning_count",
        "_request",
        "_t_first",
        "_text",
        "_tool",
        "_tool_started",
    )

    def __init__(
        self,
        backend: MockBackend,
        generation: Generation,
        plan: MockPlan,
        fault: Fault | None,
        t_acquired: float,
    ) -> None:
        request = generation.request
        self._request = request
        self._plan = plan
        self._pieces = plan.pieces
        self._n = len(plan.pieces)
        self._reasoning_count = plan.reasoning_count
        self._tool = plan.tool
        self._tool_started = False
        self._field = backend.reasoning_field or "reasoning_content"
        self._include_usage = generation.include_usage
        self._itl = backend.itl_ms / 1000
        self._i = 0
        self._closed = False
        # Exactly one of the two encoders is set: chat, or (legacy) text completion.
        self._chat: ChatChunkEncoder | None = None
        self._text: CompletionChunkEncoder | None = None
        if isinstance(request, ChatRequest):
            self._chat = ChatChunkEncoder(generation.stream_id, backend.model, generation.created)
            self._phase = _ROLE
        else:
            self._text = CompletionChunkEncoder(
                generation.stream_id, backend.model, generation.created
            )
            self._phase = _TOKENS
        # The fault that strikes first: before token ``_fault_at`` (past the end: never);
        # ``_fail``: it breaks the stream (else it stalls).
        self._fault_at = self._n + 1
        self._fail = False
        if fault is not None:
            if fault.fail_after is not None and fault.fail_after < self._fault_at:
                self._fault_at, self._fail = max(0, fault.fail_after), True
            if fault.stall_after is not None and fault.stall_after < self._fault_at:
                self._fault_at, self._fail = max(0, fault.stall_after), False
        if generation.resume is not None:
            self._skip(generation.resume.events)
        # Token i is due at _t_first + i * itl: the first one this stream emits after TTFT.
        self._t_first = t_acquired + backend.ttft_ms / 1000 - self._i * self._itl

    def _skip(self, events: int) -> None:
        """Advance past the first ``events`` events without emitting them: the client has
        them already from a stream that broke elsewhere (the plan is the same everywhere)."""
        for _ in range(events):
            if self._phase == _ROLE:
                self._phase = _TOKENS
                continue
            if self._phase == _TOKENS:
                if self._i < self._n:
                    at_tool = (
                        self._chat is not None
                        and self._tool is not None
                        and not self._tool_started
                        and self._i >= self._reasoning_count
                    )
                    if at_tool:
                        self._tool_started = True
                    else:
                        self._i += 1
                    continue
                self._phase = _FINISH
            if self._phase == _FINISH:
                self._phase = _USAGE if self._include_usage else _DONE
            elif self._phase == _USAGE:
                self._phase = _DONE
            elif self._phase == _DONE:
                self._phase = _END

    def close(self) -> None:
        """The session was left: any further ``__anext__`` raises ``ClosedResourceError``."""
        self._closed = True

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> bytes:
        """The next event; with it, every further one already due (at most ``_BATCH``):
        a reader that keeps up gets one event per write, one that fell behind (or a
        zero-latency mock) gets fewer, larger writes of the same bytes."""
        first = await self._next_event()
        if not self._due():
            return first
        parts = [first]
        while len(parts) < _BATCH and self._due():
            try:
                parts.append(await self._next_event(checkpoint=False))
            except StopAsyncIteration:
                break
        return b"".join(parts)

    def _due(self) -> bool:
        """Whether the next event can be produced without waiting (and is no fault)."""
        phase = self._phase
        if phase == _TOKENS:
            i = self._i
            if i == self._fault_at:
                return False  # the fault strikes in a call of its own
            if i >= self._n:
                return True  # the finish chunk
            return self._t_first + i * self._itl <= trio.current_time()
        return phase in (_FINISH, _USAGE, _DONE)

    async def _next_event(self, *, checkpoint: bool = True) -> bytes:
        """One event, sleeping until it is due; ``checkpoint=False`` inside a batch (the
        batch's first event yielded to the scheduler already)."""
        if self._closed:
            raise trio.ClosedResourceError("the generation's context was left")
        phase = self._phase
        chat = self._chat
        if phase == _TOKENS:
            i = self._i
            if i == self._fault_at:
                await self._strike(i)
            if i < self._n:
                deadline = self._t_first + i * self._itl
                if deadline > trio.current_time():
                    await trio.sleep_until(deadline)
                elif checkpoint:
                    await trio.lowlevel.checkpoint()
                if chat is None:
                    self._i = i + 1
                    return self._text.text(self._pieces[i])  # type: ignore[union-attr]
                if i < self._reasoning_count:
                    self._i = i + 1
                    return chat.reasoning(self._field, self._pieces[i])
                if self._tool is None:
                    self._i = i + 1
                    return chat.content(self._pieces[i])
                if not self._tool_started:
                    self._tool_started = True
                    call_id, name = self._tool
                    return chat.tool_call_start(0, call_id, name)
                self._i = i + 1
                return chat.tool_call_arguments(0, self._pieces[i])
            phase = self._phase = _FINISH
        if phase == _ROLE:
            self._phase = _TOKENS
            return chat.role()  # type: ignore[union-attr]
        if phase == _FINISH:
            self._phase = _USAGE if self._include_usage else _DONE
            if chat is not None:
                return chat.finish(self._plan.finish_reason)
            return self._text.text("", self._plan.finish_reason)  # type: ignore[union-attr]
        if phase == _USAGE:
            self._phase = _DONE
            enc = chat if chat is not None else self._text
            return enc.usage(count_prompt_tokens(self._request), self._n)  # type: ignore[union-attr]
        if phase == _DONE:
            self._phase = _END
            return DONE
        raise StopAsyncIteration

    async def _strike(self, i: int) -> None:
        """The injected fault, at the time token ``i`` was due: break, or stall forever."""
        await trio.sleep_until(self._t_first + i * self._itl)
        if self._fail:
            self._phase = _END
            raise BackendBroken(f"mock backend: injected fault, broke after {i} tokens")
        await trio.sleep_forever()
