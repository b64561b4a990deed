"""The in-process mock backend: deterministic text, reasoning, tool calls and JSON, on a clock.

Tests, scenarios and benchmarks run on it, so it behaves like a real server where it matters:

- **Deterministic.** The output is a function of the model name, the messages (or prompt),
  the tools, ``response_format`` and ``seed`` (absent = 0): a canonical JSON of those, hashed
  with SHA-256, seeds a private ``random.Random``. Every node, every run, gives the same token
  sequence, so a stream resumed on another node continues exactly. ``max_tokens`` and ``stop``
  only cut that sequence; they never change it.
- **Planned, then streamed.** ``MockBackend.plan`` decides every token piece up front
  (reasoning, then content or tool-call argument fragments), applies ``stop`` and
  ``max_tokens``; ``MockPlan.events`` lists the stream's events in order, and the stream only
  encodes and paces them: per token, one encoder call and one sleep. A resumed stream skips
  the first ``Resume.events`` of those same events.
- **Safe on any request.** Planning is bounded (``schema_values`` bounds the JSON work) and
  runs in ``open()`` before a slot is taken; whatever in the request cannot be planned (a
  schema with no finite value, over a limit, a tool name that is not valid Unicode, a resume
  point past the end) is refused there with ``InvalidRequest`` (400), naming the field.
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

import enum
import hashlib
import itertools
import json
import logging
import math
import random
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Annotated, Any, Final, TypeGuard

import trio
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
)

from quorum.backends.base import Backend, BackendLoad, BackendState, Fault, Generation
from quorum.backends.schema_values import WORDS, SchemaError, generate_json, infer_type
from quorum.errors import (
    ApiError,
    BackendBroken,
    BackendSaturated,
    BackendUnavailable,
    InvalidRequest,
)
from quorum.sse import DONE
from quorum.wire import (
    ChatChunkEncoder,
    ChatRequest,
    CompletionChunkEncoder,
    CompletionRequest,
    Request,
)

__all__ = ["MockBackend", "MockEvent", "MockPlan", "count_prompt_tokens"]

log = logging.getLogger(__name__)


# --- vocabulary ---------------------------------------------------------------------------

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
_SURROGATE = re.compile("[\ud800-\udfff]")


def _canonical(value: Any) -> bytes:
    # surrogatepass: a lone surrogate in a request still hashes (the same on every node);
    # text without one gives the same bytes as strict UTF-8.
    return json.dumps(
        value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    ).encode("utf-8", "surrogatepass")


def _json_text(value: Any) -> str:
    """``value`` as JSON text that always encodes as UTF-8: non-ASCII characters as they are,
    lone surrogates (which UTF-8 cannot carry) as ``\\udXXX`` escapes, which JSON parsers
    read back to the same string."""
    text = json.dumps(value, ensure_ascii=False)
    if not text.isascii():
        text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


def _encodable(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (no lone surrogates)."""
    return text.isascii() or _SURROGATE.search(text) is None


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


class MockEvent(enum.IntEnum):
    """One event of a mock stream. ``REASONING`` ... ``TEXT`` carry a token piece and are
    paced (due ``ttft_ms`` + index x ``itl_ms`` after the slot was taken); ``TOOL_START`` is
    due with the first argument fragment; the others go out as soon as they are reached."""

    ROLE = 0
    REASONING = 1
    CONTENT = 2
    TOOL_START = 3
    ARGUMENTS = 4
    TEXT = 5
    FINISH = 6
    USAGE = 7
    DONE = 8


# Module aliases: looking a member up on the enum class costs ~50 ns, per event.
_ROLE, _REASONING, _CONTENT, _TOOL_START, _ARGUMENTS, _TEXT, _FINISH, _USAGE, _DONE_EVENT = (
    MockEvent
)
# Indexed by MockEvent (tuple indexing is cheaper than hashing an enum member, per event).
_PACED: Final = tuple(
    k in (_REASONING, _CONTENT, _TOOL_START, _ARGUMENTS, _TEXT) for k in MockEvent
)
_TOKEN: Final = tuple(k in (_REASONING, _CONTENT, _ARGUMENTS, _TEXT) for k in MockEvent)


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

    def events(self, *, chat: bool, include_usage: bool) -> Iterator[tuple[MockEvent, int]]:
        """The stream's events in order, each with its position: the index of its token
        piece (``TOOL_START``: of the first argument fragment; ``FINISH``: ``len(pieces)``),
        -1 for the role, usage and ``[DONE]`` events. ``chat``: a chat stream (role first,
        reasoning, content or a tool call), else a text completion. ``include_usage``: a
        usage event before ``[DONE]``. This is the one order of events: a fresh stream
        emits all of them, a resumed one skips those the client has."""
        n, reasoning = len(self.pieces), self.reasoning_count
        if chat:
            yield _ROLE, -1
            for i in range(reasoning):
                yield _REASONING, i
            if self.tool is None:
                for i in range(reasoning, n):
                    yield _CONTENT, i
            else:
                yield _TOOL_START, reasoning
                for i in range(reasoning, n):
                    yield _ARGUMENTS, i
        else:
            for i in range(n):
                yield _TEXT, i
        yield _FINISH, n
        if include_usage:
            yield _USAGE, -1
        yield _DONE_EVENT, -1

    def event_count(self, *, chat: bool, include_usage: bool) -> int:
        """How many events ``events`` yields, ``[DONE]`` included."""
        n = len(self.pieces)
        if chat:
            return 1 + n + (self.tool is not None) + 1 + include_usage + 1
        return n + 1 + include_usage + 1

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
        if not isinstance(model, str) or not model:
            raise ValueError("mock backend: 'model' must be a non-empty string")
        try:
            MockOptions(
                ttft_ms=ttft_ms,
                itl_ms=itl_ms,
                slots=slots,
                queue=queue,
                reasoning_field=reasoning_field,
                output_tokens=output_tokens,
                reasoning_tokens=reasoning_tokens,
                warmup_s=warmup_s,
                weight=weight,
                fault=fault,
            )
        except ValidationError as exc:
            raise ValueError(f"mock backend {model!r}: {_first_error(exc)}") from None
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
        """Build from a TOML ``[[backends]]`` table's options (``MockOptions``): the
        constructor's keyword names as keys, ranges as two-integer lists (``output_tokens =
        [24, 64]``), ``fault`` as a string (``"fail_after=5"``) or a table. ``model``, and
        ``kind``/``type`` = "mock", are allowed and checked. Raises ``ValueError`` naming the
        key for an unknown key, a wrong type or a bad value."""
        where = f"mock backend {model!r}"
        options = dict(table)
        if options.pop("model", model) != model:
            raise ValueError(f"{where}: table says model = {table['model']!r}")
        for key in ("kind", "type"):
            if options.pop(key, "mock") != "mock":
                raise ValueError(f"{where}: {key!r} must be 'mock', not {table[key]!r}")
        try:
            parsed = MockOptions.model_validate(options)
        except ValidationError as exc:
            raise ValueError(f"{where}: {_first_error(exc)}") from None
        return cls(model, **dict(parsed))  # field → value, the Fault kept as it is

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

        Raises, on entering and before a slot is taken: ``BackendUnavailable`` for a fault
        ``status`` (with that status) or while warming (503); ``InvalidRequest`` (400, with
        ``param``) for a request that cannot be planned (see ``plan``; any other failure of
        planning becomes one too) or a ``resume`` point at or past the plan's end
        (``param`` "quorum_resume.events"); ``BackendSaturated`` when every slot is busy and
        the queue is full, with ``retry_after`` in seconds. A resumed stream skips the first
        ``resume.events`` events of ``MockPlan.events`` and paces the next token ``ttft_ms``
        after the slot is taken.
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

        Bounded work whatever the request (it runs on the event loop). Raises
        ``InvalidRequest`` (400) naming the field: the schema used (``response_format``, or
        the called tool's ``tools[i].function.parameters``) has no value ``generate_json``
        can produce or is over its limits; a tool name is not valid Unicode (a lone
        surrogate, which no stream could carry). Only the schema the plan uses is examined.
        """
        for i, t in enumerate(request.tools if isinstance(request, ChatRequest) else ()):
            if not _encodable(t.name):
                raise InvalidRequest(
                    f"'tools[{i}].function.name' contains a lone surrogate (an unpaired "
                    "\\ud800-\\udfff escape), which is not valid Unicode; send a valid name.",
                    param=f"tools[{i}].function.name",
                )
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
            index = _tool_to_call(request, rng)
            rf = request.response_format
            if index is not None:
                called = request.tools[index]
                params = dict(called.parameters)
                if not params:
                    params = {"type": "object", "properties": {}, "additionalProperties": False}
                elif "type" not in params and infer_type(params) is None:
                    params["type"] = "object"
                args = _schema_value(params, rng, f"tools[{index}].function.parameters")
                body = _fragments(rng, args)
                tool = ("call_" + digest.hex()[:24], called.name)
                natural = "tool_calls"
            elif rf is not None and rf.type in ("json_object", "json_schema"):
                schema: Mapping[str, Any] = (
                    rf.schema if rf.type == "json_schema" and rf.schema else {"type": "object"}
                )
                if (
                    "type" not in schema
                    and infer_type(schema) is None
                    and not any(
                        k in schema for k in ("$ref", "anyOf", "oneOf", "allOf", "enum", "const")
                    )
                ):
                    schema = {**schema, "type": "object"}
                text = _schema_value(schema, rng, "response_format")
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


def _tool_to_call(request: ChatRequest, rng: random.Random) -> int | None:
    """The index in ``request.tools`` of the tool to call, or None to answer in content."""
    tools = request.tools
    choice = request.tool_choice
    if not tools or choice == "none":
        return None
    if choice == "auto":
        last = request.messages[-1] if request.messages else {}
        if last.get("role") == "tool":
            return None
        return rng.randrange(len(tools))
    if choice == "required":
        return rng.randrange(len(tools))
    for i, tool in enumerate(tools):
        if tool.name == choice:
            return i
    return None


def _schema_value(schema: Mapping[str, Any], rng: random.Random, param: str) -> str:
    """JSON text of a value for ``schema`` (see ``_json_text``); ``InvalidRequest`` naming
    ``param`` when the schema has none the generator can produce."""
    try:
        return _json_text(generate_json(schema, rng))
    except SchemaError as exc:
        raise InvalidRequest(f"'{param}': {exc.message}.", param=param) from None


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- options ---------------------------------------------------------------------------------


def _low_high(minimum: int) -> Callable[[tuple[int, int]], tuple[int, int]]:
    def check(value: tuple[int, int]) -> tuple[int, int]:
        if not minimum <= value[0] <= value[1]:
            raise ValueError(f"expected [low, high] with {minimum} <= low <= high")
        return value

    return check


def _reasoning_field(value: str | None) -> str | None:
    if value is not None and (not value.isidentifier() or value in _STANDARD_DELTA_FIELDS):
        raise ValueError(
            "expected a field name such as 'reasoning_content' or 'reasoning' (not a standard "
            "delta field)"
        )
    return value


def _fault(value: Any) -> Any:
    if isinstance(value, str):
        return Fault.parse(value)  # ValueError names the unknown fault
    if isinstance(value, Mapping):
        unknown = set(value) - {"fail_after", "stall_after", "status"}
        if unknown or not all(_is_int(v) for v in value.values()):
            raise ValueError("a fault table takes integer fail_after, stall_after, status")
        return Fault(**value)
    if value is None or isinstance(value, Fault):
        return value
    raise ValueError("expected a string like 'fail_after=5' or a table")


_Range = tuple[StrictInt, StrictInt]


class MockOptions(BaseModel):
    """The options of a ``kind = "mock"`` backend, typed (see ``MockBackend`` for what each
    means): numbers finite, counts integers, ranges ``[low, high]``, no unknown key. Raises
    ``pydantic.ValidationError``."""

    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, allow_inf_nan=False, arbitrary_types_allowed=True
    )

    ttft_ms: float = Field(default=50.0, ge=0)
    itl_ms: float = Field(default=10.0, ge=0)
    slots: int = Field(default=8, ge=1)
    queue: int = Field(default=64, ge=0)
    reasoning_field: Annotated[str | None, AfterValidator(_reasoning_field)] = None
    output_tokens: Annotated[_Range, Field(strict=False), AfterValidator(_low_high(1))] = (24, 64)
    reasoning_tokens: Annotated[_Range, Field(strict=False), AfterValidator(_low_high(0))] = (
        16,
        48,
    )
    warmup_s: float = Field(default=0.0, ge=0)
    weight: float = Field(default=1.0, gt=0)
    fault: Annotated[Fault | None, BeforeValidator(_fault)] = None


def _first_error(exc: ValidationError) -> str:
    """``'slots': expected a valid integer, got '4'`` for the first error of ``exc``."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r}; the keys are: {', '.join(MockOptions.model_fields)}"
    message = error["msg"].removeprefix("Value error, ")
    if message.startswith("Input should be "):
        message = "expected " + message.removeprefix("Input should be ")
    return f"{key!r}: {message}, got {error.get('input')!r}"


# --- one generation -----------------------------------------------------------------------


class _Session(AbstractAsyncContextManager[AsyncIterator[bytes]]):
    """``MockBackend.open``'s context manager: plans and takes a slot on enter, frees it on
    exit."""

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
        plan = _plan(backend, generation)
        slots = backend._slot_sem
        if slots.value == 0 and slots.statistics().tasks_waiting >= backend.queue:
            raise BackendSaturated(
                f"mock backend {backend.model!r}: all {backend.slots} slots busy and "
                f"{backend.queue} queued",
                retry_after=backend._retry_after(),
            )
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


def _plan(backend: MockBackend, generation: Generation) -> MockPlan:
    """``generation``'s plan, its resume point checked against it. Whatever goes wrong is an
    ``ApiError``: a request that cannot be planned is refused before it takes a slot."""
    request = generation.request
    try:
        plan = backend.plan(request)
    except ApiError:
        raise
    except Exception as exc:  # a bug, but one that request triggered: refuse it, keep serving
        log.exception("mock backend %r could not plan a request", backend.model)
        raise InvalidRequest(
            f"The mock backend could not plan this request ({type(exc).__name__}: {exc})."
        ) from None
    resume = generation.resume
    if resume is not None:
        total = plan.event_count(
            chat=isinstance(request, ChatRequest), include_usage=generation.include_usage
        )
        if resume.events >= total:
            raise InvalidRequest(
                f"'quorum_resume.events' is {resume.events}, but this generation has only "
                f"{total - 1} events before [DONE]; a resume point runs from 0 to {total - 1}.",
                param="quorum_resume.events",
            )
    return plan


_BATCH = 32  # events written together at most


class _Stream(AsyncIterator[bytes]):
    """The events of one generation (``MockPlan.events``), encoded and paced on trio's clock.
    One ``__anext__`` per event, or a batch of those already due."""

    __slots__ = (
        "_chat",
        "_closed",
        "_events",
        "_fail",
        "_fault_at",
        "_field",
        "_itl",
        "_next",
        "_pieces",
        "_plan",
        "_request",
        "_t_first",
        "_text",
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
        self._field = backend.reasoning_field or "reasoning_content"
        self._itl = backend.itl_ms / 1000
        self._closed = False
        # Exactly one of the two encoders is set: chat, or (legacy) text completion.
        self._chat: ChatChunkEncoder | None = None
        self._text: CompletionChunkEncoder | None = None
        if isinstance(request, ChatRequest):
            self._chat = ChatChunkEncoder(generation.stream_id, backend.model, generation.created)
        else:
            self._text = CompletionChunkEncoder(
                generation.stream_id, backend.model, generation.created
            )
        # The fault that strikes first: before the event at position ``_fault_at`` (past the
        # end: never); ``_fail``: it breaks the stream (else it stalls).
        n = len(plan.pieces)
        self._fault_at = n + 1
        self._fail = False
        if fault is not None:
            if fault.fail_after is not None and fault.fail_after < self._fault_at:
                self._fault_at, self._fail = max(0, fault.fail_after), True
            if fault.stall_after is not None and fault.stall_after < self._fault_at:
                self._fault_at, self._fail = max(0, fault.stall_after), False
        events = plan.events(chat=self._chat is not None, include_usage=generation.include_usage)
        skipped = 0  # token pieces the client has already
        if generation.resume is not None:
            # ``_plan`` checked the resume point against the plan's length.
            for kind, _ in itertools.islice(events, generation.resume.events):
                skipped += _TOKEN[kind]
        self._events = events
        self._next: tuple[MockEvent, int] | None = next(events, None)
        # Token i is due at _t_first + i * itl: the first one this stream emits after TTFT.
        self._t_first = t_acquired + backend.ttft_ms / 1000 - skipped * self._itl

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
            parts.append(await self._next_event(checkpoint=False))
        return b"".join(parts)

    def _due(self) -> bool:
        """Whether the next event can be produced without waiting (and is no fault)."""
        event = self._next
        if event is None:
            return False
        kind, position = event
        if position == self._fault_at:
            return False  # the fault strikes in a call of its own
        if _PACED[kind]:
            return self._t_first + position * self._itl <= trio.current_time()
        return kind is not _ROLE

    async def _next_event(self, *, checkpoint: bool = True) -> bytes:
        """One event, sleeping until it is due; ``checkpoint=False`` inside a batch (the
        batch's first event yielded to the scheduler already)."""
        if self._closed:
            raise trio.ClosedResourceError("the generation's context was left")
        event = self._next
        if event is None:
            raise StopAsyncIteration
        kind, position = event
        if position == self._fault_at:
            await self._strike(position)
        if _PACED[kind]:
            deadline = self._t_first + position * self._itl
            if deadline > trio.current_time():
                await trio.sleep_until(deadline)
            elif checkpoint:
                await trio.lowlevel.checkpoint()
        self._next = next(self._events, None)
        return self._encode(kind, position)

    def _encode(self, kind: MockEvent, position: int) -> bytes:
        chat = self._chat
        if chat is None:
            text = self._text
            assert text is not None
            if kind is _TEXT:
                return text.text(self._pieces[position])
            if kind is _FINISH:
                return text.text("", self._plan.finish_reason)
            if kind is _USAGE:
                return text.usage(count_prompt_tokens(self._request), len(self._pieces))
            return DONE
        if kind is _CONTENT:
            return chat.content(self._pieces[position])
        if kind is _REASONING:
            return chat.reasoning(self._field, self._pieces[position])
        if kind is _ARGUMENTS:
            return chat.tool_call_arguments(0, self._pieces[position])
        if kind is _ROLE:
            return chat.role()
        if kind is _TOOL_START:
            assert self._plan.tool is not None
            call_id, name = self._plan.tool
            return chat.tool_call_start(0, call_id, name)
        if kind is _FINISH:
            return chat.finish(self._plan.finish_reason)
        if kind is _USAGE:
            return chat.usage(count_prompt_tokens(self._request), len(self._pieces))
        return DONE

    async def _strike(self, position: int) -> None:
        """The injected fault, at the time token ``position`` was due: break, or stall."""
        await trio.sleep_until(self._t_first + position * self._itl)
        if self._fail:
            self._next = None
            raise BackendBroken(f"mock backend: injected fault, broke after {position} tokens")
        await trio.sleep_forever()
